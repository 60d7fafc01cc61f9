"""``engine report`` (and the end of ``engine run``): a run folder turned into report.md
and SVG charts.

A team deciding which model to ship needs, on one page: what the run found in words
(:mod:`engine.run.report.summary`: cost per method, deltas against the base with their intervals,
winners only outside the noise), every model's scores per language, what each stage
cost (wall time, trainable and forward parameters), and whether training converged
(loss curves against steps, tokens and seconds). Everything is read back from the run
folder (report.json, each evaluate stage's metrics.json, each training stage's
train_log.jsonl), so a report can be made for any finished or interrupted run, on
another machine, without loading a model.

Charts are SVG written by :mod:`engine.run.report.charts` (nothing to install). Every report
replaces the previous one whole: report.md atomically, the ``report/`` chart folder by
a freshly written one, so no chart of an earlier run is left behind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core import outputs
from engine.core.errors import EngineError
from engine.run.report import charts as svg_charts
from engine.run.report.metrics import direction, format_number, format_params, legend, order_columns
from engine.run.report.search import search_markdown, search_stages, search_svg
from engine.run.report.summary import Evidence, compare, gather, summarize

REPORT_MD = "report.md"
CHART_DIR = "report"
LOG_FILE = "train_log.jsonl"
CHARTS = ("metrics", "cost", "loss")


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

    @property
    def evidence(self) -> Evidence:
        """Values, counts, standard errors and chance levels (:func:`engine.run.report.summary.gather`)."""
        return gather(self.report, self.folder)


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
            try:
                run.logs[name] = [json.loads(line) for line in log.read_text().splitlines()
                                  if line.strip()]
            except json.JSONDecodeError as exc:
                raise EngineError(f"{log}: not valid JSON lines ({exc})") from None
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


def metrics_markdown(metrics: dict[str, dict[str, float]], counts: dict[str, dict[str, int]],
                     evidence: Evidence | None = None) -> list[str]:
    """Models as rows, metrics grouped by language; a column's best in bold only when it
    beats the runner-up outside the noise (``evidence`` gives the intervals)."""
    columns = order_columns(m for v in metrics.values() for m in v)
    ev = evidence or Evidence(values=metrics, counts=counts)
    winners = {c: comp.winner for c in columns if (comp := compare(ev, c, list(metrics)))}
    rows = []
    for model, values in metrics.items():
        cells = [model]
        for col in columns:
            text = _format4(values.get(col))
            cells.append(f"**{text}**" if winners.get(col) == model else text)
        rows.append(cells)
    lines = _table(["model", *(f"{c} {direction(c)}" for c in columns)], rows,
                   ["l", *["r"] * len(columns)])
    chance = {c: ev.chance[c] for c in columns if c in ev.chance}
    if chance:
        lines += ["", "Chance level: " + ", ".join(f"{c} {v:g}" for c, v in chance.items()) + "."]
    n = {c: sorted({cnt.get(c) for cnt in counts.values() if cnt.get(c) is not None}) for c in columns}
    based = ", ".join(f"{c}: {'/'.join(_format4(x) for x in v)}" for c, v in n.items() if v)
    if based:
        lines += ["", f"Counts behind each value (tokens for ppl, bytes for bpb, items for acc): {based}."]
    return lines


def write_markdown(run: RunData, charts: dict[str, Path], note: str | None = None,
                   recipe: str | None = None) -> Path:
    """Write ``<run>/report.md`` atomically; chart paths are linked relative to the run folder."""
    r = run.report
    lines = [f"# Run report: {r.get('recipe', run.folder.name)}", "",
             f"- run folder: `{run.folder}`",
             f"- finished: {'yes' if r.get('finished') else 'no (interrupted or still running)'}",
             f"- total wall time: {_format4(r.get('wall_time_s'))} s; device {r.get('device', '-')}, "
             f"torch {r.get('torch', '-')}", ""]
    if note:
        lines += [f"> {note}", ""]
    lines += [summarize(r, run.folder, recipe=recipe or r.get("source")).markdown(), ""]
    evidence = run.evidence
    columns = order_columns(m for v in run.all_metrics.values() for m in v)
    lines += ["## Scores", "",
              f"{legend(columns)}. A column's best is bold only when it beats the runner-up "
              "outside the noise (95% interval of the difference excludes zero).", ""]
    if not run.metrics:
        lines += ["No evaluate stage in this run.", ""]
    for stage, metrics in run.metrics.items():
        lines += [f"### {stage}", ""] + metrics_markdown(metrics, run.counts.get(stage, {}), evidence) + [""]
        for model, why in run.errors.get(stage, {}).items():
            lines.append(f"- **{model} not scored**: {why}")
        if run.errors.get(stage):
            lines.append("")
    if "metrics" in charts:
        lines += [f"![scores per model and language]({_rel(charts['metrics'], run.folder)})", ""]
    searched = {k[len("search:"):]: v for k, v in charts.items() if k.startswith("search:")}
    lines += search_markdown(r, searched, lambda p: _rel(p, run.folder))
    lines += ["## Cost per stage", "",
              "A cached stage's time is that of the run that made the output it reuses.", ""]
    rows = [[s["name"], s.get("plugin", "-"), _format4(s.get("wall_time_s")), _format4(s.get("tokens")),
             _format4(s.get("tokens_per_s")), format_params(s.get("trainable_params")),
             format_params(s.get("forward_params")), _format4(s.get("peak_rss_mb")), s.get("cache", "-")]
            for s in r.get("stages", [])]
    lines += _table(["stage", "plugin", "time s", "tokens", "tokens/s", "trainable", "forward",
                     "peak MB", "cache"], rows, ["l", "l", "r", "r", "r", "r", "r", "r", "l"]) + [""]
    if "cost" in charts:
        lines += [f"![cost per stage]({_rel(charts['cost'], run.folder)})", ""]
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
            lines += [f"![training loss against steps, tokens and seconds]"
                      f"({_rel(charts['loss'], run.folder)})", ""]
    out = run.folder / REPORT_MD
    outputs.replace_file(out, "\n".join(lines))
    return out


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


# --- charts -----------------------------------------------------------------------------------


def write_charts(run: RunData, out_dir: Path) -> dict[str, Path]:
    """SVG charts into ``out_dir``: ``metrics``, ``cost`` and ``loss`` (each when it has data),
    and ``search:<stage>`` for each searched merge."""
    out_dir.mkdir(parents=True, exist_ok=True)
    charts: dict[str, Path] = {}
    evidence = run.evidence
    if evidence.values:
        columns = order_columns(m for v in evidence.values.values() for m in v)
        winners = {c: comp.winner for c in columns
                   if (comp := compare(evidence, c, list(evidence.values)))}
        charts["metrics"] = svg_charts.metrics_svg(evidence, out_dir / "metrics.svg", winners)
    if run.report.get("stages"):
        charts["cost"] = svg_charts.cost_svg(run.report["stages"], out_dir / "cost.svg")
    if any(run.logs.values()):
        lineage = run.report.get("lineage") or {}
        after = {s: info["inputs"][0] for s, info in lineage.items()  # align continues its input
                 if info.get("stage") == "align" and info.get("inputs")}
        charts["loss"] = svg_charts.loss_svg(run.logs, out_dir / "loss.svg", after)
    for stage, search in search_stages(run.report).items():
        charts[f"search:{stage}"] = search_svg(stage, search, out_dir / f"search-{stage}.svg")
    return charts


def _chart_dir(run: RunData) -> Path:
    target = run.folder / CHART_DIR
    if any(s.get("name") == CHART_DIR for s in run.report.get("stages", [])):
        raise EngineError(f"{target}: a stage of this run is named {CHART_DIR!r}; its output "
                          "folder is where the report's charts go: rename the stage")
    return target


def make_report(folder: Path, *, charts: bool = True,
                recipe: str | None = None) -> tuple[Path, dict[str, Path], str | None]:
    """Rebuild report.md and (unless ``charts`` is false) the charts of a run folder.

    The previous report is replaced whole: the chart folder is written beside it and
    swapped in; without charts it is removed, so report.md never sits next to charts of
    another run. Returns (report.md path, {chart name: svg path}, a note or None).
    """
    run = load_run(folder)
    target = _chart_dir(run)
    made: dict[str, Path] = {}
    note = None
    if charts:
        tmp = Path(outputs.temp_dir(f".{CHART_DIR}.tmp-", run.folder))
        try:
            drawn = write_charts(run, tmp)
            outputs.mark_output(tmp, "report charts")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        outputs.publish(tmp, target, flag="report charts", overwrite=True)  # only the engine's
        made = {name: target / path.name for name, path in drawn.items()}
    elif target.is_dir():
        shutil.rmtree(target)  # checked above: the engine's charts alone
        note = "charts skipped (--no-charts)"
    return write_markdown(run, made, note, recipe), made, note
