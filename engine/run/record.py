"""A run's report: report.json as the runner assembles it, and the readable tables
printed at the end of ``engine run``.

The column order, direction and "best" rules here are shared with ``engine report``
(:mod:`engine.run.report.files`), so the terminal and report.md agree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from engine.core.artifacts import LayerSelection, MetricsArtifact

if TYPE_CHECKING:
    from engine.core.artifacts import Artifact
    from engine.recipe.validate import Plan, PlannedStage
    from engine.run.context import StageContext
    from engine.run.resources import MemorySampler

REPORT_FILE = "report.json"
LOWER_IS_BETTER = ("ppl", "loss", "nll", "bpb")


# --- report.json ------------------------------------------------------------------------------


def stage_record(stage: PlannedStage, context: StageContext, artifact: Artifact, wall: float,
                 sampler: MemorySampler, fingerprint: str) -> dict[str, Any]:
    """The report.json entry of a stage that ran (the runner adds ``threads`` and ``output``;
    a cached stage's entry is the one saved with its output, ``cache`` set to ``hit``)."""
    stats = context.stats
    metrics: dict[str, Any] = dict(stats.metrics)
    if isinstance(artifact, MetricsArtifact):
        metrics.update(artifact.metrics)
    record: dict[str, Any] = {
        "name": stage.name,
        "stage": stage.spec.stage,
        "plugin": stage.spec.plugin,
        "wall_time_s": round(wall, 3),
        "tokens": stats.tokens,
        "tokens_per_s": round(stats.tokens / wall, 1) if wall > 0 and stats.tokens else None,
        "trainable_params": stats.trainable_params,
        "forward_params": stats.forward_params,
        "peak_rss_mb": sampler.peak_rss_mb,
        "peak_cuda_mb": sampler.peak_cuda_mb,
        "cache": "miss",
        "fingerprint": fingerprint,
        "metrics": metrics,
        "notes": stats.notes,
    }
    if isinstance(artifact, LayerSelection):
        record["notes"].setdefault("layers", artifact.indices)
        record["notes"].setdefault("explanation", artifact.explanation)
    if isinstance(artifact, MetricsArtifact):
        if artifact.errors:
            record["errors"] = artifact.errors
        # what the summary's intervals rest on (engine.run.report.summary): items or tokens per value,
        # standard errors an evaluator gives, chance accuracy of choice tasks
        for key in ("counts", "stderr", "chance"):
            value = getattr(artifact, key, None)
            if value:
                record[key] = value
    return record


def lineage(plan: Plan) -> dict[str, dict[str, Any]]:
    """Per stage: its kind, its inputs (models, base, layers) and its data's languages
    with their weights. The summary groups methods by language and sums a method's cost
    over its stages with it (it is rebuilt from the plan on every run, so a cached
    stage's record needs none of it)."""
    out: dict[str, dict[str, Any]] = {}
    for s in plan.stages:
        spec = s.spec
        inputs = [x for x in (spec.model, *(spec.models or []), spec.base, spec.layers) if x]
        languages: dict[str, float] = {}
        for d in s.data:
            if d.language:
                languages[d.language] = languages.get(d.language, 0.0) + float(d.weight)
        out[s.name] = {"stage": spec.stage, "plugin": spec.plugin, "inputs": inputs,
                       "languages": languages}
    return out


def run_report(plan: Plan, records: list[dict[str, Any]], startup: dict[str, Any], wall: float,
               *, finished: bool) -> dict[str, Any]:
    """report.json of a run: the recipe, where it ran, and one record per stage so far."""
    import torch

    from engine.models.modelio import resolve_device
    from engine.run import threads

    return {
        "recipe": plan.recipe.name,
        "source": plan.source,
        "finished": finished,
        "wall_time_s": round(wall, 3),
        "device": str(resolve_device(plan.recipe.runtime.device)),
        "torch": torch.__version__,
        "threads": {"recipe": plan.recipe.runtime.threads,
                    "cpus_available": threads.available_cpus()},
        "startup": startup,
        "models": sorted(plan.recipe.models),
        "lineage": lineage(plan),
        "stages": records,
    }


def write_report(workdir: Path, report: dict[str, Any]) -> None:
    """Replace ``<workdir>/report.json`` atomically (a reader never sees half a file)."""
    tmp = Path(workdir) / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, Path(workdir) / REPORT_FILE)


# --- tables ----------------------------------------------------------------------------------


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


def metrics_table(report: dict[str, Any]) -> Table | None:
    """Models as rows, metrics as columns grouped by language; each header says which way
    is better. A column's best value is bold with ``*`` only when it beats the runner-up
    outside the noise (:func:`engine.run.report.summary.compare`)."""
    from engine.run.report.summary import compare, gather

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
