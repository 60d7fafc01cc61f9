"""The ``dare-ties`` merge method: TIES with DARE's seeded random drop instead of the trim."""

from __future__ import annotations

from pydantic import Field

from engine.api import hookimpl
from engine.api.merging import MergeMethod, TiesParams, dare_ties_delta


class DareTies(MergeMethod):
    """DARE-TIES: randomly drop task-vector entries (rescaled), elect sign, disjoint merge."""

    name = "dare-ties"
    positionwise = False  # the random masks are drawn over the whole tensor

    class Params(TiesParams):
        """DARE-TIES's parameters (mergekit's defaults: ``density`` 1, ``normalize`` and
        ``rescale`` on)."""

        rescale: bool = Field(True, description="Divide kept entries by density, so that the "
                                                "expected task vector is unchanged.")
        seed: int = Field(0, description="Seed of the random drop; each (tensor, model) pair "
                                         "derives its own stream from it.")

    def merge(self, deltas, p, tensor):
        return dare_ties_delta(deltas, p.weight, p.density, seed=p.seed, tensor_name=tensor.name,
                               normalize=p.normalize, lam=p.lambda_, rescale=p.rescale)


@hookimpl
def register_merge_methods(register):
    register(DareTies())
