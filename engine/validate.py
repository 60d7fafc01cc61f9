"""Whole-recipe validation, without loading a single weight.

:func:`plan_recipe` turns a parsed :class:`~engine.recipe.Recipe` into a
:class:`Plan`: stages in dependency order, each with its implementation, validated
params, resolved data files and effective runtime. Every error names the recipe
file and the stage (and field) at fault. ``engine validate`` is this function;
``engine run`` calls it before anything heavy happens.

An input model may be a PEFT LoRA adapter folder. In a merge's ``models`` it is the
delta on the merge's ``base`` (:mod:`engine.merging.lora`; the merge needs a base, and
the adapter is checked against it from headers when the base's folder exists); it
cannot be a merge's ``base``. Other stages load it through :mod:`engine.modelio`, so
there its own base model must be found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import modelio
from engine.api import (
    ADAPT_LANGUAGE,
    ALIGN,
    MERGE,
    SELECT_LAYERS,
    DataSource,
    InputConfigs,
    PluginParams,
    data_format_error,
)
from engine.context import Runtime
from engine.data import resolve_data
from engine.errors import EngineError, RecipeError
from engine.merging.lora import is_adapter_folder, read_adapter
from engine.plugin_manager import Registered, get_implementation
from engine.recipe import (
    INPUT_RULES,
    ModelSpec,
    Recipe,
    RuntimeSpec,
    StageSpec,
    format_validation_error,
)

MODEL_STAGES = {ADAPT_LANGUAGE, MERGE, ALIGN}


@dataclass
class PlannedStage:
    """A stage ready to run: implementation, validated params, resolved data."""

    spec: StageSpec
    registered: Registered
    params: PluginParams
    data: list[DataSource]
    runtime: Runtime
    depends_on: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Plan:
    recipe: Recipe
    source: str
    recipe_dir: Path
    stages: list[PlannedStage]

    def model_spec(self, name: str) -> ModelSpec | None:
        return self.recipe.models.get(name)


def plan_recipe(recipe: Recipe, recipe_dir: Path, source: str = "<recipe>") -> Plan:
    """Check everything that can be checked before running; return the plan."""
    recipe_dir = Path(recipe_dir)
    _check_names(recipe, source)
    kinds = {s.name: s.stage for s in recipe.stages}
    for spec in recipe.stages:
        _check_inputs(spec, recipe, kinds, source)
    order = _topological_order(recipe, source)
    adapters = {name: path for name, m in recipe.models.items()
                if m.path is not None and is_adapter_folder(path := resolve_model_path(m, recipe_dir))}
    adapter_errors: dict[str, str] = {}
    model_configs = {name: _model_config(name, m, recipe_dir, source, adapter_errors)
                     for name, m in recipe.models.items()}
    stages = []
    for spec in order:
        where = f"{source}: stage {spec.name!r}"
        _check_adapter_use(spec, adapters, adapter_errors, where)
        try:
            registered = get_implementation(spec.stage, spec.plugin)
        except EngineError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        params = _validate_params(registered, spec, source)
        data = []
        for spec_data in spec.data_list():
            try:
                data.append(resolve_data(spec_data, recipe_dir))
            except EngineError as exc:
                raise RecipeError(f"{where}: data: {exc}") from None
        mismatch = data_format_error(registered.impl, spec.stage, data)
        if mismatch is not None:
            raise RecipeError(f"{where}: data: {mismatch}")
        _static_check(registered, spec, params, recipe, model_configs, where, recipe_dir)
        deps = sorted({r for refs in spec.references().values() for r in refs if r in kinds})
        stages.append(PlannedStage(spec, registered, params, data,
                                   effective_runtime(recipe.runtime, spec.runtime), deps))
    return Plan(recipe=recipe, source=source, recipe_dir=recipe_dir, stages=stages)


def effective_runtime(base: RuntimeSpec, override: RuntimeSpec | None) -> Runtime:
    """The recipe's runtime with the keys a stage sets explicitly replaced."""
    values = base.model_dump()
    if override is not None:
        values.update({k: getattr(override, k) for k in override.model_fields_set})
    return Runtime(**values)


def _check_names(recipe: Recipe, source: str) -> None:
    seen: set[str] = set()
    for spec in recipe.stages:
        if spec.name in seen:
            raise RecipeError(f"{source}: stage {spec.name!r} is defined twice")
        if spec.name in recipe.models:
            raise RecipeError(f"{source}: stage {spec.name!r} has the name of an input model")
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
                raise RecipeError(f"{where}: {key}: unknown reference {ref!r} (known: {', '.join(known)})")
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


