"""Merge arithmetic as pure functions on tensors.

Every function here takes the tensors of *one* parameter (the base's and each
model's, all the same shape and dtype, on the same device) and returns the merged
tensor. Nothing reads files or knows about models, so the functions are easy to test
by hand and to reuse in third-party plugins; :mod:`engine.merging.execute` streams
them over whole models.

Convention (docs/merging.md states it with formulas): mergekit's arithmetic.
``density`` is the kept fraction of each task vector, the TIES sign is elected on
the *weighted* trimmed deltas, ``normalize`` divides by the sum of the weights that
agree with the elected sign, and ``lam`` (the recipe's ``lambda``) scales the merged
delta before it is added to the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SlackTiesResult", "dare_ties", "deltas_from", "disjoint_merge", "elect_sign", "linear",
    "magnitude_trim", "random_drop", "seed_for", "slack_ties", "slack_ties_merge",
    "task_arithmetic", "ties", "ties_merge_deltas",
]


# --- building blocks -------------------------------------------------------------------


def _weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    """Weights as a tensor shaped ``[m, 1, ..., 1]`` so they broadcast over ``stacked``."""
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.view(-1, *([1] * (stacked.dim() - 1)))


def deltas_from(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Task vectors ``tensor_i - base`` stacked on a new first dimension."""
    return torch.stack([t - base for t in tensors], dim=0)


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k`` largest-magnitude entries of ``delta`` and zero the rest.

    ``k = floor(density * numel)`` as mergekit computes it (in floating point), but at
    least 1, so that a small tensor (a norm weight) is never erased entirely where
    mergekit would refuse to merge. ``density >= 1`` returns ``delta`` unchanged.
    Among equal magnitudes the choice of ``torch.topk`` decides.
    """
    if density >= 1:
        return delta
    if density <= 0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = delta.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(delta)


def seed_for(seed: int, tensor_name: str, model_index: int) -> int:
    """A stable 63-bit seed per (run seed, tensor, model): drops do not depend on the
    order tensors are visited in, so a streamed merge equals an in-memory one."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def random_drop(delta: Tensor, density: float, generator: torch.Generator,
                *, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``density``, then divide by ``density``
    (when ``rescale``) so the expected delta is unchanged.

    The mask is drawn on the CPU from ``generator`` so that a seed gives the same mask
    on every device.
    """
    if density >= 1:
        return delta
    if density <= 0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    out = delta * keep.to(delta.device)
    return out / density if rescale else out


def elect_sign(weighted: Tensor, vote_bias: Tensor | None = None) -> Tensor:
    """The TIES sign per position: the sign of the sum of the stacked weighted deltas
    (``+1`` where the sum is exactly zero, as mergekit does).

    ``vote_bias`` (same shape as one delta) is added to the sum before taking the
    sign; slack-TIES uses it to count the protected model's vote more heavily.
    """
    total = weighted.sum(dim=0)
    if vote_bias is not None:
        total = total + vote_bias
    one = torch.ones((), dtype=weighted.dtype, device=weighted.device)
    return torch.where(total >= 0, one, -one)


def disjoint_merge(weighted: Tensor, weights: Sequence[float], sign: Tensor,
                   *, normalize: bool) -> tuple[Tensor, Tensor]:
    """Sum the weighted deltas whose sign equals the elected ``sign``.

    With ``normalize`` the sum is divided by the sum of the *agreeing* models' weights
    (1 where no model agrees). Returns the merged delta and the agreement mask
    (``[m, ...]`` bool; a trimmed-away zero never agrees).
    """
    agree = weighted.sign() == sign
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (_weights_like(weights, weighted) * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        mixed = mixed / divisor
    return mixed, agree


def ties_merge_deltas(deltas: Tensor, weights: Sequence[float], *, normalize: bool,
                      lam: float = 1.0, vote_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Elect-sign and disjoint-merge already trimmed (or dropped) stacked deltas.

    Returns ``(lam * merged delta, agreement mask)``.
    """
    weighted = deltas * _weights_like(weights, deltas)
    sign = elect_sign(weighted, vote_bias)
    mixed, agree = disjoint_merge(weighted, weights, sign, normalize=normalize)
    return (mixed * lam if lam != 1 else mixed), agree


def _check_lengths(tensors: Sequence[Tensor], **per_model: Sequence[float]) -> None:
    if not tensors:
        raise ValueError("at least one tensor to merge is needed")
    for field, values in per_model.items():
        if len(values) != len(tensors):
            raise ValueError(f"{field}: {len(values)} values for {len(tensors)} tensors")


# --- methods ---------------------------------------------------------------------------


