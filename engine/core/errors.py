"""Errors a user can cause. The CLI prints their message alone (no traceback unless
``--debug``), so every message names the file, stage, field or tensor at fault."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every user-facing error."""


class RecipeError(EngineError):
    """The recipe file is unreadable, malformed or inconsistent."""


class PluginError(EngineError):
    """A plugin is missing, broken, or registered something invalid."""


class DataError(EngineError):
    """A data file is missing, empty or malformed."""


class ModelLoadError(EngineError):
    """A model folder is missing, incomplete, or not loadable safely."""


class WeightFileError(ModelLoadError):
    """A safetensors file is truncated or its header disagrees with its bytes."""


class MergeError(EngineError):
    """Merge inputs are inconsistent (missing tensors, shapes, bad parameters)."""


class TrainingError(EngineError):
    """Training cannot go on (NaN loss, unknown architecture, bad layer index)."""


class WorkdirBusy(EngineError):
    """Another ``engine run`` holds the workdir (its lock file names the pid)."""


class OutputRefused(EngineError):
    """An output path the engine will not write: it is, holds or lies inside an input, or it
    holds files the engine did not write (which are never replaced nor deleted)."""
