"""The end-of-run summary: what a run found, in words and numbers, noise included.

Read from report.json (and each evaluate stage's metrics.json), per language:

- **cost**: each method that adapted the language (an ``adapt-language`` stage whose
  data is mostly that language, with the ``align`` stages built on it: ELO's two
  stages are one method) against the most expensive one: wall time, tokens and
  trainable parameters. A cached stage's ``wall_time_s`` is the time the reused work
  took when it ran, so a re-run reports the same costs. The merges built on a method
  are listed with what producing them took from the base (:mod:`engine.run.report.cost`).
- **scores** against the base model (the recipe model named ``base``, else the input
  model of the adapt stages), with a 95% interval on every difference
  (:mod:`engine.run.report.intervals`), the chance level of choice tasks, and for each metric the
  best model named (and starred) only when its interval against the runner-up
  excludes zero; otherwise the summary says "within noise". A metric without an
  interval (perplexity: its evaluator gives no standard error) gets none and no winner.
- the commands to run next.

:func:`summarize` builds it; :meth:`Summary.text` is what ``engine run`` prints (lines
of at most 100 columns where the names allow), :meth:`Summary.markdown` goes into
report.md.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.run.report.cost import Method, cost_blocks, merges_built_on, methods, stage_languages
from engine.run.report.cost import lineage_of as _lineage
from engine.run.report.intervals import Interval, Score, is_accuracy
from engine.run.report.metrics import format_number, lower_is_better, metric_language, order_columns
from engine.run.report.render import Block, Bullets, Heading, Note, Table, markdown, text
from engine.run.report.render import interval_text as _ival
from engine.run.report.render import number as _num
from engine.run.report.render import signed as _signed

__all__ = ["Comparison", "Evidence", "Summary", "gather", "summarize"]


@dataclass
class Evidence:
    """Every evaluate stage's numbers merged: values, counts, standard errors, chance."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    stderr: dict[str, dict[str, float]] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    def score(self, model: str, metric: str) -> Score:
        n = self.counts.get(model, {}).get(metric)
        return Score(float(self.values[model][metric]), int(n) if n else None,
                     self.stderr.get(model, {}).get(metric), is_accuracy(metric))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _merge(into: dict[str, dict[str, Any]], more: Any) -> None:
    for model, values in (more or {}).items():
        if isinstance(values, dict):
            into.setdefault(model, {}).update(values)


def gather(report: dict[str, Any], folder: Path | None = None) -> Evidence:
    """The evidence of every evaluate stage: its record first, the stage folder's
    metrics.json (``_counts``, ``_stderr``, ``_chance``) for what the record lacks."""
    ev = Evidence()
    for r in report.get("stages", []):
        if r.get("stage") != "evaluate":
            continue
        out = Path(r["output"]) if r.get("output") else None
        if (out is None or not out.is_dir()) and folder is not None:
            out = Path(folder) / r["name"]
        data = _read_json(out / "metrics.json") if out is not None else {}
        _merge(ev.values, r.get("metrics") or {k: v for k, v in data.items() if not k.startswith("_")})
        _merge(ev.counts, r.get("counts") or data.get("_counts"))
        _merge(ev.stderr, r.get("stderr") or data.get("_stderr") or r.get("notes", {}).get("stderr"))
        ev.chance.update(r.get("chance") or data.get("_chance") or {})
    ev.values = {m: {k: v for k, v in vals.items() if isinstance(v, (int, float))}
                 for m, vals in ev.values.items()}
    return ev


# --- the run's shape: which stage adapted which language, from which base ------------------


def base_model(report: dict[str, Any], evaluated: set[str]) -> str | None:
    """The recipe model named ``base``, else the recipe model most adapt stages start from;
    None when that model was not scored (no deltas then)."""
    lineage, recipe_models = _lineage(report), set(report.get("models") or ())
    if "base" in recipe_models or (not recipe_models and "base" in evaluated):
        name: str | None = "base"
    else:
        starts = Counter(i for info in lineage.values() if info.get("stage") == "adapt-language"
                         for i in info.get("inputs", [])[:1] if i in recipe_models)
        name = starts.most_common(1)[0][0] if starts else None
    return name if name in evaluated else None


