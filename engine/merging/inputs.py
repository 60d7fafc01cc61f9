"""What a merge reads: one model folder taking part in a merge, from its headers.

A module of its own below :mod:`engine.merging.preflight` (which builds these) and
:mod:`engine.merging.lora` (which reads an adapter input against its base), so that
neither has to import the other to name the type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.adapters import LoraAdapter
from engine.models.tensorio import TensorInfo

__all__ = ["MergeInput"]


@dataclass
class MergeInput:
    """One model folder taking part in a merge: its recipe name, config and headers.

    For a LoRA adapter folder (``adapter`` set), ``path`` is the adapter folder while
    ``config`` and ``tensors`` are the base's: the adapter yields every base tensor.
    """

    name: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    adapter: LoraAdapter | None = None
