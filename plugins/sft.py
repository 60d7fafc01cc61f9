"""``sft``: supervised fine-tuning on instruction data.

The response is learned, the prompt only conditions it: prompt tokens are masked out
of the loss, so the model is not trained to produce the questions it will be asked.
"""

from __future__ import annotations

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.batching import require_format, training_batches
from engine.errors import RecipeError
from engine.training import TrainerParams, train, training_dtype


class SFT:
    """Supervised fine-tuning on instructions (prompt masked from the loss)."""

    name = "sft"

    class Params(TrainerParams):
        pass

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: sft needs a 'model' input")
        require_format(inputs.data, "instructions", "sft")
        tokenizer = context.load_tokenizer(inputs.model)
        model = context.load_model(inputs.model, load_in_8bit=False, dtype=training_dtype(context))
        batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                   batch_size=params.micro_batch_size, seed=params.seed)
        result = train(context, model, batches, params)
        meta = {"kind": "sft", "source_model": str(inputs.model.path.resolve())}
        return context.save_model(result.model, tokenizer, meta=meta)


@hookimpl
def register_language_adapters(register):
    register(SFT())