# --- comparisons ------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The best model of one metric against the runner-up."""

    metric: str
    best: str
    runner_up: str
    difference: float
    interval: Interval | None

    @property
    def winner(self) -> str | None:
        """The best model when the interval of its lead excludes zero, else None."""
        return self.best if self.interval is not None and self.interval.excludes(0.0) else None


def compare(ev: Evidence, metric: str, models: list[str]) -> Comparison | None:
    """Best against runner-up on ``metric`` among ``models`` (None with fewer than two)."""
    have = [m for m in models if metric in ev.values.get(m, {})]
    if len(have) < 2:
        return None
    ranked = sorted(have, key=lambda m: ev.values[m][metric], reverse=not lower_is_better(metric))
    best, second = ranked[:2]
    a, b = ev.score(best, metric), ev.score(second, metric)
    return Comparison(metric, best, second, a.value - b.value, a.minus(b))


def _better(metric: str, d: float) -> bool:
    return d < 0 if lower_is_better(metric) else d > 0


@dataclass
class Summary:
    """The summary's blocks (headings, tables, bullets) and its comparisons."""

    blocks: list[Block]
    comparisons: dict[str, Comparison]
    base: str | None

    def text(self) -> str:
        return text(self.blocks)

    def markdown(self) -> str:
        return markdown(self.blocks)


def _head_to_head(ev: Evidence, found: list[Method], metrics: list[str]) -> list[str]:
    """Each cheaper method against the most expensive one, metric by metric."""
    top = max(found, key=lambda m: m.wall_time_s)
    lines = []
    for m in found:
        if m is top or m.name not in ev.values or top.name not in ev.values:
            continue
        parts = []
        for metric in metrics:
            if metric not in ev.values[m.name] or metric not in ev.values[top.name]:
                continue
            a, b = ev.score(m.name, metric), ev.score(top.name, metric)
            iv = a.minus(b)
            d = a.value - b.value
            if iv is None:
                parts.append(f"{metric} {_num(a.value, metric)} vs {_num(b.value, metric)} (no interval)")
            elif iv.excludes(0.0):
                who = m.name if _better(metric, d) else top.name
                parts.append(f"{metric} {_signed(d, metric)} {_ival(iv, metric)}, {who} better")
            else:
                parts.append(f"{metric} {_signed(d, metric)} {_ival(iv, metric)} within noise")
        if parts:
            lines.append(f"{m.name} vs {top.name}: " + "; ".join(parts) + ".")
    return lines


def _metric_words(ev: Evidence, metric: str, models: list[str], base: str | None,
                  comp: Comparison | None) -> str:
    # a language's table may hold models another evaluate stage scored on other metrics
    models = [m for m in models if metric in ev.values.get(m, {})]
    n = sorted({ev.counts.get(m, {}).get(metric) for m in models} - {None})
    about = [f"chance {ev.chance[metric]:g}"] if metric in ev.chance else []
    if n:
        about.append(f"n = {'/'.join(format_number(x) for x in n)}")
    head = f"{metric}" + (f" ({', '.join(about)})" if about else "") + ": "
    if comp is None:
        return head + "only one model scored."
    lead = (f"{comp.best} {_num(ev.values[comp.best][metric], metric)} vs {comp.runner_up} "
            f"{_num(ev.values[comp.runner_up][metric], metric)}, {_signed(comp.difference, metric)} "
            f"{_ival(comp.interval, metric)}")
    if comp.winner:
        words = [f"best is {lead}: outside the noise."]
    elif comp.interval is None:
        words = [f"{'lowest' if lower_is_better(metric) else 'highest'} {comp.best} "
                 f"{_num(ev.values[comp.best][metric], metric)}, next {comp.runner_up} "
                 f"{_num(ev.values[comp.runner_up][metric], metric)}; no interval is available "
                 "for this metric (its evaluator gives no standard error), so no winner is named."]
    else:
        words = [f"{lead}: within noise, no winner."]
    if base is not None and base in models:
        up, down = [], []
        for m in models:
            if m == base or metric not in ev.values.get(m, {}):
                continue
            iv = ev.score(m, metric).minus(ev.score(base, metric))
            if iv is not None and iv.excludes(0.0):
                (up if _better(metric, iv.center) else down).append(m)
        others = [m for m in models if m != base and metric in ev.values.get(m, {})]
        if any(ev.score(m, metric).minus(ev.score(base, metric)) for m in others):
            rest = "; the rest within noise" if len(up) + len(down) < len(others) else ""
            words.append(f"Against {base}: better beyond noise: {', '.join(up) or 'none'}; "
                         f"worse: {', '.join(down) or 'none'}{rest}.")
    if metric in ev.chance:
        above = [m for m in models if (iv := ev.score(m, metric).interval()) is not None
                 and iv.low > ev.chance[metric]]
        if len(above) < len(models):
            words.append(f"Not above chance beyond noise: "
                         f"{', '.join(m for m in models if m not in above)}.")
    return head + " ".join(words)


