"""``engine report``: a run folder turned into report.md and PNG charts.

A team deciding which model to ship needs, on one page: every model's scores per
language with the best marked, what each stage cost (wall time, trainable and forward
parameters), and whether training converged (loss curves). Everything is read back
from the run folder (report.json, each evaluate stage's metrics.json, each training
stage's train_log.jsonl), so a report can be made for any finished or interrupted run,
on another machine, without loading a model.

Charts need matplotlib (the ``lingoforge[report]`` extra) and use the Agg backend (no
display). Without it, report.md is still written, without images, and
:data:`ChartsUnavailable` says why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import EngineError
from engine.report import (
    best_values,
    direction,
    format_number,
    format_params,
    lower_is_better,
    metric_language,
    order_columns,
)

REPORT_MD = "report.md"
CHART_DIR = "report"
LOG_FILE = "train_log.jsonl"
#: perplexity-like values spanning more than this factor get a log axis
LOG_SCALE_RATIO = 20.0


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed: report.md is written without charts."""


@dataclass
class RunData:
    """What a report shows, read from a run folder."""

    folder: Path
    report: dict[str, Any]
    #: evaluate stage -> {model: {metric: value}} (and counts / errors alike)
    metrics: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    #: training stage -> train_log.jsonl records
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def all_metrics(self) -> dict[str, dict[str, float]]:
        """Every evaluate stage merged: ``{model: {metric: value}}``."""
        rows: dict[str, dict[str, float]] = {}
        for per_model in self.metrics.values():
            for model, values in per_model.items():
                rows.setdefault(model, {}).update(values)
        return rows


def load_run(folder: Path) -> RunData:
    """Read report.json, metrics.json files and train logs of a run folder."""
    folder = Path(folder)
    path = folder / "report.json"
    if not path.is_file():
        raise EngineError(f"{folder}: no report.json; is this the --workdir of an `engine run`?")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path}: not valid JSON ({exc})") from None
    run = RunData(folder, report)
    for stage in report.get("stages", []):
        name = stage["name"]
        out = Path(stage.get("output") or folder / name)
        if not out.is_dir():
            out = folder / name  # the run folder was moved
        if stage.get("stage") == "evaluate":
            data = _read_json(out / "metrics.json") or {
                **stage.get("metrics", {}), "_errors": stage.get("errors", {})}
            run.metrics[name] = {k: v for k, v in data.items()
                                 if not k.startswith("_") and isinstance(v, dict)}
            run.counts[name] = data.get("_counts", {})
            run.errors[name] = data.get("_errors", {})
        log = out / LOG_FILE
        if log.is_file():
            run.logs[name] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return run


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- markdown ---------------------------------------------------------------------------------


def _format4(v: Any) -> str:
    return format_number(v, 4)


def _table(header: list[str], rows: list[list[str]], align: list[str]) -> list[str]:
    marks = {"l": "---", "r": "---:"}
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def metrics_markdown(metrics: dict[str, dict[str, float]], counts: dict[str, dict[str, int]]) -> list[str]:
    """Models as rows, metrics grouped by language; best per column in bold."""
    columns = order_columns(m for v in metrics.values() for m in v)
    best = best_values(metrics, columns)
    rows = []
    for model, values in metrics.items():
        cells = [model]
        for col in columns:
            v = values.get(col)
            text = _format4(v)
            cells.append(f"**{text}**" if v is not None and best.get(col) == v else text)
        rows.append(cells)
    lines = _table(["model", *(f"{c} {direction(c)}" for c in columns)], rows,
                   ["l", *["r"] * len(columns)])
    n = {c: sorted({cnt.get(c) for cnt in counts.values() if cnt.get(c) is not None}) for c in columns}
    based = ", ".join(f"{c}: {'/'.join(_format4(x) for x in v)}" for c, v in n.items() if v)
    if based:
        lines += ["", f"Counts behind each value (tokens for ppl, bytes for bpb, items for acc): {based}."]
    return lines


