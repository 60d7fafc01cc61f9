"""The attention kernel a model is loaded with: ``runtime.attention``.

``auto`` takes flash-attention 2 on CUDA when the package is installed and the dtype is 16
bits, and otherwise leaves the choice to transformers (SDPA where the model class has it,
eager where it has not; :func:`engine.models.slow_paths.attention_path` says which). It sits
in the models layer because loading a model needs it (:class:`engine.run.context.StageContext`
and the ELO sub-model both pass it to the loader); ``engine validate`` asks
:func:`attention_problem` through :mod:`engine.training.levers`.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.core.errors import TrainingError

__all__ = ["ATTENTION_CHOICES", "attention_problem", "flash_attn_available", "resolve_attention"]

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")


def flash_attn_available() -> bool:
    """Whether the flash-attn package can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def resolve_attention(setting: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``attn_implementation`` to load a model with for ``runtime.attention``.

    ``auto`` is ``flash_attention_2`` on CUDA with flash-attn installed and a 16-bit
    dtype; otherwise None, which lets transformers take SDPA where the model class has
    it and eager attention where it has not (:func:`engine.models.slow_paths.attention_path`
    says so). An explicit choice is passed as it is.
    """
    if setting not in ATTENTION_CHOICES:
        raise TrainingError(f"runtime.attention: unknown value {setting!r}; use one of {list(ATTENTION_CHOICES)}")
    if setting != "auto":
        return setting
    if device.type == "cuda" and flash_attn_available() and dtype in (torch.float16, torch.bfloat16):
        return "flash_attention_2"
    return None


def attention_problem(setting: str, device: torch.device) -> str | None:
    """For ``engine validate``: why ``runtime.attention`` cannot be honoured here (None: it can)."""
    if setting != "flash_attention_2":
        return None
    if not flash_attn_available():
        return ("runtime.attention: 'flash_attention_2' needs the flash-attn package, which is not installed; "
                "install flash-attn or use 'auto' (sdpa)")
    if device.type != "cuda":
        return (f"runtime.attention: 'flash_attention_2' runs on CUDA only (the device is {device.type}); "
                "use 'auto' or 'sdpa'")
    return None
