"""The ``ties`` merge method (Yadav et al. 2023) with mergekit's arithmetic."""

from __future__ import annotations

from typing import Any

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.merging import (
    Positionwise,
    PositionwiseMerge,
    TiesParams,
    check_static,
    check_weight_sum,
    for_tensor,
    resolve_per_model,
    run_merge,
    ties_combine,
)


class Ties:
    """TIES merging: trim each task vector, elect the sign, average the agreeing deltas."""

    name = "ties"

    class Params(TiesParams):
        """TIES's parameters (mergekit's defaults: ``density`` 1, ``normalize`` on)."""

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        check_static(configs, params)

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        names = [m.name for m in inputs.models]

        def build(p: Ties.Params):
            weights = resolve_per_model(p.weight, names, "weight")
            densities = resolve_per_model(p.density, names, "density")
            check_weight_sum(weights, names, normalize=p.normalize)
            return Positionwise(
                lambda trimmed: ties_combine(trimmed, weights, normalize=p.normalize,
                                             lam=p.lambda_),
                densities=tuple(densities))

        return run_merge(context, inputs, params, PositionwiseMerge(for_tensor(params, build)))


@hookimpl
def register_merge_methods(register):
    register(Ties())
