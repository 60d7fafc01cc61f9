"""Record ranges: a data spec's ``records`` (``"0:50%"``, ``"96:192"``), parsed and
turned into the index range they select of a file's records.

A module of its own, without any other engine import, because the recipe model checks
the syntax when a recipe is read (:class:`~engine.recipe.spec.DataSpec`) and the readers
(:mod:`engine.data.files`) apply it when a file is read.
"""

from __future__ import annotations

import re

__all__ = ["RangeEnd", "parse_record_range", "record_bounds"]

_RANGE_END = re.compile(r"^\s*(?:(\d+)|(\d+(?:\.\d+)?)\s*%)?\s*$")

#: one end of a record range: (number, is_percent), or None for an open end
RangeEnd = tuple[float, bool] | None


def parse_record_range(text: str) -> tuple[RangeEnd, RangeEnd]:
    """``"start:end"`` as two ends, each a record index (``96``), a percentage of the
    file's records (``50%``, at most 100) or empty (the file's start or end).

    Raises ``ValueError`` with the accepted forms; :class:`~engine.recipe.DataSpec`
    turns it into an error naming the ``records`` field.
    """
    if not isinstance(text, str) or text.count(":") != 1:
        raise ValueError(f"{text!r} is not a record range: write 'start:end', each end a record "
                         "index (96), a percentage of the file's records (50%) or empty, "
                         "e.g. '0:50%', '50%:', ':100'")
    ends: list[RangeEnd] = []
    for part in text.split(":"):
        m = _RANGE_END.match(part)
        if m is None:
            raise ValueError(f"{text!r}: {part.strip()!r} is neither a record index nor a "
                             "percentage (write e.g. 96 or 50%)")
        if m.group(1) is not None:
            ends.append((int(m.group(1)), False))
        elif m.group(2) is not None:
            pct = float(m.group(2))
            if pct > 100:
                raise ValueError(f"{text!r}: {pct:g}% is more than the whole file (at most 100%)")
            ends.append((pct, True))
        else:
            ends.append(None)
    start, end = ends
    if start is not None and end is not None and start[1] == end[1] and start[0] >= end[0]:
        raise ValueError(f"{text!r} selects no records (the start is not before the end)")
    return start, end


def record_bounds(text: str, total: int) -> tuple[int, int]:
    """The half-open index range ``[lo, hi)`` that ``text`` selects from ``total``
    records. A percentage rounds down (``50%`` of 97 is 48), so ``"0:50%"`` and
    ``"50%:"`` split a file into two parts with no record in both or neither."""
    start, end = parse_record_range(text)

    def index(e: RangeEnd, default: int) -> int:
        if e is None:
            return default
        value, pct = e
        return int(total * value // 100) if pct else int(value)

    lo, hi = index(start, 0), index(end, total)
    if hi > total:
        raise ValueError(f"record range {text!r} ends at record {hi} but the file has {total} records")
    if lo >= hi:
        raise ValueError(f"record range {text!r} selects no records of the file's {total}")
    return lo, hi
