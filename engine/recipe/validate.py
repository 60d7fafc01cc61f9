"""Whole-recipe validation, without loading a single weight.

:func:`plan_recipe` turns a parsed :class:`~engine.recipe.Recipe` into a
:class:`Plan`: stages in dependency order, each with its implementation, validated
params, resolved data files and effective runtime. Every error names the recipe
file and the stage (and field) at fault. ``engine validate`` is this function;
``engine run`` calls it before anything heavy happens.

An input model may be a PEFT LoRA adapter folder. In a merge's ``models`` it is the
delta on the merge's ``base`` (:mod:`engine.merging.lora`; the merge needs a base, and
the adapter is checked against it from headers when the base's folder exists); it
cannot be a merge's ``base``. Other stages load it through :mod:`engine.models.modelio`, so
there its own base model must be found (:mod:`engine.models.adapters`).

The checks that read input models are :mod:`engine.recipe.model_checks`; this module
collects problems, orders the stages and plans each one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.errors import EngineError, RecipeError
from engine.core.inputs import DataSource
from engine.core.params import PluginParams
from engine.core.stages import SELECT_LAYERS, kind_of, model_kinds
from engine.core.suggest import did_you_mean
from engine.data.sources import resolve_data
from engine.merging.search import checks as search_checks
from engine.models import quantization
from engine.models.adapters import is_adapter_folder
from engine.recipe import estimate
from engine.recipe.model_checks import (  # MAX_STEPS: re-exported, once here
    MAX_STEPS,
    check_adapter_use,
    check_limits,
    check_remote_code,
    model_config,
    static_check,
)
from engine.recipe.plan import Plan, PlannedStage
from engine.recipe.spec import (
    INPUT_RULES,
    Recipe,
    RuntimeSpec,
    StageSpec,
    format_validation_error,
    resolve_model_path,
)
from engine.registry.implementation import data_format_error, requirement_hint
from engine.registry.manager import Registered, clash_warning, get_implementation
from engine.run import threads
from engine.run.runtime import Runtime
from engine.training import levers, tracking

__all__ = ["MAX_STEPS", "Plan", "PlannedStage", "Problems", "effective_runtime", "plan_recipe"]

MODEL_STAGES = model_kinds()


class Problems:
    """Problems found so far, reported together like a linter's (one line each).

    A check that raises :class:`EngineError` inside ``with problems.check():`` adds its
    message and lets validation go on with the next independent check; ``ok`` says
    whether that block passed, so that checks that need its result are skipped rather
    than reported twice.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextmanager
    def check(self, prefix: str = "") -> Iterator[_Outcome]:
        outcome = _Outcome()
        try:
            yield outcome
        except EngineError as exc:
            outcome.ok = False
            for line in str(exc).splitlines():
                self.add(f"{prefix}{line}")

    def add(self, line: str) -> None:
        if line not in self.lines:
            self.lines.append(line)

    def raise_if_any(self) -> None:
        if self.lines:
            raise RecipeError("\n".join(self.lines))


@dataclass
class _Outcome:
    ok: bool = True


