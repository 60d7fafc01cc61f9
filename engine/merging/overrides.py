"""Per-tensor parameter overrides, selected by a regular expression on the tensor name.

Recipes rarely want one density for every tensor: embeddings and the LM head of a
language-adapted model carry the new language and should keep more of their task
vector than attention weights do. ``overrides`` is declared once, in
:class:`~engine.merging.params.MergeParams`, so every merge method (built-in or
third-party) accepts it::

    params:
      density: 0.2
      overrides:
        - {match: "embed_tokens|lm_head", density: 0.9}
        - {match: "self_attn", weight: {ct-mn: 0.5}}

Rules (docs/merging.md repeats them):

* ``match`` is a Python regular expression searched (``re.search``) in the tensor
  name, so ``"self_attn"`` matches anywhere and ``"^model\\.norm"`` anchors;
* the **first** override whose ``match`` hits wins; the others are ignored for that
  tensor (no stacking), and tensors no override matches use the stage's params;
* an override may set any method parameter (``weight``, ``density``, ``lambda``,
  ``normalize``, ``slack``, ...) but not how the merge is executed (``out_dtype``,
  ``compute_dtype``, ``device``, ``shard_size``, ``prefetch``, ``overrides``).

Each override is validated at recipe time as the full params it produces, so a
density of 1.5 in an override is reported by ``engine validate``, naming the override.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.core.params import PluginParams
from engine.merging.reads import note_read, start_tracking

__all__ = ["EXECUTION_FIELDS", "TensorOverride", "for_tensor", "per_tensor", "resolve_overrides"]

#: params that describe how a merge runs, identical for every tensor
EXECUTION_FIELDS = frozenset({"out_dtype", "compute_dtype", "device", "shard_size",
                              "prefetch", "overrides", "tokenizer"})

T = TypeVar("T")
B = TypeVar("B")
#: a merge method's params (:class:`~engine.merging.params.MergeParams` or its subclass): the
#: overrides of one are validated as that same class
P = TypeVar("P", bound=PluginParams)


class TensorOverride(BaseModel):
    """``{match: REGEX, <param>: <value>, ...}``: params for the tensors ``match`` finds."""

    model_config = ConfigDict(extra="allow")

    match: str = Field(description="Python regular expression searched in the tensor name "
                                   "(re.search); the first override that matches wins.")

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"match {v!r} is not a valid regular expression ({exc})") from None
        return v

    @property
    def values(self) -> dict[str, Any]:
        """The parameters this override sets (everything but ``match``)."""
        return dict(self.model_extra or {})


def resolve_overrides(params: P) -> list[tuple[re.Pattern[str], P]]:
    """Each override as (compiled pattern, the full params it produces), in order.

    Raises ``ValueError`` naming the override for a field the method does not have, an
    execution field, or a value the method's ``Params`` rejects.
    """
    out: list[tuple[re.Pattern[str], P]] = []
    base = params.model_dump(by_alias=True, exclude={"overrides"})
    for i, ov in enumerate(params.__dict__["overrides"]):  # not counted as the plugin's read
        where = f"overrides[{i}] (match {ov.match!r})"
        fixed = sorted(set(ov.values) & EXECUTION_FIELDS)
        if fixed:
            raise ValueError(f"{where}: {', '.join(fixed)} cannot be set per tensor")
        try:
            effective = type(params).model_validate({**base, **ov.values})
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: "
                               f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
            raise ValueError(f"{where}: {errors}") from None
        start_tracking(effective, root=params)  # its reads count as reads of ``params``
        out.append((re.compile(ov.match), effective))
    return out


def for_tensor(params: PluginParams, build: Callable[[Any], B]) -> Callable[[str], B]:
    """``name -> build(p)`` for the params ``p`` of the first override matching ``name``
    (the plain params when none matches).

    ``build`` is called once per override up front, so that, e.g., a zero weight sum in
    an override fails before the first tensor is read.
    """
    note_read(params, "overrides")
    default = build(params)
    variants = [(pattern, build(p)) for pattern, p in resolve_overrides(params)]

    def select(name: str) -> B:
        for pattern, built in variants:
            if pattern.search(name):
                return built
        return default

    return select


def per_tensor(params: PluginParams, build: Callable[[Any], Callable[[str, T], T]]
               ) -> Callable[[str, T], T]:
    """A tensor merge function that honours ``params.overrides``: each tensor is merged
    by ``build(p)`` for the params of the first override its name matches (see
    :func:`for_tensor`); ``build(p)`` returns a merge function ``(name, stacked) ->
    merged``."""
    select = for_tensor(params, build)
    return lambda name, stacked: select(name)(name, stacked)
