"""The ``slerp`` merge method: spherical linear interpolation between two models, per
tensor, with mergekit 0.1.5's parameter ``t`` and its fallbacks.

Each tensor of the two models is treated as one flat vector: the angle between them
comes from their normalised dot product, and the result moves along the great circle
from the first model (``t = 0``) to the second (``t = 1``). Nearly parallel or
antiparallel tensors fall back to linear interpolation. The angle needs the whole
tensor, so slerp merges tensors whole (``positionwise = False``). docs/merging.md
states the formula and where it differs from mergekit.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from engine.api import hookimpl
from engine.api.merging import ExecutionParams, MergeMethod, layered_range

#: above this |cos θ| the two tensors count as parallel and are interpolated linearly
DOT_THRESHOLD = 0.9995
#: a norm at or below this counts as zero (the tensor is used unnormalised)
NORM_EPS = 1e-8
#: slerp's ``t``: a number in [0, 1], or a layer gradient of them
Interpolation = layered_range("t", 0, 1, meaning="0 is the first model, 1 the second")


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """``sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`` with ``cos θ`` the cosine of the
    angle between the flattened tensors; linear interpolation when ``|cos θ| >
    DOT_THRESHOLD``. Computed in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = (na if na > NORM_EPS else 1.0), (nb if nb > NORM_EPS else 1.0)
    dot = max(-1.0, min(1.0, float((a / na * (b / nb)).sum())))
    if abs(dot) > DOT_THRESHOLD or a.numel() == 0:
        return a.mul(1 - t).add_(b, alpha=t)
    theta = math.acos(dot)
    s = math.sin(theta)
    return a.mul(math.sin((1 - t) * theta) / s).add_(b, alpha=math.sin(t * theta) / s)


class Slerp(MergeMethod):
    """SLERP: interpolate two models along the great circle between each pair of tensors."""

    name = "slerp"
    task_vectors = False  # interpolates the models themselves
    positionwise = False  # the angle is one number per whole tensor
    min_models = max_models = 2  # t = 0 is the first (mergekit's base_model), t = 1 the second

    class Params(ExecutionParams):
        """SLERP's parameters (mergekit's name ``t``; the first model is mergekit's
        ``base_model``). A ``base``, if the recipe gives one, only supplies config and
        tokenizer."""

        t: Interpolation = Field(
            ..., description="Interpolation factor in [0, 1]: 0 gives the first model, 1 the "
                             "second; per tensor through overrides, and a list of numbers is a "
                             "gradient over the layers (mergekit's: [0, 0.5, 1] runs from the "
                             "first model at layer 0 to the second at the last layer).")

    def merge(self, stacked, p, tensor):
        return slerp(p.t, stacked[0], stacked[1])


@hookimpl
def register_merge_methods(register):
    register(Slerp())
