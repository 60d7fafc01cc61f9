"""Suggestions for validation errors: the closest known name to a mistyped one.

:func:`did_you_mean` is the suffix an error message gets (``; did you mean 'density'?``)
when a recipe key, stage kind, plugin name, param name or stage reference is unknown and
one of the known names is close (:func:`difflib.get_close_matches`). :func:`keys_at`
finds the keys a pydantic model accepts at an error's location, so that an unknown key
anywhere in a recipe (or in a plugin's params) can be matched against its siblings.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

__all__ = ["did_you_mean", "keys_at"]

#: how close a known name must be (difflib's ratio) to be suggested
CUTOFF = 0.6


def did_you_mean(word: Any, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``word``, or ``""``."""
    if not isinstance(word, str) or not word:
        return ""
    choices = [k for k in dict.fromkeys(known) if isinstance(k, str) and k != word]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=CUTOFF)
    if not close:  # a differently cased name is the same name mistyped
        close = [k for k in choices if k.lower() == word.lower()][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _types(annotation: Any) -> list[Any]:
    """The types an annotation may hold, with Optional/Union/Annotated unwrapped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _types(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _types(arg)]
    return [annotation]


def _models(candidates: list[Any]) -> list[type[BaseModel]]:
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _step(candidates: list[Any], part: Any) -> list[Any]:
    """The types found one location step further (a field, a list index, a dict key or
    pydantic's union-branch tag)."""
    out: list[Any] = []
    for cand in candidates:
        origin, args = typing.get_origin(cand), typing.get_args(cand)
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            if isinstance(part, str) and part == cand.__name__:
                out.append(cand)
            for name, info in cand.model_fields.items():
                if part in (name, info.alias):
                    out += _types(info.annotation)
        elif origin in (list, tuple, set, frozenset, Sequence) and isinstance(part, int) and args:
            out += _types(args[0])
        elif origin is dict and args:
            out += _types(args[1])
        if isinstance(part, str) and "[" in part and origin is not None:
            out.append(cand)  # a tag such as 'list[DataSpec]' names the branch, not a key
    return out


def keys_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """The keys the model nested at ``loc`` accepts (``loc`` is the location of the
    object holding the unknown key); empty when the location cannot be followed."""
    if model is None:
        return []
    candidates: list[Any] = [model]
    for part in loc:
        candidates = _step(candidates, part)
        if not candidates:
            return []
    return [info.alias or name for m in _models(candidates) for name, info in m.model_fields.items()]
