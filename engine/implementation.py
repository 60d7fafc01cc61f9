"""What ``register(...)`` accepts (checked by :func:`check_implementation` when plugins
register), and the helpers that read an implementation's optional attributes (the
protocol and helpers in ``__all__`` are re-exported by :mod:`engine.api`)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from engine.artifacts import Artifact
from engine.errors import PluginError
from engine.inputs import DataSource, StageInputs
from engine.params import PluginParams
from engine.stages import EVALUATE

if TYPE_CHECKING:
    from engine.context import StageContext

__all__ = ["StageImplementation", "data_format_error", "describe"]


@runtime_checkable
class StageImplementation(Protocol):
    """What ``register(...)`` accepts.

    ``name`` is the recipe's ``plugin:`` value; ``Params`` a :class:`PluginParams`
    subclass; ``run`` does the work. ``description`` (optional) is a one-line
    summary shown by ``engine plugins``. ``data_formats`` (optional, a tuple of
    :data:`DataFormat` names) lets ``engine validate`` check a stage's ``data:``
    before anything runs (see :func:`data_format_error`).
    """

    name: str
    Params: type[PluginParams]

    def run(self, context: StageContext, inputs: StageInputs, params: Any) -> Artifact: ...


def data_format_error(impl: Any, stage_kind: str, sources: Sequence[DataSource]) -> str | None:
    """Why ``sources`` do not suit ``impl`` (None when they do, or when ``impl`` declares
    no ``data_formats``). An evaluator reads the sources of its formats and ignores the
    others, so one matching source is enough; every other stage (trainers, selectors)
    reads all its data, so every source must be of a declared format."""
    formats = tuple(getattr(impl, "data_formats", None) or ())
    if not formats or not sources:
        return None
    wanted = " or ".join(repr(f) for f in formats)
    if stage_kind == EVALUATE:
        if any(s.format in formats for s in sources):
            return None
        got = ", ".join(f"{s.path.name} ({s.format})" for s in sources)
        return f"{impl.name} reads {wanted} data; got {got}"
    for s in sources:
        if s.format not in formats:
            return f"{s.path}: {impl.name} reads {wanted} data, this file is {s.format!r}"
    return None


def describe(impl: StageImplementation) -> str:
    """One line that says what an implementation does."""
    text = getattr(impl, "description", None) or (type(impl).__doc__ or "")
    return text.strip().splitlines()[0] if text.strip() else ""


def check_implementation(impl: Any, kind: str) -> None:
    """Raise :class:`PluginError` unless ``impl`` is what ``register(...)`` accepts for a
    ``kind`` stage: a string ``name``, a :class:`PluginParams` ``Params``, a ``run``, and
    params the engine can route (:func:`declaration_problems`)."""
    name = getattr(impl, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"a {kind} implementation {impl!r} has no string 'name'")
    params = getattr(impl, "Params", None)
    if not (inspect.isclass(params) and issubclass(params, PluginParams)):
        raise PluginError(f"{kind} implementation {name!r}: Params must subclass engine.api.PluginParams")
    if not callable(getattr(impl, "run", None)):
        raise PluginError(f"{kind} implementation {name!r} has no run(context, inputs, params)")
    problems = declaration_problems(impl)
    if problems:
        raise PluginError(f"{kind} implementation {name!r} declares params the engine cannot "
                          f"route: {'; '.join(problems)}")


def declaration_problems(impl: Any) -> list[str]:
    """Why ``impl.Params`` cannot be routed from a recipe (empty: it can).

    Every param must be writable in YAML and shown by ``engine schema``: its JSON
    schema must build and its recipe key must be a plain name. An implementation may
    add its own checks with a ``declaration_problems()`` method returning messages (the
    merge-method base checks that each param reaches its arithmetic).
    """
    params = impl.Params
    problems: list[str] = []
    for field_name, info in params.model_fields.items():
        key = info.alias or field_name
        if not key.replace("_", "a").replace("-", "a").isalnum() or key.startswith("_"):
            problems.append(f"params.{key}: not a plain recipe key")
    try:
        params.model_json_schema()
    except Exception as exc:  # pydantic cannot describe a field type to a recipe writer
        problems.append(f"no JSON schema ({type(exc).__name__}: {exc})")
    extra = getattr(impl, "declaration_problems", None)
    if callable(extra):
        problems += list(extra())
    return problems
