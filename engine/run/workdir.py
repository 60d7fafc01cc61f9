"""Which names in a workdir the engine may write, checked before a run writes anything.

``engine run --workdir W`` writes a fixed set of names into ``W``: one per stage (a link into
``.stages``), ``.stages/``, ``.checkpoints/``, ``.eval-cache/``, ``.search/`` (search studies), ``logs/``, ``report.json``, ``report.md``,
``report/``, ``run.log`` and its lock file. ``W`` may be a folder that already holds a
user's files; those are never replaced nor deleted. Before the first write, under the
workdir lock, :func:`claim` checks every name the run will write:

- a stage's name must be absent, a link the engine made into ``.stages``, or an older
  layout's stage folder (:func:`engine.run.stage_cache.check_stage_path`);
- ``report/`` must be absent or a folder the engine marked (:mod:`engine.core.outputs`) holding
  nothing else;
- the other names must be absent or listed in the workdir's own marker
  :data:`WORKDIR_FILE`, which records every name the engine has claimed there. A workdir of
  an earlier version (no marker, but a ``.stages`` folder or a report.json of the engine's
  shape) is adopted: its names count as the engine's.

Every clash is refused at once, in one error that lists them all; nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from engine.core import outputs
from engine.core.errors import OutputRefused
from engine.run.stage_cache import CHECKPOINTS_DIR, STAGES_DIR, check_stage_path

__all__ = ["ENGINE_NAMES", "WORKDIR_FILE", "check_report_names", "claim", "claimed_names"]

#: the workdir's marker: the names the engine has claimed in it
WORKDIR_FILE = ".lingoforge-workdir.json"
#: names every run may write besides its stages (the lock file is handled by the lock)
ENGINE_NAMES = (STAGES_DIR, CHECKPOINTS_DIR, ".eval-cache", ".search", "logs", "report.json", "report.md",
                "report", "run.log")
_REPORT_NAMES = ("report.md", "report")


def claimed_names(workdir: Path) -> set[str] | None:
    """The names the engine has claimed in ``workdir``; None when it holds no marker and
    is not a workdir of an earlier version."""
    workdir = Path(workdir)
    try:
        saved = json.loads((workdir / WORKDIR_FILE).read_text())
        if isinstance(saved, dict) and isinstance(saved.get("names"), list):
            return {str(n) for n in saved["names"]}
    except (OSError, ValueError):
        pass
    if _earlier_workdir(workdir):
        return {n for n in ENGINE_NAMES if (workdir / n).exists()}
    return None


def _earlier_workdir(workdir: Path) -> bool:
    """A workdir an earlier version wrote (before the marker): its ``.stages`` folder, or a
    report.json of the engine's shape."""
    if (workdir / STAGES_DIR).is_dir() and not (workdir / STAGES_DIR).is_symlink():
        return True
    try:
        saved = json.loads((workdir / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "stages" in saved and "recipe" in saved


def _clash(workdir: Path, name: str, claimed: set[str]) -> str | None:
    path = workdir / name
    if not path.exists() and not path.is_symlink():
        return None
    if name == "report":
        if outputs.read_owner(path) is not None and not outputs.foreign_entries(path):
            return None
        if name in claimed and path.is_dir() and not path.is_symlink() and all(
                p.suffix == ".svg" and p.is_file() for p in path.iterdir()):
            return None  # an earlier version's charts folder (unmarked; charts only)
        extra = outputs.foreign_entries(path) if path.is_dir() and not path.is_symlink() else []
        held = f": {', '.join(extra[:3])}" if extra else ""
        return f"{path} (a folder lingoforge did not write, or one holding files it did not write{held})"
    if name in claimed and not path.is_symlink():
        return None
    return f"{path} ({'a link' if path.is_symlink() else 'a file or folder'} lingoforge did not write)"


def claim(workdir: Path, stage_names: Iterable[str]) -> None:
    """Check every name a run of ``stage_names`` writes in ``workdir`` (refusing them all at
    once when one holds what the engine did not write), then record them in the marker."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise OutputRefused(f"--workdir {workdir}: is a file, not a folder")
    workdir.mkdir(parents=True, exist_ok=True)
    claimed = claimed_names(workdir) or set()
    problems = [p for n in ENGINE_NAMES if (p := _clash(workdir, n, claimed))]
    for name in stage_names:
        try:
            check_stage_path(workdir, name)
        except OutputRefused as exc:
            problems.append(str(exc))
    if problems:
        raise OutputRefused(f"--workdir {workdir}: the run would replace what lingoforge did not "
                            "write, which it never does; rename these or choose another --workdir:\n  "
                            + "\n  ".join(problems))
    names = sorted(claimed | set(ENGINE_NAMES))
    outputs.replace_file(workdir / WORKDIR_FILE,
                         json.dumps({"written_by": "lingoforge", "names": names}, indent=1) + "\n")


def check_report_names(folder: Path) -> None:
    """Refuse to rebuild report.md and ``report/`` in ``folder`` (``engine report``) when
    either holds what the engine did not write."""
    folder = Path(folder)
    claimed = claimed_names(folder) or set()
    problems = [p for n in _REPORT_NAMES if (p := _clash(folder, n, claimed))]
    if problems:
        raise OutputRefused(f"{folder}: the report would replace what lingoforge did not write, "
                            "which it never does: " + "; ".join(problems))
