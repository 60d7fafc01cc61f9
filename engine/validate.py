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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine import modelio
from engine.context import Runtime
from engine.data import resolve_data
from engine.errors import EngineError, RecipeError, WeightFileError
from engine.implementation import data_format_error
from engine.inputs import DataSource, InputConfigs
from engine.merging.lora import is_adapter_folder, read_adapter
from engine.params import PluginParams, TrainingParams
from engine.plugin_manager import Registered, get_implementation
from engine.recipe import (
    INPUT_RULES,
    ModelSpec,
    Recipe,
    RuntimeSpec,
    StageSpec,
    format_validation_error,
)
from engine.safety import check_remote_code
from engine.stages import MERGE, SELECT_LAYERS, model_kinds

MODEL_STAGES = model_kinds()


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
            model_configs[name] = _model_config(name, m, recipe_dir, source, adapter_errors)
        models_ok[name] = outcome.ok
    stages = []
    for spec in order:
        planned = _plan_stage(spec, recipe, recipe_dir, source, kinds, adapters, adapter_errors,
                              model_configs, models_ok, problems, inputs_ok[spec.name])
        if planned is not None:
            stages.append(planned)
    problems.raise_if_any()
    return Plan(recipe=recipe, source=source, recipe_dir=recipe_dir, stages=stages)


def _plan_stage(spec: StageSpec, recipe: Recipe, recipe_dir: Path, source: str,
                kinds: dict[str, str], adapters: dict[str, Path], adapter_errors: dict[str, str],
                model_configs: dict[str, dict[str, Any] | None], models_ok: dict[str, bool],
                problems: Problems, inputs_ok: bool) -> PlannedStage | None:
    """One stage's checks; every independent failure is added to ``problems``."""
    where = f"{source}: stage {spec.name!r}"
    runtime = effective_runtime(recipe.runtime, spec.runtime)
    ok = inputs_ok
    with problems.check() as outcome:
        _check_adapter_use(spec, adapters, adapter_errors, where)
        _check_remote_code(spec, recipe, recipe_dir, runtime, models_ok, where)
    ok &= outcome.ok
    registered: Registered | None = None
    with problems.check(f"{where}: ") as outcome:
        registered = get_implementation(spec.stage, spec.plugin)
    params: PluginParams | None = None
    if registered is not None:
        with problems.check() as outcome:
            params = _validate_params(registered, spec, source)
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
            _check_limits(spec, params, recipe, model_configs, where)
            _static_check(registered, spec, params, recipe, model_configs, where, recipe_dir)
        ok &= outcome.ok
    if not (ok and data_ok):
        return None
    deps = sorted({r for refs in spec.references().values() for r in refs if r in kinds})
    return PlannedStage(spec, registered, params, data, runtime, deps)


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
    except WeightFileError as exc:
        raise RecipeError(f"{source}: models.{name}: the weights of model {name!r} are "
                          f"unusable: {exc}") from None
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


#: more optimizer steps than this is a typo, not a plan (about three years at one step a
#: second); refused before a run sets out to do them
MAX_STEPS = 100_000_000
#: params that set a sequence length in tokens, checked against the model's positions
_LENGTH_PARAMS = ("seq_len", "max_length")


def _check_limits(spec: StageSpec, params: PluginParams, recipe: Recipe,
                  configs: dict[str, dict | None], where: str) -> None:
    """Absurd sizes are named before anything runs: ``steps`` past :data:`MAX_STEPS`, and a
    sequence length beyond what the input model's position embeddings cover."""
    if isinstance(params, TrainingParams) and params.steps > MAX_STEPS:
        raise RecipeError(f"{where} params.steps: {params.steps} steps is not a plausible run "
                          f"(at most {MAX_STEPS:,})")
    for key in _LENGTH_PARAMS:
        value = getattr(params, key, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        for refs_key, refs in spec.references().items():
            if refs_key == "layers":
                continue
            for ref in refs:
                cfg = _root_config(ref, recipe, configs)
                limit = _max_positions(cfg) if cfg is not None else None
                if limit is not None and value > limit:
                    raise RecipeError(f"{where} params.{key}: {value} tokens is more than model "
                                      f"{ref!r} has positions for (max_position_embeddings "
                                      f"{limit})")


def _max_positions(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict):
            value = cfg.get("max_position_embeddings")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _check_remote_code(spec: StageSpec, recipe: Recipe, recipe_dir: Path, runtime: Runtime,
                       models_ok: dict[str, bool], where: str) -> None:
    """Input folders that name custom code need the stage's runtime.trust_remote_code."""
    for key, refs in spec.references().items():
        for ref in refs:
            model = recipe.models.get(ref)
            if key == "layers" or model is None or model.path is None or not models_ok.get(ref):
                continue
            try:
                check_remote_code(resolve_model_path(model, recipe_dir), runtime.trust_remote_code)
            except EngineError as exc:
                raise RecipeError(f"{where}: {key}: {ref!r}: {exc}") from None
