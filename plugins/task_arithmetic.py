"""The ``task-arithmetic`` merge method: add the weighted sum of task vectors to the base."""

from __future__ import annotations

from engine.api import hookimpl
from engine.api.merging import MergeMethod, TaskVectorParams, task_arithmetic_delta


class TaskArithmetic(MergeMethod):
    """Task arithmetic: base + lambda * sum_i weight_i * (model_i - base)."""

    name = "task-arithmetic"

    class Params(TaskVectorParams):
        """Task arithmetic's parameters (mergekit's defaults: ``normalize`` off)."""

    def merge(self, deltas, p, tensor):
        return task_arithmetic_delta(deltas, p.weight, normalize=p.normalize, lam=p.lambda_)


@hookimpl
def register_merge_methods(register):
    register(TaskArithmetic())
