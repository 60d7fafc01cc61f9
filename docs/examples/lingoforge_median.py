"""A complete third-party merge plugin: the element-wise (weighted) median of task vectors.

Ship it in a distribution with this in its pyproject.toml::

    [project.entry-points."engine.plugins"]
    median = "lingoforge_median"

and ``engine plugins`` lists it; recipes use ``plugin: median``.

The plugin declares its name and params and writes the arithmetic on one tensor; the
engine resolves ``weight`` (one number or ``{model: weight}``) into one weight per model,
applies per-tensor ``overrides``, streams large tensors in row slices (the median is
position-wise) and refuses at ``engine validate`` any declared param the arithmetic
never reads.
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.api import hookimpl
from engine.api.errors import MergeError
from engine.api.merging import MergeMethod, MergeParams


def weighted_median(values: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Per position, the smallest of ``values[i]`` at which the weights of the values up
    to it reach half the total weight. With equal weights this is ``values.median(dim=0)``
    (the lower of the two middle values for an even count)."""
    w = torch.as_tensor(weights, dtype=values.dtype, device=values.device)
    ordered, order = values.sort(dim=0)
    reached = w[order].cumsum(dim=0)
    below = (reached < w.sum() / 2).sum(dim=0, keepdim=True)  # values before the median
    return ordered.gather(0, below).squeeze(0)


class MedianMerge(MergeMethod):
    """Element-wise weighted median of the task vectors, scaled by lambda."""

    name = "median"

    class Params(MergeParams):
        lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged task vector.")

    def check_params(self, p):
        if any(w < 0 for w in p.peek("weight")) or not sum(p.peek("weight")) > 0:
            raise MergeError(f"params.weight must be >= 0 with a positive sum for a weighted "
                             f"median, got {dict(zip(p.names, p.peek('weight')))}")

    def merge(self, deltas, p, tensor):
        # deltas: [models, rows, ...] task vectors (model - base), or rows of them
        return p.lambda_ * weighted_median(deltas, p.weight)


@hookimpl
def register_merge_methods(register):
    register(MedianMerge())
