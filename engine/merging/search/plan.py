"""A merge stage's ``search:`` as validation resolves it: the methods, the space, the
evaluators with their dev data. Kept apart from the search's machinery
(:mod:`engine.merging.search.stage`) so that the plan does not import it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.fingerprint import data_key, fingerprint_hash
from engine.core.inputs import DataSource
from engine.merging.search.space import SearchSpace
from engine.recipe.search import SearchSpec

__all__ = ["PlannedEvaluator", "PlannedSearch"]


@dataclass
class PlannedEvaluator:
    """A search evaluator as validation resolved it."""

    plugin: str
    impl: Any
    params: Any
    data: list[DataSource]
    models: list[str]


@dataclass
class PlannedSearch:
    """A stage's ``search:`` as validation resolved it."""

    spec: SearchSpec
    methods: dict[str, Any]  # plugin name -> MergeMethod
    default: str
    space: SearchSpace
    evaluators: list[PlannedEvaluator]
    warm_start: Path | None = None

    def key(self) -> dict[str, Any]:
        """What the search computes from, for the stage's fingerprint (the budget, seed and
        sampler included: another budget is another result)."""
        return {
            "spec": self.spec.model_dump(mode="json", exclude={"warm_start", "storage", "workers", "study"}),
            "space": [d.describe() for d in self.space.dimensions()],
            "evaluators": [{"plugin": e.plugin, "params": e.params.result_key(),
                            "data": [data_key(d) for d in e.data], "models": e.models}
                           for e in self.evaluators],
        }

    def study_key(self, stage_params: Mapping[str, Any], fingerprints: Mapping[str, str]) -> str:
        """The study's name: what its trials mean (inputs, space, evaluators, objectives,
        constraints, fixed params). The budget, seed, sampler and workers are not part of
        it, so a larger budget continues the same study."""
        spec = self.spec.model_dump(mode="json", include={"objectives", "constraints", "layer_groups",
                                                          "filters", "methods", "prune",
                                                          "prune_fraction"})
        return "search-" + fingerprint_hash({**self.key(), "spec": spec, "params": dict(stage_params),
                                             "inputs": dict(fingerprints)})
