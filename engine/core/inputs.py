"""What a stage receives: data sources, earlier artifacts and, for ``check``, the
inputs' configs (re-exported by :mod:`engine.api`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.core.artifacts import LayerSelection, ModelArtifact

__all__ = ["DataFormat", "DataSource", "InputConfigs", "StageInputs"]

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
    file's records (non-empty lines; rows of a parquet file), in file order.
    ``path`` may also be a ``.parquet`` file (text in the ``text_field`` column) or a
    folder of shards, listed in ``shards`` (:mod:`engine.data.shards`).
    """

    path: Path
    format: DataFormat = "text"
    language: str | None = None
    weight: float = 1.0
    text_field: str = "text"
    #: a record range such as ``"0:50%"`` (see :func:`engine.data.records.parse_record_range`);
    #: ``None`` reads every record
    records: str | None = None
    #: when ``path`` is a folder: its shard files, in the order they are read
    #: (:func:`engine.data.shards.list_shards`); empty for a single file
    shards: tuple[Path, ...] = ()
    #: a broken shard is skipped (warned about, noted in the stage) instead of failing
    skip_broken_shards: bool = False

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
