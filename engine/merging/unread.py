"""Refusing recipe params that a plugin written before MergeMethod never reads.

A plugin that passes :func:`~engine.merging.execute.run_merge` its own merge function
inherits ``weight`` and ``overrides`` from :class:`~engine.merging.params.MergeParams`
whether it uses them or not, so the schema advertises them and a recipe may set them.
The engine cannot look inside the function; it watches the params object instead
(:meth:`ExecutionParams.__getattribute__ <engine.merging.params.ExecutionParams>`
records which method fields the plugin reads, and :func:`for_tensor` records
``overrides``). After the plugin's function has merged its first tensor, every param
the recipe set must have been read, or the merge stops with an error naming the param
and the plugin. Reading a param is not proof of honouring it, but never reading it is
proof of ignoring it.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.core.errors import MergeError
from engine.merging.params import ExecutionParams
from engine.merging.reads import RUN_FIELDS, fields_read, is_tracked
from engine.merging.streaming import Positionwise, PositionwiseMerge, TensorMerge

__all__ = ["recipe_set_fields", "refuse_unread_params"]


def recipe_set_fields(params: ExecutionParams) -> set[str]:
    """The method params a recipe set explicitly (in ``params`` or in an override):
    field names, without the execution params the engine honours itself."""
    fields = type(params).model_fields
    by_alias = {info.alias: name for name, info in fields.items() if info.alias}
    wanted = {f for f in params.model_fields_set if f not in RUN_FIELDS and f != "overrides"}
    overrides = params.__dict__.get("overrides") or []
    if overrides:
        wanted.add("overrides")
    for ov in overrides:
        wanted.update(by_alias.get(k, k) for k in ov.values)
    return {f for f in wanted if f in fields}


class _Checked(Positionwise):
    """A legacy :class:`Positionwise` step that runs the read check after it merged."""

    def __init__(self, inner: Positionwise, after: Any) -> None:
        object.__setattr__(self, "fn", inner.fn)
        object.__setattr__(self, "densities", inner.densities)
        object.__setattr__(self, "bands", inner.bands)
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_after", after)

    def apply(self, stacked: torch.Tensor, name: str, start: int, stop: int,
              shape: tuple[int, ...]) -> torch.Tensor:
        out = self._inner.apply(stacked, name, start, stop, shape)  # type: ignore[attr-defined]
        self._after()  # type: ignore[attr-defined]
        return out


def refuse_unread_params(plugin: str, params: ExecutionParams, merge: TensorMerge) -> TensorMerge:
    """``merge`` wrapped so that, once it has merged a tensor, a param the recipe set and
    the plugin never read raises :class:`MergeError` (see the module docstring)."""
    wanted = recipe_set_fields(params)
    if not wanted or not is_tracked(params):  # a copy whose reads nobody recorded: no verdict
        return merge
    done = False

    def after() -> None:
        nonlocal done
        if done:
            return
        done = True
        unread = sorted(wanted - fields_read(params))
        if not unread:
            return
        fields = type(params).model_fields
        shown = [fields[f].alias or f for f in unread]
        raise MergeError(
            f"plugin {plugin!r} does not honour params {', '.join(shown)} set in the recipe: "
            f"its merge function never read {'it' if len(shown) == 1 else 'them'}, so "
            f"{'it' if len(shown) == 1 else 'they'} would be silently ignored. Remove "
            f"{', '.join(f'params.{s}' for s in shown)} from the stage, or port the plugin to "
            "engine.api.merging.MergeMethod, whose engine applies weight, per-model values "
            "and overrides (docs/merging.md)")

    if isinstance(merge, PositionwiseMerge):
        select = merge.select
        return PositionwiseMerge(lambda name: _Checked(select(name), after))

    def checked(name: str, stacked: torch.Tensor) -> torch.Tensor:
        out = merge(name, stacked)
        after()
        return out

    return checked
