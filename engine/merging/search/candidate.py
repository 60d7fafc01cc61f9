"""A search's candidates, merged in memory: no model is written to disk per trial.

:class:`InMemoryMerge` loads the base and each input model once, keeps the base's
tensors and each input's, and turns a set of params into a candidate by writing
``base + merge(task vectors)`` (the task vectors ``model - base`` taken per tensor, as the
streamed merge takes them) into one live model, tensor by tensor, with the very
per-tensor merge the streamed merge uses
(:meth:`~engine.merging.method.MergeMethod.tensor_merge`). A candidate's scores are
therefore the scores of the model the stage writes with the same params.

Memory: the live model, the base's tensors and one copy per input, in the merge's
``compute_dtype``; one stacked tensor ``[m, ...]`` at a time besides.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

import torch

from engine.core.artifacts import ModelArtifact
from engine.core.errors import MergeError
from engine.core.inputs import StageInputs
from engine.merging.gradients import layer_count
from engine.models import modelio
from engine.run.context import StageContext

__all__ = ["InMemoryMerge"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters by name (a tied weight once, under its first name)."""
    return {n: p for n, p in model.named_parameters() if p.is_floating_point()}


class InMemoryMerge:
    """The base, each input model's tensors, and the live candidate model."""

    def __init__(self, context: StageContext, inputs: StageInputs, compute_dtype: str = "float32") -> None:
        t0 = time.perf_counter()
        self.names = [m.name for m in inputs.models]
        if not self.names:
            raise MergeError("a search merges at least one model (recipe key 'models')")
        reference: ModelArtifact = inputs.base if inputs.base is not None else inputs.models[0]
        self.has_base = inputs.base is not None
        self.dtype = _DTYPES[compute_dtype]
        self.model = context.load_model(reference, load_in_8bit=False).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        live = _parameters(self.model)
        self.tensors = list(live)
        self.base = {n: p.detach().to(self.dtype, copy=True) for n, p in live.items()}
        #: each input model's tensors by name, in the compute dtype
        self.inputs: list[dict[str, torch.Tensor]] = []
        for artifact in inputs.models:
            other = context.load_model(artifact, load_in_8bit=False, dtype=self.dtype)
            theirs = _parameters(other)
            theirs_kept: dict[str, torch.Tensor] = {}
            for n in self.tensors:
                t = theirs.get(n)
                if t is None:
                    raise MergeError(f"search: model {artifact.name!r} has no tensor {n!r} (the "
                                     f"{'base' if self.has_base else 'first model'} has it)")
                if t.shape != self.base[n].shape:
                    raise MergeError(
                        f"search: tensor {n!r} of model {artifact.name!r} has shape "
                        f"{list(t.shape)}, the {'base' if self.has_base else 'first model'}'s "
                        f"{list(self.base[n].shape)}; a search merges models of one shape in memory "
                        "(a merge stage without 'search' handles differing vocabularies)")
                theirs_kept[n] = t.detach().to(self.dtype, copy=True).to(self.base[n].device)
            self.inputs.append(theirs_kept)
            del other, theirs
            gc.collect()
        config = modelio.read_config(reference.path)
        self.n_layers = layer_count([config])
        self.load_seconds = time.perf_counter() - t0

    def apply(self, method: Any, params: Any) -> dict[str, Any]:
        """Write the candidate of ``method`` (a :class:`~engine.merging.method.MergeMethod`)
        with ``params`` (its validated ``Params``) into :attr:`model`; returns
        what the method reports (its tally)."""
        if method.task_vectors and not self.has_base:
            raise MergeError(f"merge method {method.name!r} merges task vectors and needs a "
                             "'base'")
        merge, tally = method.tensor_merge(params, self.names, self.n_layers)
        live = _parameters(self.model)
        with torch.no_grad():
            for n in self.tensors:
                stacked = torch.stack([d[n] for d in self.inputs])
                if method.task_vectors:
                    stacked -= self.base[n]  # task vectors, exactly as the streamed merge takes them
                out = merge(n, stacked)
                if method.task_vectors:
                    out = out.to(self.dtype) + self.base[n]
                if not torch.isfinite(out).all():
                    raise MergeError(f"merge method {method.name!r} produced NaN or inf in "
                                     f"tensor {n!r}")
                live[n].copy_(out)
        return dict(tally)

    def memory_bytes(self) -> int:
        """Bytes of the tensors kept: the live model, the base and the inputs."""
        def size(ts: Sequence[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        return (size(list(_parameters(self.model).values())) + size(list(self.base.values()))
                + sum(size(list(d.values())) for d in self.inputs))
