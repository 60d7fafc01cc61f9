"""The stage cache: fingerprints, completion markers and checkpoint folders.

A stage's *fingerprint* hashes what it computes from: its kind, plugin, params (their
``result_key``), the fingerprints of its inputs, its data files (path, format, language,
weight, field, size and mtime; ``records`` when set) and its runtime (threads, trackers
and memory_gb excepted: they change speed or logging, not results). An input model's fingerprint is its path and the size
and mtime of its top-level files.

A finished stage folder holds :data:`STAGE_FILE`, ``{"fingerprint", "components",
"inputs", "created", "record"}``: the fingerprint, the dict it hashes (so ``engine status``
can say *why* a stage is stale), the names of the inputs behind the input fingerprints, and
the stage's report record; a later run whose fingerprint for the stage is the same reuses
the folder (a cache hit) and its saved record.

Every finished version of a workdir stage is kept, content-addressed:
``<workdir>/.stages/<stage>/<fingerprint>/`` (:data:`STAGES_DIR`), and ``<workdir>/<stage>``
is a relative symlink to the current one (``.stages/<stage>/<fingerprint>``), swapped
atomically (a new link renamed over the old one), so that path stays a plain Hugging Face
folder for every reader. A version folder is renamed into place complete, then the link is
switched: a kill between the two leaves the version kept and the link on the previous one,
and the next run re-links it as a cache hit. A stage folder of the older layout (a real
folder holding a marker) is adopted into ``.stages`` on the next run. Versions stay until
``engine cache prune``. Training checkpoints live in
``<workdir>/.checkpoints/<stage>/<fingerprint>/`` until the stage's output is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from engine.core import outputs
from engine.core.errors import OutputRefused
from engine.core.fingerprint import STAGE_FILE, data_key, fingerprint_hash, model_fingerprint
from engine.core.inputs import DataSource

#: runtime keys that change speed or logging, not what a stage computes
_NOT_RESULTS = frozenset({"threads", "log_with", "memory_gb"})

__all__ = [
    "CHECKPOINTS_DIR", "STAGES_DIR", "STAGE_FILE", "Version", "adopt_legacy", "cached_record",
    "check_stage_path", "checkpoint_dir", "commit", "discard", "is_checkpoint_folder", "is_stage_link", "current_fingerprint", "data_key", "fingerprint_hash",
    "lookup", "make_current", "model_fingerprint", "read_marker", "remove_checkpoints",
    "remove_stale_temporaries", "stage_components", "stage_fingerprint", "version_dir",
    "versions", "write_marker",
]

CHECKPOINTS_DIR = ".checkpoints"
STAGES_DIR = ".stages"


class PlannedStage(Protocol):
    """What a fingerprint reads of a planned stage (:class:`engine.recipe.plan.PlannedStage`):
    its recipe entry, validated params, resolved data and effective runtime."""

    spec: Any
    params: Any
    data: list[DataSource]
    runtime: Any


def stage_fingerprint(stage: PlannedStage, fingerprints: Mapping[str, str]) -> str:
    """The fingerprint of ``stage``, given the fingerprints of everything it references."""
    return fingerprint_hash(stage_components(stage, fingerprints))


def stage_components(stage: PlannedStage, fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """What :func:`stage_fingerprint` hashes, as a dict (kept in the marker)."""
    refs = {k: [fingerprints[r] for r in v] for k, v in stage.spec.references().items()}
    return {
        "stage": stage.spec.stage,
        "plugin": stage.spec.plugin,
        "params": stage.params.result_key(),
        "inputs": refs,
        "data": [data_key(d) for d in stage.data],
        # thread counts change speed, not what a stage computes: not part of the key
        "runtime": {k: v for k, v in vars(stage.runtime).items() if k not in _NOT_RESULTS},
        **({"search": search.key()} if (search := getattr(stage, "search", None)) is not None else {}),
    }


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a finished stage folder; None when absent or unreadable."""
    marker = Path(folder) / STAGE_FILE
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and "fingerprint" in saved else None


