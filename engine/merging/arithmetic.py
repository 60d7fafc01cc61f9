"""Merge arithmetic as pure functions on tensors.

Every function here works on *one* parameter: the base's tensor and each model's, all
the same shape, dtype and device. Nothing reads files or knows about models, so the
functions are easy to test by hand and to reuse in third-party plugins;
:mod:`engine.merging.execute` streams them over whole models.

Two layers:

* ``*_delta`` functions take the stacked task vectors ``deltas[i] = model_i - base``
  (shape ``[m, ...]``) and return the merged delta. They **consume** ``deltas``
  (trim, drop and weight it in place), because that buffer is the largest thing a
  merge holds: with ``m`` models peak memory is about ``m + 4`` tensors, not ``4m``.
* ``task_arithmetic``, ``ties``, ``dare_ties``, ``slack_ties`` take
  ``(base, tensors)``, never modify them, and return ``base + merged delta``.

Convention (docs/merging.md states it with formulas): mergekit's arithmetic.
``density`` is the kept fraction of each task vector, the TIES sign is elected on the
*weighted* trimmed deltas, ``normalize`` divides by the sum of the weights that agree
with the elected sign, and ``lam`` (the recipe's ``lambda``) scales the merged delta.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from engine.merging.trims import (  # noqa: F401 - re-exported from their old home
    MagnitudeThreshold,
    _magnitude_bits,
    _trim_,
    keep_count,
    magnitude_trim,
)

__all__ = [
    "MagnitudeThreshold", "SlackTiesResult", "dare_ties", "dare_ties_delta", "disjoint_merge", "elect_sign",
    "keep_count", "linear", "magnitude_trim", "random_drop", "seed_for", "slack_ties", "slack_ties_combine",
    "slack_ties_delta", "stack_deltas", "task_arithmetic", "task_arithmetic_delta", "ties", "ties_combine", "ties_delta",
]


# --- building blocks -------------------------------------------------------------------


def _check(m: int, **per_model: Sequence[float]) -> None:
    if m == 0:
        raise ValueError("at least one tensor to merge is needed")
    for field, values in per_model.items():
        if len(values) != m:
            raise ValueError(f"{field}: {len(values)} values for {m} tensors")


def _weights_like(weights: Sequence[float], stacked: Tensor) -> Tensor:
    """Weights as a tensor shaped ``[m, 1, ..., 1]`` so they broadcast over ``stacked``."""
    w = torch.as_tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return w.view(-1, *([1] * (stacked.dim() - 1)))


def stack_deltas(base: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """Task vectors ``tensor_i - base`` stacked on a new first dimension (one buffer)."""
    return torch.stack(list(tensors), dim=0).sub_(base)


def seed_for(seed: int, tensor_name: str, model_index: int) -> int:
    """A stable 63-bit seed per (run seed, tensor, model): drops do not depend on the
    order tensors are visited in, so a streamed merge equals an in-memory one."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _drop_(delta: Tensor, density: float, generator: torch.Generator, rescale: bool) -> Tensor:
    if density >= 1:
        return delta
    if not density > 0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    drop = torch.rand(delta.shape, generator=generator, dtype=torch.float32) >= density
    delta.masked_fill_(drop.to(delta.device), 0)
    return delta.div_(density) if rescale else delta


