"""Fingerprints: short hashes of what a result was computed from.

A stage's fingerprint (:mod:`engine.run.stage_cache`) and an evaluation's cache key
(:mod:`engine.evaluation.cache`) are built from the same pieces: :func:`fingerprint_hash`
of a JSON-able description, an input model folder's :func:`model_fingerprint` (its path and
the size and mtime of its top-level files) and each data source's :func:`data_key`. A
finished stage folder records its fingerprint in :data:`STAGE_FILE`, so a reader can name
the stage output it saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from engine.core.inputs import DataSource

__all__ = ["STAGE_FILE", "data_key", "fingerprint_hash", "model_fingerprint"]

#: the completion marker of a finished stage folder: its fingerprint, components and record
STAGE_FILE = ".lingoforge-stage.json"


def fingerprint_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_state(path: Path) -> list[Any]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _files_state(folder: Path) -> dict[str, list[Any]]:
    return {p.name: _file_state(p) for p in sorted(folder.iterdir()) if p.is_file()}


def model_fingerprint(path: Path) -> str:
    """The fingerprint of an input model folder."""
    return fingerprint_hash({"model": str(path), "files": _files_state(Path(path))})


def data_key(d: DataSource) -> dict[str, Any]:
    """What a data source contributes to a stage's fingerprint. ``records`` joins the key
    only when set, so fingerprints of recipes that do not slice stay as they were; a
    folder of shards contributes each shard's name, size and mtime."""
    key = {"path": str(d.path), "format": d.format, "language": d.language,
           "weight": d.weight, "field": d.text_field}
    if d.shards:  # a folder: every shard's name and state, in reading order
        key["shards"] = [[str(p.relative_to(d.path)), *_file_state(p)] for p in d.shards]
        key["skip_broken_shards"] = d.skip_broken_shards
    else:
        key["state"] = _file_state(d.path)
    if d.records is not None:
        key["records"] = d.records
    return key