def _validate_params(registered: Registered, spec: StageSpec, source: str) -> PluginParams:
    try:
        return registered.impl.Params.model_validate(spec.params)
    except ValidationError as exc:
        msg = format_validation_error(exc, source, prefix=f"stage {spec.name!r} params.")
        raise RecipeError(msg) from None


def _check_adapter_use(spec: StageSpec, adapters: dict[str, Path], adapter_errors: dict[str, str],
                       where: str) -> None:
    """Where a LoRA adapter folder may go: a merge's ``models`` (with a ``base``, checked as
    a LoRA delta), not a merge's ``base``; elsewhere its own base must have been found."""
    for key, refs in spec.references().items():
        for ref in refs:
            path = adapters.get(ref)
            if path is None or key == "layers":
                continue
            if spec.stage == MERGE and key == "base":
                raise RecipeError(f"{where}: base: {ref!r} is a LoRA adapter folder and cannot be "
                                  "a merge's base; give the model it was trained on as 'base' and "
                                  "the adapter in 'models'")
            if spec.stage == MERGE and key == "models":
                if spec.base is None:
                    raise RecipeError(f"{where}: models: {ref!r} is a LoRA adapter folder, a delta "
                                      "on a base model; the merge needs a 'base' (the model the "
                                      "adapter was trained on)")
                try:
                    read_adapter(path)
                except EngineError as exc:
                    raise RecipeError(f"{where}: models.{ref}: {exc}") from None
            elif ref in adapter_errors:
                raise RecipeError(f"{where}: {key}: {ref!r}: {adapter_errors[ref]}")


def _model_config(name: str, spec: ModelSpec, recipe_dir: Path, source: str,
                  adapter_errors: dict[str, str] | None = None) -> dict[str, Any] | None:
    """config.json of an input model, read without loading weights. For a LoRA adapter
    folder: its base model's config as :mod:`engine.modelio` finds it, or None (the
    reason kept in ``adapter_errors``; a merge needs only the recipe's base)."""
    try:
        if spec.builtin is not None:
            from engine import world

            return world.model_config(spec.builtin)
        path = resolve_model_path(spec, recipe_dir)
        if adapter_errors is not None and is_adapter_folder(path):
            try:
                return modelio.check_model_folder(path)
            except EngineError as exc:
                adapter_errors[name] = str(exc)
                return None
        return modelio.check_model_folder(path)
    except EngineError as exc:
        raise RecipeError(f"{source}: models.{name}: {exc}") from None


def resolve_model_path(spec: ModelSpec, recipe_dir: Path) -> Path:
    """The folder of a path model (relative to the recipe file)."""
    assert spec.path is not None
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() else (recipe_dir / path).resolve()


def _root_config(ref: str, recipe: Recipe, configs: dict[str, dict | None]) -> dict | None:
    """The config of the input model a reference derives from (stage outputs keep
    their primary input's architecture)."""
    seen = set()
    while ref not in configs and ref not in seen:
        seen.add(ref)
        try:
            spec = recipe.stage(ref)
        except KeyError:
            return None
        ref = spec.model or spec.base or (spec.models[0] if spec.models else ref)
    return configs.get(ref)


def _static_check(registered: Registered, spec: StageSpec, params: PluginParams, recipe: Recipe,
                  configs: dict[str, dict | None], where: str, recipe_dir: Path | None = None) -> None:
    """Call the implementation's optional ``check(configs, params)``."""
    check = getattr(registered.impl, "check", None)
    if check is None:
        return
    by_key: dict[str, list[dict]] = {}
    names: dict[str, list[str]] = {}
    paths: dict[str, list[Path | None]] = {}
    for key, refs in spec.references().items():
        if key == "layers":
            continue
        found = [_root_config(r, recipe, configs) for r in refs]
        by_key[key] = [c for c in found if c is not None]
        names[key] = list(refs)
        paths[key] = [resolve_model_path(recipe.models[r], recipe_dir)
                      if recipe_dir is not None and r in recipe.models
                      and recipe.models[r].path is not None else None for r in refs]
    try:
        check(InputConfigs(by_key, names, paths), params)
    except (ValueError, EngineError) as exc:
        raise RecipeError(f"{where}: {exc}") from None
