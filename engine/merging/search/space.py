"""The search space of a merge: built from the merge methods' declared params.

Every :class:`~engine.merging.method.MergeMethod` declares its params once (pydantic
fields with validators); the space reads them, so any method, a third party's included,
can be searched:

* a param's range is what its validator accepts (``density`` in (0, 1], ``slack`` in
  [0, 1]), or the method's declared :class:`~engine.merging.params.SearchRange` for a
  number any value of which is valid (``weight``: [0, 2], ``lambda``: [0.5, 2]); a recipe
  may narrow it (``density: [0.2, 0.8]``), never widen it past the validator;
* a per-model param gets one dimension per merged model (``weight[ct-lum]``);
* booleans and ``Literal`` fields are choices; a recipe may give ``{choices: [...]}``;
* ``layer_groups: k`` turns each searched number into a layer gradient of ``k`` anchors
  (:mod:`engine.merging.gradients`);
* ``filters: {attn: self_attn, mlp: mlp}`` gives each searched param one value per filter,
  written as ``overrides`` (the plain values stay for the tensors no filter matches);
* ``methods: [...]`` makes the method itself a choice; each method's dimensions are
  named ``<method>.<param>`` and only sampled when that method is drawn.

A param with no usable range (a number with neither bounds nor a declared search range,
a string) is refused when it is asked for, naming it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types

from engine.core.errors import RecipeError
from engine.merging.declared import Bounds, PerModel, SearchRange
from engine.merging.gradients import Gradient
from engine.merging.overrides import EXECUTION_FIELDS

__all__ = ["Dimension", "MethodSpace", "SearchSpace", "build_space", "param_range"]

#: how far inside an open bound the search samples, as a share of the range
OPEN_MARGIN = 0.01


@dataclass(frozen=True)
class Dimension:
    """One sampled value: a float or int in [low, high] (``log``: on a log scale), or one
    of ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this dimension."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' (log)' if self.log else ''}"


@dataclass
class _Param:
    """One searched param of a method: its dimensions' common range, and how its
    sampled values are put back together."""

    field: str  # the field name
    key: str  # the recipe key (alias)
    low: float | None
    high: float | None
    log: bool
    integer: bool
    choices: tuple[Any, ...] | None
    per_model: bool
    layered: bool
    models: dict[str, tuple[float, float]] = field(default_factory=dict)  # per-model ranges


