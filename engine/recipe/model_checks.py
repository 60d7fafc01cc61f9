"""The checks of ``engine validate`` that read a stage's input models (configs and
headers, never weights): where a LoRA adapter folder may go, each input model's config,
sizes beyond what a model or a run can take, custom code, and the plugin's own
``check(configs, params)``. :mod:`engine.recipe.validate` calls them stage by stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import world
from engine.core.errors import EngineError, RecipeError, WeightFileError
from engine.core.inputs import InputConfigs
from engine.core.params import PluginParams, TrainingParams
from engine.core.stages import MERGE
from engine.models import modelio
from engine.models.adapters import is_adapter_folder, read_adapter
from engine.models.safety import check_remote_code as _remote_code_check
from engine.recipe.spec import ModelSpec, Recipe, StageSpec, resolve_model_path, root_config
from engine.registry.implementation import StageImplementation
from engine.run.runtime import Runtime

__all__ = [
    "MAX_STEPS", "check_adapter_use", "check_limits", "check_remote_code", "model_config",
    "static_check",
]


def check_adapter_use(spec: StageSpec, adapters: dict[str, Path], adapter_errors: dict[str, str],
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


def model_config(name: str, spec: ModelSpec, recipe_dir: Path, source: str,
                  adapter_errors: dict[str, str] | None = None) -> dict[str, Any] | None:
    """config.json of an input model, read without loading weights. For a LoRA adapter
    folder: its base model's config as :mod:`engine.models.modelio` finds it, or None (the
    reason kept in ``adapter_errors``; a merge needs only the recipe's base)."""
    try:
        if spec.builtin is not None:
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


def static_check(impl: StageImplementation, spec: StageSpec, params: PluginParams, recipe: Recipe,
                  configs: dict[str, dict | None], where: str, recipe_dir: Path | None = None) -> None:
    """Call the implementation's optional ``check(configs, params)``."""
    check = getattr(impl, "check", None)
    if check is None:
        return
    by_key: dict[str, list[dict]] = {}
    names: dict[str, list[str]] = {}
    paths: dict[str, list[Path | None]] = {}
    for key, refs in spec.references().items():
        if key in ("layers", "search"):  # search: the models a search's evaluators score
            continue
        found = [root_config(r, recipe, configs) for r in refs]
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


def check_limits(spec: StageSpec, params: PluginParams, recipe: Recipe,
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
                cfg = root_config(ref, recipe, configs)
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


def check_remote_code(spec: StageSpec, recipe: Recipe, recipe_dir: Path, runtime: Runtime,
                       models_ok: dict[str, bool], where: str) -> None:
    """Input folders that name custom code need the stage's runtime.trust_remote_code."""
    for key, refs in spec.references().items():
        for ref in refs:
            model = recipe.models.get(ref)
            if key == "layers" or model is None or model.path is None or not models_ok.get(ref):
                continue
            try:
                _remote_code_check(resolve_model_path(model, recipe_dir), runtime.trust_remote_code)
            except EngineError as exc:
                raise RecipeError(f"{where}: {key}: {ref!r}: {exc}") from None
