"""LoRA adapters as merge inputs: a PEFT adapter folder is the delta ``scaling · B·A`` on its base.

Per-language LoRA adapters are cheap to train and to store; writing each one out as a
full model only to merge it again costs a model's disk and I/O per language. A merge
input may therefore be a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``). For every tensor of the merge's base it stands for
the model PEFT's ``merge_and_unload`` would give (the arithmetic, and everything else
about adapter folders, is :mod:`engine.models.adapters`; its names used by the merge are
re-exported here): a LoRA-adapted tensor is ``W + s · B @ A``, a tensor the adapter
holds whole (``modules_to_save``) replaces the base's, every other tensor is the base's
(a zero task vector).

Everything that can be known from ``adapter_config.json`` and the safetensors header
is checked before any tensor data is read (:func:`read_adapter`, :func:`check_adapter`):
the tensor names map onto base tensors, the factors' rank matches the config and
``B @ A`` has the base tensor's shape.

Precision: :class:`LoraReader` returns the adapted tensor as ``base + s · B @ A``
computed in float32 (float64 for a float64 base), whatever the base's dtype, so that
the task vector the merge forms again (``model − base`` in ``compute_dtype``) is the
LoRA delta up to one float32 rounding of the weight -- exactly what a float32 model
written by ``merge_and_unload`` gives, and far better than a bfloat16 one (whose
rounding would swallow most of a small delta).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from engine.core.errors import MergeError
from engine.merging.inputs import MergeInput
from engine.models.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraAdapter,
    LoraDelta,
    LoraSettings,
    _same_folder,
    delta,
    delta_rows,
    is_adapter_folder,
    read_adapter,
    read_settings,
    trained_on,
)
from engine.models.layout import TensorInfo
from engine.models.tensorio import ModelReader

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "LoraDelta", "LoraReader", "LoraSettings",
    "check_adapter", "is_adapter_folder", "open_reader", "read_adapter", "read_settings",
    "trained_on",
]


def check_adapter(adapter: LoraAdapter, label: str, base_label: str, base_path: Path,
                  base_tensors: Mapping[str, TensorInfo]) -> None:
    """Check ``adapter`` (recipe name ``label``) against the merge's base, headers only:
    every tensor it changes exists in the base with the shape of ``B @ A`` (or of the
    replacing tensor) and a floating-point dtype, and the base folder the adapter names
    (:func:`trained_on`), when it exists here, is the merge base's folder."""
    where = f"model {label!r} ({adapter.describe()})"
    named = trained_on(adapter)
    if named is not None and not _same_folder(named[0], base_path):
        raise MergeError(f"{where} was trained on {named[0]} ({named[1]}) but the merge base "
                         f"{base_label!r} is {base_path}; merge it onto the base it was trained on, "
                         f"or, if {base_path} is a copy of that model, edit {named[1]}")
    for target, change in adapter.deltas.items():
        source = change.b.name if change.a is None else f"{change.a.name} / {change.b.name}"
        info = base_tensors.get(target)
        if info is None:
            raise MergeError(f"{where}: LoRA factors {source} change tensor {target!r}, which "
                             f"base {base_label!r} lacks (an adapter of another model?)")
        if change.shape != info.shape:
            raise MergeError(f"{where}: LoRA factors {source} give tensor {target!r} a delta of "
                             f"shape {list(change.shape)} but it has shape {list(info.shape)} in base "
                             f"{base_label!r} (an adapter of another model?)")
        if not info.torch_dtype.is_floating_point:
            raise MergeError(f"{where}: LoRA factors {source} change tensor {target!r}, which is "
                             f"{info.dtype} in base {base_label!r} (not floating point)")
    for target, own in adapter.replaced.items():
        info = base_tensors.get(target)
        if info is None:
            raise MergeError(f"{where}: tensor {own.name!r} would replace tensor {target!r}, which "
                             f"base {base_label!r} lacks")
        if own.shape != info.shape:
            raise MergeError(f"{where}: tensor {own.name!r} has shape {list(own.shape)} but "
                             f"{target!r} has {list(info.shape)} in base {base_label!r}; an adapter "
                             "merges onto its base's shapes and vocabulary (resized embeddings "
                             "cannot be merged)")
        if own.torch_dtype.is_floating_point != info.torch_dtype.is_floating_point:
            raise MergeError(f"{where}: tensor {own.name!r} is {own.dtype} but {target!r} is "
                             f"{info.dtype} in base {base_label!r}")


# --- reading ------------------------------------------------------------------------------


class LoraReader:
    """The adapter's version of every base tensor, one at a time, with :class:`ModelReader`'s
    interface (``get``, ``label``, ``close``, context manager): ``base + s · B @ A`` in
    float32 (float64 for a float64 base) for a tensor with a LoRA delta, the adapter's
    tensor for a replaced one (``modules_to_save``), the base tensor otherwise."""

    def __init__(self, adapter: LoraAdapter, label: str, base: MergeInput) -> None:
        self.adapter = adapter
        self.label = label
        self._base = ModelReader(base.path, base.name, base.tensors)
        self._own = ModelReader(adapter.folder, label, adapter.tensors)

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the adapted model (see the class docstring)."""
        own = self.adapter.replaced.get(name)
        raw = self._own.get(own.name) if own is not None else self._base.get(name)
        lora = self.adapter.deltas.get(name)
        if lora is None:
            return raw
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return raw.to(dtype).add_(delta(lora, self._own.get, dtype))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`get` ``(name)``, reading only those rows of the
        base (the engine merges huge tensors in row slices). The product is formed for
        those rows only, so it may differ from :meth:`get`'s in the last bit (the matrix
        product's summation order depends on its shape); equal slices give equal rows."""
        own = self.adapter.replaced.get(name)
        raw = (self._own.get_rows(own.name, start, stop) if own is not None
               else self._base.get_rows(name, start, stop))
        lora = self.adapter.deltas.get(name)
        if lora is None:
            return raw
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return raw.to(dtype).add_(delta_rows(lora, self._own.get, dtype, start, stop))

    def close(self) -> None:
        self._base.close()
        self._own.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(m: MergeInput, base: MergeInput | None) -> ModelReader | LoraReader:
    """The reader for merge input ``m``: a :class:`LoraReader` on ``base`` for an adapter,
    a :class:`ModelReader` for a model folder."""
    adapter: LoraAdapter | None = getattr(m, "adapter", None)
    if adapter is None:
        return ModelReader(m.path, m.name, m.tensors)
    if base is None:
        raise MergeError(f"model {m.name!r} is a LoRA adapter ({m.path}); merging it needs a base")
    return LoraReader(adapter, m.name, base)
