"""Scoring a search's candidates with the recipe's own evaluate plugins, on dev data.

The candidate is an in-memory model (:mod:`engine.merging.search.candidate`). The evaluators run
exactly as in an evaluate stage, through a :class:`SearchContext` that hands them the
live model for the candidate, so any evaluate plugin can define an objective.

Each evaluator's plan (its tokenized items) is built on the first trial and reused by
the later ones. The candidate's artifact points at a small folder holding the base's config and
tokenizer files and a stage marker whose fingerprint is the trial's (method, params,
inputs): the evaluation cache (:mod:`engine.evaluation.cache`) then keeps each trial's
metrics by that fingerprint, so a re-run, a larger budget or a warm start that draws
the same candidate again reuses them, and the models an evaluator scores besides the
candidate (a retention reference) are scored once.

With pruning on, a candidate is first scored on a first part of each dev source (a
*rung*); the pruner stops it there when it is hopeless.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from engine.core.artifacts import MetricsArtifact, ModelArtifact
from engine.core.errors import EngineError
from engine.core.fingerprint import STAGE_FILE
from engine.core.inputs import DataSource, StageInputs
from engine.data.files import count_records, source_bounds
from engine.run.context import StageContext

__all__ = ["Evaluator", "SearchContext", "Scorer", "candidate_folder"]

#: files of the base a candidate's folder carries (everything but the weights)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Evaluator:
    """One evaluate plugin of a search: its implementation, params, dev data and the
    other models it scores (a retention reference)."""

    plugin: str
    impl: Any
    params: Any
    data: list[DataSource]
    models: list[ModelArtifact] = field(default_factory=list)


class SearchContext(StageContext):
    """The context an evaluator runs in during a search: the candidate's artifact loads as
    the live in-memory model; tokenizers are loaded once; nothing is printed."""

    def __init__(self, parent: StageContext, plugin: str, candidate: Path, live: torch.nn.Module,
                 plan_cache: dict[Any, Any] | None = None) -> None:
        super().__init__(run_name=parent.run_name, stage_name=parent.stage_name, stage_kind="evaluate",
                         plugin=plugin, workdir=parent.workdir, output_dir=parent.output_dir,
                         runtime=parent.runtime, console=Console(stderr=True, quiet=True),
                         use_cache=True)
        self._candidate = Path(candidate).resolve()
        self._live = live
        self._tokenizers: dict[Path, Any] = {}
        #: evaluation plans by evaluator, data and tokenizer, built on the first trial and
        #: reused by every later one (:func:`engine.evaluation.driver.evaluate_models`)
        self.plan_cache = plan_cache if plan_cache is not None else {}

    def _is_candidate(self, model: ModelArtifact | Path) -> bool:
        path = model.path if isinstance(model, ModelArtifact) else Path(model)
        return Path(path).resolve() == self._candidate

    def load_model(self, model: ModelArtifact | Path, **kw: Any) -> torch.nn.Module:
        if self._is_candidate(model):
            return self._live
        return super().load_model(model, **kw)

    def keeps(self, model: torch.nn.Module) -> bool:
        return model is self._live

    def load_tokenizer(self, model: ModelArtifact | Path) -> Any:
        path = Path(model.path if isinstance(model, ModelArtifact) else model).resolve()
        if path not in self._tokenizers:
            self._tokenizers[path] = super().load_tokenizer(model)
        return self._tokenizers[path]


def candidate_folder(folder: Path, reference: Path) -> Path:
    """A folder with ``reference``'s config and tokenizer files (no weights), where a
    candidate's fingerprint is written per trial."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in Path(reference).iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith("."):
            shutil.copyfile(f, folder / f.name)
    return folder


def _rung_source(source: DataSource, fraction: float) -> DataSource:
    """The first ``fraction`` of a source's records (at least one)."""
    bounds = source_bounds(source.path, source.records)
    lo, hi = bounds if bounds is not None else (0, count_records(source.path))
    n = max(1, math.ceil(fraction * (hi - lo)))
    return dataclasses.replace(source, records=f"{lo}:{lo + n}")


class Scorer:
    """Scores the live candidate with every evaluator; metrics of the candidate by name."""

    def __init__(self, context: StageContext, evaluators: Sequence[Evaluator], live: torch.nn.Module,
                 reference: ModelArtifact, folder: Path, *, rung_fraction: float | None = None) -> None:
        self.context = context
        self.evaluators = list(evaluators)
        self.live = live
        self.folder = candidate_folder(folder, reference.path)
        self.candidate = ModelArtifact(name=context.stage_name, path=self.folder)
        self.rungs: list[list[DataSource]] | None = None
        self.plans: dict[Any, Any] = {}
        if rung_fraction is not None:
            self.rungs = [[_rung_source(d, rung_fraction) for d in e.data if d.shards == ()]
                          for e in self.evaluators]
            if any(len(r) != len(e.data) for r, e in zip(self.rungs, self.evaluators)):
                self.rungs = None  # a folder of shards has no first part to score

    def _mark(self, fingerprint: str) -> None:
        """The candidate folder now stands for ``fingerprint``."""
        tmp = self.folder / f".{STAGE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"fingerprint": f"search-candidate:{fingerprint}"}))
        os.replace(tmp, self.folder / STAGE_FILE)

    def score(self, fingerprint: str, *, rung: bool = False) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, standard errors) of the candidate now in the live model, on the dev
        data (``rung``: on the first part of it)."""
        if rung and self.rungs is None:
            raise EngineError("no rung data to score on")
        self._mark(fingerprint)
        metrics: dict[str, float] = {}
        stderr: dict[str, float] = {}
        owner: dict[str, str] = {}
        for i, e in enumerate(self.evaluators):
            data = self.rungs[i] if rung and self.rungs is not None else e.data
            ctx = SearchContext(self.context, e.plugin, self.folder, self.live, self.plans)
            inputs = StageInputs(models=[self.candidate, *e.models], data=list(data))
            art = e.impl.run(ctx, inputs, e.params)
            if not isinstance(art, MetricsArtifact):
                raise EngineError(f"search: evaluator {e.plugin!r} returned {type(art).__name__}, "
                                  "not metrics")
            if self.candidate.name in art.errors:
                raise EngineError(f"search: evaluator {e.plugin!r} could not score the candidate: "
                                  f"{art.errors[self.candidate.name]}")
            got = art.metrics.get(self.candidate.name, {})
            for k, v in got.items():
                if k in owner and owner[k] != e.plugin:
                    raise EngineError(f"search: evaluators {owner[k]!r} and {e.plugin!r} both "
                                      f"produce {k!r}; give their data distinct 'language' labels")
                owner[k] = e.plugin
                metrics[k] = float(v)
            stderr.update({k: float(v) for k, v in art.stderr.get(self.candidate.name, {}).items()
                           if v is not None})
        return metrics, stderr
