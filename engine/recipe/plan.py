"""A plan: what validation makes of a recipe and what a run executes.

:func:`engine.recipe.validate.plan_recipe` builds a :class:`Plan` (stages in dependency
order, each a :class:`PlannedStage` with its implementation, validated params, resolved
data and effective runtime); the runner, ``engine status`` and the report read it. A
module of its own so that those readers need not import validation itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.core.inputs import DataSource
from engine.core.params import PluginParams
from engine.merging.search.plan import PlannedSearch
from engine.recipe.spec import ModelSpec, Recipe, StageSpec
from engine.registry.manager import Registered
from engine.run.runtime import Runtime

__all__ = ["Plan", "PlannedStage"]


@dataclass
class PlannedStage:
    """A stage ready to run: implementation, validated params, resolved data."""

    spec: StageSpec
    registered: Registered
    params: PluginParams
    data: list[DataSource]
    runtime: Runtime
    depends_on: list[str] = field(default_factory=list)
    #: a merge stage's ``search:``, resolved (None: a plain merge)
    search: PlannedSearch | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Plan:
    """A validated recipe: its stages in the order they run, and the warnings found."""

    recipe: Recipe
    source: str
    recipe_dir: Path
    stages: list[PlannedStage]
    #: things that will not stop a run but may sink it (a memory estimate over the device's)
    warnings: list[str] = field(default_factory=list)

    def model_spec(self, name: str) -> ModelSpec | None:
        return self.recipe.models.get(name)
