"""The ``model_stock`` merge method (Jang et al. 2024, "Model Stock", arXiv 2403.19522)
with mergekit 0.1.5's parameter ``filter_wise``.

The fine-tuned models' task vectors are averaged and moved towards the base by a ratio
fixed by the mean angle between them: the more the task vectors agree, the more of
their average is kept. The angle needs the whole tensor (or whole rows with
``filter_wise``), so model_stock merges tensors whole (``positionwise = False``).
docs/merging.md states the formula and where it differs from mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.api import hookimpl
from engine.api.merging import ExecutionParams, MergeMethod

#: norms products below this are clamped to it in the cosine
COS_EPS = 1e-6
#: ``|1 + (N - 1) cos θ|`` below this: no finite ratio, the base is kept
SINGULAR = 1e-6


def model_stock_ratio(deltas: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The interpolation ratio ``t = N cos θ / (1 + (N - 1) cos θ)`` of ``N`` stacked task
    vectors, ``cos θ`` the mean pairwise cosine: one number per tensor, or per row
    (cosines over the last dimension) with ``filter_wise``; 0 where the denominator
    vanishes. Shaped to broadcast against one task vector."""
    n = deltas.shape[0]
    flat = deltas if filter_wise and deltas.dim() > 2 else deltas.reshape(n, 1, -1)
    norms = torch.linalg.vector_norm(flat, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (flat[i] * flat[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=COS_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denom), denom))
    if filter_wise and deltas.dim() > 2:
        return t  # [..., 1]: one ratio per row
    return t.reshape([1] * (deltas.dim() - 1))


class ModelStock(MergeMethod):
    """Model Stock: the average task vector, shrunk towards the base by the models' mean angle."""

    name = "model-stock"
    positionwise = False  # cosines over whole tensors (or rows)
    min_models = 2  # the ratio comes from the angles between their task vectors

    class Params(ExecutionParams):
        """Model Stock's parameters (mergekit's ``filter_wise``, default off). Needs a base
        and at least two models."""

        filter_wise: bool = Field(
            False, description="One ratio per row (cosines over the last dimension) instead of "
                               "one per tensor; 1-D tensors keep one ratio.")

    def merge(self, deltas, p, tensor):
        t = model_stock_ratio(deltas, p.filter_wise)
        return deltas.mean(dim=0).mul_(t)


@hookimpl
def register_merge_methods(register):
    register(ModelStock())
