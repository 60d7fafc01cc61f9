"""A complete third-party merge plugin: the element-wise median of task vectors.

Ship it in a distribution with this in its pyproject.toml::

    [project.entry-points."engine.plugins"]
    median = "lingoforge_median"

and ``engine plugins`` lists it; recipes use ``plugin: median``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.merging import MergeParams, run_merge


class MedianMerge:
    """Element-wise median of the task vectors, scaled by lambda."""

    name = "median"

    class Params(MergeParams):
        lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged task vector.")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        def merge(tensor_name: str, deltas: torch.Tensor) -> torch.Tensor:
            # deltas: [models, ...] task vectors (model - base) in the compute dtype
            return params.lambda_ * deltas.median(dim=0).values

        return run_merge(context, inputs, params, merge)


@hookimpl
def register_merge_methods(register):
    register(MedianMerge())
