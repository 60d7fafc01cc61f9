"""Streaming merge execution: one tensor at a time from every model, shards out as they go.

:func:`merge_folders` is the engine-independent loop (a future ``engine merge`` CLI
and benchmarks call it directly); :func:`run_merge` wraps it for a stage
implementation, so that a merge plugin only supplies the per-tensor arithmetic::

    def run(self, context, inputs, params):
        names = [m.name for m in inputs.models]
        weights = resolve_per_model(params.weight, names, "weight")
        return run_merge(context, inputs, params,
                         lambda name, deltas: task_arithmetic_delta(deltas, weights))

Per tensor: read it from the base and each model into one stacked ``[m, ...]`` buffer
in ``compute_dtype`` on the chosen device (task vectors: minus the base, in place),
reject NaN/inf (naming model and tensor), merge, add the base back, cast to the output
dtype, append to the current shard. Peak memory is that buffer plus a few tensors of
one parameter's size, whatever the size of the model. Tensors that are not floating point (integer
buffers) are copied from the reference model unchanged.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import modelio
from engine.api import ModelArtifact, StageInputs
from engine.context import StageContext
from engine.errors import MergeError
from engine.merging.params import MergeParams
from engine.merging.prefetch import prefetched
from engine.merging.preflight import MergePlan, check_merge_inputs
from engine.merging.tensorio import ModelReader, PlannedTensor, ShardedWriter, parse_size
from engine.merging.vocab import tail_rows

__all__ = ["MergeSummary", "TensorMerge", "merge_folders", "run_merge"]

#: ``merge(tensor_name, stacked) -> merged``. ``stacked`` (``[m, ...]``, on the compute
#: device in the compute dtype, the function may modify it) holds the task vectors
#: ``model_i - base`` for a task-vector merge, which returns the merged *delta* (the
#: base is added for it), and the models themselves otherwise.
TensorMerge = Callable[[str, torch.Tensor], torch.Tensor]

@dataclass
class MergeSummary:
    """What a merge wrote, for reports."""

    tensors: int = 0
    parameters: int = 0
    copied: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0


def _check_finite(t: torch.Tensor, model: str, tensor: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MergeError(f"model {model!r} tensor {tensor!r} contains NaN or inf; "
                         "refusing to merge it")


_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """The merge's dtype names (float64 included, which model loading does not offer)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise MergeError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _write_config(plan: MergePlan, out_dir: Path, out_dtype: torch.dtype | None) -> None:
    """config.json from the reference model (dtype updated when the output's changes,
    vocab_size when vocabularies differ), plus tokenizer and generation files (from the
    input with the largest tokenizer when vocabularies differ)."""
    ref = plan.reference
    config = dict(ref.config)
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).removeprefix("torch.")  # transformers >= 4.56 key
        if "torch_dtype" in config:  # written by older transformers
            config["torch_dtype"] = config["dtype"]
    tokenizer_src = ref.path
    if plan.vocab is not None:
        config["vocab_size"] = plan.vocab.out_size
        by_name = {m.name: m for m in [*([plan.base] if plan.base else []), *plan.models]}
        if plan.vocab.tokenizer_from is not None:
            tokenizer_src = by_name[plan.vocab.tokenizer_from].path
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    modelio.copy_tokenizer_files(tokenizer_src, out_dir)


