"""``sft``: supervised fine-tuning on instruction data.

The response is learned, the prompt only conditions it: prompt tokens are masked out
of the loss, so the model is not trained to produce the questions it will be asked.
Every record is checked before the model is loaded: a prompt that leaves no room for
a response token in ``seq_len`` stops the stage with its file and line.

With ``lora`` set, low-rank adapters (peft) train instead of the weights, and the
result is saved merged (an ordinary model folder) or as a PEFT adapter folder.
"""

from __future__ import annotations

from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.errors import RecipeError
from engine.api.training import (
    LoraParams,
    TrainerParams,
    apply_lora,
    require_format,
    save_lora_result,
    train,
    training_batches,
    training_dtype,
)


class SFT:
    """Supervised fine-tuning on instructions (prompt masked from the loss)."""

    name = "sft"
    data_formats = ("instructions",)

    class Params(TrainerParams):
        lora: LoraParams | None = Field(
            None, description="Train LoRA adapters (peft) instead of the weights: "
            "{r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, ..., down_proj] or 'all-linear', "
            "use_rslora: false, save: merged|adapter, quantize: none|4bit|8bit (QLoRA: the frozen base "
            "held in 4 or 8 bits, needs lingoforge[8bit]), quant_type: nf4|fp4, double_quant: true}. "
            "Needs lingoforge[lora].")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: sft needs a 'model' input")
        require_format(inputs.data, "instructions", "sft")
        source = inputs.model.path.resolve()
        tokenizer = context.load_tokenizer(source)
        # checks every record's prompt length up front, before the (slow) model load
        batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                   batch_size=params.micro_batch_size, seed=params.seed, packing=params.packing,
                                   eval_fraction=params.eval_fraction)
        model = context.load_model(source, load_in_8bit=False, dtype=training_dtype(context),
                                   quantize=params.lora.base_quantization if params.lora else None)
        if params.lora is not None:
            model = apply_lora(model, params.lora, seed=params.seed)
        result = train(context, model, batches, params)
        meta = {"kind": "sft", "source_model": str(source)}
        if params.lora is not None:
            return save_lora_result(context, result.model, tokenizer, params.lora, base=source, meta=meta)
        return context.save_model(result.model, tokenizer, meta=meta)


@hookimpl
def register_language_adapters(register):
    register(SFT())
