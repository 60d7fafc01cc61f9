"""The ``della`` and ``della-linear`` merge methods (DELLA-Merging, Deep et al. 2024,
arXiv 2406.11617) with mergekit 0.1.5's parameters.

MagPrune drops task-vector entries at random like DARE, but with a keep probability
that grows with the entry's magnitude rank within its row: from ``density - epsilon``
for the smallest to ``density + epsilon`` for the largest. The kept entries are rescaled
so the task vector keeps its L1 norm (mergekit's rescale). ``della`` then merges as TIES
does (sign election, disjoint merge), ``della-linear`` adds the weighted task vectors.
Masks are drawn over whole tensors from a seeded generator per (tensor, model), so both
merge tensors whole (``positionwise = False``). docs/merging.md states the formulas and
where they differ from mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.api import hookimpl
from engine.api.errors import MergeError
from engine.api.merging import (
    MergeMethod,
    PerModelDensity,
    TaskVectorParams,
    per_model_range,
    seed_for,
    task_arithmetic_delta,
    ties_combine,
)

#: L1 norms below this are not rescaled (nothing meaningful to match)
RESCALE_EPS = 1e-7


def magprune_(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
              *, rescale: bool = True) -> torch.Tensor:
    """MagPrune ``delta`` in place: rank ``|delta|`` along dimension 1 (a 1-D tensor as one
    row; equal magnitudes rank by index), keep each entry with probability ``density -
    epsilon + 2 epsilon · rank / (n - 1)`` (``density`` for a row of one), then, with
    ``rescale``, multiply by ``Σ|delta| / Σ|kept|``. ``density >= 1`` keeps everything.
    The uniform draws come from ``generator`` on the CPU."""
    if density >= 1:
        return delta
    work = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    n = work.shape[1]
    order = torch.argsort(work.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, _arange_like(order, n))
    rank_norm = ranks.to(work.dtype) / (n - 1) if n > 1 else torch.full_like(work, 0.5)
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    draws = torch.rand(work.shape, generator=generator, dtype=torch.float32).to(work.device)
    before = float(work.abs().sum()) if rescale else 0.0
    work.masked_fill_(draws >= probs, 0)
    if rescale:
        after = float(work.abs().sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            work.mul_(before / after)
    return delta


def _arange_like(order: torch.Tensor, n: int) -> torch.Tensor:
    """0..n-1 along dimension 1 of ``order``'s shape (tensors of more than 2 dimensions)."""
    shape = [1] * order.dim()
    shape[1] = n
    return torch.arange(n, device=order.device).reshape(shape).expand_as(order).contiguous()


#: half the spread of the keep probabilities, in [0, 0.5)
PerModelEpsilon = per_model_range("epsilon", 0, 0.5, high_open=True,
                                  meaning="half the spread of keep probabilities")


class DellaParams(TaskVectorParams):
    """DELLA's parameters (mergekit 0.1.5's names and defaults)."""

    density: PerModelDensity = Field(
        1.0, description="Mean keep probability of each task vector's entries, in (0, 1]: one "
                         "number or {model name: density}; 1 keeps everything.")
    epsilon: PerModelEpsilon = Field(
        0.15, description="Spread of the keep probabilities: from density - epsilon (smallest "
                          "magnitude in a row) to density + epsilon (largest); one number or "
                          "{model name: epsilon} (models not named get 0.15).")
    rescale: bool = Field(True, description="Rescale the kept entries so that each task vector "
                                            "keeps its L1 norm (mergekit's rescale).")
    seed: int = Field(0, description="Seed of the random drop; each (tensor, model) pair derives "
                                     "its own stream from it.")


class Della(MergeMethod):
    """DELLA: magnitude-ranked random drop (MagPrune), then TIES's sign election and merge."""

    name = "della"
    positionwise = False  # the masks are drawn and rescaled over whole tensors

    class Params(DellaParams):
        """DELLA's parameters (mergekit's defaults: density 1, epsilon 0.15, rescale and
        normalize on)."""

        normalize: bool = Field(
            True, description="Divide each position's merged delta by the sum of the weights of "
                              "the models that agree with the elected sign (mergekit's default).")

    def check_params(self, p):
        for name, d, e in zip(p.names, p.peek("density"), p.peek("epsilon")):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise MergeError(
                    f"params.density {d:g} and params.epsilon {e:g} for model {name!r}: the keep "
                    f"probabilities run from density - epsilon to density + epsilon, which must "
                    f"lie inside (0, 1) (here {d - e:g} to {d + e:g}); lower epsilon")

    def prune(self, deltas, p, tensor):
        for i, (delta, d, e) in enumerate(zip(deltas, p.density, p.epsilon)):
            generator = torch.Generator().manual_seed(seed_for(p.seed, tensor.name, i))
            magprune_(delta, d, e, generator, rescale=p.rescale)
        return deltas

    def merge(self, deltas, p, tensor):
        trimmed = self.prune(deltas, p, tensor)
        return ties_combine(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


class DellaLinear(Della):
    """DELLA without TIES: magnitude-ranked random drop, then the weighted sum of task vectors."""

    name = "della-linear"

    class Params(DellaParams):
        """Linear DELLA's parameters (mergekit's defaults: density 1, epsilon 0.15, rescale
        on, normalize off)."""

    def merge(self, deltas, p, tensor):
        trimmed = self.prune(deltas, p, tensor)
        return task_arithmetic_delta(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


@hookimpl
def register_merge_methods(register):
    register(Della())
    register(DellaLinear())
