"""The ``breadcrumbs`` and ``breadcrumbs-ties`` merge methods (Model Breadcrumbs, Davari &
Belilovsky 2023, arXiv 2312.06795) with mergekit 0.1.5's parameters.

Each task vector keeps a band of its magnitudes: the largest ``gamma`` fraction (the
outliers) and the smallest ones are dropped, ``density`` of the entries are kept.
``breadcrumbs`` adds the weighted trimmed task vectors (task arithmetic),
``breadcrumbs-ties`` merges them as TIES does (sign election, disjoint merge). The
engine trims exactly, whole or in row slices, so both stream. docs/merging.md states the
formulas and where they differ from mergekit.
"""

from __future__ import annotations

from pydantic import Field

from engine.api import hookimpl
from engine.api.merging import (
    MagnitudeBand,
    MergeMethod,
    PerModelDensity,
    TaskVectorParams,
    per_model_range,
    task_arithmetic_delta,
    ties_combine,
)

#: the fraction of largest magnitudes removed, in [0, 1]
PerModelGamma = per_model_range("gamma", 0, 1, meaning="the fraction of largest magnitudes removed")


class BreadcrumbsParams(TaskVectorParams):
    """Model Breadcrumbs's parameters (mergekit 0.1.5's names and defaults)."""

    density: PerModelDensity = Field(
        1.0, description="Fraction of each task vector kept, per tensor, in (0, 1]: one number "
                         "or {model name: density}; 1 keeps everything (gamma is then not "
                         "applied, as in mergekit).")
    gamma: PerModelGamma = Field(
        0.01, description="Fraction of the largest magnitudes of each task vector removed as "
                          "outliers, in [0, 1]: one number or {model name: gamma} (models not "
                          "named get 0.01); fewer are removed when density leaves no room.")
    normalize: bool = Field(
        False, description="Divide the merged delta by the sum of the weights (breadcrumbs) or "
                           "of the agreeing weights (breadcrumbs-ties); mergekit's default: off.")


class Breadcrumbs(MergeMethod):
    """Model Breadcrumbs: drop each task vector's outliers and small entries, add them up."""

    name = "breadcrumbs"

    class Params(BreadcrumbsParams):
        """Breadcrumbs's parameters (mergekit's defaults: density 1, gamma 0.01, normalize off)."""

    def bands(self, p):
        return [MagnitudeBand(d, g) for d, g in zip(p.density, p.gamma)]

    def merge(self, trimmed, p, tensor):
        return task_arithmetic_delta(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs with TIES: the breadcrumbs trim, then sign election and disjoint merge."""

    name = "breadcrumbs-ties"

    class Params(BreadcrumbsParams):
        """Breadcrumbs-TIES's parameters (mergekit's defaults: density 1, gamma 0.01,
        normalize off)."""

    def merge(self, trimmed, p, tensor):
        return ties_combine(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


@hookimpl
def register_merge_methods(register):
    register(Breadcrumbs())
    register(BreadcrumbsTies())
