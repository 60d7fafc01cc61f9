"""The public API: everything a plugin is written against.

A plugin imports from this package and nothing else of the engine:

* ``engine.api`` -- the stage kinds table, the artifacts a stage returns, the inputs it
  receives, the context it runs in, the parameter base classes and the hook marker;
* :mod:`engine.api.training` -- the shared training loop, batching and LoRA;
* :mod:`engine.api.merging` -- the merge-method base, streaming execution and merge
  arithmetic;
* :mod:`engine.api.evaluation` -- evaluation plans, task items and scoring;
* :mod:`engine.api.models` -- model folders and decoder-layer surgery;
* :mod:`engine.api.errors` -- the exceptions a plugin raises.

The built-in plugins in ``plugins/`` are held to this (a test reads their imports), so
whatever they can do, a third-party plugin can do with the same names. No engine
module imports this package back: it only re-exports.
"""

from __future__ import annotations

from engine.core.artifacts import Artifact, LayerSelection, MetricsArtifact, ModelArtifact
from engine.core.inputs import DataFormat, DataSource, InputConfigs, StageInputs
from engine.core.params import NOT_IN_RESULT, PluginParams, TrainingParams
from engine.core.stages import (
    ADAPT_LANGUAGE,
    ALIGN,
    EVALUATE,
    INPUT_KEYS,
    MERGE,
    SELECT_LAYERS,
    STAGE_KINDS,
    StageKind,
    kind_of,
)
from engine.registry.hookspecs import hookimpl
from engine.registry.implementation import StageImplementation, data_format_error, describe
from engine.run.context import StageContext

__all__ = [
    "ADAPT_LANGUAGE", "ALIGN", "EVALUATE", "INPUT_KEYS", "MERGE", "NOT_IN_RESULT", "SELECT_LAYERS",
    "STAGE_KINDS", "Artifact", "DataFormat", "DataSource", "InputConfigs", "LayerSelection",
    "MetricsArtifact", "ModelArtifact", "PluginParams", "StageContext", "StageImplementation",
    "StageInputs", "StageKind", "TrainingParams", "data_format_error", "describe", "hookimpl",
    "kind_of",
]
