"""What every conformance check shares: the failure it raises, the report it returns, the
checker that turns a broken property into a :class:`ConformanceError`, the ``Params``
properties every kind starts with, and helpers that read model folders and run a stage
quietly.

A module of its own below :mod:`engine.testing.conformance` (which dispatches on the stage
kind) and the kinds' checks (:mod:`engine.testing._merge`, :mod:`engine.testing._train`,
:mod:`engine.testing._score`), so that those never import the module that calls them.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from rich.console import Console
from safetensors.torch import load_file

from engine.core.inputs import DataFormat
from engine.core.params import PluginParams
from engine.models import modelio
from engine.models.layout import is_adapter_folder, weight_files
from engine.registry.implementation import describe
from engine.testing.builders import make_stage_context

__all__ = ["Checker", "ConformanceError", "ConformanceReport", "changed_tensors",
           "check_params_contract", "loads_as_model", "model_state", "output_state",
           "quiet_context", "single_thread"]


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


def check_params_contract(c: Checker, params: Mapping[str, Any]) -> ConformanceReport:
    """The ``Params`` properties every kind's check starts with (:func:`engine.testing.conformance.check_params`)."""
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




def model_state(folder: Path) -> dict[str, Any]:
    """Every tensor of a model folder, in memory."""
    out: dict[str, Any] = {}
    for f in weight_files(Path(folder)):
        out.update(load_file(str(f)))
    return out


def output_state(folder: Path) -> dict[str, Any]:
    """A model folder's tensors; for a LoRA adapter folder, those of the model it stands for
    (its base with the adapter merged in, as the engine loads it)."""
    if not is_adapter_folder(Path(folder)):
        return model_state(folder)
    model = modelio.load_model(Path(folder), dtype=torch.float32, device=torch.device("cpu"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_tensors(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """Names present in both with the same shape whose values differ (bitwise), plus names
    whose shape or dtype differs."""
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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quiet_context(workdir: Path, stage_name: str, kind: str, plugin: str) -> Any:
    """A stage context for a conformance run, its log lines silenced."""
    return make_stage_context(workdir, stage_name, kind, plugin, console=Console(quiet=True))


def loads_as_model(folder: Path) -> None:
    """The folder loads as a causal LM (a LoRA adapter folder through the engine's loader)."""
    if is_adapter_folder(Path(folder)):
        modelio.load_model(folder, dtype=torch.float32, device=torch.device("cpu"))
        return
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(folder))