def merge_folders(
    plan: MergePlan,
    merge: TensorMerge,
    out_dir: Path,
    *,
    task_vectors: bool = True,
    compute_dtype: str | torch.dtype = "float32",
    out_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_shard_bytes: int | str = "2GB",
    prefetch_bytes: int = 0,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeSummary:
    """Merge the checked inputs of ``plan`` into ``out_dir``, streaming.

    ``task_vectors`` (needs ``plan.base``): ``merge`` gets task vectors and returns a
    delta. ``out_dtype`` None keeps each tensor's dtype in the reference model.
    ``prefetch_bytes`` > 0 reads the next tensors in a thread while one merges (see
    :mod:`engine.merging.prefetch`). On any error every file this call wrote is
    removed again, so ``out_dir`` never holds a partial model that looks complete.
    """
    if task_vectors and plan.base is None:
        raise MergeError("a task-vector merge needs a base model (recipe key 'base')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cdtype = _resolve_dtype(compute_dtype)
    odtype = _resolve_dtype(out_dtype) if out_dtype is not None else None
    dev = modelio.resolve_device(device) if isinstance(device, str) else device
    ref = plan.reference
    vocab = plan.vocab

    planned = []
    for name, info in ref.tensors.items():
        dtype = info.torch_dtype
        if odtype is not None and dtype.is_floating_point:
            dtype = odtype
        shape = info.shape
        if vocab is not None and name in vocab.tensors:
            shape = (vocab.out_size, *shape[1:])
        planned.append(PlannedTensor(name, dtype, shape))

    before = {p.name for p in out_dir.iterdir()}
    summary = MergeSummary()
    try:
        with ExitStack() as stack:
            inputs = [*([plan.base] if plan.base is not None else []), *plan.models]
            readers = [stack.enter_context(ModelReader(m.path, m.name, m.tensors)) for m in inputs]
            writer = stack.enter_context(ShardedWriter(
                out_dir, planned, max_shard_bytes=parse_size(max_shard_bytes),
                metadata={"merged_by": "lingoforge"}))
            step = _Step(plan, merge, task_vectors, cdtype, dev, summary)
            by_name = {t.name: t for t in planned}

            def size_of(name: str) -> int:
                return sum(m.tensors[name].end - m.tensors[name].start for m in inputs)

            loads = prefetched([t.name for t in planned], lambda n: _load(readers, n), size_of,
                               prefetch_bytes)
            try:
                for name, raws in loads:
                    writer.write(name, step(by_name[name], raws))
                    del raws
                    if on_tensor is not None:
                        on_tensor(name)
            finally:
                loads.close()
            files = writer.close()
        _write_config(plan, out_dir, odtype)
    except BaseException:
        for p in out_dir.iterdir():
            if p.name not in before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
    summary.files = [f.name for f in files]
    summary.bytes = writer.total_bytes
    return summary


def _load(readers: Sequence[ModelReader], name: str) -> list[torch.Tensor]:
    """Tensor ``name`` of every input (base first), each checked for NaN/inf."""
    raws = []
    for r in readers:
        t = r.get(name)
        _check_finite(t, r.label, name)
        raws.append(t)
    return raws


@dataclass
class _Step:
    """Merges one tensor from the raw tensors of every input (base first)."""

    plan: MergePlan
    merge: TensorMerge
    task_vectors: bool
    cdtype: torch.dtype
    dev: torch.device
    summary: MergeSummary

    def __call__(self, target: PlannedTensor, raws: list[torch.Tensor]) -> torch.Tensor:
        """Copy each model's tensor into its row of one stacked buffer (minus the base,
        in place) and drop the raw tensor at once, merge, add the base back, cast."""
        name, plan = target.name, self.plan
        has_base = plan.base is not None
        first = raws[0]
        self.summary.tensors += 1
        self.summary.parameters += first.numel()
        if not first.is_floating_point():
            self.summary.copied.append(name)
            return first
        vocab = plan.vocab if plan.vocab is not None and name in plan.vocab.tensors else None
        rows = vocab.common if vocab is not None else target.shape[0] if target.shape else None
        tails = None
        if vocab is not None:
            labels = [*([plan.base.name] if plan.base else []), *plan.names]  # type: ignore[union-attr]
            tails = tail_rows(vocab, plan.names, dict(zip(labels, raws)), self.cdtype)
        shape = (rows, *target.shape[1:]) if vocab is not None else target.shape

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:rows] if vocab is not None else t

        base_t = cut(first).to(self.dev, self.cdtype) if has_base else None
        del first
        offset = 1 if has_base else 0
        if has_base:
            raws[0] = None  # type: ignore[call-overload]  # base_t holds what is needed
        # ``raws`` is shared with the caller and the read-ahead thread: clearing its
        # entries (not rebinding names) is what actually frees each raw tensor.
        stacked = torch.empty((len(raws) - offset, *shape), dtype=self.cdtype, device=self.dev)
        for i in range(len(raws) - offset):
            stacked[i].copy_(cut(raws[i + offset]))
            raws[i + offset] = None  # type: ignore[call-overload]
            if self.task_vectors:
                stacked[i].sub_(base_t)
        merged = self.merge(name, stacked)
        del stacked
        if tuple(merged.shape) != tuple(shape):
            raise MergeError(f"the merge method returned shape {list(merged.shape)} for tensor "
                             f"{name!r}, expected {list(shape)}")
        if self.task_vectors:
            merged = merged.add_(base_t)
        del base_t
        if tails is not None:
            full = torch.empty(target.shape, dtype=self.cdtype, device=self.dev)
            full[:rows] = merged
            for a, b, t in tails:
                full[a:b] = t
            merged = full
        out = merged.to(target.dtype).cpu()
        if not bool(torch.isfinite(out).all()):
            raise MergeError(f"merged tensor {name!r} is not finite in {target.dtype} (overflow? "
                             f"try a wider out_dtype than {str(target.dtype).removeprefix('torch.')})")
        return out


def run_merge(context: StageContext, inputs: StageInputs, params: MergeParams, merge: TensorMerge,
              *, task_vectors: bool = True, meta: dict[str, Any] | None = None) -> ModelArtifact:
    """Run a merge stage: check inputs, stream the merge into ``context.output_dir``,
    record what happened, return the artifact.

    ``task_vectors`` says what ``merge`` receives (see :data:`TensorMerge`); it needs a
    base. ``meta`` (JSON-serialisable) is stored with the method's facts in the output's
    ``lingoforge.json`` under ``merge``; it is read after the merge, so a plugin may
    fill it while merging (slack-TIES records its keep counts that way).
    """
    if task_vectors and inputs.base is None:
        raise MergeError(f"{context.plugin} merges task vectors and needs a base model "
                         "(recipe key 'base')")
    plan = check_merge_inputs(inputs.base, inputs.models)
    device = modelio.resolve_device(params.device or context.runtime.device)
    context.log(f"merging {', '.join(plan.names)}"
                + (f" onto {plan.base.name}" if plan.base else "") + f" on {device}")
    with context.progress(len(plan.reference.tensors), f"{context.stage_name}: merge") as bar:
        summary = merge_folders(
            plan, merge, context.output_dir, task_vectors=task_vectors,
            compute_dtype=params.compute_dtype,
            out_dtype=params.out_dtype, device=device, max_shard_bytes=params.shard_size,
            prefetch_bytes=params.prefetch_bytes, on_tensor=lambda _name: bar.advance(),
        )
    info = {
        "method": context.plugin,
        "base": plan.base.name if plan.base else None,
        "models": plan.names,
        "params": params.model_dump(mode="json", by_alias=True),
        **(meta or {}),
    }
    if plan.vocab is not None:
        info["vocab"] = plan.vocab.report(plan.names)
        context.note("vocab", info["vocab"])
    modelio.write_meta(context.output_dir, {"merge": info})
    context.set_param_counts(trainable=0, forward=summary.parameters)
    shards = [f for f in summary.files if f.endswith(".safetensors")]
    context.note("merge", {"tensors": summary.tensors, "shards": len(shards),
                           "bytes": summary.bytes, "copied_unmerged": summary.copied[:20]})
    return ModelArtifact(name=context.stage_name, path=context.output_dir, meta={"merge": info})
