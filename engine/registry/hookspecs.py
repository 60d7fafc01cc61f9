"""The hook specification: the contract between the engine and every plugin.

lingoforge runs recipes made of *stages*. Each stage kind has one hook here,
generated from its entry in the stage kinds table (:data:`engine.core.stages.STAGE_KINDS`), in
register style: the engine calls the hook with a ``register`` callable, and a plugin
calls ``register(implementation)`` once per implementation it provides. An
implementation is a small object (see :class:`engine.api.StageImplementation`):

* ``name`` -- the value a recipe writes in ``plugin:``;
* ``Params`` -- a pydantic model of the recipe keys under ``params:``, with defaults
  and field descriptions (it is the documentation and the validation in one place);
* ``run(context, inputs, params)`` -- does the work and returns an artifact.

Lifecycle hooks let a plugin observe a run (log to a tracker, send a notification)
without touching the runner. Their return values are ignored.

Write an implementation as in ``plugins/``; every built-in is registered through
these very hooks, exactly like a third-party plugin shipped with an entry point in
the group ``engine.plugins``.

The hooks name the stage context and the recipe's types in their docstrings rather than
importing them: the registry only collects implementations and calls observers, so it sits
right above :mod:`engine.core`, below the runtime and the recipe (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

from engine.core.stages import INPUT_KEYS, STAGE_KINDS, StageKind

PROJECT_NAME = "engine"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: what a register hook receives: call it once per implementation (an object with ``name``,
#: ``Params`` and ``run``: :class:`engine.registry.implementation.StageImplementation`)
Register = Callable[[Any], None]


# --- stage hooks -----------------------------------------------------------------
#
# One register hook per entry of the stage kinds table (engine.core.stages.STAGE_KINDS),
# generated from it, so that adding a stage kind is one table entry. Each hook's
# docstring -- the contract -- is built from the entry: read it with
# ``help(engine.registry.hookspecs.register_merge_methods)`` or in docs/plugins.md.

_ARTIFACT_CLASS = {"model": "ModelArtifact", "layers": "LayerSelection", "metrics": "MetricsArtifact"}


def _inputs(kind: StageKind) -> str:
    def listed(keys: frozenset[str]) -> str:
        return ", ".join(f"``{k}``" for k in INPUT_KEYS if k in keys) or "none"

    return f"Inputs: {listed(kind.required)} (required); {listed(kind.optional)} (optional)."


def stage_hook_doc(kind: StageKind) -> str:
    """The contract of ``kind``'s register hook, from its table entry."""
    trains = (" Its stages train: they are seeded, checkpointed and resumable, and a "
              "cache hit skips them." if kind.trains else "")
    return (f"Register *{kind.name}* implementations: they {kind.summary} and return an "
            f":class:`engine.api.{_ARTIFACT_CLASS[kind.artifact]}`.\n\n"
            f"{kind.contract}{trains}\n\n{_inputs(kind)}\n")


def _stage_hookspec(kind: StageKind) -> Callable[[Register], None]:
    def register_hook(register: Register) -> None:
        pass

    register_hook.__name__ = register_hook.__qualname__ = kind.hook
    register_hook.__doc__ = stage_hook_doc(kind)
    return hookspec(register_hook)


for _kind in STAGE_KINDS.values():
    globals()[_kind.hook] = _stage_hookspec(_kind)
del _kind


# --- tool hooks --------------------------------------------------------------------


@hookspec
def register_embedding_inits(register: Register) -> None:
    """Register ways to initialise the embedding rows of tokens a model's vocabulary gains.

    ``engine extend-tokenizer``, ``engine transplant-tokenizer`` and the ``vocabulary``
    stage call one of them for every token the new tokenizer has and the old one lacks
    (tokens both have keep their rows exactly). An implementation has ``name`` (what
    ``--init`` names), ``Params`` (a :class:`engine.api.PluginParams` of its options) and
    ``init_rows(problem, params)``, which receives an
    :class:`engine.models.tokenizer.inits.InitProblem` (the old embedding and head, the new
    tokens with their split under the old tokenizer, both tokenizers, the target text) and
    returns an :class:`engine.models.tokenizer.inits.InitRows`. Not a stage kind: an
    initialisation never runs on its own, it fills rows inside one of those commands."""


# --- lifecycle hooks ---------------------------------------------------------------


@hookspec
def stage_started(context: Any, stage: Any) -> None:
    """Called before a stage runs (not called for a stage served from the cache).

    ``context`` is the stage's :class:`engine.api.StageContext`, ``stage`` its recipe
    entry (a :class:`engine.recipe.StageSpec`)."""


@hookspec
def stage_finished(context: Any, stage: Any, artifact: Any, record: dict[str, Any]) -> None:
    """Called after a stage wrote its output; ``record`` is its report.json entry.

    ``context`` and ``stage`` are as in :func:`stage_started`; ``artifact`` is what the
    stage returned (an :data:`engine.api.Artifact`)."""


@hookspec
def run_finished(recipe: Any, workdir: str, report: dict[str, Any]) -> None:
    """Called once after every stage ran and report.json was written; ``recipe`` is the
    parsed recipe (an :class:`engine.recipe.Recipe`), ``report`` the content of report.json."""