def plan_recipe(recipe: Recipe, recipe_dir: Path, source: str = "<recipe>") -> Plan:
    """Check everything that can be checked before running; return the plan.

    Independent problems are all collected (a missing model folder *and* an unknown
    plugin are both reported) and raised as one :class:`RecipeError` of one line each.
    """
    recipe_dir = Path(recipe_dir)
    problems = Problems()
    _check_names(recipe, source, problems)
    kinds = {s.name: s.stage for s in recipe.stages}
    inputs_ok = {}
    for spec in recipe.stages:
        with problems.check() as outcome:
            _check_inputs(spec, recipe, kinds, source)
        inputs_ok[spec.name] = outcome.ok
    with problems.check() as outcome:
        order = _topological_order(recipe, source)
    if not outcome.ok:
        problems.raise_if_any()
    adapters = {name: path for name, m in recipe.models.items()
                if m.path is not None and is_adapter_folder(path := resolve_model_path(m, recipe_dir))}
    adapter_errors: dict[str, str] = {}
    model_configs: dict[str, dict[str, Any] | None] = {}
    models_ok: dict[str, bool] = {}
    for name, m in recipe.models.items():
        model_configs[name] = None
        with problems.check() as outcome:
            model_configs[name] = model_config(name, m, recipe_dir, source, adapter_errors)
        models_ok[name] = outcome.ok
    stages = []
    for spec in order:
        planned = _plan_stage(spec, recipe, recipe_dir, source, kinds, adapters, adapter_errors,
                              model_configs, models_ok, problems, inputs_ok[spec.name])
        if planned is not None:
            stages.append(planned)
    searches = {s.name: s.search for s in stages if s.search is not None}
    if searches:
        test_data = {s.name: s.data for s in stages if s.spec.stage == "evaluate"}
        for line in search_checks.overlap_problems(recipe, searches, test_data, source):
            problems.add(line)
    problems.raise_if_any()
    warnings = estimate.memory_warnings(stages, recipe, model_configs, source)
    warnings += threads.excess_warnings(recipe, source)
    warnings += [f"{source}: stage {s.name!r}: plugin {s.spec.plugin!r} {hint}" for s in stages
                 if (hint := requirement_hint(s.registered.impl, s.registered.distribution))]
    warnings += [f"{source}: stage {s.name!r}: {clash}" for s in recipe.stages  # as written
                 if (clash := clash_warning(s.stage, s.plugin))]
    return Plan(recipe=recipe, source=source, recipe_dir=recipe_dir, stages=stages, warnings=warnings)


def _plan_stage(spec: StageSpec, recipe: Recipe, recipe_dir: Path, source: str,
                kinds: dict[str, str], adapters: dict[str, Path], adapter_errors: dict[str, str],
                model_configs: dict[str, dict[str, Any] | None], models_ok: dict[str, bool],
                problems: Problems, inputs_ok: bool) -> PlannedStage | None:
    """One stage's checks; every independent failure is added to ``problems``."""
    where = f"{source}: stage {spec.name!r}"
    runtime = effective_runtime(recipe.runtime, spec.runtime)
    ok = inputs_ok
    with problems.check() as outcome:
        check_adapter_use(spec, adapters, adapter_errors, where)
        check_remote_code(spec, recipe, recipe_dir, runtime, models_ok, where)
    ok &= outcome.ok
    with problems.check(f"{where}: ") as outcome:
        levers.check_runtime(runtime, kind_of(spec.stage).loads_models)
    ok &= outcome.ok
    if kind_of(spec.stage).loads_models:
        with problems.check(f"{where}: ") as outcome:
            tracking.check_log_with(runtime.log_with)
    registered: Registered | None = None
    with problems.check(f"{where}: ") as outcome:
        registered = get_implementation(spec.stage, spec.plugin)
    if registered is not None and spec.plugin != registered.unique_name:
        # one spelling per implementation (qualified when its name has several providers),
        # so that reports, context.plugin and cache keys say which implementation ran
        spec = spec.model_copy(update={"plugin": registered.unique_name})
    params: PluginParams | None = None
    if registered is not None:
        with problems.check() as outcome:
            params = _validate_params(registered, spec, source, recipe_dir)
        if params is not None:
            with problems.check(f"{where}: "):
                quantization.check_fsdp(params, runtime)  # QLoRA: what the run would refuse
    data: list[DataSource] = []
    data_ok = True
    for spec_data in spec.data_list():
        with problems.check(f"{where}: data: ") as outcome:
            data.append(resolve_data(spec_data, recipe_dir))
        data_ok &= outcome.ok
    if registered is not None and data_ok:
        mismatch = data_format_error(registered.impl, spec.stage, data)
        if mismatch is not None:
            problems.add(f"{where}: data: {mismatch}")
            data_ok = False
    if registered is None or params is None:
        return None
    refs_ok = all(models_ok.get(r, True) for refs in spec.references().values() for r in refs)
    if inputs_ok and refs_ok:
        with problems.check() as outcome:
            check_limits(spec, params, recipe, model_configs, where)
            static_check(registered.impl, spec, params, recipe, model_configs, where, recipe_dir)
        ok &= outcome.ok
    search = None
    if spec.search is not None:
        with problems.check() as outcome:
            search = search_checks.plan_search(spec, recipe, recipe_dir, source)
        ok &= outcome.ok
    if not (ok and data_ok):
        return None
    deps = sorted({r for refs in spec.references().values() for r in refs if r in kinds})
    return PlannedStage(spec, registered, params, data, runtime, deps, search)


