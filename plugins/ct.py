"""``ct``: continual pretraining of a model on raw text.

The plain way to teach a model a language: next-token prediction on target-language
text, optionally restricted to some decoder layers (from a select-layers stage or the
``layers`` param) while the rest of the model stays frozen and bit-identical.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine import arch
from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.batching import require_format, training_batches
from engine.errors import RecipeError, TrainingError
from engine.training import TrainerParams, train, training_dtype


class CT:
    """Continual pretraining of a model on raw text."""

    name = "ct"

    class Params(TrainerParams):
        layers: list[int] | None = Field(
            None, description="Train only these decoder layers (negative counts from the end); "
            "the rest stay frozen. Alternatively give a select-layers stage as the 'layers' input.")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check before anything runs: the explicit layers exist in the model."""
        if params.layers is None:
            return
        for cfg in configs.get("model", []):
            try:
                arch.check_supported(cfg)
                arch.resolve_indices(params.layers, arch.num_layers(cfg))
            except TrainingError as exc:
                raise ValueError(f"ct params.layers: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: ct needs a 'model' input")
        require_format(inputs.data, "text", "ct")
        tokenizer = context.load_tokenizer(inputs.model)
        model = context.load_model(inputs.model, load_in_8bit=False, dtype=training_dtype(context))
        meta: dict[str, Any] = {"kind": "ct", "source_model": str(inputs.model.path.resolve())}
        if params.layers is not None or inputs.layers is not None:
            chosen = arch.choose_layers(params.layers, inputs.layers, arch.model_num_layers(model))
            indices = arch.train_only_layers(model, chosen)
            meta["trained_layers"] = indices
            context.note("trained_layers", indices)
        batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                   batch_size=params.micro_batch_size, seed=params.seed)
        result = train(context, model, batches, params)
        return context.save_model(result.model, tokenizer, meta=meta)


@hookimpl
def register_language_adapters(register):
    register(CT())