def write_markdown(run: RunData, charts: dict[str, Path], note: str | None = None) -> Path:
    """Write ``<run>/report.md``; chart paths are linked relative to the run folder."""
    r = run.report
    lines = [f"# Run report: {r.get('recipe', run.folder.name)}", "",
             f"- run folder: `{run.folder}`",
             f"- finished: {'yes' if r.get('finished') else 'no (interrupted or still running)'}",
             f"- total wall time: {_format4(r.get('wall_time_s'))} s; device {r.get('device', '-')}, "
             f"torch {r.get('torch', '-')}", ""]
    if note:
        lines += [f"> {note}", ""]
    lines += ["## Scores", "",
              "↓ lower is better (ppl, bpb), ↑ higher is better (acc, acc_norm, and retention: "
              "`retention_*` = reference / model, 1.0 = kept; `delta_*` = model - reference, "
              "0.0 = kept). Best per column in bold.", ""]
    if not run.metrics:
        lines += ["No evaluate stage in this run.", ""]
    for stage, metrics in run.metrics.items():
        lines += [f"### {stage}", ""] + metrics_markdown(metrics, run.counts.get(stage, {})) + [""]
        for model, why in run.errors.get(stage, {}).items():
            lines.append(f"- **{model} not scored**: {why}")
        if run.errors.get(stage):
            lines.append("")
    if "metrics" in charts:
        lines += [f"![metrics per model and language]({_rel(charts['metrics'], run.folder)})", ""]
    lines += ["## Cost per stage", ""]
    rows = [[s["name"], s.get("plugin", "-"), _format4(s.get("wall_time_s")), _format4(s.get("tokens")),
             _format4(s.get("tokens_per_s")), format_params(s.get("trainable_params")),
             format_params(s.get("forward_params")), _format4(s.get("peak_rss_mb")), s.get("cache", "-")]
            for s in r.get("stages", [])]
    lines += _table(["stage", "plugin", "time s", "tokens", "tokens/s", "trainable", "forward",
                     "peak MB", "cache"], rows, ["l", "l", "r", "r", "r", "r", "r", "r", "l"]) + [""]
    if "cost" in charts:
        lines += [f"![training cost per stage]({_rel(charts['cost'], run.folder)})", ""]
    if run.logs:
        lines += ["## Training", ""]
        rows = []
        for stage, log in run.logs.items():
            losses = [x["loss"] for x in log if isinstance(x.get("loss"), (int, float))]
            rows.append([stage, _format4(len(log)), _format4(losses[0] if losses else None),
                         _format4(losses[-1] if losses else None), _format4(min(losses) if losses else None)])
        lines += _table(["stage", "steps", "first loss", "last loss", "min loss"], rows,
                        ["l", "r", "r", "r", "r"]) + [""]
        if "loss" in charts:
            lines += [f"![training loss curves]({_rel(charts['loss'], run.folder)})", ""]
    out = run.folder / REPORT_MD
    out.write_text("\n".join(lines))
    return out


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