def effective_runtime(base: RuntimeSpec, override: RuntimeSpec | None) -> Runtime:
    """The recipe's runtime with the keys a stage sets explicitly replaced."""
    values = base.model_dump()
    if override is not None:
        values.update({k: getattr(override, k) for k in override.model_fields_set})
    return Runtime(**values)


def _check_names(recipe: Recipe, source: str, problems: Problems) -> None:
    seen: set[str] = set()
    for spec in recipe.stages:
        if spec.name in seen:
            problems.add(f"{source}: stage {spec.name!r} is defined twice")
        if spec.name in recipe.models:
            problems.add(f"{source}: stage {spec.name!r} has the name of an input model")
        seen.add(spec.name)


def _check_inputs(spec: StageSpec, recipe: Recipe, kinds: dict[str, str], source: str) -> None:
    where = f"{source}: stage {spec.name!r} ({spec.stage})"
    required, optional = INPUT_RULES[spec.stage]
    given = {k for k in ("model", "models", "base", "layers") if getattr(spec, k) is not None}
    if spec.data is not None:
        given.add("data")
    missing = sorted(required - given)
    if missing:
        raise RecipeError(f"{where}: missing input {', '.join(repr(m) for m in missing)}")
    extra = sorted(given - required - optional)
    if extra:
        allowed = ", ".join(sorted(required | optional))
        raise RecipeError(f"{where}: {', '.join(repr(e) for e in extra)} is not an input of this "
                          f"stage kind (it takes {allowed})")
    if spec.models is not None and not spec.models:
        raise RecipeError(f"{where}: 'models' is empty")
    for key, refs in spec.references().items():
        for ref in refs:
            if ref == spec.name:
                raise RecipeError(f"{where}: {key} refers to the stage itself")
            if ref in recipe.models:
                if key == "layers":
                    raise RecipeError(f"{where}: layers: {ref!r} is a model, not a select-layers stage")
                continue
            if ref not in kinds:
                known = sorted(set(recipe.models) | set(kinds))
                raise RecipeError(f"{where}: {key}: unknown reference {ref!r} (known: {', '.join(known)})"
                                  f"{did_you_mean(ref, known)}")
            if key == "layers" and kinds[ref] != SELECT_LAYERS:
                raise RecipeError(f"{where}: layers: {ref!r} is a {kinds[ref]} stage, not select-layers")
            if key != "layers" and kinds[ref] not in MODEL_STAGES:
                raise RecipeError(f"{where}: {key}: {ref!r} is a {kinds[ref]} stage and produces no model")


def _topological_order(recipe: Recipe, source: str) -> list[StageSpec]:
    """Stages in dependency order (recipe order among independent ones); cycles are errors."""
    names = {s.name for s in recipe.stages}
    deps = {s.name: {r for refs in s.references().values() for r in refs if r in names}
            for s in recipe.stages}
    done: list[StageSpec] = []
    placed: set[str] = set()
    remaining = list(recipe.stages)
    while remaining:
        ready = [s for s in remaining if deps[s.name] <= placed]
        if not ready:
            cycle = ", ".join(s.name for s in remaining)
            raise RecipeError(f"{source}: stages depend on each other in a cycle: {cycle}")
        first = ready[0]
        done.append(first)
        placed.add(first.name)
        remaining.remove(first)
    return done


def _validate_params(registered: Registered, spec: StageSpec, source: str,
                     recipe_dir: Path | None = None) -> PluginParams:
    """The stage's params; validators get ``{"recipe_dir": Path}`` as pydantic context, so
    that a path param can be made relative to the recipe file (lm-eval's include_path)."""
    try:
        return registered.impl.Params.model_validate(spec.params, context={"recipe_dir": recipe_dir})
    except ValidationError as exc:
        msg = format_validation_error(exc, source, prefix=f"stage {spec.name!r} params.",
                                      model=registered.impl.Params)
        raise RecipeError(msg) from None
