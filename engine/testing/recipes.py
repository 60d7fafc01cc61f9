"""Run a recipe in-process through the real runner, as ``engine run`` does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.recipe.spec import apply_overrides, load_recipe, parse_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import Runner

__all__ = ["run_recipe"]


def run_recipe(recipe: Mapping[str, Any] | str | Path, workdir: str | Path, *,
               overrides: Sequence[str] = (), recipe_dir: str | Path | None = None,
               use_cache: bool = True) -> dict[str, Any]:
    """Validate and run ``recipe`` into ``workdir``; return the report (report.json's content).

    ``recipe`` is a recipe file or the recipe as a mapping (what the YAML would hold).
    Relative paths in it are resolved against the file's folder, or ``recipe_dir`` for a
    mapping (default: the current directory). ``overrides`` are ``--set`` items
    (``stages.merged.params.lambda=0.5``). Errors are the engine's own: a
    :class:`~engine.core.errors.RecipeError` for an invalid recipe, a
    :class:`~engine.run.runner.StageFailed` naming the stage that raised.
    """
    if isinstance(recipe, Mapping):
        import copy

        data = apply_overrides(copy.deepcopy(dict(recipe)), list(overrides))
        source = "<recipe>"
        parsed = parse_recipe(data, source)
        folder = Path(recipe_dir) if recipe_dir is not None else Path.cwd()
    else:
        path = Path(recipe)
        parsed = load_recipe(path, list(overrides))
        source = str(path)
        folder = Path(recipe_dir) if recipe_dir is not None else path.resolve().parent
    plan = plan_recipe(parsed, folder.resolve(), source)
    return Runner(plan, Path(workdir), use_cache=use_cache).run()