# --- charts -----------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ChartsUnavailable("matplotlib is not installed; charts skipped "
                                "(pip install 'lingoforge[report]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_charts(run: RunData, out_dir: Path) -> dict[str, Path]:
    """PNG charts into ``out_dir``: ``metrics``, ``cost`` and ``loss`` (each when it has data)."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, Path] = {}
    rows = run.all_metrics
    if rows:
        charts["metrics"] = _metrics_chart(plt, rows, out_dir / "metrics.png")
    if run.report.get("stages"):
        charts["cost"] = _cost_chart(plt, run.report["stages"], out_dir / "cost.png")
    if any(run.logs.values()):
        charts["loss"] = _loss_chart(plt, run.logs, out_dir / "loss.png")
    return charts


def _metrics_chart(plt: Any, rows: dict[str, dict[str, float]], path: Path) -> Path:
    """One panel per metric kind; languages on x, one bar per model; best bar outlined."""
    kinds = sorted({m.partition("/")[0] for v in rows.values() for m in v})
    models = list(rows)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(7.0, 1.2 * len(models) + 4), 3.2 * len(kinds)),
                             squeeze=False)
    colors = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    for ax, kind in zip(axes[:, 0], kinds, strict=True):
        cols = order_columns(m for v in rows.values() for m in v if m.partition("/")[0] == kind)
        langs = [metric_language(c) or kind for c in cols]
        best = best_values(rows, cols)
        width = 0.8 / len(models)
        values = [v for m in models for c in cols if isinstance(v := rows[m].get(c), (int, float))
                  and math.isfinite(v)]
        for k, model in enumerate(models):
            xs, ys, edges = [], [], []
            for j, col in enumerate(cols):
                v = rows[model].get(col)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs.append(j - 0.4 + width * (k + 0.5))
                    ys.append(v)
                    edges.append("black" if v == best.get(col) else "none")
            bars = ax.bar(xs, ys, width=width * 0.95, color=colors(k), label=model,
                          edgecolor=edges, linewidth=1.5)
            if len(models) * len(cols) <= 24:
                ax.bar_label(bars, labels=[f"{y:.3g}" if abs(y) < 1e3 else f"{y:,.0f}" for y in ys],
                             fontsize=7, padding=1)
        positive = [v for v in values if v > 0]
        if lower_is_better(kind) and positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
            ax.set_yscale("log")
        elif values and min(values) >= 0:  # scores and rates: the axis starts at 0
            ax.set_ylim(bottom=0, top=None if max(values) > 0 else 1)
        if kind.startswith("retention"):
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        if kind.startswith("delta"):
            ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(cols)), langs)
        better = "lower is better" if lower_is_better(kind) else "higher is better"
        ax.set_title(f"{kind} ({better}; best outlined)", fontsize=11)
        ax.set_ylabel(kind)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="model")
    fig.suptitle("Scores per model and language", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost_chart(plt: Any, stages: list[dict[str, Any]], path: Path) -> Path:
    """Wall time per stage, and trainable vs forward parameters per training stage."""
    names = [s["name"] for s in stages]
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2))
    times = [float(s.get("wall_time_s") or 0) for s in stages]
    bars = ax_t.barh(names, times, color=["tab:gray" if s.get("cache") == "hit" else "tab:blue"
                                         for s in stages])
    ax_t.bar_label(bars, labels=[f"{t:.1f}s" for t in times], fontsize=8, padding=2)
    ax_t.margins(x=0.12)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("wall time (s); gray = cached")
    ax_t.set_title("wall time per stage")
    ax_t.grid(axis="x", alpha=0.3)
    trained = [s for s in stages if s.get("forward_params")]
    y = range(len(trained))
    fwd = [s["forward_params"] / 1e6 for s in trained]
    trn = [(s.get("trainable_params") or 0) / 1e6 for s in trained]
    for shift, vals, label, color in ((-0.2, fwd, "forward", "tab:orange"),
                                      (0.2, trn, "trainable", "tab:green")):
        bars = ax_p.barh([i + shift for i in y], vals, height=0.4, label=label, color=color)
        ax_p.bar_label(bars, labels=[format_params(int(v * 1e6)) for v in vals], fontsize=7, padding=2)
    ax_p.margins(x=0.15)
    ax_p.set_yticks(list(y), [s["name"] for s in trained])
    ax_p.invert_yaxis()
    ax_p.set_xlabel("parameters (millions)")
    ax_p.set_title("parameters per stage (trainable 0 = merge)")
    ax_p.legend(fontsize=9)
    ax_p.grid(axis="x", alpha=0.3)
    fig.suptitle("Cost per stage", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _loss_chart(plt: Any, logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Training loss against step, one line per training stage."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for stage, log in logs.items():
        pts = [(x["step"], x["loss"]) for x in log
               if isinstance(x.get("loss"), (int, float)) and math.isfinite(x["loss"])]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"{stage} ({len(pts)} steps)", linewidth=1.5,
                    marker="." if len(pts) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss per stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_report(folder: Path, *, charts: bool = True) -> tuple[Path, dict[str, Path], str | None]:
    """report.md (and charts unless ``charts`` is false) for a run folder.

    Returns (report.md path, {chart name: png path}, a note when charts were skipped).
    """
    run = load_run(folder)
    made: dict[str, Path] = {}
    note = None
    if charts:
        try:
            made = write_charts(run, run.folder / CHART_DIR)
        except ChartsUnavailable as exc:
            note = str(exc)
    return write_markdown(run, made, note), made, note
