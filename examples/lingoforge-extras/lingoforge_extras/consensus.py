"""``consensus``: task arithmetic where the models agree on the sign.

Per position, the weighted vote of the task vectors' signs decides whether the merge
changes it at all: only where the models on the side of the weighted sum hold at least
``quorum`` of the total weight is the weighted sum of task vectors (times ``lambda``)
added to the base; elsewhere the base value is kept. With ``quorum: 0`` it is plain task
arithmetic; with ``quorum: 1`` only unanimous positions move.
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.api.merging import MergeMethod, TaskVectorParams


class Consensus(MergeMethod):
    """Task arithmetic on the positions where at least `quorum` of the weight agrees on the sign."""

    name = "consensus"

    class Params(TaskVectorParams):
        quorum: float = Field(
            0.5, ge=0, le=1,
            description="Share of the total weight that must agree with the sign of the "
                        "weighted sum at a position for it to be merged; 0: every position.")

    def merge(self, deltas: torch.Tensor, p, tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (deltas.dim() - 1)
        w = torch.as_tensor(p.weight, dtype=deltas.dtype, device=deltas.device).view(shape)
        total = (w * deltas).sum(dim=0)
        agree = ((torch.sign(deltas) == torch.sign(total)) * w.abs()).sum(dim=0)
        keep = agree >= p.quorum * w.abs().sum()
        if p.normalize:
            total = total / w.sum()
        return torch.where(keep, p.lambda_ * total, torch.zeros_like(total))
