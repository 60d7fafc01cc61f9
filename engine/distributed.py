"""Distributed coordination of a run under ``torchrun``/``accelerate launch``.

Every process runs the plan; only the main process (rank 0) writes stage outputs,
checkpoints and the report. Training stages run on every process, data-parallel; other
stages on the main process only. The main process tells the others, by broadcast
(:func:`share`), whether a stage was served from the cache and whether it succeeded
(``None``, or the failure's text); they then read its output from disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Ranks", "init_process_group", "share"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch (``RANK``, ``WORLD_SIZE``; 0 and 1 when alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_process_group(device: str) -> None:
    """Join the launch's process group (gloo on the CPU) before the first stage."""
    from accelerate import PartialState

    from engine.modelio import resolve_device

    PartialState(cpu=resolve_device(device).type == "cpu")


def share(value: Any) -> Any:
    """Broadcast ``value`` from the main process; every process returns the main's value."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
