"""Which method params a plugin read: the check behind refusing a recipe value that a
plugin written before :class:`~engine.merging.method.MergeMethod` never looked at.

Validation starts tracking a params object (:func:`start_tracking`);
:class:`~engine.merging.params.ExecutionParams` records every attribute read of a method
param (:func:`note_read`); the params an override produces count as reads of the params
they came from. :mod:`engine.merging.unread` asks :func:`fields_read` after the merge.
A module of its own so that params and their overrides (:mod:`engine.merging.overrides`)
both record reads without importing each other.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["RUN_FIELDS", "fields_read", "is_tracked", "note_read", "peek", "start_tracking",
           "tracked_fields"]

#: id(params) -> the field names read on it or on the params its overrides produce
_READS: dict[int, set[str]] = {}
#: id(params an override produced) -> id(the params it came from)
_ROOT: dict[int, int] = {}
_TRACKED: dict[type, frozenset[str]] = {}
#: params that say how the merge runs; the engine honours them itself
RUN_FIELDS = frozenset({"out_dtype", "compute_dtype", "device", "shard_size", "prefetch", "tokenizer"})


def tracked_fields(cls: type) -> frozenset[str]:
    """The fields of ``cls`` whose reads are recorded: every method param, not those saying
    how the merge runs."""
    found = _TRACKED.get(cls)
    if found is None:
        found = _TRACKED[cls] = frozenset(cls.model_fields) - RUN_FIELDS  # type: ignore[attr-defined]
    return found


def _forget(key: int) -> None:
    _READS.pop(key, None)
    _ROOT.pop(key, None)


def start_tracking(params: Any, root: Any | None = None) -> None:
    """Record reads of ``params`` from now on (with ``root``: count them as reads of ``root``,
    for the params an override produces)."""
    key = id(params)
    if root is not None:
        _ROOT[key] = _ROOT.get(id(root), id(root))
    else:
        _READS[key] = set()
    weakref.finalize(params, _forget, key)


def note_read(params: Any, field: str) -> None:
    """Record that a plugin honoured ``field`` of ``params`` without reading the attribute
    (``for_tensor`` does this for ``overrides``)."""
    reads = _READS.get(_ROOT.get(id(params), id(params)))
    if reads is not None:
        reads.add(field)


def is_tracked(params: Any) -> bool:
    """Whether reads of ``params`` are recorded (params built by validation are; a copy
    made by ``model_copy`` or unpickling is not)."""
    return _ROOT.get(id(params), id(params)) in _READS


def fields_read(params: Any) -> set[str]:
    """The method params read so far on ``params`` (or on the params its overrides give)."""
    return set(_READS.get(_ROOT.get(id(params), id(params)), set()))


def peek(params: Any, field: str, default: Any = None) -> Any:
    """A field's value read by the engine itself (not counted as the plugin reading it)."""
    return params.__dict__.get(field, default)
