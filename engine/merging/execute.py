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
import math
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import modelio
from engine.artifacts import ModelArtifact
from engine.context import StageContext
from engine.errors import MergeError
from engine.inputs import StageInputs
from engine.merging.arithmetic import MagnitudeThreshold, _magnitude_bits, _trim_, keep_count
from engine.merging.lora import open_reader
from engine.merging.params import MergeParams
from engine.merging.prefetch import prefetched
from engine.merging.preflight import MergePlan, check_merge_inputs
from engine.merging.tensorio import ModelReader, PlannedTensor, ShardedWriter, parse_size
from engine.merging.vocab import tail_rows

__all__ = ["CHUNK_ELEMENTS", "MergeSummary", "Positionwise", "PositionwiseMerge", "TensorMerge",
           "merge_folders", "run_merge"]

#: ``merge(tensor_name, stacked) -> merged``. ``stacked`` (``[m, ...]``, on the compute
#: device in the compute dtype, the function may modify it) holds the task vectors
#: ``model_i - base`` for a task-vector merge, which returns the merged *delta* (the
#: base is added for it), and the models themselves otherwise.
TensorMerge = Callable[[str, torch.Tensor], torch.Tensor]

#: tensors with more elements than this are merged in row slices when the method is
#: position-wise (:class:`PositionwiseMerge`) ...
CHUNK_ELEMENTS = 4 * 2**20
#: ... of about this many elements per input
SLICE_ELEMENTS = 2**20


@dataclass(frozen=True)
class Positionwise:
    """One tensor's merge step for a position-wise method.

    ``fn(stacked) -> merged`` must compute each output position from the same position
    of the inputs only (TIES's sign election and disjoint merge, task arithmetic, a
    weighted average, a median...); it may consume ``stacked``. ``densities`` (one per
    model, task-vector merges only) asks the engine to trim each task vector to its
    top-``density`` magnitudes first, exactly as :func:`~engine.merging.arithmetic.magnitude_trim`
    does on the whole tensor: the one step of the TIES family that looks at the whole
    tensor is done by the engine, so ``fn`` can run on any slice of rows.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    densities: tuple[float, ...] | None = None


class PositionwiseMerge:
    """A merge method made of :class:`Positionwise` steps: ``select(tensor name)`` gives
    each tensor's step (per-tensor overrides choose there, see
    :func:`~engine.merging.overrides.for_tensor`).

    Passed to :func:`run_merge` in place of a :data:`TensorMerge`, it lets the engine
    merge a large tensor (an embedding, an LM head) in row slices, reading each input
    slice by slice, so peak memory is a few slices rather than ``m + 2`` whole tensors.
    Called as a :data:`TensorMerge` it merges a whole tensor at once, with the same
    result.
    """

    def __init__(self, select: Callable[[str], Positionwise]) -> None:
        self.select = select

    def __call__(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        step = self.select(name)
        if step.densities is not None:
            for delta, density in zip(stacked, step.densities):
                _trim_(delta, density)
        return step.fn(stacked)

@dataclass
class MergeSummary:
    """What a merge wrote, for reports."""

    tensors: int = 0
    parameters: int = 0
    copied: list[str] = field(default_factory=list)
    #: tensors merged in row slices (see :class:`PositionwiseMerge`)
    sliced: list[str] = field(default_factory=list)
    #: large tensors (more than ``chunk_elements``) merged whole, and why not in slices
    whole: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bytes: int = 0


_SUMMABLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. A finite sum proves every entry finite (a NaN or inf makes
    the sum NaN or inf), and summing is several times cheaper than ``isfinite``; only a
    sum that is not finite (a NaN/inf, or finite entries overflowing) is looked at entry
    by entry."""
    if t.dtype in _SUMMABLE and bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, model: str, tensor: str) -> None:
    if t.is_floating_point() and not _all_finite(t):
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
    chunk_elements: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeSummary:
    """Merge the checked inputs of ``plan`` into ``out_dir``, streaming.

    ``task_vectors`` (needs ``plan.base``): ``merge`` gets task vectors and returns a
    delta. ``out_dtype`` None keeps each tensor's dtype in the reference model.
    ``prefetch_bytes`` > 0 reads the next tensors in a thread while one merges (see
    :mod:`engine.merging.prefetch`). A :class:`PositionwiseMerge` merges tensors of
    more than ``chunk_elements`` (default :data:`CHUNK_ELEMENTS`) elements in row
    slices of about that size. On any
    error every file this call wrote is removed again, so ``out_dir`` never holds a
    partial model that looks complete.
    """
    if task_vectors and plan.base is None:
        raise MergeError("a task-vector merge needs a base model (recipe key 'base')")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cdtype = _resolve_dtype(compute_dtype)
    chunk = CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
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
            readers = [stack.enter_context(open_reader(m, plan.base)) for m in inputs]
            writer = stack.enter_context(ShardedWriter(
                out_dir, planned, max_shard_bytes=parse_size(max_shard_bytes),
                metadata={"merged_by": "lingoforge"}))
            step = _Step(plan, merge, task_vectors, cdtype, dev, summary)
            by_name = {t.name: t for t in planned}
            sliced = set()
            for t in planned:
                why = _why_whole(t, plan, merge, readers, cdtype, chunk)
                if why is None:
                    sliced.add(t.name)
                elif why:
                    summary.whole[t.name] = why

            def size_of(name: str) -> int:
                if name in sliced:  # read slice by slice by the merging thread
                    return 0
                return sum(m.tensors[name].end - m.tensors[name].start for m in inputs)

            def load(name: str) -> list[torch.Tensor] | None:
                return None if name in sliced else _load(readers, name)

            loads = prefetched([t.name for t in planned], load, size_of, prefetch_bytes)
            try:
                for name, raws in loads:
                    if raws is None:
                        _merge_in_slices(step, by_name[name], readers, writer, chunk)
                    else:
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