def _metrics_table(ev: Evidence, metrics: list[str], models: list[str], base: str | None,
                   comps: dict[str, Comparison]) -> Table:
    rows = []
    if any(m in ev.chance for m in metrics):
        rows.append(["(chance)", *(f"{ev.chance[m]:g}" if m in ev.chance else "" for m in metrics)])
    for model in models:
        cells = [model]
        for metric in metrics:
            if metric not in ev.values.get(model, {}):
                cells.append("-")
                continue
            s = ev.score(model, metric)
            cell = _num(s.value, metric)
            if base is not None and model != base and metric in ev.values.get(base, {}):
                iv = s.minus(ev.score(base, metric))
                d = s.value - ev.values[base][metric]
                cell += f" {_signed(d, metric)}" + (f"±{iv.half_width:.2f}" if iv is not None else "")
            comp = comps.get(metric)
            cells.append(cell + ("*" if comp is not None and comp.winner == model else ""))
        rows.append(cells)
    header = ["model", *(f"{m} {'↓' if lower_is_better(m) else '↑'}" for m in metrics)]
    return Table(header, rows, "l" + "r" * len(metrics))


def summarize(report: dict[str, Any], folder: Path | None = None, *,
              recipe: str | None = None) -> Summary:
    """The summary of a run; ``folder`` is its workdir, ``recipe`` the recipe path to suggest."""
    ev = gather(report, folder)
    models = list(ev.values)
    base = base_model(report, set(models))
    langs = stage_languages(report)
    metrics = order_columns(m for v in ev.values.values() for m in v)
    by_lang: dict[str, list[str]] = {}
    for m in metrics:
        by_lang.setdefault(metric_language(m), []).append(m)
    adapted = [lang for lang in dict.fromkeys(langs.values()) if lang in by_lang]
    order = adapted + [lang for lang in by_lang if lang not in adapted]
    blocks: list[Block] = [Heading(
        f"Summary of {report.get('recipe', 'the run')}: {len(models)} models scored"
        + (f" against {base}" if base else ""))]
    if models:
        blocks.append(Note("Differences carry a 95% interval (± its wider side); a value is "
                           "starred * only when the best beats the runner-up outside the noise."))
    comps: dict[str, Comparison] = {}
    for lang in order:
        found = methods(report, lang) if lang in adapted else []
        title = f"{lang or '(no language)'}: " + (
            f"adapted by {', '.join(m.name for m in found)}" if found else "not adapted in this run")
        blocks.append(Heading(title, level=2))
        if found:
            blocks += cost_blocks(found, merges_built_on(report, found))
        cols = by_lang[lang]
        shown = [m for m in models if any(c in ev.values[m] for c in cols)]
        shown = sorted(shown, key=lambda m: (m != base, m not in {f.name for f in found}))
        for c in cols:
            if (comp := compare(ev, c, shown)) is not None:
                comps[c] = comp
        blocks.append(Note("metrics: " + (f"value, difference from {base} ± its 95% interval"
                                          if base in shown else "value")))
        blocks.append(_metrics_table(ev, cols, shown, base, comps))
        words = ([] if len(found) < 2 else _head_to_head(ev, found, cols))
        words += [_metric_words(ev, c, shown, base, comps.get(c)) for c in cols]
        blocks.append(Bullets(words))
    if not models:
        blocks.append(Note("No evaluate stage scored a model; add one to compare the methods."))
    where = Path(folder) if folder is not None else Path("runs") / str(report.get("recipe", "RUN"))
    nxt = [f"engine report {where}    rebuild report.md and the charts",
           f"report.md: {where / 'report.md'} (charts in {where / 'report'})"]
    if recipe:
        nxt.insert(1, f"engine status {recipe}    what is up to date, what would re-run")
    blocks += [Heading("Next", level=2), Bullets(nxt, code=True)]
    return Summary(blocks, comps, base)
