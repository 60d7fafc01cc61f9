"""The ``linear`` merge method: a weighted average of the models themselves."""

from __future__ import annotations

from pydantic import Field

from engine.api import hookimpl
from engine.api.merging import MergeMethod, MergeParams, linear


class Linear(MergeMethod):
    """Linear merge: sum_i weight_i * model_i / sum_i weight_i (a model soup)."""

    name = "linear"
    task_vectors = False  # averages the models, not their task vectors

    class Params(MergeParams):
        """Linear's parameters (mergekit's defaults: ``normalize`` on). A ``base``, if the
        recipe gives one, is not averaged in; it only supplies config and tokenizer."""

        normalize: bool = Field(True, description="Divide the weighted sum by the sum of the weights.")

    def merge(self, stacked, p, tensor):
        return linear(stacked, p.weight, normalize=p.normalize)


@hookimpl
def register_merge_methods(register):
    register(Linear())
