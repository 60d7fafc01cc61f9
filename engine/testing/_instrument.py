"""Instruments for the merge conformance checks: tensor layouts, a lowered slice size,
refused whole-model loaders and counted reader bytes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from engine.merging import execute
from engine.models import tensorio

#: whole-model loaders a streaming merge never calls (module, attribute)
WHOLE_LOADERS = (("safetensors.torch", "load_file"), ("safetensors.torch", "load"),
                 ("torch", "load"), ("engine.models.modelio", "load_model"),
                 ("transformers", "AutoModelForCausalLM.from_pretrained"),
                 ("transformers", "PreTrainedModel.from_pretrained"))
SMALL_CHUNK = 100
#: input bytes that may be alive at once, in largest tensors per input: one tensor of each
#: (the tiny model's embedding is a sixth of it, so holding one whole model exceeds this)
READ_BOUND = 1.25

#: the merged models (of the family) and the tensors the override check targets

_MISSING = object()


def _names(names: Any, limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"


def _same_layout(want: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    import torch

    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"tensors missing {_names(missing)}, extra {_names(extra)}"
    for k, v in want.items():
        g = got[k]
        assert tuple(g.shape) == tuple(v.shape), f"tensor {k!r} has shape {list(g.shape)}, base {list(v.shape)}"
        assert g.dtype == v.dtype, f"tensor {k!r} is {g.dtype}, the base's is {v.dtype}"
        if g.is_floating_point():
            assert bool(torch.isfinite(g).all()), f"tensor {k!r} is not finite"


@contextmanager
def _chunk_elements(n: int | None) -> Iterator[None]:
    """Set the size above which the streaming executor merges a tensor in row slices."""
    if n is None or not hasattr(execute, "CHUNK_ELEMENTS"):
        yield
        return
    before = execute.CHUNK_ELEMENTS
    execute.CHUNK_ELEMENTS = n
    try:
        yield
    finally:
        execute.CHUNK_ELEMENTS = before


@contextmanager
def _refuse_whole_loaders(active: bool) -> Iterator[None]:
    """Make every whole-model loader raise while a merge streams."""
    import importlib

    if not active:
        yield
        return
    restore: list[tuple[Any, str, Any]] = []

    def refuse(label: str) -> Any:
        def loader(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"the merge called {label}, which holds a whole model in "
                                 "memory; stream with engine.merging's run_merge")
        return loader

    try:
        for module_name, attr in WHOLE_LOADERS:
            try:
                owner: Any = importlib.import_module(module_name)
                *path, last = attr.split(".")
                for part in path:
                    owner = getattr(owner, part)
            except (ImportError, AttributeError):
                continue
            if not hasattr(owner, last):
                continue
            restore.append((owner, last, owner.__dict__.get(last, _MISSING)
                            if isinstance(owner, type) else getattr(owner, last)))
            setattr(owner, last, refuse(f"{module_name}.{attr}"))
        yield
    finally:
        for owner, last, value in reversed(restore):
            if value is _MISSING:
                delattr(owner, last)
            else:
                setattr(owner, last, value)


def _size(value: Any) -> int:
    return tensorio.parse_size(value)


class _Reads:
    """Bytes of tensors handed out by the model readers and still alive (and the peak)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def track(self, t: Any) -> Any:
        import weakref

        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.live -= n


@contextmanager
def _count_reads() -> Iterator[_Reads]:
    """Count what the engine's model readers hand out while a merge runs."""
    reads = _Reads()
    reader = getattr(tensorio, "ModelReader", None)
    methods = [m for m in ("get", "get_rows") if reader is not None and hasattr(reader, m)]
    originals = {m: getattr(reader, m) for m in methods}

    def wrap(original: Any) -> Any:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            return reads.track(original(self, *args, **kwargs))
        return read

    for m in methods:
        setattr(reader, m, wrap(originals[m]))
    try:
        yield reads
    finally:
        for m, original in originals.items():
            setattr(reader, m, original)
