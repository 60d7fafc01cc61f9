"""lingoforge: adapt multilingual LLMs to new and updated languages cheaply.

The engine runs recipes (YAML pipelines of stages) whose stages are implemented by
pluggy plugins; see :mod:`engine.registry.hookspecs` for the contract and :mod:`engine.api`
for what plugins import. docs/architecture.md draws its packages and their layers.

Old import paths: 0.6 moved the engine's modules into packages. Every module path the docs,
the changelog or the API reference showed before (``engine.tasks``, ``engine.modelio``,
``engine.cli_merge``, ...) still imports for one minor release, through the one table
below, with a :class:`DeprecationWarning` naming the new path (the old path *is* the new
module; one whose module was split is a view that finds each name); they go in
:data:`OLD_PATHS_REMOVED_IN`. ``python -m`` works on them too (``python -m engine.cli_merge``).
Other internal paths moved without an alias: only ``engine.api*`` and ``engine.testing``
are promised to plugin authors.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import Any

__version__ = "0.5.0"

#: the release that drops the old paths below
OLD_PATHS_REMOVED_IN = "0.7.0"

#: old module path -> the module that holds its content now
MOVED_MODULES: dict[str, str] = {
    "engine.adapters": "engine.models.adapters",
    "engine.answers": "engine.evaluation.answers",
    "engine.arch": "engine.models.arch",
    "engine.artifacts": "engine.core.artifacts",
    "engine.batching": "engine.training.batching",
    "engine.capabilities": "engine.models.capabilities",
    "engine.cli_merge": "engine.cli.merge",
    "engine.cli_ops": "engine.cli.ops",
    "engine.console": "engine.core.console",
    "engine.context": "engine.run.context",
    "engine.coverage": "engine.models.tokenizer.coverage",
    "engine.distributed": "engine.run.distributed",
    "engine.errors": "engine.core.errors",
    "engine.estimate": "engine.recipe.estimate",
    "engine.eval_cache": "engine.evaluation.cache",
    "engine.generation": "engine.evaluation.generation",
    "engine.hookspecs": "engine.registry.hookspecs",
    "engine.implementation": "engine.registry.implementation",
    "engine.inputs": "engine.core.inputs",
    "engine.lora_training": "engine.training.lora",
    "engine.model_card": "engine.models.card",
    "engine.modelio": "engine.models.modelio",
    "engine.outputs": "engine.core.outputs",
    "engine.packing": "engine.training.packing",
    "engine.params": "engine.core.params",
    "engine.plugin_manager": "engine.registry.manager",
    "engine.report": "engine.run.record",
    "engine.resources": "engine.run.resources",
    "engine.run_status": "engine.run.status",
    "engine.runner": "engine.run.runner",
    "engine.runtime_spec": "engine.recipe.runtime",
    "engine.scoring": "engine.evaluation.scoring",
    "engine.slow_paths": "engine.models.slow_paths",
    "engine.spans": "engine.evaluation.spans",
    "engine.stage_cache": "engine.run.stage_cache",
    "engine.stages": "engine.core.stages",
    "engine.tasks": "engine.evaluation.choices",
    "engine.token_cache": "engine.data.token_cache",
    "engine.tokenizer_extend": "engine.models.tokenizer.extend",
    "engine.trainer_params": "engine.training.params",
}

_ANSWERS = ("AnswerItem", "AnswerMatch", "generate_answers", "generation_plan", "load_answer_items",
            "plan_generation", "summarize_exact_match")
_PROMPTS = ("FewShot", "Shots", "chat_messages", "encode_prompt", "fewshot_indices", "render_prompt",
            "use_chat_template")
_METRICS = ("LOWER_IS_BETTER", "best_values", "collect_metrics", "direction", "format_number",
            "format_params", "legend", "lower_is_better", "metric_language", "order_columns")

#: (old module path, name) -> the module that holds the name now, where that is not the
#: old module's new home: names that left their module when it was split
MOVED_NAMES: dict[tuple[str, str], str] = {
    **{("engine.tasks", n): "engine.evaluation.answers" for n in _ANSWERS},  # moved in 0.2
    **{("engine.tasks", n): "engine.evaluation.prompts" for n in _PROMPTS},
    **{("engine.report", n): "engine.run.report.metrics" for n in _METRICS},
    ("engine.report", "metrics_table"): "engine.run.report.tables",
    ("engine.report", "stages_table"): "engine.run.report.tables",
    ("engine.batching", "IGNORE_INDEX"): "engine.training.examples",
    ("engine.plugin_manager", "plugins_info"): "engine.registry.info",
}


def _stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the code doing the import: past this
    module's frames (:func:`warnings.warn` itself skips the import system's)."""
    frame, skipped = sys._getframe(1), 0
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_globals.get("__name__", "").startswith(
                                     ("importlib", "_frozen_importlib"))):
        # warnings.warn does not count the import system's bootstrap frames itself
        skipped += not frame.f_code.co_filename.startswith("<frozen importlib")
        frame = frame.f_back
    return skipped + 1


