"""The conformance suite: one call per plugin checks that it keeps the engine's contract.

::

    from engine.testing.conformance import check_plugin

    def test_my_merge_conforms():
        check_plugin(MyMerge(), "merge", variations={"gamma": 0.05})

:func:`check_plugin` dispatches on the stage kind (:data:`engine.core.stages.STAGE_KINDS`) to
:func:`check_merge_method`, :func:`check_trainer`, :func:`check_layer_selector`,
:func:`check_aligner` or :func:`check_evaluator`. Each runs the implementation's
``run(context, inputs, params)`` on tiny in-process models (:mod:`engine.testing.builders`)
and raises :class:`ConformanceError` (an ``AssertionError``) whose message names the
plugin and the property it broke, e.g.::

    merge plugin 'median' breaks 'honours every parameter': weight={'a': 0.25} changed no
    tensor (of 29 whose inputs differ) ...

It returns a :class:`ConformanceReport` of the properties checked, those it could not
check for this plugin with the reason (``skipped``), and notes (for example that a method
merges large tensors whole rather than in row slices). The properties of each kind are
listed in their functions' docstrings and in docs/plugins.md; :func:`check_options`
names the options each kind takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from engine.core.stages import ADAPT_LANGUAGE, ALIGN, EVALUATE, MERGE, SELECT_LAYERS, kind_of
from engine.registry.manager import all_implementations
from engine.testing import _merge, _score, _train
from engine.testing._checks import (  # noqa: F401 - the helpers below are importable from here too
    Checker,
    ConformanceError,
    ConformanceReport,
    changed_tensors,
    check_params_contract,
    loads_as_model,
    model_state,
    output_state,
    quiet_context,
    single_thread,
)
from engine.testing._inits import check_embedding_init

__all__ = [
    "ConformanceError", "ConformanceReport", "check_aligner", "check_embedding_init", "check_evaluator",
    "check_layer_selector", "check_merge_method", "check_options", "check_params", "check_plugin",
    "check_trainer",
]


# --- params ------------------------------------------------------------------------------


def check_params(impl: Any, kind: str, params: Mapping[str, Any] | None = None) -> ConformanceReport:
    """The ``Params`` contract, for every kind: it subclasses ``PluginParams``; it builds
    from ``params`` (the defaults when empty); every field has a description; the JSON
    schema builds and serialises; a dump validates back to equal params (and survives
    JSON); ``result_key()`` is JSON; an unknown key is refused. Also: the implementation
    has a non-empty ``name``, a one-line description, and valid ``data_formats``."""
    return check_params_contract(Checker(impl, kind), params or {})


# --- dispatch ----------------------------------------------------------------------------


def check_plugin(impl: Any, kind: str | None = None, **options: Any) -> ConformanceReport:
    """Check ``impl`` as an implementation of stage ``kind`` (found among the registered
    implementations when omitted); ``options`` go to the kind's check function
    (:func:`check_options` names them; any other is a ``TypeError`` listing them)."""
    if kind is None:
        kind = _registered_kind(impl)
    entry = kind_of(kind)
    check = _check_function(entry.name)
    unknown = sorted(set(options) - set(check_options(entry.name)))
    if unknown:
        raise TypeError(f"check_plugin(impl, {entry.name!r}) takes the options "
                        f"{', '.join(check_options(entry.name))}; not {', '.join(unknown)}")
    return check(impl, **options)


def check_options(kind: str) -> tuple[str, ...]:
    """The options ``check_plugin(impl, kind, ...)`` takes: the keyword parameters of the
    kind's check function (``check_options("merge")`` -> params, variations, family,
    models, workdir)."""
    params = inspect.signature(_check_function(kind_of(kind).name)).parameters
    return tuple(p for p in params if p != "impl")


def _check_function(kind: str) -> Any:
    checks = {ADAPT_LANGUAGE: check_trainer, SELECT_LAYERS: check_layer_selector,
              MERGE: check_merge_method, ALIGN: check_aligner, EVALUATE: check_evaluator}
    if kind not in checks:
        raise KeyError(f"no conformance check for stage kind {kind!r}")
    return checks[kind]


def _registered_kind(impl: Any) -> str:
    for kind, impls in all_implementations().items():  # a shadowed implementation too
        for reg in impls:
            if reg.impl is impl or (type(reg.impl) is type(impl) and reg.name == impl.name):
                return kind
    raise TypeError(f"{impl!r} is not a registered implementation: pass its stage kind, "
                    "e.g. check_plugin(impl, 'merge')")


def check_merge_method(impl: Any, *, params: Mapping[str, Any] | None = None,
                       variations: Mapping[str, Any] | None = None,
                       family: Mapping[str, Path] | None = None,
                       models: int | Sequence[str] | Mapping[str, Path] | None = None,
                       workdir: Path | None = None) -> ConformanceReport:
    """Check a merge method on a base and as many models as it merges (three when its
    ``min_models``/``max_models`` allow, else the nearest count: two for slerp).
    ``params``: the baseline params (default: the defaults); ``variations``: ``{own param:
    a value that should change the output}``; ``family``: ``{"base": folder, name: folder,
    ...}`` (default: the kit's own, built with as many models as needed); ``models``: the
    merged models, as a count (the first of the family's), names of the family's models,
    or ``{name: folder}`` merged onto the family's base; ``workdir``: where outputs go
    (default: a temporary folder). The properties are in docs/plugins.md and
    :func:`engine.testing._merge.check_merge_method`."""
    return _merge.check_merge_method(impl, params=params, variations=variations, family=family, models=models,
                 workdir=workdir)


def check_trainer(impl: Any, *, params: Mapping[str, Any] | None = None,
                  data: Sequence[Any] | None = None, layers: Sequence[int] | None = None,
                  model: Path | None = None, workdir: Path | None = None) -> ConformanceReport:
    """Check an adapt-language trainer on ``model`` (a folder; default: the tiny model).
    ``params`` are merged over a few fast steps (steps 2, batch_size 2, seq_len 32);
    ``data``: a list of ``DataSource`` (default: a file of the first of its
    ``data_formats``); ``layers``: layer indices handed as the stage's ``layers`` input.
    The properties are in docs/plugins.md and :func:`engine.testing._train.check_trainer`."""
    return _train.check_trainer(impl, params=params, data=data, layers=layers, model=model, workdir=workdir)


def check_aligner(impl: Any, *, model: Any, base: Any, params: Mapping[str, Any] | None = None,
                  data: Sequence[Any] | None = None, workdir: Path | None = None) -> ConformanceReport:
    """Check an aligner that puts ``model`` (a trained part, e.g. an ELO sub-model; a folder
    or ``ModelArtifact``) back into ``base`` (the same). ``params`` are merged over a few
    fast steps; ``data`` (default: none) is what it fine-tunes on. The properties are in
    docs/plugins.md and :func:`engine.testing._train.check_aligner`."""
    return _train.check_aligner(impl, model=model, base=base, params=params, data=data, workdir=workdir)


def check_layer_selector(impl: Any, *, params: Mapping[str, Any] | None = None,
                         data: Sequence[Any] | None = None, model: Path | None = None,
                         workdir: Path | None = None) -> ConformanceReport:
    """Check a layer selector on ``model`` (a folder; default: the tiny model). ``data``
    defaults to a text file when it declares ``data_formats``. The properties are in
    docs/plugins.md and :func:`engine.testing._score.check_layer_selector`."""
    return _score.check_layer_selector(impl, params=params, data=data, model=model, workdir=workdir)


def check_evaluator(impl: Any, *, params: Mapping[str, Any] | None = None,
                    data: Sequence[Any] | None = None, models: Mapping[str, Path] | None = None,
                    workdir: Path | None = None) -> ConformanceReport:
    """Check an evaluator on ``models`` (``{name: folder}``; default: the family's ``base``
    and ``a``). ``data`` defaults to one file per declared format (text, choice). The
    properties are in docs/plugins.md and :func:`engine.testing._score.check_evaluator`."""
    return _score.check_evaluator(impl, params=params, data=data, models=models, workdir=workdir)
