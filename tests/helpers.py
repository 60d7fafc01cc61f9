"""Small helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.testing.conformance import model_state


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in memory (the reference streamed outputs must equal)."""
    return model_state(folder)
