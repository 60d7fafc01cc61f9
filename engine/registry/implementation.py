"""What ``register(...)`` accepts, and the helpers that read an implementation's
optional attributes (re-exported by :mod:`engine.api`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from engine.core.artifacts import Artifact
from engine.core.inputs import DataSource, StageInputs
from engine.core.params import PluginParams
from engine.core.stages import EVALUATE

if TYPE_CHECKING:
    from engine.run.context import StageContext

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
