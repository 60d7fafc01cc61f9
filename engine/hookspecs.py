"""The hook specification: the contract between the engine and every plugin.

lingoforge runs recipes made of *stages*. Each stage kind has one hook here, in
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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from engine.artifacts import Artifact
    from engine.context import StageContext
    from engine.implementation import StageImplementation
    from engine.recipe import Recipe, StageSpec

PROJECT_NAME = "engine"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[["StageImplementation"], None]


# --- stage hooks -----------------------------------------------------------------


@hookspec
def register_language_adapters(register: Register) -> None:
    """Register *adapt-language* implementations: they train a model on text or
    instructions (continual pretraining, supervised fine-tuning, ELO's detached-layer
    training) and return a :class:`engine.api.ModelArtifact`.

    Inputs a recipe may give: ``model`` (required), ``data`` (required), ``layers``
    (optional, the output of a select-layers stage).
    """


@hookspec
def register_layer_selectors(register: Register) -> None:
    """Register *select-layers* implementations: they choose which decoder layers a
    later stage trains and return a :class:`engine.api.LayerSelection` whose
    ``explanation`` says why.

    Inputs: ``model`` (required; only its config needs to be read by simple
    selectors), ``data`` (optional, for data-driven selectors).
    """


@hookspec
def register_merge_methods(register: Register) -> None:
    """Register *merge* implementations: they combine ``models`` (each optionally
    relative to ``base``) into one model and return a :class:`engine.api.ModelArtifact`.

    Inputs: ``models`` (required, at least one), ``base`` (required by methods that
    work on task vectors). Merges should stream tensor by tensor
    (:mod:`engine.merging`) so that peak memory stays a few tensors.
    """


@hookspec
def register_aligners(register: Register) -> None:
    """Register *align* implementations: they re-integrate separately trained parts
    into a full model (ELO's layer alignment: put the trained layers back, then a
    brief full fine-tune) and return a :class:`engine.api.ModelArtifact`.

    Inputs: ``model`` (required, the trained part, for example an ELO sub-model),
    ``base`` (optional, the full model to put it back into; defaults to the model the
    part was detached from), ``data`` (optional, the fine-tuning data).
    """


@hookspec
def register_evaluators(register: Register) -> None:
    """Register *evaluate* implementations: they score ``models`` on ``data`` and
    return a :class:`engine.api.MetricsArtifact` mapping each model name to its
    metrics. The runner writes it to ``<workdir>/<stage>/metrics.json``.

    Inputs: ``models`` (required), ``data`` (required).
    """


# --- lifecycle hooks ---------------------------------------------------------------


@hookspec
def stage_started(context: StageContext, stage: StageSpec) -> None:
    """Called before a stage runs (not called for a stage served from the cache)."""


@hookspec
def stage_finished(context: StageContext, stage: StageSpec, artifact: Artifact,
                   record: dict[str, Any]) -> None:
    """Called after a stage wrote its output; ``record`` is its report.json entry."""


@hookspec
def run_finished(recipe: Recipe, workdir: str, report: dict[str, Any]) -> None:
    """Called once after every stage ran and report.json was written."""
