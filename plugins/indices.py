"""``indices``: select decoder layers by explicit index.

For experiments and for reproducing a published choice. Negative indices count from
the end (``-1`` is the last layer); every index is checked against the model's layer
count, from config.json only.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.api import LayerSelection, PluginParams, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError, TrainingError


class Indices:
    """Select decoder layers by explicit index (negative counts from the end)."""

    name = "indices"

    class Params(PluginParams):
        indices: list[int] = Field(..., min_length=1, description="Decoder layer indices, e.g. [0, -1].")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check: every index exists in the model."""
        for cfg in configs.get("model", []):
            try:
                models.resolve_indices(params.indices, models.num_layers(cfg))
            except TrainingError as exc:
                raise ValueError(f"indices: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> LayerSelection:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: indices needs a 'model' input")
        n = models.num_layers(models.read_config(inputs.model.path))
        indices = models.resolve_indices(params.indices, n)
        context.note("layers", indices)
        return LayerSelection(name=context.stage_name, indices=indices, num_layers=n,
                              explanation=f"layers {params.indices} given explicitly ({n} in the model)")


@hookimpl
def register_layer_selectors(register):
    register(Indices())