def linear(tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True) -> Tensor:
    """Weighted average of the models themselves (no base): ``sum w_i x_i / sum w_i``,
    or the plain weighted sum without ``normalize``."""
    _check_lengths(tensors, weights=weights)
    stacked = torch.stack(list(tensors), dim=0)
    w = _weights_like(weights, stacked)
    out = (stacked * w).sum(dim=0)
    return out / w.sum() if normalize else out


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lam: float = 1.0) -> Tensor:
    """``base + lam * sum_i w_i (x_i - base)`` (divided by ``sum w_i`` with ``normalize``)."""
    _check_lengths(tensors, weights=weights)
    deltas = deltas_from(base, tensors)
    w = _weights_like(weights, deltas)
    mixed = (deltas * w).sum(dim=0)
    if normalize:
        mixed = mixed / w.sum()
    return base + mixed * lam if lam != 1 else base + mixed


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
         densities: Sequence[float], *, normalize: bool = True, lam: float = 1.0) -> Tensor:
    """TIES: trim each delta to its top ``density`` magnitudes, elect the sign of the
    weighted sum, average (or sum) the agreeing weighted deltas, scale by ``lam``."""
    _check_lengths(tensors, weights=weights, densities=densities)
    deltas = deltas_from(base, tensors)
    trimmed = torch.stack([magnitude_trim(d, p) for d, p in zip(deltas, densities)], dim=0)
    mixed, _ = ties_merge_deltas(trimmed, weights, normalize=normalize, lam=lam)
    return base + mixed


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int = 0, tensor_name: str = "",
              normalize: bool = True, lam: float = 1.0, rescale: bool = True) -> Tensor:
    """DARE-TIES: TIES with a seeded random drop (and ``1/density`` rescale) in place
    of the magnitude trim. The mask of model ``i`` is seeded by
    :func:`seed_for(seed, tensor_name, i) <seed_for>`."""
    _check_lengths(tensors, weights=weights, densities=densities)
    deltas = deltas_from(base, tensors)
    dropped = []
    for i, (d, p) in enumerate(zip(deltas, densities)):
        gen = torch.Generator().manual_seed(seed_for(seed, tensor_name, i))
        dropped.append(random_drop(d, p, gen, rescale=rescale))
    mixed, _ = ties_merge_deltas(torch.stack(dropped, dim=0), weights, normalize=normalize, lam=lam)
    return base + mixed


class SlackTiesResult(NamedTuple):
    """A slack-TIES merge and how many of the protected model's important positions
    the plain TIES election and the slack election keep (for reports and tests)."""

    merged: Tensor
    important: int
    kept_by_ties: int
    kept: int


def slack_ties_merge(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                     densities: Sequence[float], *, protect: int, slack: float,
                     normalize: bool = True, lam: float = 1.0) -> SlackTiesResult:
    """slack-TIES (this project's reading of TIES-SV), with keep counts.

    With ``u_i = w_i * trim(x_i - base, density_i)`` and ``p = protect``, the sign is
    elected on ``sum_i u_i + slack / (1 - slack) * u_p``: the protected model votes
    with weight ``w_p / (1 - slack)``; the disjoint merge uses the ordinary weights.
    So an important (kept by the trim) protected delta survives unless the opposing
    weighted mass exceeds ``|u_p| / (1 - slack)``. ``slack = 0`` is TIES bit for bit;
    ``slack = 1`` lets the protected model decide the sign wherever its trimmed delta
    is non-zero.
    """
    _check_lengths(tensors, weights=weights, densities=densities)
    if not 0 <= protect < len(tensors):
        raise ValueError(f"protect index {protect} is out of range for {len(tensors)} models")
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"slack must be in [0, 1], got {slack}")
    deltas = deltas_from(base, tensors)
    trimmed = torch.stack([magnitude_trim(d, p) for d, p in zip(deltas, densities)], dim=0)
    weighted = trimmed * _weights_like(weights, trimmed)
    u_p = weighted[protect]
    plain_sign = elect_sign(weighted)
    if slack == 0.0:
        sign = plain_sign
    elif slack == 1.0:
        sign = torch.where(u_p != 0, torch.sign(u_p), plain_sign)
    else:
        sign = elect_sign(weighted, u_p * (slack / (1.0 - slack)))
    mixed, agree = disjoint_merge(weighted, weights, sign, normalize=normalize)
    if lam != 1:
        mixed = mixed * lam
    important = u_p != 0
    return SlackTiesResult(
        merged=base + mixed,
        important=int(important.sum()),
        kept_by_ties=int((important & (torch.sign(u_p) == plain_sign)).sum()),
        kept=int((important & agree[protect]).sum()),
    )


def slack_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
               densities: Sequence[float], *, protect: int, slack: float,
               normalize: bool = True, lam: float = 1.0) -> Tensor:
    """The merged tensor of :func:`slack_ties_merge`."""
    return slack_ties_merge(base, tensors, weights, densities, protect=protect, slack=slack,
                            normalize=normalize, lam=lam).merged