@dataclass
class MethodSpace:
    """The searched params of one method and how to turn a trial's draws into params."""

    method: str
    prefix: str  # "" for a single-method search, else "<method>."
    params: list[_Param]
    names: tuple[str, ...]
    layer_groups: int
    filters: dict[str, str]

    def dimensions(self) -> list[Dimension]:
        out: list[Dimension] = []
        for p in self.params:
            for scope in ("", *(f"@{f}" for f in self.filters)):
                for target, (low, high) in self._targets(p):
                    anchors = self.layer_groups if (p.layered and p.choices is None) else 1
                    for g in range(anchors):
                        suffix = f"#{g}" if anchors > 1 else ""
                        out.append(Dimension(f"{self.prefix}{p.key}{target}{scope}{suffix}",
                                             low, high, p.log, p.integer, p.choices))
        return out

    def _targets(self, p: _Param) -> list[tuple[str, tuple[float | None, float | None]]]:
        if p.per_model and p.choices is None:
            return [(f"[{n}]", p.models.get(n, (p.low, p.high))) for n in self.names]
        return [("", (p.low, p.high))]

    def values(self, drawn: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe params (keys as a recipe writes them) for a trial's draws; filters as
        ``overrides``."""
        plain: dict[str, Any] = {}
        scoped: dict[str, dict[str, Any]] = {f: {} for f in self.filters}
        for p in self.params:
            for scope, out in (("", plain), *((f"@{f}", scoped[f]) for f in self.filters)):
                per_target: dict[str, Any] = {}
                for target, _ in self._targets(p):
                    anchors = self.layer_groups if (p.layered and p.choices is None) else 1
                    name = f"{self.prefix}{p.key}{target}{scope}"
                    got = [drawn[f"{name}#{g}"] for g in range(anchors)] if anchors > 1 else drawn[name]
                    per_target[target[1:-1] if target else ""] = got
                out[p.key] = per_target[""] if "" in per_target else per_target
        if self.filters:
            plain["overrides"] = [{"match": self.filters[f], **scoped[f]} for f in self.filters]
        return plain


@dataclass
class SearchSpace:
    """Every method's space; ``methods`` has one entry unless the method is a choice."""

    spaces: dict[str, MethodSpace]
    default: str  # the stage's plugin

    @property
    def choice(self) -> Dimension | None:
        return Dimension("method", choices=tuple(self.spaces)) if len(self.spaces) > 1 else None

    def dimensions(self) -> list[Dimension]:
        out = [self.choice] if self.choice is not None else []
        return out + [d for s in self.spaces.values() for d in s.dimensions()]

    def suggest(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """(method, recipe params drawn) for an Optuna trial."""
        method = self.choice.suggest(trial) if self.choice is not None else self.default
        space = self.spaces[method]
        drawn = {d.name: d.suggest(trial) for d in space.dimensions()}
        return method, space.values(drawn)

    def size(self) -> int:
        return len(self.dimensions())


# --- ranges -------------------------------------------------------------------------


def _annotation_metadata(info: Any) -> list[Any]:
    """Field metadata, plus that of an ``Annotated`` type inside a union."""
    found = list(info.metadata)
    for arg in typing.get_args(info.annotation):
        found.extend(getattr(arg, "__metadata__", ()))
    return found


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    args = [annotation]
    while args:
        a = args.pop()
        if typing.get_origin(a) is Literal:
            return tuple(typing.get_args(a))
        args.extend(typing.get_args(a))
    return None


def _is_number(annotation: Any) -> tuple[bool, bool]:
    """(numeric, integer) for a field type (a float wins over an int in a union)."""
    kinds = set()
    stack = [annotation]
    while stack:
        a = stack.pop()
        if a in (float, int):
            kinds.add(a)
        stack.extend(typing.get_args(a))
    return bool(kinds), kinds == {int}


def param_range(info: Any, key: str) -> tuple[float | None, float | None, bool, bool, tuple[Any, ...] | None]:
    """(low, high, log, integer, choices) a declared field is searched over by default;
    (None, None, ...) with no choices when it has no usable range."""
    metadata = _annotation_metadata(info)
    if info.annotation is bool:
        return None, None, False, False, (False, True)
    choices = _literal_choices(info.annotation)
    if choices is not None:
        return None, None, False, False, choices
    numeric, integer = _is_number(info.annotation)
    if not numeric:
        return None, None, False, False, None
    low = high = None
    low_open = high_open = False
    declared = next((m for m in metadata if isinstance(m, SearchRange)), None)
    for m in metadata:
        if isinstance(m, Bounds):
            low, high, low_open, high_open = m.low, m.high, m.low_open, m.high_open
        elif isinstance(m, annotated_types.Ge):
            low, low_open = m.ge, False
        elif isinstance(m, annotated_types.Gt):
            low, low_open = m.gt, True
        elif isinstance(m, annotated_types.Le):
            high, high_open = m.le, False
        elif isinstance(m, annotated_types.Lt):
            high, high_open = m.lt, True
    if low is None or high is None:
        if declared is not None:
            return declared.low, declared.high, declared.log, integer, None
        return None, None, False, integer, None
    span = high - low
    if low_open:
        low = low + 1 if integer else low + OPEN_MARGIN * span
    if high_open:
        high = high - 1 if integer else high - OPEN_MARGIN * span
    return float(low), float(high), False, integer, None


def _narrowed(value: Any, where: str, low: float | None, high: float | None, integer: bool
              ) -> tuple[float, float, bool]:
    """A recipe range ``[low, high]`` or ``{low, high, log}``, checked inside the validator's."""
    log = False
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"low", "high", "log"})
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {unknown} (a range is [low, high] or "
                              "{low, high, log})")
        lo, hi, log = value.get("low"), value.get("high"), bool(value.get("log", False))
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = value
    else:
        raise RecipeError(f"{where}: {value!r} is not a range; write [low, high], "
                          "{low: .., high: .., log: true}, {choices: [...]} or 'auto'")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in (lo, hi)):
        raise RecipeError(f"{where}: the ends of a range are finite numbers, got {[lo, hi]}")
    if lo >= hi:
        raise RecipeError(f"{where}: the range [{lo:g}, {hi:g}] is empty (low must be below high)")
    if low is not None and lo < low - 1e-12 or high is not None and hi > high + 1e-12:
        raise RecipeError(f"{where}: [{lo:g}, {hi:g}] reaches outside what the param accepts "
                          f"([{low:g}, {high:g}])")
    if log and lo <= 0:
        raise RecipeError(f"{where}: a log range needs low > 0, got {lo:g}")
    if integer and (lo != int(lo) or hi != int(hi)):
        raise RecipeError(f"{where}: an integer param's range has integer ends")
    return float(lo), float(hi), log


