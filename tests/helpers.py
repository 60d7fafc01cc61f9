"""Small helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine import modelio


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in memory (the reference streamed outputs must equal)."""
    out: dict[str, torch.Tensor] = {}
    for f in modelio.weight_files(folder):
        out.update(load_file(str(f)))
    return out