def cached_record(final: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved record of the finished stage folder ``final`` when its marker holds
    ``fingerprint`` (``output`` set to ``final``); None when absent, unreadable or stale."""
    saved = read_marker(final)
    if saved is None or saved.get("fingerprint") != fingerprint:
        return None
    record = dict(saved["record"])
    record["output"] = str(final)
    return record


def write_marker(folder: Path, fingerprint: str, record: dict[str, Any],
                 components: dict[str, Any] | None = None,
                 inputs: dict[str, list[str]] | None = None, recipe: str | None = None) -> None:
    """Mark a stage folder (still temporary) as the output of ``fingerprint``; ``components``
    (what the fingerprint hashes) and ``inputs`` (the referenced names) let ``engine status``
    explain a later difference; ``recipe`` (the recipe file's path) lets ``engine cache prune
    RECIPE`` keep the versions another recipe file of the same name made."""
    saved = {"fingerprint": fingerprint, "components": components, "inputs": inputs,
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "record": record,
             "recipe": recipe}
    (Path(folder) / STAGE_FILE).write_text(json.dumps(saved, indent=2, default=str))


# --- kept versions ---------------------------------------------------------------------------


class Version:
    """One kept version of a stage: its folder, marker and whether it is current."""

    def __init__(self, folder: Path, marker: dict[str, Any], current: bool) -> None:
        self.folder, self.marker, self.current = folder, marker, current
        self.fingerprint: str = marker["fingerprint"]

    @property
    def created(self) -> str:
        return self.marker.get("created") or time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.folder.stat().st_mtime))

    @property
    def wall_time_s(self) -> float | None:
        return (self.marker.get("record") or {}).get("wall_time_s")

    def size(self) -> int:
        """Bytes of the files in the folder (links not followed)."""
        total = 0
        for root, _, files in os.walk(self.folder):
            total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
        return total


def version_dir(workdir: Path, name: str, fingerprint: str) -> Path:
    """Where version ``fingerprint`` of stage ``name`` is kept."""
    return Path(workdir) / STAGES_DIR / name / fingerprint


def _link_target(name: str, fingerprint: str) -> str:
    return os.path.join(STAGES_DIR, name, fingerprint)


def current_fingerprint(workdir: Path, name: str) -> str | None:
    """The fingerprint ``<workdir>/<name>`` holds now (a link's or an older layout folder's)."""
    link = Path(workdir) / name
    if link.is_symlink():
        target = Path(os.readlink(link))
        return target.name if (link / STAGE_FILE).is_file() else None
    saved = read_marker(link) if link.is_dir() else None
    return saved["fingerprint"] if saved else None


def versions(workdir: Path, name: str) -> list[Version]:
    """Every finished version of stage ``name`` kept in ``workdir``, oldest first (an older
    layout folder at ``<workdir>/<name>`` counts as the current one)."""
    found: list[Version] = []
    current = current_fingerprint(workdir, name)
    root = Path(workdir) / STAGES_DIR / name
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        saved = read_marker(folder) if not folder.name.startswith(".") else None
        if saved is not None and saved["fingerprint"] == folder.name:
            found.append(Version(folder, saved, folder.name == current))
    legacy = Path(workdir) / name
    if not legacy.is_symlink() and current is not None and not any(v.current for v in found):
        found.append(Version(legacy, read_marker(legacy) or {}, True))
    return sorted(found, key=lambda v: (v.created, v.folder.stat().st_mtime_ns))  # oldest first


def make_current(workdir: Path, name: str, fingerprint: str) -> None:
    """Point ``<workdir>/<name>`` at the kept version ``fingerprint`` (atomic rename of a new
    link over the old one). Only a link into ``.stages`` or an older layout's stage folder is
    ever replaced: anything else at that name is the user's and is refused
    (:func:`check_stage_path`)."""
    link = Path(workdir) / name
    target = _link_target(name, fingerprint)
    if link.is_symlink() and os.readlink(link) == target:
        return
    check_stage_path(workdir, name)
    tmp = Path(workdir) / f".{name}.tmp-link-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    trash = None
    if link.is_dir() and not link.is_symlink():  # an older layout's stage folder (checked above)
        trash = Path(workdir) / f".{name}.tmp-old-{os.getpid()}"
        outputs.mark_temp(link)  # marked before it is set aside: a killed run's leftover goes
        os.replace(link, trash)
    os.replace(tmp, link)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def is_stage_link(path: Path) -> bool:
    """Whether ``path`` is a link the engine made: one into ``.stages`` of its own name."""
    if not path.is_symlink():
        return False
    return Path(os.readlink(path)).parts[:2] == (STAGES_DIR, path.name)


def check_stage_path(workdir: Path, name: str) -> None:
    """Refuse a stage whose path ``<workdir>/<name>`` holds something the engine did not
    write there (a user's folder or file of the same name): it is never replaced."""
    path = Path(workdir) / name
    if not path.exists() and not path.is_symlink():
        return
    if is_stage_link(path):
        return
    if path.is_dir() and not path.is_symlink() and read_marker(path) is not None:
        return  # an older layout's stage folder: adopted into .stages
    what = "link" if path.is_symlink() else "folder" if path.is_dir() else "file"
    raise OutputRefused(f"stage {name!r}: {path} is a {what} lingoforge did not write; it is never "
                        "replaced: rename it, rename the stage, or choose another --workdir")


def commit(tmp: Path, final: Path, workdir: Path | None, fingerprint: str, *,
           flag: str = "--out", overwrite: bool = False) -> None:
    """Move the finished temporary folder ``tmp`` into place: with a ``workdir``, kept as
    version ``fingerprint`` of stage ``final.name`` and made current; without, published at
    ``final`` (a folder of the caller's choosing, ``engine merge --out``), which is replaced
    only with ``overwrite`` and only when the engine wrote it (:func:`engine.core.outputs.publish`)."""
    if workdir is None:
        outputs.publish(Path(tmp), Path(final), flag=flag, overwrite=overwrite)
        return
    check_stage_path(workdir, Path(final).name)
    folder = version_dir(workdir, Path(final).name, fingerprint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    outputs.publish(Path(tmp), folder, flag=f"stage {Path(final).name!r} version", overwrite=True)
    make_current(workdir, Path(final).name, fingerprint)


def lookup(workdir: Path, name: str, fingerprint: str, final: Path,
           versioned: bool) -> dict[str, Any] | None:
    """The saved record of the kept version ``fingerprint`` of a stage, made current
    (``versioned``: a workdir stage), or of the folder ``final`` (not versioned); None
    when there is none."""
    if not versioned:
        return cached_record(final, fingerprint)
    record = cached_record(version_dir(workdir, name, fingerprint), fingerprint)
    if record is not None:
        make_current(workdir, name, fingerprint)
        record["output"] = str(final)
    return record


def adopt_legacy(workdir: Path, name: str) -> None:
    """Move an older layout's stage folder (a real folder with a marker) into ``.stages``."""
    folder = Path(workdir) / name
    saved = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    if saved is None:
        return
    kept = version_dir(workdir, name, saved["fingerprint"])
    if kept.is_dir():  # the same version is kept already: the copy goes
        make_current(workdir, name, saved["fingerprint"])
        return
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, kept)
    make_current(workdir, name, saved["fingerprint"])


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


_FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_CHECKPOINT_ENTRY = re.compile(r"(step-\d+|\.tmp-step-\d+-\d+)")


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether ``folder`` (``.checkpoints/<stage>/<x>``) is one the engine wrote: named by a
    fingerprint and holding only checkpoint steps and their unfinished temporaries."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or not _FINGERPRINT.fullmatch(folder.name):
        return False
    return all(_CHECKPOINT_ENTRY.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
               for p in folder.iterdir())


def discard(folder: Path) -> None:
    """Delete an engine folder (a kept version, a checkpoint folder) so that no kill leaves
    it half-deleted under its own name: it is marked temporary, renamed aside to a hidden
    name that no lookup reads, and only then deleted (a killed prune's leftover is removed
    by the next run or prune)."""
    folder = Path(folder)
    outputs.mark_temp(folder)
    aside = folder.with_name(f".{folder.name}.tmp-pruning-{os.getpid()}")
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temporaries(workdir: Path) -> None:
    """Delete the temporary folders and links a hard-killed earlier run left behind.

    They are never mistaken for outputs (their names start with a dot and carry no
    stage marker), but they take disk space. Only what the engine made goes: folders that
    carry its temporary marker (:data:`engine.core.outputs.TEMP_FILE`) and unfinished link
    switches into ``.stages``; a user's ``.draft.tmp-2024`` stays. One run per workdir at a time.
    """
    for item in Path(workdir).glob(".*.tmp-*"):
        if item.is_symlink():  # an unfinished link switch
            if Path(os.readlink(item)).parts[:1] == (STAGES_DIR,):
                item.unlink(missing_ok=True)
        else:
            outputs.remove_engine_temp(item)
    for pattern in (f"{STAGES_DIR}/*/.*", f"{CHECKPOINTS_DIR}/*/.*", ".eval-cache/.*"):
        for item in Path(workdir).glob(pattern):
            outputs.remove_engine_temp(item)  # what a killed prune had set aside
