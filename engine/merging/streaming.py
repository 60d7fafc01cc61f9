"""One tensor's merge: the step types a method hands the engine, and how the engine runs
them on a whole tensor or in row slices.

:mod:`engine.merging.execute` walks the tensors of a model and calls into this module
per tensor: :class:`_Step` merges a whole tensor from the raw tensors of every input,
:func:`_merge_in_slices` merges one large tensor of a position-wise method slice by
slice, with the exact magnitude-band trims of :mod:`engine.merging.trims`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.core.errors import MergeError
from engine.merging.inputs import MergePlan
from engine.merging.trims import BandSelector, MagnitudeBand, _magnitude_bits, band_trim_
from engine.merging.vocab import tail_rows
from engine.models.tensorio import ModelReader, PlannedTensor, ShardedWriter

__all__ = ["SLICE_ELEMENTS", "MergeSummary", "Positionwise", "PositionwiseMerge", "TensorMerge"]

#: ``merge(tensor_name, stacked) -> merged``. ``stacked`` (``[m, ...]``, on the compute
#: device in the compute dtype, the function may modify it) holds the task vectors
#: ``model_i - base`` for a task-vector merge, which returns the merged *delta* (the
#: base is added for it), and the models themselves otherwise.
TensorMerge = Callable[[str, torch.Tensor], torch.Tensor]

#: row slices hold about this many elements per input
SLICE_ELEMENTS = 2**20


@dataclass(frozen=True)
class Positionwise:
    """One tensor's merge step for a position-wise method.

    ``fn(stacked) -> merged`` must compute each output position from the same position
    of the inputs only (TIES's sign election and disjoint merge, task arithmetic, a
    weighted average, a median...); it may consume ``stacked``. ``bands`` (one
    :class:`~engine.merging.trims.MagnitudeBand` or None per model, task-vector merges
    only) asks the engine to trim each task vector to a band of magnitude ranks first,
    exactly as :func:`~engine.merging.trims.magnitude_band` does on the whole tensor;
    ``densities`` is the older spelling of top-``density`` bands (``MagnitudeBand(d)``).
    The one step that looks at the whole tensor is done by the engine, so ``fn`` can
    run on any slice of rows.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    densities: tuple[float, ...] | None = None
    bands: tuple[MagnitudeBand | None, ...] | None = None

    def trims(self) -> tuple[MagnitudeBand | None, ...] | None:
        """The band of each model (``bands``, else one from each of ``densities``)."""
        if self.bands is not None:
            return self.bands
        if self.densities is not None:
            return tuple(MagnitudeBand(d) for d in self.densities)
        return None

    def apply(self, stacked: torch.Tensor, name: str, start: int, stop: int,
              shape: tuple[int, ...]) -> torch.Tensor:
        """Merge rows ``[start, stop)`` of tensor ``name`` of one model's ``shape``
        (``stacked`` holds those rows of every model, already trimmed)."""
        return self.fn(stacked)


class PositionwiseMerge:
    """A merge method made of :class:`Positionwise` steps: ``select(tensor name)`` gives
    each tensor's step (per-tensor overrides choose there, see
    :func:`~engine.merging.overrides.for_tensor`).

    Passed to :func:`~engine.merging.execute.run_merge` in place of a
    :data:`TensorMerge`, it lets the engine merge a large tensor (an embedding, an LM
    head) in row slices, reading each input slice by slice, so peak memory is a few
    slices rather than ``m + 2`` whole tensors. Called as a :data:`TensorMerge` it
    merges a whole tensor at once, with the same result.
    """

    def __init__(self, select: Callable[[str], Positionwise]) -> None:
        self.select = select

    def __call__(self, name: str, stacked: torch.Tensor) -> torch.Tensor:
        step = self.select(name)
        bands = step.trims()
        if bands is not None:
            _trim_whole(stacked, bands)
        shape = tuple(stacked.shape[1:])
        return step.apply(stacked, name, 0, shape[0] if shape else 1, shape)


def _trim_whole(stacked: torch.Tensor, bands: Sequence[MagnitudeBand | None]) -> None:
    """Trim each model's whole task vector to its band, in place, one after the other.
    (Trimming the models side by side on two threads was measured at 150M parameters:
    no faster, and 75 MB more peak RSS; docs/benchmarks.md.)"""
    n = stacked[0].numel()
    for delta, band in zip(stacked, bands):
        if band is not None:
            band_trim_(delta, *band.ranks(n))


@dataclass
class MergeSummary:
    """What a merge wrote, for reports (and for tests that check a merge streamed)."""

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


def _load(readers: Sequence[ModelReader], name: str) -> list[torch.Tensor]:
    """Tensor ``name`` of every input (base first), each checked for NaN/inf."""
    raws = []
    for r in readers:
        t = r.get(name)
        _check_finite(t, r.label, name)
        raws.append(t)
    return raws