def _warn(old: str, instead: str) -> None:
    """Say that ``old`` is deprecated and what to import ``instead``."""
    warnings.warn(f"{old} is deprecated: {instead} (the old path goes in lingoforge "
                  f"{OLD_PATHS_REMOVED_IN})", DeprecationWarning, stacklevel=_stacklevel())


#: old paths whose module was split: they are read through a view (:class:`_SplitPath`)
_SPLIT = frozenset(old for old, _ in MOVED_NAMES)


class _SplitPath(types.ModuleType):
    """An old path whose module was split: a read-only view that finds each name where it
    lives now (``engine.tasks.X`` in :mod:`engine.evaluation.choices`, or in the module
    :data:`MOVED_NAMES` names). Every other old path is the new module itself."""

    def __init__(self, old: str) -> None:
        super().__init__(old, f"Deprecated: {old} moved to {MOVED_MODULES[old]}.")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        home = importlib.import_module(MOVED_MODULES[self.__name__])
        if name == "__all__":  # ``from engine.tasks import *``: the new module's public names
            return list(getattr(home, "__all__", [n for n in vars(home) if not n.startswith("_")]))
        moved = MOVED_NAMES.get((self.__name__, name))
        if moved is not None:
            _warn(f"{self.__name__}.{name}", f"import {name} from {moved}")
            home = importlib.import_module(moved)
        try:
            return getattr(home, name)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} (now {MOVED_MODULES[self.__name__]}) has "
                                 f"no attribute {name!r}") from None

    def __dir__(self) -> list[str]:
        return sorted(set(dir(importlib.import_module(MOVED_MODULES[self.__name__])))
                      | {n for m, n in MOVED_NAMES if m == self.__name__})


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths (last on ``sys.meta_path``: a real module always wins)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"alias of {MOVED_MODULES[fullname]}")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        _warn(spec.name, f"import {MOVED_MODULES[spec.name]}")
        return _SplitPath(spec.name) if spec.name in _SPLIT else None

    def exec_module(self, module: types.ModuleType) -> None:
        """The old path becomes the new module itself (the import system reads the module
        back from ``sys.modules``), so that ``engine.modelio is engine.models.modelio`` and a
        monkeypatch through the old path patches what the engine uses."""
        if not isinstance(module, _SplitPath):
            sys.modules[module.__name__] = importlib.import_module(MOVED_MODULES[module.__name__])

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The new module's code, for ``python -m OLD.PATH`` (runpy asks the loader)."""
        _warn(fullname, f"run python -m {MOVED_MODULES[fullname]}")
        new = MOVED_MODULES[fullname]
        spec = importlib.util.find_spec(new)
        loader = spec.loader if spec is not None else None
        return loader.get_code(new) if isinstance(loader, importlib.abc.InspectLoader) else None


if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
    sys.meta_path.append(_OldPathFinder())


def __getattr__(name: str) -> Any:
    """``engine.tasks`` (attribute access, ``from engine import tasks``) for an old path."""
    if f"engine.{name}" in MOVED_MODULES:
        return importlib.import_module(f"engine.{name}")
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
