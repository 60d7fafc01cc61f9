"""The stage cache: fingerprints, completion markers and checkpoint folders.

A stage's *fingerprint* hashes what it computes from: its kind, plugin, params (their
``result_key``), the fingerprints of its inputs, its data files (path, format, language,
weight, field, size and mtime; ``records`` when set) and its runtime (threads, trackers
and memory_gb excepted: they change speed or logging, not results). An input model's fingerprint is its path and the size
and mtime of its top-level files.

A finished stage folder holds :data:`STAGE_FILE`, ``{"fingerprint", "record"}``; a later
run whose fingerprint for the stage is the same reuses the folder (a cache hit) and its
saved record. Training checkpoints live in ``<workdir>/.checkpoints/<stage>/<fingerprint>/``
until the stage's output is in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.inputs import DataSource
    from engine.validate import PlannedStage

#: runtime keys that change speed or logging, not what a stage computes
_NOT_RESULTS = frozenset({"threads", "log_with", "memory_gb"})

__all__ = [
    "CHECKPOINTS_DIR", "STAGE_FILE", "cached_record", "checkpoint_dir", "data_key",
    "fingerprint_hash", "model_fingerprint", "remove_checkpoints", "remove_stale_temporaries",
    "stage_fingerprint", "write_marker",
]

STAGE_FILE = ".lingoforge-stage.json"
CHECKPOINTS_DIR = ".checkpoints"


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


def stage_fingerprint(stage: PlannedStage, fingerprints: Mapping[str, str]) -> str:
    """The fingerprint of ``stage``, given the fingerprints of everything it references."""
    refs = {k: [fingerprints[r] for r in v] for k, v in stage.spec.references().items()}
    return fingerprint_hash({
        "stage": stage.spec.stage,
        "plugin": stage.spec.plugin,
        "params": stage.params.result_key(),
        "inputs": refs,
        "data": [data_key(d) for d in stage.data],
        # thread counts change speed, not what a stage computes: not part of the key
        "runtime": {k: v for k, v in vars(stage.runtime).items() if k not in _NOT_RESULTS},
    })


def cached_record(final: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved record of the finished stage folder ``final`` when its marker holds
    ``fingerprint`` (``output`` set to ``final``); None when absent, unreadable or stale."""
    marker = Path(final) / STAGE_FILE
    if not marker.is_file():
        return None
    try:
        saved = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None
    if saved.get("fingerprint") != fingerprint:
        return None
    record = dict(saved["record"])
    record["output"] = str(final)
    return record


def write_marker(folder: Path, fingerprint: str, record: dict[str, Any]) -> None:
    """Mark a stage folder (still temporary) as the output of ``fingerprint``."""
    (Path(folder) / STAGE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "record": record},
                                                      indent=2, default=str))


def checkpoint_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    """Where stage ``name`` with ``fingerprint`` keeps its resumable checkpoints."""
    return Path(workdir) / CHECKPOINTS_DIR / name / fingerprint


def remove_checkpoints(workdir: Path, name: str) -> None:
    """Drop a finished stage's checkpoints (every fingerprint: they can no longer be resumed)."""
    shutil.rmtree(Path(workdir) / CHECKPOINTS_DIR / name, ignore_errors=True)
    try:
        (Path(workdir) / CHECKPOINTS_DIR).rmdir()
    except OSError:
        pass


def remove_stale_temporaries(workdir: Path) -> None:
    """Delete the temporary stage folders a hard-killed earlier run left behind.

    They are never mistaken for outputs (their names start with a dot and carry no
    stage marker), but they take disk space. One run per workdir at a time.
    """
    for item in Path(workdir).glob(".*.tmp-*"):
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
