"""How many CPU threads torch uses: the recipe's ``runtime.threads``.

torch picks its intra-op thread count from the machine's physical cores. Two cases make
that wrong: a process confined to fewer cores (``taskset``, a container's cpuset, a batch
scheduler) still starts one thread per core of the *machine*, and threads beyond the
cores available only contend; and on a shared machine whose cores are already busy,
every extra thread stalls on the others (torch's small-matrix kernels spin while they
wait). ``auto`` therefore means torch's default, capped at the cores this process may run
on (``os.sched_getaffinity``), and reduced to the idle cores plus one when the one-minute
load average says others are busy. The "plus one" is this process's own share: the
load it already contributes (importing, planning) is counted in the average.

Inter-op threads can be set only once per process, before any parallel work; the engine
tries once and records what torch actually uses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


def load_average() -> float | None:
    """The one-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def auto_threads(torch_default: int, cpus: int, load: float | None) -> tuple[int, str]:
    """The ``auto`` rule as a pure function: ``min(torch_default, cpus)``, then at most
    ``floor(cpus - load) + 1`` when a load average is known. Returns (threads, reason)."""
    n = max(1, min(torch_default, cpus))
    reason = f"torch default {torch_default}, {cpus} cores available"
    if load is not None:
        idle_plus_one = max(1, math.floor(cpus - load) + 1)
        if idle_plus_one < n:
            n = idle_plus_one
            reason += f", load average {load:.2f} (machine shared)"
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
        n, reason = auto_threads(default, available_cpus(), load_average())
    else:
        n, reason = int(setting), "set in the recipe"
    return ThreadPlan(setting, n, _interop_for(n), reason)


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