def random_drop(delta: Tensor, density: float, generator: torch.Generator,
                *, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``density``, then divide by ``density``
    (when ``rescale``) so the expected delta is unchanged.

    The mask is drawn on the CPU from ``generator``, so a seed gives the same mask on
    every device.
    """
    return _drop_(delta.clone(), density, generator, rescale)


def elect_sign(weighted: Tensor, vote_bias: Tensor | None = None) -> Tensor:
    """The TIES sign per position: the sign of the sum of the stacked weighted deltas
    (``+1`` where the sum is exactly zero, as mergekit does).

    ``vote_bias`` (the shape of one delta) is added to the sum before taking the sign;
    slack-TIES uses it to count the protected model's vote more heavily.
    """
    total = weighted.sum(dim=0)
    if vote_bias is not None:
        total.add_(vote_bias)
    return (total >= 0).to(weighted.dtype).mul_(2).sub_(1)  # exactly +1 / -1


def _agreement(weighted: Tensor, sign: Tensor) -> Tensor:
    """``sign(weighted[i]) == sign`` per model, as bools (a zero never agrees)."""
    positive = sign > 0
    agree = torch.empty(weighted.shape, dtype=torch.bool, device=weighted.device)
    for i, w in enumerate(weighted):  # one model at a time: temporaries of one tensor's size
        torch.where(positive, w > 0, w < 0, out=agree[i])
    return agree


def _disjoint_merge_(weighted: Tensor, weights: Sequence[float], agree: Tensor,
                     normalize: bool) -> Tensor:
    """In place on ``weighted``: sum the agreeing entries, divide by agreeing weights."""
    for w, a in zip(weighted, agree):
        w.masked_fill_(~a, 0)
    mixed = weighted.sum(dim=0)
    if normalize:
        divisor = torch.zeros_like(mixed)
        for i, w in enumerate(weights):
            divisor.add_(agree[i], alpha=w)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed


def disjoint_merge(weighted: Tensor, weights: Sequence[float], sign: Tensor,
                   *, normalize: bool) -> tuple[Tensor, Tensor]:
    """Sum the stacked weighted deltas whose sign equals the elected ``sign``.

    With ``normalize`` the sum is divided by the sum of the *agreeing* models' weights
    (1 where no model agrees). Returns the merged delta and the agreement mask
    (``[m, ...]`` bool; a trimmed-away zero never agrees). ``weighted`` is unchanged.
    """
    agree = _agreement(weighted, sign)
    return _disjoint_merge_(weighted.clone(), weights, agree, normalize), agree


def _scale(delta: Tensor, lam: float) -> Tensor:
    return delta.mul_(lam) if lam != 1 else delta


# --- merged deltas (consume their ``deltas`` argument) -----------------------------------


def task_arithmetic_delta(deltas: Tensor, weights: Sequence[float], *, normalize: bool = False,
                          lam: float = 1.0) -> Tensor:
    """``lam * sum_i w_i deltas_i`` (divided by ``sum_i w_i`` with ``normalize``)."""
    _check(len(deltas), weights=weights)
    mixed = deltas.mul_(_weights_like(weights, deltas)).sum(dim=0)
    if normalize:
        mixed.div_(sum(weights))
    return _scale(mixed, lam)


def _elect_sign_bits(weighted: Tensor) -> Tensor:
    """The sign :func:`elect_sign` elects, as an int32 sign-bit mask: 0 where the sum
    of the stacked weighted deltas is ``>= 0`` (+1), the sign bit where it is -1.
    XOR-ing a float32's bits with it multiplies by the sign, exactly (negation only
    flips that bit)."""
    return (weighted.sum(dim=0) >= 0).view(torch.uint8).to(torch.int32).sub_(1).bitwise_and_(-2**31)


def ties_combine(trimmed: Tensor, weights: Sequence[float], *, normalize: bool = True,
                 lam: float = 1.0) -> Tensor:
    """TIES after the trim: weight the stacked trimmed task vectors, elect the sign,
    merge the agreeing ones, scale by ``lam``. Position by position, so it may run on
    any slice of rows (consumes ``trimmed``)."""
    _check(len(trimmed), weights=weights)
    weighted = trimmed if all(w == 1 for w in weights) else trimmed.mul_(
        _weights_like(weights, trimmed))
    if weighted.dtype == torch.float32:
        # float32 (the engine's compute dtype): the sign applied by flipping sign bits,
        # with the same floating-point sums as below, bit for bit, in fewer passes
        flip = _elect_sign_bits(weighted)
        aligned = weighted.view(torch.int32).bitwise_xor_(flip).view(torch.float32)
        mixed = aligned.clamp_(min=0).sum(dim=0)
        mixed.view(torch.int32).bitwise_xor_(flip)
        del flip
        if normalize:
            # sign() of the clamped entries is 1 where a model agrees, else 0 (as a float:
            # cheaper than a bool mask); unit weights: the divisor is the agreeing count
            if all(w == 1 for w in weights):
                mixed.div_(torch.sign(aligned).sum(dim=0).clamp_(min=1))
            else:
                divisor = torch.zeros_like(mixed)
                for i, w in enumerate(weights):
                    divisor.add_(torch.sign(aligned[i]), alpha=w)
                mixed.div_(divisor.masked_fill_(divisor == 0, 1))
        return _scale(mixed, lam)
    sign = elect_sign(weighted)
    # weighted * sign is |weighted| where a model agrees with the elected sign and <= 0
    # elsewhere, so clamping at 0, summing and multiplying by the sign gives the sum of
    # the agreeing entries (the same floating-point sums, negated where sign < 0).
    aligned = weighted.mul_(sign)
    agree = aligned > 0 if normalize else None
    mixed = aligned.clamp_(min=0).sum(dim=0).mul_(sign)
    if agree is not None:
        divisor = torch.zeros_like(mixed)
        for i, w in enumerate(weights):
            divisor.add_(agree[i], alpha=w)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return _scale(mixed, lam)


def ties_delta(deltas: Tensor, weights: Sequence[float], densities: Sequence[float], *,
               normalize: bool = True, lam: float = 1.0) -> Tensor:
    """TIES on stacked task vectors: trim each to its top ``density`` magnitudes, elect
    the sign of the weighted sum, merge the agreeing weighted deltas, scale by ``lam``."""
    _check(len(deltas), weights=weights, densities=densities)
    for d, p in zip(deltas, densities):
        _trim_(d, p)
    return ties_combine(deltas, weights, normalize=normalize, lam=lam)


def dare_ties_delta(deltas: Tensor, weights: Sequence[float], densities: Sequence[float], *,
                    seed: int = 0, tensor_name: str = "", normalize: bool = True,
                    lam: float = 1.0, rescale: bool = True) -> Tensor:
    """DARE-TIES: TIES with a seeded random drop (``1/density`` rescale) in place of
    the magnitude trim; model ``i``'s mask is seeded by ``seed_for(seed, tensor_name, i)``."""
    _check(len(deltas), weights=weights, densities=densities)
    for i, (d, p) in enumerate(zip(deltas, densities)):
        _drop_(d, p, torch.Generator().manual_seed(seed_for(seed, tensor_name, i)), rescale)
    weighted = deltas.mul_(_weights_like(weights, deltas))
    agree = _agreement(weighted, elect_sign(weighted))
    return _scale(_disjoint_merge_(weighted, weights, agree, normalize), lam)


