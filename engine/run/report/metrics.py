"""How metrics are named, ordered and printed: the rules the terminal tables, report.md,
the charts and the summary share, so that they agree.

A metric is ``kind/label`` (``ppl/en``, ``acc/lum``): the label is its language or data
source; perplexities and losses improve downwards, everything else upwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["LOWER_IS_BETTER", "best_values", "collect_metrics", "direction", "format_number",
           "format_params", "legend", "lower_is_better", "metric_language", "order_columns"]

LOWER_IS_BETTER = ("ppl", "loss", "nll", "bpb")


def lower_is_better(metric: str) -> bool:
    """Perplexities and losses improve downwards; accuracies and the rest upwards."""
    return metric.split("/", 1)[0].lower() in LOWER_IS_BETTER


def format_number(v: Any, digits: int = 3) -> str:
    """A value for a table cell: ``-`` for missing/NaN, thousands separators for big ones."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_params(v: int | None) -> str:
    """A parameter count as 394K, 1.97M, 8.03B."""
    if v is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return str(v)


def collect_metrics(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """All evaluate stages' metrics merged: ``{model: {metric: value}}``."""
    rows: dict[str, dict[str, float]] = {}
    for r in report["stages"]:
        if r["stage"] != "evaluate":
            continue
        for model, values in r.get("metrics", {}).items():
            if isinstance(values, dict):
                rows.setdefault(model, {}).update(values)
    return rows


def metric_language(metric: str) -> str:
    """``ppl/en`` -> ``en``; a metric without a label belongs to the group ``""``."""
    return metric.partition("/")[2]


def order_columns(columns: Iterable[str]) -> list[str]:
    """Metric columns grouped by language (label), then by metric kind, so that one
    language's numbers sit side by side; unlabelled metrics come first."""
    return sorted(set(columns), key=lambda c: (metric_language(c), c.partition("/")[0]))


def direction(metric: str) -> str:
    """An arrow saying which way is better: ``↓`` for ppl/loss, ``↑`` for the rest
    (accuracies, and retention ratios and deltas, where higher means more was kept)."""
    return "↓" if lower_is_better(metric) else "↑"


def best_values(rows: dict[str, dict[str, Any]], columns: Iterable[str]) -> dict[str, float]:
    """The best numeric value of each column, in that column's direction (NaN ignored)."""
    best: dict[str, float] = {}
    for col in columns:
        vals = [v[col] for v in rows.values()
                if isinstance(v.get(col), (int, float)) and not math.isnan(v[col])]
        if vals:
            best[col] = min(vals) if lower_is_better(col) else max(vals)
    return best


def legend(columns: Iterable[str]) -> str:
    """How to read a metrics table: the arrows, and the reference of retention and delta
    metrics only when such a column is shown."""
    parts = ["↓ lower is better, ↑ higher"]
    kinds = {c.partition("/")[0] for c in columns}
    if any(k.startswith("retention") for k in kinds):
        parts.append("retention 1.0 = reference kept")
    if any(k.startswith("delta") for k in kinds):
        parts.append("delta 0.0 = reference kept")
    return "; ".join(parts)
