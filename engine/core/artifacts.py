"""What a stage returns: a model folder, a layer selection or metrics (re-exported by
:mod:`engine.api`).

Each artifact saves itself into a stage's output folder and loads itself back from one
(``save``, ``load``): a layer selection as ``layers.json``, metrics as ``metrics.json``;
a model is the folder itself (its plugin writes it; ``save`` only moves a model written
elsewhere into the folder). ``relocated`` is the artifact once its folder has been
renamed into place. A model folder's own facts (``lingoforge.json``) are read and written
here too (:func:`read_meta`, :func:`write_meta`). The runner picks the class from the stage-kind table
(:data:`engine.core.stages.STAGE_KINDS` ``[kind].artifact`` -> :data:`ARTIFACT_TYPES`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ARTIFACT_TYPES", "Artifact", "LAYERS_FILE", "LayerSelection", "METRICS_FILE", "META_FILE",
           "MetricsArtifact", "ModelArtifact", "load_artifact", "read_meta", "write_meta"]

#: where a select-layers stage's selection and an evaluate stage's metrics are saved
LAYERS_FILE = "layers.json"
METRICS_FILE = "metrics.json"


#: ``lingoforge.json``: lingoforge's own facts about a model folder (what an ELO sub-model
#: holds, which base an adapter was trained on, how a merge was made), read back by
#: :meth:`ModelArtifact.load` and by the model loaders (:mod:`engine.models`)
META_FILE = "lingoforge.json"


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Record ``meta`` as the folder's ``lingoforge.json``."""
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(folder: Path) -> dict[str, Any]:
    """lingoforge's own facts about a model folder (empty when absent)."""
    f = Path(folder) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


@dataclass
class ModelArtifact:
    """A Hugging Face model folder on disk (config.json, safetensors, tokenizer).

    ``meta`` carries facts later stages need, for example an ELO sub-model records
    which layers of which base model it holds (also written to ``lingoforge.json``
    inside the folder so that it survives across runs).
    """

    name: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "model"

    def save(self, folder: Path) -> None:
        """Make ``folder`` hold the model: a plugin writes its model into the stage folder
        itself; one that wrote it elsewhere has its files moved in."""
        folder = Path(folder)
        if Path(self.path).resolve() != folder.resolve():
            for item in Path(self.path).iterdir():
                shutil.move(str(item), folder / item.name)

    @classmethod
    def load(cls, name: str, folder: Path) -> ModelArtifact:
        """The model in ``folder``, with the facts its ``lingoforge.json`` records."""
        return cls(name=name, path=Path(folder), meta=read_meta(folder))

    def relocated(self, folder: Path) -> ModelArtifact:
        """This model once its stage folder is ``folder`` (meta re-read, else kept)."""
        return ModelArtifact(name=self.name, path=Path(folder),
                             meta=read_meta(folder) or self.meta)


@dataclass
class LayerSelection:
    """Decoder layer indices chosen by a select-layers stage, with the reason."""

    name: str
    indices: list[int]
    num_layers: int
    explanation: str = ""
    scores: dict[int, float] = field(default_factory=dict)

    kind: ClassVar[str] = "layers"

    def to_json(self) -> dict[str, Any]:
        return {
            "indices": list(self.indices),
            "num_layers": self.num_layers,
            "explanation": self.explanation,
            "scores": {str(k): v for k, v in self.scores.items()},
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> LayerSelection:
        return cls(
            name=name,
            indices=[int(i) for i in data["indices"]],
            num_layers=int(data["num_layers"]),
            explanation=data.get("explanation", ""),
            scores={int(k): float(v) for k, v in data.get("scores", {}).items()},
        )

    def save(self, folder: Path) -> None:
        _write_json(Path(folder) / LAYERS_FILE, self.to_json())

    @classmethod
    def load(cls, name: str, folder: Path) -> LayerSelection:
        return cls.from_json(name, json.loads((Path(folder) / LAYERS_FILE).read_text()))

    def relocated(self, folder: Path) -> LayerSelection:
        return self


@dataclass
class MetricsArtifact:
    """Scores per model: ``{model name: {metric name: value}}``.

    ``counts`` holds, per model and metric, the number of tokens or examples behind
    the value, so that a reader knows how much to trust it. ``stderr`` holds, per model
    and metric, the value's standard error (binomial for accuracies; for perplexity the
    delta-method error from per-document log-losses, docs/evaluation.md), and ``chance``
    per multiple-choice metric the accuracy of guessing (the mean over items of
    1 / number of choices). Either may be empty (an evaluator that does not give them).
    """

    name: str
    metrics: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)

    kind: ClassVar[str] = "metrics"

    def to_json(self) -> dict[str, Any]:
        """The metrics.json layout: ``{model: {metric: value}}`` plus reserved keys
        ``_counts`` (same shape, the counts), ``_errors`` (model -> message), ``_stderr``
        (same shape, standard errors) and ``_chance`` (metric -> chance level); the last
        three only when not empty."""
        out: dict[str, Any] = {name: dict(values) for name, values in self.metrics.items()}
        out["_counts"] = self.counts
        if self.errors:
            out["_errors"] = self.errors
        if any(self.stderr.values()):
            out["_stderr"] = self.stderr
        if self.chance:
            out["_chance"] = self.chance
        return out

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> MetricsArtifact:
        """The inverse of :meth:`to_json`: keys starting with ``_`` are reserved; a
        metrics.json written before ``_stderr`` and ``_chance`` existed loads with both empty."""
        metrics = {k: v for k, v in data.items() if not k.startswith("_")}
        return cls(name, metrics, data.get("_counts", {}), data.get("_errors", {}),
                   data.get("_chance", {}), data.get("_stderr", {}))

    def save(self, folder: Path) -> None:
        _write_json(Path(folder) / METRICS_FILE, self.to_json())

    @classmethod
    def load(cls, name: str, folder: Path) -> MetricsArtifact:
        return cls.from_json(name, json.loads((Path(folder) / METRICS_FILE).read_text()))

    def relocated(self, folder: Path) -> MetricsArtifact:
        return self


Artifact = ModelArtifact | LayerSelection | MetricsArtifact


#: the artifact class of each artifact type named in the stage kinds table
ARTIFACT_TYPES: dict[str, type[ModelArtifact] | type[LayerSelection] | type[MetricsArtifact]] = {
    cls.kind: cls for cls in (ModelArtifact, LayerSelection, MetricsArtifact)}


def load_artifact(artifact_type: str, name: str, folder: Path) -> Artifact:
    """Load the artifact of type ``artifact_type`` (a key of :data:`ARTIFACT_TYPES`, as the
    stage-kind table names it) saved in ``folder``."""
    return ARTIFACT_TYPES[artifact_type].load(name, folder)