class SlackTiesResult(NamedTuple):
    """A slack-TIES merged delta, and how many of the protected model's important
    positions the plain TIES election and the slack election keep."""

    delta: Tensor
    important: int
    kept_by_ties: int
    kept: int


def slack_ties_combine(trimmed: Tensor, weights: Sequence[float], *, protect: int,
                       slack: float, normalize: bool = True, lam: float = 1.0) -> SlackTiesResult:
    """slack-TIES after the trim (see :func:`slack_ties_delta`). Position by position,
    so it may run on any slice of rows; the counts of slices add up (consumes ``trimmed``)."""
    _check(len(trimmed), weights=weights)
    if not 0 <= protect < len(trimmed):
        raise ValueError(f"protect index {protect} is out of range for {len(trimmed)} models")
    if not 0.0 <= slack <= 1.0:
        raise ValueError(f"slack must be in [0, 1], got {slack}")
    weighted = trimmed.mul_(_weights_like(weights, trimmed))
    u_p = weighted[protect]
    plain = elect_sign(weighted)
    if slack == 0.0:
        sign = plain
    elif slack == 1.0:
        sign = torch.where(u_p != 0, torch.sign(u_p), plain)
    else:
        sign = elect_sign(weighted, u_p * (slack / (1.0 - slack)))
    important = u_p != 0
    kept_by_ties = int((important & (torch.sign(u_p) == plain)).sum())
    agree = _agreement(weighted, sign)
    kept = int((important & agree[protect]).sum())
    mixed = _scale(_disjoint_merge_(weighted, weights, agree, normalize), lam)
    return SlackTiesResult(mixed, int(important.sum()), kept_by_ties, kept)