def _into(row: torch.Tensor, raw: torch.Tensor, base: torch.Tensor | None) -> None:
    """``row = raw - base`` (``raw`` itself without a base), in ``row``'s dtype and device.
    One pass when ``raw`` is already in that dtype and device (the same subtraction, bit
    for bit, as copying and then subtracting in place); otherwise ``raw`` is cast first,
    then the base subtracted, so the rounding stays that of the compute dtype."""
    if base is not None and raw.dtype == row.dtype and raw.device == row.device:
        torch.sub(raw, base, out=row)
        return
    row.copy_(raw)
    if base is not None:
        row.sub_(base)


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


#: a sliced tensor's magnitude trims count in one pass around a threshold guessed from
#: about this many entries, read as rows spread evenly over the tensor
SAMPLE_ELEMENTS = 2**18


def _sample_rows(rows: int, per_row: int) -> list[tuple[int, int]] | None:
    """Row ranges ``[a, b)`` of about :data:`SAMPLE_ELEMENTS` entries, evenly spread (a
    few rows per read); None for a tensor less than 4 times that (counted as usual)."""
    want = SAMPLE_ELEMENTS // per_row
    if want < 1 or 4 * want > rows:
        return None
    group = min(want, -(-1024 // per_row))  # rows per read: at least 1024 entries
    count = max(1, want // group)
    stride = rows // count
    return [(i * stride, i * stride + group) for i in range(count)]


def _count_bracket(selectors: Sequence[BandSelector | None], bracketed: Sequence[bool],
                   stacked: torch.Tensor) -> None:
    """Feed one slice of each model's task vector to its selector's bracket pass."""
    for sel, used, delta in zip(selectors, bracketed, stacked):
        if used and sel is not None:
            sel.count_bracket(_magnitude_bits(delta))


def _count_slice(selectors: Sequence[BandSelector | None], stacked: torch.Tensor,
                 count_pass: int) -> None:
    """Feed one slice of each model's task vector to its selector's counting pass."""
    for sel, delta in zip(selectors, stacked):
        if sel is not None and not sel.counted:
            bits = _magnitude_bits(delta)
            (sel.count_high if count_pass == 0 else sel.count_low)(bits)


def _trim_slice(selectors: Sequence[BandSelector | None], stacked: torch.Tensor) -> None:
    """Zero, in place, the entries of one slice that each model's band drops."""
    for sel, delta in zip(selectors, stacked):
        if sel is not None:
            delta.masked_fill_(sel.dropped(_magnitude_bits(delta)), 0)


def _merge_in_slices(step: _Step, target: PlannedTensor, readers: Sequence[Any],
                     writer: ShardedWriter, chunk_elements: int) -> None:
    """Merge one large tensor of a :class:`PositionwiseMerge` slice by slice.

    With trims, counting passes over the task vectors' slices find each model's exact
    band of magnitude ranks (:class:`~engine.merging.trims.BandSelector`) before the
    merging pass; inputs are re-read for each pass (from the page cache). For a top-``k``
    trim one pass usually does: rows spread over the tensor give a guess of the
    threshold's bits, and one pass counts around it (:func:`~engine.merging.trims.
    bracket_guess`); where the guess missed, the two passes of the radix select follow.
    The trim is the same either way, bit for bit.
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
            _into(stacked[i], raw, base if step.task_vectors else None)
            del raw
        return base, stacked

    selectors: list[BandSelector | None] = []
    bands = pos.trims() if step.task_vectors else None
    if bands is not None:
        for band in bands:
            start, stop = band.ranks(numel) if band is not None else (0, numel)
            selectors.append(BandSelector(start, stop, step.dev)
                             if start > 0 or stop < numel else None)
    counting = any(s is not None for s in selectors)
    checked = False
    if counting:
        sample = _sample_rows(rows, per_row)
        if sample is not None:
            stacked = torch.cat([read(a, b, check=False)[1] for a, b in sample], dim=1)
            bracketed = [sel is not None and sel.bracket(_magnitude_bits(delta), numel)
                         for sel, delta in zip(selectors, stacked)]
            del stacked
            if any(bracketed):
                for a, b in slices:
                    _, stacked = read(a, b, check=True)
                    _count_bracket(selectors, bracketed, stacked)
                    del stacked
                checked = True
                for sel, used in zip(selectors, bracketed):
                    if used and sel is not None:
                        sel.finish_bracket()  # when the guess missed, counted as below
        if not all(sel is None or sel.counted for sel in selectors):
            for count_pass in (0, 1):
                for a, b in slices:
                    _, stacked = read(a, b, check=count_pass == 0 and not checked)
                    _count_slice(selectors, stacked, count_pass)
                    del stacked
    for a, b in slices:
        base, stacked = read(a, b, check=not counting)
        _trim_slice(selectors, stacked)
        merged = pos.apply(stacked, name, a, b, tuple(target.shape))
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
            _into(stacked[i], cut(raws[i + offset]), base_t if self.task_vectors else None)
            raws[i + offset] = None  # type: ignore[call-overload]
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


