"""The ``ties`` merge method (Yadav et al. 2023) with mergekit's arithmetic."""

from __future__ import annotations

from engine.api import hookimpl
from engine.api.merging import MagnitudeBand, MergeMethod, TiesParams, ties_combine


class Ties(MergeMethod):
    """TIES merging: trim each task vector, elect the sign, average the agreeing deltas."""

    name = "ties"

    class Params(TiesParams):
        """TIES's parameters (mergekit's defaults: ``density`` 1, ``normalize`` on)."""

    def bands(self, p):
        return [MagnitudeBand(d) for d in p.density]  # top-density; the engine trims

    def merge(self, trimmed, p, tensor):
        return ties_combine(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


@hookimpl
def register_merge_methods(register):
    register(Ties())
