"""What a stage returns: a model folder, a layer selection or metrics (re-exported by
:mod:`engine.api`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ARTIFACT_TYPES", "Artifact", "LayerSelection", "MetricsArtifact", "ModelArtifact"]


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


@dataclass
class MetricsArtifact:
    """Scores per model: ``{model name: {metric name: value}}``.

    ``counts`` holds, per model and metric, the number of tokens or examples behind
    the value, so that a reader knows how much to trust it.
    """

    name: str
    metrics: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    kind: ClassVar[str] = "metrics"

    def to_json(self) -> dict[str, Any]:
        """The metrics.json layout: ``{model: {metric: value}}`` plus reserved keys
        ``_counts`` (same shape, the counts) and ``_errors`` (model -> message)."""
        out: dict[str, Any] = {name: dict(values) for name, values in self.metrics.items()}
        out["_counts"] = self.counts
        if self.errors:
            out["_errors"] = self.errors
        return out


Artifact = ModelArtifact | LayerSelection | MetricsArtifact


#: the artifact class of each artifact type named in the stage kinds table
ARTIFACT_TYPES: dict[str, type] = {
    cls.kind: cls for cls in (ModelArtifact, LayerSelection, MetricsArtifact)}