def _output(merged: torch.Tensor, target: PlannedTensor) -> torch.Tensor:
    """A merged tensor (or rows of one) cast to its output dtype on the CPU, refused when
    the cast overflows."""
    out = merged.to(target.dtype).cpu()
    if not _all_finite(out):
        raise MergeError(f"merged tensor {target.name!r} is not finite in {target.dtype} (overflow? "
                         f"try a wider out_dtype than {str(target.dtype).removeprefix('torch.')})")
    return out


def _why_whole(target: PlannedTensor, plan: MergePlan, merge: TensorMerge,
               readers: Sequence[Any], cdtype: torch.dtype, chunk_elements: int) -> str | None:
    """None when ``target`` is merged in row slices: a large floating-point tensor with
    more than one row, a position-wise method, readers that read rows, no vocabulary
    tail, and a dtype whose magnitudes the exact trim can rank. Otherwise why not: ``""``
    for a tensor too small (or of one row, or integer) to slice, else a reason worth
    reporting (the tensor is held whole per input)."""
    numel = math.prod(target.shape)
    if not (numel > chunk_elements and len(target.shape) >= 1 and target.shape[0] > 1
            and target.dtype.is_floating_point):
        return ""
    if not isinstance(merge, PositionwiseMerge):
        return "the method is not position-wise"
    if plan.vocab is not None and target.name in plan.vocab.tensors:
        return "vocabulary sizes differ (rows beyond the common vocabulary are merged apart)"
    if cdtype != torch.float32:
        return f"compute_dtype is {str(cdtype).removeprefix('torch.')} (slices need float32)"
    if not all(hasattr(r, "get_rows") for r in readers):
        return "an input cannot be read by rows"
    return None


