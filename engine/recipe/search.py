"""The ``search:`` block of a merge stage: which merge params to search, how candidates are
scored on dev data, and the budget.

Only the shape is checked here; :mod:`engine.merging.search.checks` checks it against the merge
method's declared params, the evaluators' metrics and the test data at validate time, and
:mod:`engine.merging.search` runs it. docs/search.md is the user's guide.

A sketch::

    - name: merge-searched
      stage: merge
      plugin: task-arithmetic
      base: base
      models: [ct-lum, sft-en]
      search:
        space: {weight: {ct-lum: [0.3, 1.5], sft-en: [0.3, 1.5]}, lambda: auto}
        evaluate:
          - plugin: task-accuracy
            data: {builtin: lum/task-dev.jsonl, language: lum-dev}
        objectives: [{metric: acc/lum-dev, direction: maximize}]
        trials: 40
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.recipe.data import DataSpec
from engine.recipe.runtime import _Strict

__all__ = ["CONSTRAINT_PATTERN", "SEARCH_DIR", "ConstraintSpec", "ObjectiveSpec", "SearchEvaluatorSpec",
           "SearchSpec", "Sampler", "parse_constraint"]

#: the workdir folder holding each search's study (``<stage>.db``) and candidate folders
SEARCH_DIR = ".search"

Sampler = Literal["tpe", "cmaes", "nsga2", "random"]

#: ``metric >= number`` or ``metric <= number`` (also ``>``, ``<``)
CONSTRAINT_PATTERN = re.compile(r"^\s*(?P<metric>[^<>=\s]+)\s*(?P<op>>=|<=|>|<)\s*(?P<bound>\S+)\s*$")


class ObjectiveSpec(_Strict):
    """A metric of the search's evaluators to optimise on the dev data."""

    metric: str = Field(..., description="A metric an evaluator of the search produces for the "
                                         "candidate, e.g. 'acc/lum-dev' or 'retention_ppl/en'.")
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="Whether higher or lower is better.")


class ConstraintSpec(_Strict):
    """A bound a candidate must keep to be chosen, e.g. ``delta_acc/en-dev >= -0.02``."""

    metric: str = Field(..., description="A metric an evaluator of the search produces.")
    op: Literal[">=", "<=", ">", "<"] = Field(..., description="The comparison.")
    bound: float = Field(..., description="The number compared with.")

    @field_validator("bound")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"a constraint's bound must be a finite number, got {v}")
        return v

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    def violation(self, value: float) -> float:
        """How far ``value`` is on the wrong side of the bound (0 or less: satisfied),
        Optuna's convention for constraint values."""
        if math.isnan(value):
            return math.inf
        if self.op in (">=", ">"):
            gap = self.bound - value
            return gap if self.op == ">=" else gap + (1e-12 if gap >= 0 else 0.0)
        gap = value - self.bound
        return gap if self.op == "<=" else gap + (1e-12 if gap >= 0 else 0.0)


def parse_constraint(value: Any) -> Any:
    """``"delta_acc/en >= -0.02"`` into a constraint mapping; mappings pass through."""
    if not isinstance(value, str):
        return value
    m = CONSTRAINT_PATTERN.match(value)
    if m is None:
        raise ValueError(f"constraint {value!r} is not 'METRIC >= NUMBER' or 'METRIC <= NUMBER' "
                         "(e.g. 'delta_acc/en-dev >= -0.02')")
    try:
        bound = float(m["bound"])
    except ValueError:
        raise ValueError(f"constraint {value!r}: {m['bound']!r} is not a number") from None
    return {"metric": m["metric"], "op": m["op"], "bound": bound}


class SearchEvaluatorSpec(_Strict):
    """An evaluate plugin run on every candidate, on dev data."""

    plugin: str = Field(..., description="An evaluate plugin, e.g. 'task-accuracy', 'retention'.")
    data: DataSpec | list[DataSpec] = Field(..., description="Dev data: one data entry or a list, as a stage's 'data'. "
                                       "It must not overlap the test data of any evaluate stage "
                                       "that scores this merge.")
    params: dict[str, Any] = Field(default_factory=dict, description="The evaluator's params.")
    models: list[str] = Field(
        default_factory=list,
        description="Other models the evaluator scores beside the candidate (a retention "
                    "reference, e.g. [base]); scored once and kept in the evaluation cache.")

    @field_validator("params", mode="before")
    @classmethod
    def _params_mapping(cls, v: Any) -> Any:
        return {} if v is None else v

    def data_list(self) -> list[DataSpec]:
        return self.data if isinstance(self.data, list) else [self.data]


