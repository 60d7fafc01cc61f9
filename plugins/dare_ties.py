"""The ``dare-ties`` merge method: TIES with DARE's seeded random drop instead of the trim."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.merging import (
    TiesParams,
    check_static,
    check_weight_sum,
    dare_ties_delta,
    per_tensor,
    resolve_per_model,
    run_merge,
)


class DareTies:
    """DARE-TIES: randomly drop task-vector entries (rescaled), elect sign, disjoint merge."""

    name = "dare-ties"

    class Params(TiesParams):
        """DARE-TIES's parameters (mergekit's defaults: ``density`` 1, ``normalize`` and
        ``rescale`` on)."""

        rescale: bool = Field(True, description="Divide kept entries by density, so that the "
                                                "expected task vector is unchanged.")
        seed: int = Field(0, description="Seed of the random drop; each (tensor, model) pair "
                                         "derives its own stream from it.")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        check_static(configs, params)

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        names = [m.name for m in inputs.models]

        def build(p: DareTies.Params):
            weights = resolve_per_model(p.weight, names, "weight")
            densities = resolve_per_model(p.density, names, "density")
            check_weight_sum(weights, names, normalize=p.normalize)
            return lambda name, deltas: dare_ties_delta(
                deltas, weights, densities, seed=p.seed, tensor_name=name,
                normalize=p.normalize, lam=p.lambda_, rescale=p.rescale)

        return run_merge(context, inputs, params, per_tensor(params, build))


@hookimpl
def register_merge_methods(register):
    register(DareTies())
