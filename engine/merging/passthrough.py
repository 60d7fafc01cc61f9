"""Layer stacking (``passthrough``): a model built from ranges of layers of one or more
models, streamed tensor by tensor.

A *slice* takes layers ``[start, stop)`` of one model; the output's layers are the
slices' layers in order, renumbered from 0, so the output may have more or fewer layers
than any input (depth up-scaling, layer dropping, ELO-style depth surgery). The tensors
outside the layers come from the base when there is one, else the embeddings from the
first slice's model and the rest (final norm, LM head) from the last slice's, as
mergekit does. ``config.json`` gets the new ``num_hidden_layers`` (and ``layer_types``
rebuilt from the slices when the config has one). Each tensor is read from its source
(in row slices when large) and written to the output's shards at once: nothing is
buffered beyond one slice of one tensor.

Everything that can be known from config.json and the safetensors headers is checked
before a byte of tensor data is read; errors name the slice, the model and the tensor.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.artifacts import ModelArtifact
from engine.core.errors import MergeError
from engine.merging import execute
from engine.merging.inputs import MergeInput
from engine.merging.lora import is_adapter_folder
from engine.merging.preflight import _describe, _load, _same_architecture
from engine.merging.streaming import SLICE_ELEMENTS, _output
from engine.models import modelio
from engine.models.tensorio import ModelReader, PlannedTensor, ShardedWriter, parse_size

__all__ = ["LAYER_COUNT_KEYS", "StackPlan", "plan_layer_stack", "run_layer_stack", "stack_layers"]

#: config.json keys that hold the number of layers (the first one present is updated)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: a layer tensor's name: everything up to the layer list, the index, the rest
_LAYER = re.compile(r"^((?:.*\.)?(?:layers|h|blocks|block)\.)(\d+)\.(.+)$")
#: non-layer tensors taken from the first slice's model (without a base); the others
#: (final norm, LM head) come from the last slice's model
_PRE = re.compile(r"embed|wte|wpe")


@dataclass(frozen=True)
class _Layout:
    """One model's tensors split into layers and the rest."""

    model: MergeInput
    prefix: str
    layers: dict[int, list[tuple[str, str]]]  # index -> [(rest of name, full name)], stored order
    others: list[str]

    @property
    def count(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class StackPlan:
    """What a layer stack writes: ``tensors`` as (output name, source model, source
    tensor name, scale) in output order, the output config and the model whose
    tokenizer files are copied; ``sources`` names each output layer's origin."""

    tensors: list[tuple[str, str, str, float]]
    config: dict[str, Any]
    tokenizer_from: Path
    sources: list[str]


def _layout(m: MergeInput) -> _Layout:
    layers: dict[int, list[tuple[str, str]]] = {}
    others: list[str] = []
    prefixes = set()
    for name in m.tensors:
        hit = _LAYER.match(name)
        if hit is None:
            others.append(name)
            continue
        prefixes.add(hit.group(1))
        layers.setdefault(int(hit.group(2)), []).append((hit.group(3), name))
    if len(prefixes) != 1:
        raise MergeError(f"model {m.name!r}: cannot find its layers (tensors named "
                         f"'<...>.layers.N.<...>'); found prefixes {sorted(prefixes)}")
    count = next((int(m.config[k]) for k in LAYER_COUNT_KEYS if k in m.config), None)
    if sorted(layers) != list(range(len(layers))) or (count is not None and count != len(layers)):
        raise MergeError(f"model {m.name!r}: its tensors hold layers {sorted(layers)[:3]}... "
                         f"({len(layers)} layers) but config.json says {count}")
    return _Layout(m, prefixes.pop(), layers, others)


def _shape_of(lay: _Layout, name: str) -> tuple[tuple[int, ...], str]:
    info = lay.model.tensors[name]
    return info.shape, info.dtype


def plan_layer_stack(base: ModelArtifact | None, models: Sequence[ModelArtifact],
                     slices: Sequence[Mapping[str, Any]]) -> StackPlan:
    """Check the inputs (headers only) and plan the output. Each slice is ``{model,
    start, stop, scale}`` (``scale`` a number or ``[(pattern, factor), ...]``, the first
    pattern searched in the output tensor name wins, 1 when none matches)."""
    if not slices:
        raise MergeError("passthrough needs at least one slice (params.slices)")
    by_name: dict[str, _Layout] = {}
    for art in models:
        if is_adapter_folder(art.path):
            raise MergeError(f"model {art.name!r} ({art.path}) is a LoRA adapter folder; "
                             "passthrough stacks layers of full models only")
        by_name[art.name] = _layout(_load(art))
    base_lay = _layout(_load(base, role="base")) if base is not None else None
    for i, s in enumerate(slices):
        lay = by_name.get(s["model"])
        if lay is None:
            raise MergeError(f"params.slices[{i}]: model {s['model']!r} is not one of this "
                             f"stage's models {sorted(by_name)} (recipe key 'models')")
        if not 0 <= s["start"] < s["stop"] <= lay.count:
            raise MergeError(f"params.slices[{i}]: layers [{s['start']}, {s['stop']}) of model "
                             f"{s['model']!r} are out of range: it has {lay.count} layers "
                             f"(0 to {lay.count - 1}; a slice is [start, stop) with start < stop)")
    unused = sorted(set(by_name) - {s["model"] for s in slices})
    if unused:
        raise MergeError(f"model(s) {unused} are in the stage's models but no slice takes layers "
                         "from them (params.slices); remove them from 'models' or add a slice")
    first, last = by_name[slices[0]["model"]], by_name[slices[-1]["model"]]
    ref = base_lay or first
    _check_compatible(ref, [*by_name.values()], base_lay is not None)
    template = {rest: _shape_of(ref, full) for rest, full in ref.layers[0]}
    tensors: list[tuple[str, str, str, float]] = []
    pre = [n for n in ref.others if _PRE.search(n)]
    post = [n for n in ref.others if not _PRE.search(n)]
    pre_src, post_src = (base_lay, base_lay) if base_lay is not None else (first, last)
    tensors += [(n, pre_src.model.name, n, 1.0) for n in pre]
    sources: list[str] = []
    origins: list[tuple[str, int]] = []
    out_index = 0
    for i, s in enumerate(slices):
        lay = by_name[s["model"]]
        for layer in range(s["start"], s["stop"]):
            got = {rest: _shape_of(lay, full) for rest, full in lay.layers[layer]}
            if got != template:
                diff = sorted(set(got.items()) ^ set(template.items()))[:3]
                raise MergeError(f"params.slices[{i}]: layer {layer} of model {s['model']!r} does "
                                 f"not have the tensors of layer 0 of {ref.model.name!r} (names, "
                                 f"shapes, dtypes differ: {diff})")
            for rest, full in lay.layers[layer]:
                out = f"{ref.prefix}{out_index}.{rest}"
                tensors.append((out, lay.model.name, full, _scale_for(s.get("scale", 1.0), out)))
            sources.append(f"{s['model']}:{layer}")
            origins.append((s["model"], layer))
            out_index += 1
    tensors += [(n, post_src.model.name, n, 1.0) for n in post]
    config = dict(ref.model.config)
    key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
    config[key] = out_index
    if isinstance(config.get("layer_types"), list):  # one entry per layer: follow the slices
        config["layer_types"] = [(by_name[m].model.config.get("layer_types") or [None] * (k + 1))[k]
                                 for m, k in origins]
    return StackPlan(tensors, config, ref.model.path, sources)


def _scale_for(scale: float | Sequence[tuple[str, float]], name: str) -> float:
    if isinstance(scale, int | float):
        return float(scale)
    for pattern, factor in scale:
        if re.search(pattern, name):
            return float(factor)
    return 1.0


def _check_compatible(ref: _Layout, lays: Sequence[_Layout], has_base: bool) -> None:
    for lay in lays:
        if lay is ref:
            continue
        if not _same_architecture(ref.model.config, lay.model.config):
            raise MergeError(f"model {lay.model.name!r} is {_describe(lay.model.config)} but "
                             f"{ref.model.name!r} is {_describe(ref.model.config)}; layers of "
                             "different architectures cannot be stacked")
        if lay.prefix != ref.prefix:
            raise MergeError(f"model {lay.model.name!r} names its layers {lay.prefix!r}, "
                             f"{ref.model.name!r} {ref.prefix!r}")
        mine = {n: _shape_of(ref, n) for n in ref.others}
        theirs = {n: _shape_of(lay, n) for n in lay.others}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise MergeError(f"model {lay.model.name!r} and {ref.model.name!r} differ outside "
                             f"their layers (embeddings, final norm, LM head: {diff}); "
                             "passthrough needs the same vocabulary and hidden size")


def stack_layers(plan: StackPlan, paths: Mapping[str, Path], out_dir: Path, *,
                 out_dtype: torch.dtype | None = None, compute_dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int | str = "2GB",
                 on_tensor: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``plan`` into ``out_dir``: each tensor read from its model folder
    (``paths``: model name -> folder), in row slices above ``CHUNK_ELEMENTS``
    elements, scaled (in ``compute_dtype``) and cast to ``out_dtype`` (floating
    tensors; None keeps each tensor's dtype). On error every file written is removed.
    Returns the summary for the stage notes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunk = execute.CHUNK_ELEMENTS
    before = {p.name for p in out_dir.iterdir()}
    sliced: list[str] = []
    try:
        with ExitStack() as stack:
            readers = {name: stack.enter_context(ModelReader(path, name))
                       for name, path in paths.items()}
            planned = []
            for out, model, src, _ in plan.tensors:
                info = readers[model].infos[src]
                dtype = info.torch_dtype
                if out_dtype is not None and dtype.is_floating_point:
                    dtype = out_dtype
                planned.append(PlannedTensor(out, dtype, info.shape))
            writer = stack.enter_context(ShardedWriter(
                out_dir, planned, max_shard_bytes=parse_size(max_shard_bytes),
                metadata={"merged_by": "lingoforge"}))
            for target, (out, model, src, scale) in zip(planned, plan.tensors):
                reader = readers[model]
                numel = math.prod(target.shape)
                if numel > chunk and len(target.shape) >= 1 and target.shape[0] > 1:
                    per_row = max(1, numel // target.shape[0])
                    span = max(1, min(chunk, SLICE_ELEMENTS) // per_row)
                    for a in range(0, target.shape[0], span):
                        b = min(a + span, target.shape[0])
                        writer.write_rows(out, _copy(reader.get_rows(src, a, b), target, scale,
                                                     compute_dtype, reader.label, src))
                    sliced.append(out)
                else:
                    writer.write(out, _copy(reader.get(src), target, scale, compute_dtype,
                                            reader.label, src))
                if on_tensor is not None:
                    on_tensor(out)
            files = writer.close()
        config = dict(plan.config)
        if out_dtype is not None:
            config["dtype"] = str(out_dtype).removeprefix("torch.")
            if "torch_dtype" in config:
                config["torch_dtype"] = config["dtype"]
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        modelio.copy_tokenizer_files(plan.tokenizer_from, out_dir)
    except BaseException:
        for p in out_dir.iterdir():
            if p.name not in before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
    return {"tensors": len(planned), "shards": len([f for f in files if f.suffix == ".safetensors"]),
            "bytes": writer.total_bytes, "layers": len(plan.sources),
            "merged_in_slices": sliced[:20], "sliced_count": len(sliced), "merged_whole": {},
            "parameters": sum(math.prod(t.shape) for t in planned)}


def _copy(raw: torch.Tensor, target: PlannedTensor, scale: float, compute_dtype: torch.dtype,
          model: str, name: str) -> torch.Tensor:
    if not raw.is_floating_point():
        return raw
    if not bool(torch.isfinite(raw).all()):
        raise MergeError(f"model {model!r} tensor {name!r} contains NaN or inf; refusing to "
                         "copy it")
    if scale != 1.0:
        raw = raw.to(compute_dtype).mul_(scale)
    return _output(raw, target)


def run_layer_stack(context: Any, inputs: Any, params: Any,
                    slices: Sequence[Mapping[str, Any]]) -> ModelArtifact:
    """The stage: plan (headers only), stream the stack into ``context.output_dir`` with a
    progress bar over the output tensors, record the slices in ``lingoforge.json`` and
    the stage notes, return the artifact."""
    plan = plan_layer_stack(inputs.base, inputs.models, slices)
    paths = {m.name: Path(m.path) for m in [*([inputs.base] if inputs.base else []), *inputs.models]}
    context.log(f"stacking {len(plan.sources)} layers from {', '.join(sorted({s['model'] for s in slices}))}")
    odtype = execute._resolve_dtype(params.out_dtype) if params.out_dtype is not None else None
    with context.progress(len(plan.tensors), f"{context.stage_name}: passthrough", unit="tensors") as bar:
        summary = stack_layers(plan, paths, context.output_dir, out_dtype=odtype,
                               compute_dtype=execute._resolve_dtype(params.compute_dtype),
                               max_shard_bytes=params.shard_size,
                               on_tensor=lambda _name: bar.advance())
    parameters = summary.pop("parameters")
    info = {"method": context.plugin, "base": inputs.base.name if inputs.base else None,
            "models": [m.name for m in inputs.models],
            "params": params.model_dump(mode="json", by_alias=True),
            "layers": plan.sources}
    modelio.write_meta(context.output_dir, {"merge": info})
    context.set_param_counts(trainable=0, forward=parameters)
    context.note("merge", {**summary, "copied_unmerged": []})
    return ModelArtifact(name=context.stage_name, path=context.output_dir, meta={"merge": info})