class SearchSpec(_Strict):
    """What a merge stage searches: the space, the dev-data objectives, the budget."""

    space: dict[str, Any] | None = Field(
        None, description="Param -> range to search: 'auto' (the range its validator allows, or "
                          "its declared search range), [low, high], {model: [low, high]} for a "
                          "per-model param, {choices: [...]} for a set of values, or {low, high, "
                          "log: true}. Default: every numeric or boolean param the method declares "
                          "with a usable range. Params not listed keep the stage's params.")
    methods: list[str] | None = Field(
        None, description="Merge plugins to choose between (the stage's plugin is the default "
                          "merge); each is searched over its own declared params.")
    layer_groups: int = Field(
        1, ge=1, le=64, description="Per-layer-group values: each searched number becomes a layer "
                                    "gradient of this many anchors (1: one value for all layers).")
    filters: dict[str, str] = Field(
        default_factory=dict,
        description="Per-filter values: name -> regex on tensor names (e.g. {attn: self_attn, mlp: "
                    "mlp}); each searched param gets one value per filter, applied through "
                    "'overrides'. Tensors no filter matches take the plain values.")
    evaluate: list[SearchEvaluatorSpec] = Field(..., min_length=1,
                                                description="Evaluators run on each candidate (dev data).")
    objectives: list[ObjectiveSpec] = Field(..., min_length=1,
                                            description="Metrics to optimise; several give a Pareto front.")
    constraints: list[ConstraintSpec] = Field(
        default_factory=list, description="Bounds a chosen candidate must keep, e.g. "
                                          "'delta_acc/en-dev >= -0.02'.")
    trials: int | None = Field(None, ge=1, description="Trials in the study (finished ones of an "
                                                      "earlier run count). At least trials or seconds.")
    seconds: float | None = Field(None, gt=0, description="Wall-time budget of this run's search.")
    sampler: Sampler = Field("tpe", description="Optuna sampler: tpe, cmaes (one objective, "
                                                "numbers only), nsga2, random.")
    seed: int = Field(0, description="Seed of the sampler (reproducible with one worker).")
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the study.")
    prune: bool = Field(True, description="Score a candidate on a first part of the dev data and "
                                          "stop hopeless ones (one objective only).")
    prune_fraction: float = Field(0.25, gt=0, lt=1, description="The share of each dev source a "
                                                               "candidate is first scored on.")
    startup_trials: int = Field(8, ge=0, description="Random trials before the sampler models the "
                                                     "space (and before pruning starts).")
    warm_start: str | None = Field(
        None, description="A previous workdir (or study .db file) whose best trials are tried "
                          "first; for re-merging after one language was retrained.")
    warm_start_trials: int = Field(4, ge=1, description="How many of its best trials.")
    storage: str | None = Field(
        None, description="Optuna storage URL shared by workers on several machines (e.g. "
                          "postgresql://...); default: a SQLite file in the workdir.")
    study: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The study's name in the storage; default: derived from the inputs, space, "
                    "evaluators and objectives (a changed search starts a new study). Give the "
                    "same name on every machine that shares a 'storage'.")
    choose: str | None = Field(
        None, description="With several objectives: the objective (metric) whose best point on "
                          "the feasible Pareto front is written; default: the first objective.")

    @field_validator("constraints", mode="before")
    @classmethod
    def _constraints(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [parse_constraint(c) for c in v]
        return v

    @field_validator("filters")
    @classmethod
    def _regexes(cls, v: dict[str, str]) -> dict[str, str]:
        for name, pattern in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"filter name {name!r}: use letters, digits, '_' and '-'")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"filter {name!r}: {pattern!r} is not a regular expression ({exc})") from None
        return v

    @model_validator(mode="after")
    def _budget(self) -> SearchSpec:
        if self.trials is None and self.seconds is None:
            raise ValueError("give a budget: 'trials' (a number of trials), 'seconds' (wall time) "
                             "or both")
        metrics = [o.metric for o in self.objectives]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"objectives name {twice} twice")
        if self.choose is not None and self.choose not in metrics:
            raise ValueError(f"choose: {self.choose!r} is not one of the objectives ({metrics})")
        if self.sampler == "cmaes" and len(self.objectives) > 1:
            raise ValueError("sampler cmaes optimises one objective; use tpe or nsga2 for several")
        return self
