"""The public API that plugins are written against.

Everything a plugin needs is importable from here: the stage kinds, the artifacts a
stage returns, the inputs it receives, the shared parameter models and the hook
markers. The built-in plugins in ``plugins/`` use nothing else from the engine's
internals except the documented helper modules (:mod:`engine.training`,
:mod:`engine.merging`, :mod:`engine.modelio`, :mod:`engine.data`,
:mod:`engine.evaluation`, :mod:`engine.arch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from engine.hookspecs import hookimpl

if TYPE_CHECKING:
    from engine.context import StageContext

__all__ = [
    "ADAPT_LANGUAGE", "SELECT_LAYERS", "MERGE", "ALIGN", "EVALUATE", "STAGE_KINDS", "NOT_IN_RESULT",
    "Artifact", "DataSource", "InputConfigs", "LayerSelection", "MetricsArtifact", "ModelArtifact",
    "PluginParams", "StageContext", "StageImplementation", "StageInputs",
    "TrainingParams", "hookimpl",
]

ADAPT_LANGUAGE = "adapt-language"
SELECT_LAYERS = "select-layers"
MERGE = "merge"
ALIGN = "align"
EVALUATE = "evaluate"

#: stage kind -> the register hook that collects its implementations
STAGE_KINDS: dict[str, str] = {
    ADAPT_LANGUAGE: "register_language_adapters",
    SELECT_LAYERS: "register_layer_selectors",
    MERGE: "register_merge_methods",
    ALIGN: "register_aligners",
    EVALUATE: "register_evaluators",
}


# --- parameters ----------------------------------------------------------------------


#: Mark a param that does not change a stage's result (logging, checkpoint cadence,
#: prefetch sizes): ``Field(10, json_schema_extra=NOT_IN_RESULT)``. Changing it does not
#: invalidate the stage's cached output.
NOT_IN_RESULT: dict[str, Any] = {"affects_output": False}


class PluginParams(BaseModel):
    """Base class of every implementation's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def result_key(self) -> dict[str, Any]:
        """The params that determine the stage's output (the cache key's part)."""
        dumped = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("affects_output") is False:
                dumped.pop(name, None)
        return dumped


class TrainingParams(PluginParams):
    """The parameter names every trainer shares, so recipes stay portable."""

    steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    seed: int = Field(0, description="Seed for data order, dropout and initialisation.")


# --- artifacts -------------------------------------------------------------------------


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


# --- inputs ----------------------------------------------------------------------------

DataFormat = Literal["text", "instructions", "choice", "generation"]


@dataclass
class DataSource:
    """One data file a stage reads, resolved to an absolute path.

    ``format`` is what the file holds: raw ``text`` (``.txt`` one document per
    line, or ``.jsonl`` with ``text_field``), ``instructions`` (jsonl with
    ``prompt``/``response`` or chat ``messages``), ``choice`` (jsonl
    multiple-choice items with ``prompt``, ``choices`` and ``label``) or
    ``generation`` (jsonl items with ``prompt`` and ``answer`` or ``answers``, scored
    by greedy generation and exact match). ``records`` keeps only a range of the
    file's records (non-empty lines), in file order.
    """

    path: Path
    format: DataFormat = "text"
    language: str | None = None
    weight: float = 1.0
    text_field: str = "text"
    #: a record range such as ``"0:50%"`` (see :func:`engine.data.parse_record_range`);
    #: ``None`` reads every record
    records: str | None = None

    @property
    def label(self) -> str:
        return self.language or self.path.stem


@dataclass
class StageInputs:
    """What a stage receives: artifacts of earlier stages and the data it reads."""

    model: ModelArtifact | None = None
    models: list[ModelArtifact] = field(default_factory=list)
    base: ModelArtifact | None = None
    layers: LayerSelection | None = None
    data: list[DataSource] = field(default_factory=list)


class InputConfigs(dict):
    """What an implementation's optional ``check(configs, params)`` receives.

    A mapping ``{input key: [config.json dict, ...]}`` (``model``, ``models``, ``base``)
    read before any weight is loaded; a stage's output counts as having its primary
    input's config. ``names`` maps the same keys to the recipe names referenced, in
    recipe order, so that params naming models (``weight: {ct-mn: 0.7}``) can be
    checked too. ``paths`` maps the same keys to each reference's model folder, or
    ``None`` where the folder does not exist yet (an earlier stage's output) or is
    built on demand (a built-in model), so that a check can read weight headers.
    """

    def __init__(self, configs: dict[str, list[dict[str, Any]]],
                 names: dict[str, list[str]] | None = None,
                 paths: dict[str, list[Path | None]] | None = None) -> None:
        super().__init__(configs)
        self.names: dict[str, list[str]] = names or {}
        self.paths: dict[str, list[Path | None]] = paths or {}


# --- implementations -------------------------------------------------------------------


@runtime_checkable
class StageImplementation(Protocol):
    """What ``register(...)`` accepts.

    ``name`` is the recipe's ``plugin:`` value; ``Params`` a :class:`PluginParams`
    subclass; ``run`` does the work. ``description`` (optional) is a one-line
    summary shown by ``engine plugins``. ``data_formats`` (optional, a tuple of
    :data:`DataFormat` names) lets ``engine validate`` check a stage's ``data:``
    before anything runs (see :func:`data_format_error`).
    """

    name: str
    Params: type[PluginParams]

    def run(self, context: StageContext, inputs: StageInputs, params: Any) -> Artifact: ...


def data_format_error(impl: Any, stage_kind: str, sources: Sequence[DataSource]) -> str | None:
    """Why ``sources`` do not suit ``impl`` (None when they do, or when ``impl`` declares
    no ``data_formats``). An evaluator reads the sources of its formats and ignores the
    others, so one matching source is enough; every other stage (trainers, selectors)
    reads all its data, so every source must be of a declared format."""
    formats = tuple(getattr(impl, "data_formats", None) or ())
    if not formats or not sources:
        return None
    wanted = " or ".join(repr(f) for f in formats)
    if stage_kind == EVALUATE:
        if any(s.format in formats for s in sources):
            return None
        got = ", ".join(f"{s.path.name} ({s.format})" for s in sources)
        return f"{impl.name} reads {wanted} data; got {got}"
    for s in sources:
        if s.format not in formats:
            return f"{s.path}: {impl.name} reads {wanted} data, this file is {s.format!r}"
    return None


def describe(impl: StageImplementation) -> str:
    """One line that says what an implementation does."""
    text = getattr(impl, "description", None) or (type(impl).__doc__ or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def __getattr__(name: str) -> Any:  # lazy re-export, avoids an import cycle
    if name == "StageContext":
        from engine.context import StageContext

        return StageContext
    raise AttributeError(name)
