"""``first-last``: select the first k and last m decoder layers.

ELO's observation: the layers next to the embeddings and next to the head carry most
of what is language-specific, so adapting them adapts the model to a new language at a
fraction of the cost. Reads only config.json.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from engine.api import LayerSelection, PluginParams, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError, TrainingError


def first_last_indices(n_layers: int, first: int, last: int) -> list[int]:
    """Indices of the first ``first`` and last ``last`` of ``n_layers`` layers, sorted."""
    for name, k in (("first", first), ("last", last)):
        if k > n_layers:
            raise models.LayerIndexError(f"{name}={k} asks for more layers than the model's {n_layers}")
    return sorted(set(range(first)) | set(range(n_layers - last, n_layers)))


class FirstLast:
    """Select the first k and last m decoder layers (ELO's default: one of each)."""

    name = "first-last"

    class Params(PluginParams):
        first: int = Field(1, ge=0, description="How many layers to take from the bottom (next to the embeddings).")
        last: int = Field(1, ge=0, description="How many layers to take from the top (next to the head).")

        @model_validator(mode="after")
        def _some(self) -> FirstLast.Params:
            if self.first + self.last == 0:
                raise ValueError("first and last are both 0: no layer would be selected")
            return self

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check: the model has enough layers."""
        for cfg in configs.get("model", []):
            try:
                first_last_indices(models.num_layers(cfg), params.first, params.last)
            except TrainingError as exc:
                raise ValueError(f"first-last: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> LayerSelection:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: first-last needs a 'model' input")
        n = models.num_layers(models.read_config(inputs.model.path))
        indices = first_last_indices(n, params.first, params.last)
        explanation = (f"first {params.first} and last {params.last} of {n} decoder layers: the layers "
                       "next to the embeddings and the head, which ELO trains to adapt a language")
        context.note("layers", indices)
        return LayerSelection(name=context.stage_name, indices=indices, num_layers=n, explanation=explanation)


@hookimpl
def register_layer_selectors(register):
    register(FirstLast())
