"""The tables ``engine run`` prints at its end: one row per stage, and every model's
scores with the best value of each metric starred when it is outside the noise."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from engine.run.report.metrics import direction, format_number, format_params, legend, order_columns
from engine.run.report.summary import compare, gather

__all__ = ["metrics_table", "stages_table"]


def stages_table(report: dict[str, Any]) -> Table:
    """One row per stage: what ran, how long, how much it trained."""
    table = Table(title=f"run {report['recipe']}: stages", title_justify="left")
    for col, justify in (("stage", "left"), ("plugin", "left"), ("time s", "right"), ("tokens", "right"),
                         ("trainable / forward", "right"), ("peak MB", "right"), ("cache", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report["stages"]:
        trained = f"{format_params(r.get('trainable_params'))} / {format_params(r.get('forward_params'))}"
        table.add_row(r["name"], r["plugin"], f"{r['wall_time_s']:.1f}", format_number(r.get("tokens")),
                      trained, format_number(r.get("peak_rss_mb"), 4), r.get("cache", "-"))
    return table


def metrics_table(report: dict[str, Any]) -> Table | None:
    """Models as rows, metrics as columns grouped by language; each header says which way
    is better. A column's best value is bold with ``*`` only when it beats the runner-up
    outside the noise (:func:`engine.run.report.summary.compare`)."""
    evidence = gather(report)
    rows = evidence.values
    if not rows:
        return None
    columns = order_columns(m for values in rows.values() for m in values)
    winners = {c: comp.winner for c in columns if (comp := compare(evidence, c, list(rows)))}
    table = Table(title=f"metrics (* best outside the noise; {legend(columns)})", title_justify="left")
    table.add_column("model")
    for col in columns:
        table.add_column(f"{col} {direction(col)}", justify="right")
    for model, values in rows.items():
        cells = []
        for col in columns:
            text = format_number(values.get(col), 4)
            if winners.get(col) == model:
                text = f"[bold green]{text}*[/]"
            cells.append(text)
        table.add_row(model, *cells)
    return table