def _method_space(method: str, params_type: type, names: Sequence[str], requested: Mapping[str, Any] | None,
                  layer_groups: int, filters: dict[str, str], prefix: str, where: str,
                  fixed: Mapping[str, Any]) -> MethodSpace:
    by_key = {(info.alias or f): (f, info) for f, info in params_type.model_fields.items()
              if f not in EXECUTION_FIELDS}
    wanted: dict[str, Any]
    if requested is None:
        wanted = {}
        for key, (_f, info) in by_key.items():
            if key in fixed:
                continue  # what the stage sets stays
            low, high, _, _, choices = param_range(info, key)
            if choices is not None or (low is not None and high is not None):
                wanted[key] = "auto"
    else:
        wanted = {k: v for k, v in requested.items() if k in by_key}
    params: list[_Param] = []
    for key, value in wanted.items():
        f, info = by_key[key]
        here = f"{where}space.{key}" + (f" (method {method!r})" if prefix else "")
        low, high, log, integer, choices = param_range(info, key)
        metadata = _annotation_metadata(info)
        per_model = any(isinstance(m, PerModel) for m in metadata)
        layered = any(isinstance(m, Gradient) for m in metadata)
        models: dict[str, tuple[float, float]] = {}
        if isinstance(value, Mapping) and "choices" in value:
            got = value["choices"]
            if set(value) != {"choices"} or not isinstance(got, list) or not got:
                raise RecipeError(f"{here}: {{choices: [...]}} takes a non-empty list and nothing else")
            choices, low, high = tuple(got), None, None
        elif value == "auto" or value is None:
            if choices is None and (low is None or high is None):
                raise RecipeError(
                    f"{here}: {key!r} has no usable range (its validator accepts any "
                    f"{'value' if not _is_number(info.annotation)[0] else 'number'} and the method "
                    "declares no search range); give one, e.g. "
                    f"'{key}: [0.1, 1.0]', or {{choices: [...]}}")
        elif choices is not None:
            raise RecipeError(f"{here}: {key!r} takes {list(choices)}; write {{choices: [...]}} "
                              "to search a subset, or 'auto'")
        elif per_model and isinstance(value, Mapping) and not {"low", "high", "log"} & set(value):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise RecipeError(f"{here}: names model(s) {unknown} that this merge does not "
                                  f"merge ({list(names)})")
            if low is None or high is None:
                missing = [n for n in names if n not in value]
                if missing:
                    raise RecipeError(f"{here}: {key!r} has no usable range of its own; give one "
                                      f"for every model (missing: {missing})")
            for n, r in value.items():
                lo, hi, log = _narrowed(r, f"{here}.{n}", low, high, integer)
                models[n] = (lo, hi)
        else:
            low, high, log = _narrowed(value, here, low, high, integer)
        params.append(_Param(f, key, low, high, log, integer, choices, per_model, layered, models))
    return MethodSpace(method, prefix, params, tuple(names), layer_groups, dict(filters))


def build_space(methods: Mapping[str, type], default: str, names: Sequence[str],
                space: Mapping[str, Any] | None, layer_groups: int, filters: dict[str, str],
                fixed: Mapping[str, Any], where: str = "search: ") -> SearchSpace:
    """The space of ``methods`` (plugin name -> its ``Params`` class). ``space`` is the
    recipe's ``search.space`` (None: every param with a usable range), ``fixed`` the stage's
    ``params`` (kept, not searched, when ``space`` is None). Raises :class:`RecipeError`
    naming the param for a range that cannot be searched, and for a ``space`` key no method
    declares."""
    if space is not None:
        declared = {(info.alias or f) for p in methods.values() for f, info in p.model_fields.items()
                    if f not in EXECUTION_FIELDS}
        unknown = sorted(set(space) - declared)
        if unknown:
            raise RecipeError(f"{where}space: {unknown} {'is' if len(unknown) == 1 else 'are'} "
                              f"not a param of {', '.join(repr(m) for m in methods)} (searchable: "
                              f"{sorted(declared)})")
    prefix = len(methods) > 1
    spaces = {m: _method_space(m, p, names, space, layer_groups, filters, f"{m}." if prefix else "",
                               where, fixed) for m, p in methods.items()}
    result = SearchSpace(spaces, default)
    if not result.dimensions():
        raise RecipeError(f"{where}nothing to search: no param of {', '.join(repr(m) for m in methods)} "
                          "has a usable range; name params and ranges under 'space'")
    return result
