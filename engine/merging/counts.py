"""How many models a merge method takes: ``min_models`` and ``max_models``.

A merge implementation may declare them as class attributes (:class:`~engine.merging.method.MergeMethod`
does, default ``1`` and ``None``); :func:`check_model_count` refuses a stage outside the
range, naming the method, and :func:`probe_count` picks the count the registration probe
and the conformance suite merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.core.errors import MergeError

__all__ = ["check_model_count", "model_count", "probe_count"]

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _number(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def model_count(method: Any) -> tuple[int, int | None]:
    """``(min_models, max_models)`` a merge implementation declares (a plain object
    without them: ``(1, None)``); ValueError for a range that is not one."""
    low, high = getattr(method, "min_models", 1), getattr(method, "max_models", None)
    name = getattr(method, "name", type(method).__name__)
    if not isinstance(low, int) or isinstance(low, bool) or low < 1:
        raise ValueError(f"merge method {name!r}: min_models must be an integer >= 1, got {low!r}")
    if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high < low):
        raise ValueError(f"merge method {name!r}: max_models must be None or an integer >= "
                         f"min_models ({low}), got {high!r}")
    return low, high


def probe_count(method: Any, wanted: int = 3) -> int:
    """The number of models nearest ``wanted`` that ``method`` merges."""
    low, high = model_count(method)
    return max(low, wanted) if high is None else min(max(low, wanted), high)


def check_model_count(method: Any, names: Sequence[str]) -> None:
    """Refuse merging ``names`` when their number is outside ``[min_models, max_models]``:
    ``slerp merges exactly two models (recipe key 'models'), got 3: ['a', 'b', 'c']``."""
    low, high = model_count(method)
    if low <= len(names) and (high is None or len(names) <= high):
        return
    if high == low:
        wanted = f"merges exactly {_number(low)} model{'s' if low != 1 else ''}"
    elif high is None:
        wanted = f"needs at least {_number(low)} model{'s' if low != 1 else ''}"
    else:
        wanted = f"merges {_number(low)} to {_number(high)} models"
    name = getattr(method, "name", type(method).__name__)
    raise MergeError(f"{name} {wanted} (recipe key 'models'), got {len(names)}: {list(names)}")
