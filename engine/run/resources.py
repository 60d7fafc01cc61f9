"""What a stage ran with and used: peak memory (sampled while it runs) and torch threads,
as they go into its report.json record."""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

__all__ = ["MemorySampler", "rss_bytes", "threads_record"]


class MemorySampler:
    """Peak resident memory of this process while a stage runs (and CUDA peak)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    def __enter__(self) -> MemorySampler:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_rss_mb = round(self._peak / 2**20, 1) if self._peak else None
        if torch.cuda.is_available():
            self.peak_cuda_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def rss_bytes() -> int:
    """This process's resident memory now (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def threads_record(thread_plan: Any) -> dict[str, Any]:
    """The record's ``threads``: what :func:`engine.run.threads.apply_threads` set, or torch's
    own setting when the stage left threads alone (``thread_plan`` None)."""
    if thread_plan is not None:
        return thread_plan.to_json()
    return {"setting": None, "intra_op": torch.get_num_threads(),
            "inter_op": torch.get_num_interop_threads(), "reason": "torch's own setting"}
