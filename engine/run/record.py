"""A run's record: report.json as the runner assembles it, one entry per stage.

What is read back from it (the tables printed at the end of ``engine run``, report.md,
the charts and the summary) is :mod:`engine.run.report`, which reads the file alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.core import outputs
from engine.core.artifacts import Artifact, LayerSelection, MetricsArtifact
from engine.models.modelio import resolve_device
from engine.recipe.plan import Plan, PlannedStage
from engine.run import threads
from engine.run.context import StageContext
from engine.run.resources import MemorySampler

__all__ = ["REPORT_FILE", "lineage", "run_report", "stage_record", "write_report"]

REPORT_FILE = "report.json"


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
    outputs.replace_file(Path(workdir) / REPORT_FILE, json.dumps(report, indent=2, default=str))