def slack_ties_delta(deltas: Tensor, weights: Sequence[float], densities: Sequence[float], *,
                     protect: int, slack: float, normalize: bool = True,
                     lam: float = 1.0) -> SlackTiesResult:
    """slack-TIES (this project's reading of TIES-SV) on stacked task vectors.

    With ``u_i = w_i * trim(delta_i, density_i)`` and ``p = protect``, the sign is
    elected on ``sum_i u_i + slack / (1 - slack) * u_p``: the protected model votes with
    weight ``w_p / (1 - slack)``, the disjoint merge uses the ordinary weights. An
    important (trim-surviving) protected delta is therefore kept unless the opposing
    weighted mass exceeds ``|u_p| / (1 - slack)``. ``slack = 0`` is TIES bit for bit;
    ``slack = 1`` lets the protected model set the sign wherever ``u_p != 0``.
    """
    _check(len(deltas), weights=weights, densities=densities)
    if not 0 <= protect < len(deltas):
        raise ValueError(f"protect index {protect} is out of range for {len(deltas)} models")
    for d, p in zip(deltas, densities):
        _trim_(d, p)
    return slack_ties_combine(deltas, weights, protect=protect, slack=slack,
                              normalize=normalize, lam=lam)


# --- whole methods on (base, tensors); inputs are never modified --------------------------


def linear(tensors: Sequence[Tensor] | Tensor, weights: Sequence[float], *,
           normalize: bool = True) -> Tensor:
    """Weighted average of the models themselves (no base): ``sum w_i x_i / sum w_i``,
    or the plain weighted sum without ``normalize``. ``tensors`` may be pre-stacked."""
    stacked = tensors if isinstance(tensors, Tensor) else torch.stack(list(tensors), dim=0)
    _check(len(stacked), weights=weights)
    out = (stacked * _weights_like(weights, stacked)).sum(dim=0)
    return out.div_(sum(weights)) if normalize else out


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], *,
                    normalize: bool = False, lam: float = 1.0) -> Tensor:
    """``base + lam * sum_i w_i (x_i - base)`` (divided by ``sum w_i`` with ``normalize``)."""
    return base + task_arithmetic_delta(stack_deltas(base, tensors), weights,
                                        normalize=normalize, lam=lam)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
         densities: Sequence[float], *, normalize: bool = True, lam: float = 1.0) -> Tensor:
    """TIES: ``base + ties_delta(x_i - base)``."""
    return base + ties_delta(stack_deltas(base, tensors), weights, densities,
                             normalize=normalize, lam=lam)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
              densities: Sequence[float], *, seed: int = 0, tensor_name: str = "",
              normalize: bool = True, lam: float = 1.0, rescale: bool = True) -> Tensor:
    """DARE-TIES: ``base + dare_ties_delta(x_i - base)``."""
    return base + dare_ties_delta(stack_deltas(base, tensors), weights, densities, seed=seed,
                                  tensor_name=tensor_name, normalize=normalize, lam=lam,
                                  rescale=rescale)


def slack_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
               densities: Sequence[float], *, protect: int, slack: float,
               normalize: bool = True, lam: float = 1.0) -> Tensor:
    """slack-TIES: ``base + slack_ties_delta(x_i - base).delta``."""
    return base + slack_ties_delta(stack_deltas(base, tensors), weights, densities,
                                   protect=protect, slack=slack, normalize=normalize,
                                   lam=lam).delta
