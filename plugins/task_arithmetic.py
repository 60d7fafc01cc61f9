"""The ``task-arithmetic`` merge method: add the weighted sum of task vectors to the base."""

from __future__ import annotations

from typing import Any

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.api.merging import (
    Positionwise,
    PositionwiseMerge,
    TaskVectorParams,
    check_static,
    check_weight_sum,
    for_tensor,
    resolve_per_model,
    run_merge,
    task_arithmetic_delta,
)


class TaskArithmetic:
    """Task arithmetic: base + lambda * sum_i weight_i * (model_i - base)."""

    name = "task-arithmetic"

    class Params(TaskVectorParams):
        """Task arithmetic's parameters (mergekit's defaults: ``normalize`` off)."""

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        check_static(configs, params)

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        names = [m.name for m in inputs.models]

        def build(p: TaskArithmetic.Params):
            weights = resolve_per_model(p.weight, names, "weight")
            check_weight_sum(weights, names, normalize=p.normalize)
            return Positionwise(lambda deltas: task_arithmetic_delta(
                deltas, weights, normalize=p.normalize, lam=p.lambda_))

        return run_merge(context, inputs, params, PositionwiseMerge(for_tensor(params, build)))


@hookimpl
def register_merge_methods(register):
    register(TaskArithmetic())
