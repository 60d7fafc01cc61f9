"""How many CPU threads torch uses: the recipe's ``runtime.threads``.

torch picks its intra-op thread count from the machine's physical cores. Two cases make
that wrong: a process confined to fewer cores (``taskset``, a container's cpuset, a batch
scheduler) still starts one thread per core of the *machine*, and threads beyond the
cores available only contend; and several engine runs on one machine each start a
thread per core. The second case is the costly one: torch's OpenMP threads spin while
they wait for each other, so two quickstarts at two threads each on a 2-core machine
ran 14x slower than one alone (536 s against 37 s, measured), the evaluation stages
worst (186 s against 5 s).

``auto`` (the default) therefore means torch's default, capped at the cores this
process may run on (``os.sched_getaffinity``), divided by the number of engine runs
alive on this machine. Every run registers itself (:class:`RunRegistration`: a file
per run holding an ``fcntl`` lock, released by the kernel even on ``kill -9``), and the
count is taken again before every stage, so a run that starts while another is going
makes both use their share from their next stage on. Other programs' load is not
counted: the one-minute load average lags by a minute and would make thread counts,
and so the last bits of results, depend on what ran before.

An integer is used as given up to the cores this process may run on; a larger one (a
recipe written for a bigger machine, or a typo such as 4096) is capped at those cores,
said by ``engine validate``/``engine run`` (:func:`excess_warnings`) and in the stage's
report record: threads beyond the cores only contend (4096 on 2 cores started 8,194
threads and drove the load to 1,600).

Inter-op threads can be set only once per process, before any parallel work; the engine
tries once and records what torch actually uses.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: torch's intra-op thread count when this module first looked, i.e. before the engine
#: changed anything ("torch's default" for ``auto``)
_baseline: int | None = None
_interop_tried = False


@dataclass(frozen=True)
class ThreadPlan:
    """Threads chosen for a stage, and why (written to report.json)."""

    setting: int | str | None
    intra_op: int
    inter_op: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"setting": self.setting, "intra_op": self.intra_op, "inter_op": self.inter_op,
                "reason": self.reason}


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _registry() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"lingoforge-runs-{uid}"


class RunRegistration:
    """Marks this process as a running engine run for as long as the ``with`` lasts:
    a file in a per-user folder of the temp directory, locked with ``fcntl``."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or _registry()
        self._fh = None
        self._path: Path | None = None

    def __enter__(self) -> RunRegistration:
        try:
            import fcntl

            self.folder.mkdir(parents=True, exist_ok=True)
            self._path = self.folder / f"{os.getpid()}-{id(self)}"
            self._fh = open(self._path, "w")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no fcntl or an unwritable temp dir: count as alone
            self._fh = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()
            if self._path is not None:
                self._path.unlink(missing_ok=True)
            self._fh = None


def live_runs(folder: Path | None = None) -> int:
    """Engine runs alive on this machine (at least 1: the caller). A file whose lock can
    be taken belongs to a process that died; it is removed."""
    folder = folder or _registry()
    try:
        import fcntl

        entries = list(folder.iterdir())
    except (ImportError, OSError):
        return 1
    alive = 0
    for entry in entries:
        try:
            with open(entry) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive += 1
                    continue
                entry.unlink(missing_ok=True)
        except OSError:
            continue
    return max(1, alive)


def auto_threads(torch_default: int, cpus: int, runs: int = 1) -> tuple[int, str]:
    """The ``auto`` rule as a pure function: ``min(torch_default, cpus // runs)``, at
    least 1. Returns (threads, reason)."""
    n = max(1, min(torch_default, cpus // max(1, runs)))
    reason = f"torch default {torch_default}, {cpus} cores available"
    if runs > 1:
        reason += f", shared by {runs} engine runs"
    return n, reason


def torch_default_threads() -> int:
    """torch's intra-op count before the engine first changed it."""
    global _baseline
    if _baseline is None:
        _baseline = torch.get_num_threads()
    return _baseline


def plan_threads(setting: int | str | None) -> ThreadPlan | None:
    """What ``setting`` resolves to now; None when the setting leaves torch alone."""
    if setting is None:
        return None
    default = torch_default_threads()
    if setting == "auto":
        n, reason = auto_threads(default, available_cpus(), live_runs())
    else:
        n, reason = capped_threads(int(setting), available_cpus())
    return ThreadPlan(setting, n, _interop_for(n), reason)


def capped_threads(setting: int, cpus: int) -> tuple[int, str]:
    """An integer ``runtime.threads`` as used: at most ``cpus``. Returns (threads, reason)."""
    if setting > cpus:
        return cpus, f"set in the recipe to {setting}, capped at the {cpus} cores available"
    return setting, "set in the recipe"


def excess_warnings(recipe: Any, source: str) -> list[str]:
    """A warning for each ``runtime.threads`` of ``recipe`` (the recipe's, a stage's own)
    above the cores this process may use, naming the field and the core count."""
    cpus = available_cpus()
    found = [("", recipe.runtime.threads)]
    found += [(f"stage {spec.name!r}: ", spec.runtime.threads) for spec in recipe.stages
              if spec.runtime is not None and "threads" in spec.runtime.model_fields_set]
    return [f"{source}: {where}runtime.threads: {value} is more than the {cpus} cores this process "
            f"may use (os.sched_getaffinity); {cpus} threads are used instead"
            for where, value in found
            if isinstance(value, int) and not isinstance(value, bool) and value > cpus]


def _interop_for(intra: int) -> int:
    """Inter-op threads to ask for: as many as intra-op ones (torch's own default pairs
    them), unless torch's were fixed already."""
    return intra if not _interop_tried else torch.get_num_interop_threads()


def apply_threads(setting: int | str | None) -> ThreadPlan | None:
    """Set torch's thread counts for ``setting``; return what was set (None: untouched).

    ``torch.set_num_threads`` may be called any time. ``torch.set_num_interop_threads``
    raises once inter-op work has started (or on a second call), so it is tried once per
    process; afterwards the plan reports torch's actual inter-op count.
    """
    global _interop_tried
    plan = plan_threads(setting)
    if plan is None:
        return None
    torch.set_num_threads(plan.intra_op)
    if not _interop_tried:
        _interop_tried = True
        try:
            torch.set_num_interop_threads(plan.intra_op)
        except RuntimeError:
            pass  # parallel work already ran in this process: torch keeps its count
    return ThreadPlan(plan.setting, torch.get_num_threads(), torch.get_num_interop_threads(),
                      plan.reason)