def _merge_in_slices(step: _Step, target: PlannedTensor, readers: Sequence[Any],
                     writer: ShardedWriter, chunk_elements: int) -> None:
    """Merge one large tensor of a :class:`PositionwiseMerge` slice by slice.

    With trimming, two counting passes over the task vectors' slices find each model's
    exact top-``k`` threshold (:class:`~engine.merging.arithmetic.MagnitudeThreshold`)
    before the merging pass; inputs are re-read for each pass (from the page cache).
    Peak memory: a few slices of ``SLICE_ELEMENTS`` (or ``chunk_elements`` if smaller)
    per input.
    """
    merge = step.merge
    assert isinstance(merge, PositionwiseMerge)
    name, rows = target.name, target.shape[0]
    pos = merge.select(name)
    per_row = max(1, math.prod(target.shape[1:]))
    numel = rows * per_row
    step.summary.tensors += 1
    step.summary.parameters += numel
    step.summary.sliced.append(name)
    span = max(1, min(chunk_elements, SLICE_ELEMENTS) // per_row)
    slices = [(a, min(a + span, rows)) for a in range(0, rows, span)]
    has_base = step.plan.base is not None
    models = readers[1:] if has_base else readers

    def read(a: int, b: int, check: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Base rows (compute dtype) and the stacked model rows (minus the base for a
        task-vector merge)."""
        base = None
        if has_base and step.task_vectors:
            raw = readers[0].get_rows(name, a, b)
            if check:
                _check_finite(raw, readers[0].label, name)
            base = raw.to(step.dev, step.cdtype)
        stacked = torch.empty((len(models), b - a, *target.shape[1:]), dtype=step.cdtype,
                              device=step.dev)
        for i, r in enumerate(models):
            raw = r.get_rows(name, a, b)
            if check:
                _check_finite(raw, r.label, name)
            stacked[i].copy_(raw)
            del raw
            if step.task_vectors:
                stacked[i].sub_(base)
        return base, stacked

    selectors: list[MagnitudeThreshold | None] = []
    if step.task_vectors and pos.densities is not None:
        counts = [keep_count(d, numel) for d in pos.densities]
        selectors = [MagnitudeThreshold(k, step.dev) if k < numel else None for k in counts]
    counting = any(s is not None for s in selectors)
    if counting:
        for count_pass in (0, 1):
            for a, b in slices:
                _, stacked = read(a, b, check=count_pass == 0)
                for sel, delta in zip(selectors, stacked):
                    if sel is not None:
                        bits = _magnitude_bits(delta)
                        (sel.count_high if count_pass == 0 else sel.count_low)(bits)
                del stacked
    for a, b in slices:
        base, stacked = read(a, b, check=not counting)
        for sel, delta in zip(selectors, stacked):
            if sel is not None:
                delta.masked_fill_(sel.dropped(_magnitude_bits(delta)), 0)
        merged = pos.fn(stacked)
        del stacked
        if tuple(merged.shape) != (b - a, *target.shape[1:]):
            raise MergeError(f"the merge method returned shape {list(merged.shape)} for rows "
                             f"{a}:{b} of tensor {name!r}, expected {[b - a, *target.shape[1:]]}")
        if step.task_vectors:
            merged = merged.add_(base)
        writer.write_rows(name, _output(merged, target))


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
        return _output(merged, target)


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
    if summary.whole:
        reasons = sorted(set(summary.whole.values()))
        context.slow_path("merge", "whole tensors", (
            f"{len(summary.whole)} tensor(s) larger than {CHUNK_ELEMENTS} elements merged whole, "
            f"not in row slices ({'; '.join(reasons)}): peak memory holds each of them whole "
            f"per input ({', '.join(list(summary.whole)[:4])}"
            + (", ..." if len(summary.whole) > 4 else "") + ")"))
    context.note("merge", {"tensors": summary.tensors, "shards": len(shards),
                           "bytes": summary.bytes, "copied_unmerged": summary.copied[:20],
                           "merged_in_slices": summary.sliced[:20]})
    return ModelArtifact(name=context.stage_name, path=context.output_dir, meta={"merge": info})
