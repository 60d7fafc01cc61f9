"""The conformance suite: one call per plugin checks that it keeps the engine's contract.

::

    from engine.testing.conformance import check_plugin

    def test_my_merge_conforms():
        check_plugin(MyMerge(), "merge", variations={"gamma": 0.05})

:func:`check_plugin` dispatches on the stage kind (:data:`engine.stages.STAGE_KINDS`) to
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

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.stages import ADAPT_LANGUAGE, ALIGN, EVALUATE, MERGE, SELECT_LAYERS, kind_of

__all__ = [
    "ConformanceError", "ConformanceReport", "check_aligner", "check_evaluator",
    "check_layer_selector", "check_merge_method", "check_options", "check_params", "check_plugin",
    "check_trainer",
]


class ConformanceError(AssertionError):
    """A plugin broke a conformance property; ``plugin``, ``kind`` and ``prop`` say which."""

    def __init__(self, kind: str, plugin: str, prop: str, detail: str) -> None:
        super().__init__(f"{kind} plugin {plugin!r} breaks {prop!r}: {detail}")
        self.kind, self.plugin, self.prop, self.detail = kind, plugin, prop, detail


@dataclass
class ConformanceReport:
    """What a check found: ``passed``, the properties that held; ``skipped``, property ->
    why it could not be checked for this plugin (e.g. a merge method that takes any number
    of models has no other count to refuse); ``notes``, facts worth knowing."""

    plugin: str
    kind: str
    passed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


class Checker:
    """Runs properties of one plugin; turns any failure into a :class:`ConformanceError`."""

    def __init__(self, impl: Any, kind: str) -> None:
        self.impl = impl
        self.kind = kind
        self.name = str(getattr(impl, "name", type(impl).__name__))
        self.report = ConformanceReport(self.name, kind)

    def fail(self, prop: str, detail: str) -> None:
        raise ConformanceError(self.kind, self.name, prop, detail)

    @contextmanager
    def prop(self, prop: str) -> Iterator[None]:
        try:
            yield
        except ConformanceError:
            raise
        except AssertionError as exc:
            # pytest's assertion rewriting appends the failed expression: keep the message
            detail = str(exc).split("\nassert ")[0] or "assertion failed"
            raise ConformanceError(self.kind, self.name, prop, detail) from exc
        except Exception as exc:
            raise ConformanceError(self.kind, self.name, prop,
                                   f"raised {type(exc).__name__}: {exc}") from exc
        self.report.passed.append(prop)

    def note(self, text: str) -> None:
        self.report.notes.append(text)


# --- params ------------------------------------------------------------------------------


def check_params(impl: Any, kind: str, params: Mapping[str, Any] | None = None) -> ConformanceReport:
    """The ``Params`` contract, for every kind: it subclasses ``PluginParams``; it builds
    from ``params`` (the defaults when empty); every field has a description; the JSON
    schema builds and serialises; a dump validates back to equal params (and survives
    JSON); ``result_key()`` is JSON; an unknown key is refused. Also: the implementation
    has a non-empty ``name``, a one-line description, and valid ``data_formats``."""
    return _check_params(Checker(impl, kind), params or {})


def _check_params(c: Checker, params: Mapping[str, Any]) -> ConformanceReport:
    import json
    import typing

    from pydantic import ValidationError

    from engine.implementation import describe
    from engine.inputs import DataFormat
    from engine.params import PluginParams

    impl = c.impl
    with c.prop("declares name, description and data formats"):
        assert isinstance(getattr(impl, "name", None), str) and impl.name, "no string 'name'"
        assert callable(getattr(impl, "run", None)), "no run(context, inputs, params)"
        assert describe(impl), ("no description: give the class a docstring or a "
                                "'description' attribute (engine plugins shows it)")
        formats = getattr(impl, "data_formats", None)
        if formats is not None:
            known = set(typing.get_args(DataFormat))
            assert set(formats) <= known, f"data_formats {formats!r} names formats outside {sorted(known)}"
    P = getattr(impl, "Params", None)
    with c.prop("params: subclass PluginParams"):
        assert isinstance(P, type) and issubclass(P, PluginParams), \
            f"Params is {P!r}, not a subclass of engine.api.PluginParams"
    with c.prop("params: defaults build"):
        built = P.model_validate(dict(params))
    with c.prop("params: documented"):
        missing = [n for n, f in P.model_fields.items() if not f.description]
        assert not missing, f"fields without a description: {missing} (Field(..., description=...))"
    with c.prop("params: JSON schema"):
        schema = P.model_json_schema(by_alias=True)
        json.dumps(schema)
        props = set(schema.get("properties", {}))
        want = {f.alias or n for n, f in P.model_fields.items()}
        assert want <= props, f"schema lacks properties {sorted(want - props)}"
    with c.prop("params: round-trip"):
        dumped = json.loads(json.dumps(built.model_dump(mode="json", by_alias=True)))
        again = P.model_validate(dumped)
        assert again == built, f"dump {dumped!r} validates back to {again!r}, not {built!r}"
        json.dumps(built.result_key())
    with c.prop("params: unknown keys refused"):
        try:
            P.model_validate({**params, "no_such_param_lingoforge": 1})
        except ValidationError:
            pass
        else:
            raise AssertionError("an unknown key 'no_such_param_lingoforge' was accepted "
                                 "(a recipe typo would pass silently); keep extra='forbid'")
    return c.report


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
    import inspect

    params = inspect.signature(_check_function(kind_of(kind).name)).parameters
    return tuple(p for p in params if p != "impl")


def _check_function(kind: str) -> Any:
    checks = {ADAPT_LANGUAGE: check_trainer, SELECT_LAYERS: check_layer_selector,
              MERGE: check_merge_method, ALIGN: check_aligner, EVALUATE: check_evaluator}
    if kind not in checks:
        raise KeyError(f"no conformance check for stage kind {kind!r}")
    return checks[kind]


def _registered_kind(impl: Any) -> str:
    from engine.plugin_manager import all_implementations

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
    from engine.testing._merge import check_merge_method as check

    return check(impl, params=params, variations=variations, family=family, models=models,
                 workdir=workdir)


def check_trainer(impl: Any, *, params: Mapping[str, Any] | None = None,
                  data: Sequence[Any] | None = None, layers: Sequence[int] | None = None,
                  model: Path | None = None, workdir: Path | None = None) -> ConformanceReport:
    """Check an adapt-language trainer on ``model`` (a folder; default: the tiny model).
    ``params`` are merged over a few fast steps (steps 2, batch_size 2, seq_len 32);
    ``data``: a list of ``DataSource`` (default: a file of the first of its
    ``data_formats``); ``layers``: layer indices handed as the stage's ``layers`` input.
    The properties are in docs/plugins.md and :func:`engine.testing._train.check_trainer`."""
    from engine.testing._train import check_trainer as check

    return check(impl, params=params, data=data, layers=layers, model=model, workdir=workdir)


def check_aligner(impl: Any, *, model: Any, base: Any, params: Mapping[str, Any] | None = None,
                  data: Sequence[Any] | None = None, workdir: Path | None = None) -> ConformanceReport:
    """Check an aligner that puts ``model`` (a trained part, e.g. an ELO sub-model; a folder
    or ``ModelArtifact``) back into ``base`` (the same). ``params`` are merged over a few
    fast steps; ``data`` (default: none) is what it fine-tunes on. The properties are in
    docs/plugins.md and :func:`engine.testing._train.check_aligner`."""
    from engine.testing._train import check_aligner as check

    return check(impl, model=model, base=base, params=params, data=data, workdir=workdir)


def check_layer_selector(impl: Any, *, params: Mapping[str, Any] | None = None,
                         data: Sequence[Any] | None = None, model: Path | None = None,
                         workdir: Path | None = None) -> ConformanceReport:
    """Check a layer selector on ``model`` (a folder; default: the tiny model). ``data``
    defaults to a text file when it declares ``data_formats``. The properties are in
    docs/plugins.md and :func:`engine.testing._score.check_layer_selector`."""
    from engine.testing._score import check_layer_selector as check

    return check(impl, params=params, data=data, model=model, workdir=workdir)


def check_evaluator(impl: Any, *, params: Mapping[str, Any] | None = None,
                    data: Sequence[Any] | None = None, models: Mapping[str, Path] | None = None,
                    workdir: Path | None = None) -> ConformanceReport:
    """Check an evaluator on ``models`` (``{name: folder}``; default: the family's ``base``
    and ``a``). ``data`` defaults to one file per declared format (text, choice). The
    properties are in docs/plugins.md and :func:`engine.testing._score.check_evaluator`."""
    from engine.testing._score import check_evaluator as check

    return check(impl, params=params, data=data, models=models, workdir=workdir)


# --- shared helpers ------------------------------------------------------------------------


def model_state(folder: Path) -> dict[str, Any]:
    """Every tensor of a model folder, in memory."""
    from safetensors.torch import load_file

    from engine import modelio

    out: dict[str, Any] = {}
    for f in modelio.weight_files(Path(folder)):
        out.update(load_file(str(f)))
    return out


def output_state(folder: Path) -> dict[str, Any]:
    """A model folder's tensors; for a LoRA adapter folder, those of the model it stands for
    (its base with the adapter merged in, as the engine loads it)."""
    import torch

    from engine import modelio
    from engine.merging.lora import is_adapter_folder

    if not is_adapter_folder(Path(folder)):
        return model_state(folder)
    model = modelio.load_model(Path(folder), dtype=torch.float32, device=torch.device("cpu"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Names present in both with the same shape whose values differ (bitwise), plus names
    whose shape or dtype differs."""
    import torch

    out = []
    for k, v in after.items():
        if k not in before:
            continue
        b = before[k]
        if b.shape != v.shape or b.dtype != v.dtype or not torch.equal(b, v):
            out.append(k)
    return out


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread: one reduction order, so runs compare bitwise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_context(workdir: Path, stage_name: str, kind: str, plugin: str) -> Any:
    """A stage context for a conformance run, its log lines silenced."""
    from rich.console import Console

    from engine.testing.builders import make_stage_context

    return make_stage_context(workdir, stage_name, kind, plugin, console=Console(quiet=True))


def loads_as_model(folder: Path) -> None:
    """The folder loads as a causal LM (a LoRA adapter folder through the engine's loader)."""
    import torch

    from engine import modelio
    from engine.merging.lora import is_adapter_folder

    if is_adapter_folder(Path(folder)):
        modelio.load_model(folder, dtype=torch.float32, device=torch.device("cpu"))
        return
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(folder))
