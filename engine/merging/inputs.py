"""What a merge reads: each model folder taking part, from its headers, and the checked
plan of them all.

A module of its own below :mod:`engine.merging.preflight` (which builds these),
:mod:`engine.merging.lora` (which reads an adapter input against its base) and
:mod:`engine.merging.streaming` (which merges along a plan), so that none of them has to
import another to name the types.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.merging.vocab import VocabPlan
from engine.models.adapters import LoraAdapter
from engine.models.layout import TensorInfo

__all__ = ["MergeInput", "MergePlan"]


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


@dataclass
class MergePlan:
    """Checked inputs. ``reference`` is the model whose tensor names, order, config and
    tokenizer the output takes: the base when there is one, else the first model."""

    base: MergeInput | None
    models: list[MergeInput]
    vocab: VocabPlan | None = None

    @property
    def reference(self) -> MergeInput:
        return self.base if self.base is not None else self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]
