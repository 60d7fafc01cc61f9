"""The markers a merge method's ``Params`` fields carry, read by the engine without the
params themselves: per-model values (:class:`PerModel`), the range a validator accepts
(:class:`Bounds`) and a declared search range (:class:`SearchRange`). A module of its own
(no engine imports) so that a search's space reads them cheaply; import them from
:mod:`engine.merging.params`."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Bounds", "PerModel", "SearchRange"]


@dataclass(frozen=True)
class PerModel:
    """Marks a field as per-model (``Annotated[..., PerModel()]``): a recipe writes one
    number for every model or ``{model name: number}``, and
    :class:`~engine.merging.method.MergeMethod` hands the arithmetic one value per model,
    in model order (models a dict does not name get the field's default)."""


@dataclass(frozen=True)
class Bounds:
    """The range a param's validator accepts (metadata of :func:`per_model_range` and
    :func:`layered_range`), which ``search:`` samples unless the recipe narrows it."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class SearchRange:
    """Where a merge ``search:`` samples a param whose validator accepts any number
    (``Annotated[float, SearchRange(0.5, 2.0)]``): the method's declared search range. A
    recipe may name any other range; a searched number with neither bounds nor this has no
    usable range and is refused at validate time."""

    low: float
    high: float
    log: bool = False
