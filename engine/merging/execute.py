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
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from engine.core.artifacts import ModelArtifact
from engine.core.errors import MergeError
from engine.core.inputs import StageInputs
from engine.merging.inputs import MergePlan
from engine.merging.lora import open_reader
from engine.merging.params import ExecutionParams
from engine.merging.prefetch import prefetched
from engine.merging.preflight import check_merge_inputs
from engine.merging.streaming import (
    SLICE_ELEMENTS,
    MergeSummary,
    Positionwise,
    PositionwiseMerge,
    TensorMerge,
    _load,
    _merge_in_slices,
    _Step,
    _why_whole,
)
from engine.merging.unread import refuse_unread_params
from engine.models import modelio
from engine.models.tensorio import PlannedTensor, ShardedWriter, parse_size
from engine.run.context import StageContext

__all__ = ["CHUNK_ELEMENTS", "SLICE_ELEMENTS", "MergeSummary", "Positionwise", "PositionwiseMerge",
           "TensorMerge", "execute_merge", "merge_folders", "run_merge"]

#: tensors with more elements than this are merged in row slices when the method is
#: position-wise (:class:`PositionwiseMerge`), in slices of about ``SLICE_ELEMENTS``
CHUNK_ELEMENTS = 4 * 2**20


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


def run_merge(context: StageContext, inputs: StageInputs, params: ExecutionParams,
              merge: TensorMerge, *, task_vectors: bool = True,
              meta: dict[str, Any] | None = None) -> ModelArtifact:
    """Run a merge stage with a plugin's own merge function (the API before
    :class:`~engine.merging.method.MergeMethod`; deprecated, still supported).

    ``merge`` is a :data:`TensorMerge` ``(tensor name, stacked) -> merged`` or a
    :class:`PositionwiseMerge`; ``task_vectors`` says what it receives (see
    :data:`TensorMerge`) and needs a base. ``meta`` (JSON-serialisable) is stored with
    the method's facts in the output's ``lingoforge.json`` under ``merge``; it is read
    after the merge, so a plugin may fill it while merging.

    The engine cannot see what such a function does with ``params``, so it watches which
    method params the plugin reads: a param the recipe sets (``weight``, ``lambda``, any
    field of the plugin's ``Params``, or ``overrides``) that the plugin has not read by
    the time its function has merged the first tensor is refused with a
    :class:`MergeError` naming the param and the plugin (the output is removed), rather
    than silently ignored.
    """
    warnings.warn(
        f"plugin {context.plugin!r}: run_merge(context, inputs, params, merge_function) is "
        "deprecated; subclass engine.api.merging.MergeMethod (declare name and Params, write "
        "merge(stacked, p, tensor)) and the engine applies weight, per-model values, "
        "overrides and row slicing for you (docs/merging.md, 'Writing a merge method')",
        DeprecationWarning, stacklevel=2)
    merge = refuse_unread_params(context.plugin, params, merge)
    return execute_merge(context, inputs, params, merge, task_vectors=task_vectors,
                         meta=(lambda: meta or {}))


def execute_merge(context: StageContext, inputs: StageInputs, params: ExecutionParams,
                  merge: TensorMerge, *, task_vectors: bool = True,
                  meta: Callable[[], dict[str, Any]] | None = None) -> ModelArtifact:
    """Check inputs, stream the merge into ``context.output_dir``, record what happened,
    return the artifact. ``meta()`` is called after the merge; what it returns is stored
    under ``merge`` in ``lingoforge.json``. (:meth:`MergeMethod.run` and
    :func:`run_merge` call this.)"""
    if task_vectors and inputs.base is None:
        raise MergeError(f"{context.plugin} merges task vectors and needs a base model "
                         "(recipe key 'base')")
    plan = check_merge_inputs(inputs.base, inputs.models)
    device = modelio.resolve_device(params.device or context.runtime.device)
    context.log(f"merging {', '.join(plan.names)}"
                + (f" onto {plan.base.name}" if plan.base else "") + f" on {device}")
    with context.progress(len(plan.reference.tensors), f"{context.stage_name}: merge", unit="tensors") as bar:
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
        **(meta() if meta is not None else {}),
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
                           "merged_in_slices": summary.sliced[:20],
                           "sliced_count": len(summary.sliced),
                           "merged_whole": dict(list(summary.whole.items())[:20])})
    return ModelArtifact(name=context.stage_name, path=context.output_dir, meta={"merge": info})
