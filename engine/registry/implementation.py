"""What ``register(...)`` accepts, and the helpers that read an implementation's
optional attributes: its description, the data formats it reads and the optional packages
it requires (:func:`requirement_hint`; ``engine plugins`` and ``engine validate`` say what
is missing). Re-exported by :mod:`engine.api`."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from engine.core.artifacts import Artifact
from engine.core.errors import PluginError
from engine.core.inputs import DataSource, StageInputs
from engine.core.params import PluginParams
from engine.core.stages import EVALUATE

__all__ = ["StageImplementation", "check_implementation", "data_format_error", "declaration_problems",
           "describe", "missing_requirements", "requirement_hint", "requirements"]


@runtime_checkable
class StageImplementation(Protocol):
    """What ``register(...)`` accepts.

    ``name`` is the recipe's ``plugin:`` value; ``Params`` a :class:`PluginParams`
    subclass; ``run`` does the work, given the stage's :class:`engine.api.StageContext`
    (named here, not imported: the registry sits below the runtime). ``description`` (optional) is a one-line
    summary shown by ``engine plugins``. ``data_formats`` (optional, a tuple of
    :data:`DataFormat` names) lets ``engine validate`` check a stage's ``data:``
    before anything runs (see :func:`data_format_error`).
    """

    name: str
    Params: type[PluginParams]

    def run(self, context: Any, inputs: StageInputs, params: Any) -> Artifact: ...


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


def requirements(impl: Any) -> tuple[str, ...]:
    """The module names ``impl`` declares in ``requires`` (a single string is one name)."""
    raw = getattr(impl, "requires", None) or ()
    return (raw,) if isinstance(raw, str) else tuple(str(r) for r in raw)


def _installed(module: str) -> bool:
    try:  # a top-level name: find_spec locates it without importing anything
        return importlib.util.find_spec(module.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(impl: Any) -> list[str]:
    """The modules of ``impl.requires`` that cannot be found (none imported)."""
    return [m for m in requirements(impl) if not _installed(m)]


def requirement_hint(impl: Any, distribution: str = "-") -> str | None:
    """``needs extra DIST[EXTRA]: pip install 'DIST[EXTRA]'`` when a requirement of
    ``impl`` is missing (``needs module(s) x, y (not installed)`` without an ``extra``
    or a known distribution); None when everything it requires is installed."""
    missing = missing_requirements(impl)
    if not missing:
        return None
    extra = getattr(impl, "extra", None)
    if isinstance(extra, str) and extra and distribution not in ("-", "?", ""):
        spec = f"{distribution}[{extra}]"
        return f"needs extra {spec}: pip install '{spec}'"
    return f"needs module(s) {', '.join(missing)} (not installed)"


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
