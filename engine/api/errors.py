"""The exceptions a plugin raises. Each is an :class:`EngineError`: the CLI prints its
message (which should name the file, field or tensor at fault) without a traceback."""

from engine.core.errors import (
    DataError,
    EngineError,
    MergeError,
    ModelLoadError,
    PluginError,
    RecipeError,
    TrainingError,
    WeightFileError,
)

__all__ = ["DataError", "EngineError", "MergeError", "ModelLoadError", "PluginError", "RecipeError",
           "TrainingError", "WeightFileError"]
