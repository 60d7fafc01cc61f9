"""The ``linear`` merge method: a weighted average of the models themselves."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.merging import (
    MergeParams,
    Positionwise,
    PositionwiseMerge,
    check_static,
    check_weight_sum,
    for_tensor,
    linear,
    resolve_per_model,
    run_merge,
)


class Linear:
    """Linear merge: sum_i weight_i * model_i / sum_i weight_i (a model soup)."""

    name = "linear"

    class Params(MergeParams):
        """Linear's parameters (mergekit's defaults: ``normalize`` on). A ``base``, if the
        recipe gives one, is not averaged in; it only supplies config and tokenizer."""

        normalize: bool = Field(True, description="Divide the weighted sum by the sum of the weights.")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        check_static(configs, params)

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        names = [m.name for m in inputs.models]

        def build(p: Linear.Params):
            weights = resolve_per_model(p.weight, names, "weight")
            check_weight_sum(weights, names, normalize=p.normalize)
            return Positionwise(lambda stacked: linear(stacked, weights, normalize=p.normalize))

        return run_merge(context, inputs, params, PositionwiseMerge(for_tensor(params, build)),
                         task_vectors=False)


@hookimpl
def register_merge_methods(register):
    register(Linear())
