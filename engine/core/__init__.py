"""The engine's foundation: what every other layer speaks in.

* :mod:`engine.core.errors` -- the user-facing errors (the CLI prints their message alone);
* :mod:`engine.core.stages` -- the one table of stage kinds;
* :mod:`engine.core.params` -- the base classes of every implementation's ``Params``;
* :mod:`engine.core.artifacts` -- what a stage returns (and ``lingoforge.json``);
* :mod:`engine.core.inputs` -- what a stage receives;
* :mod:`engine.core.outputs` -- the one rule for writing and replacing outputs;
* :mod:`engine.core.fingerprint` -- hashes of what a result was computed from;
* :mod:`engine.core.console` -- the rich console, progress bars and the run log;
* :mod:`engine.core.suggest` -- "did you mean" for mistyped names.

It imports nothing else of the engine (docs/architecture.md). Plugins import these names
from :mod:`engine.api`, not from here.
"""

from engine.core.artifacts import (
    ARTIFACT_TYPES,
    META_FILE,
    Artifact,
    LayerSelection,
    MetricsArtifact,
    ModelArtifact,
    load_artifact,
    read_meta,
    write_meta,
)
from engine.core.errors import (
    DataError,
    EngineError,
    MergeError,
    ModelLoadError,
    OutputRefused,
    PluginError,
    RecipeError,
    TrainingError,
    WeightFileError,
    WorkdirBusy,
)
from engine.core.inputs import DataFormat, DataSource, InputConfigs, StageInputs
from engine.core.params import NOT_IN_RESULT, PluginParams, TrainingParams
from engine.core.stages import STAGE_KINDS, StageKind, kind_of, model_kinds, training_kinds

__all__ = [
    "ARTIFACT_TYPES", "META_FILE", "NOT_IN_RESULT", "STAGE_KINDS", "Artifact", "DataError",
    "DataFormat", "DataSource", "EngineError", "InputConfigs", "LayerSelection", "MergeError",
    "MetricsArtifact", "ModelArtifact", "ModelLoadError", "OutputRefused", "PluginError",
    "PluginParams", "RecipeError", "StageInputs", "StageKind", "TrainingError", "TrainingParams",
    "WeightFileError", "WorkdirBusy", "kind_of", "load_artifact", "model_kinds", "read_meta",
    "training_kinds", "write_meta",
]
