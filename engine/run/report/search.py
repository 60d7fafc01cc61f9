"""The report's view of merge searches: a section per searched merge in report.md and a
chart of its trials, from the stage's ``notes.search`` in report.json.

The chart (``search-<stage>.svg``) plots each trial: with two or more objectives the
first against the second (the feasible Pareto front joined by a line), with one the
objective against the trial number (the best so far as a step line). Pruned trials are
hollow, infeasible ones grey, the chosen one ringed and labelled. Elements carry classes
(``trial``, ``front``, ``chosen``) so tests and style sheets can find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.run.report.charts import PALETTE, Axis, Svg, _fmt, _y_axis

__all__ = ["search_markdown", "search_stages", "search_svg"]


def search_stages(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Stage name -> its ``notes.search``, for every searched merge of the run."""
    out = {}
    for s in report.get("stages", []):
        notes = s.get("notes") or {}
        if isinstance(notes.get("search"), dict) and isinstance(notes["search"].get("trials"), list):
            out[s["name"]] = notes["search"]
    return out


def _value(t: dict[str, Any], i: int) -> float | None:
    values = t.get("values")
    if isinstance(values, list) and len(values) > i and isinstance(values[i], (int, float)):
        return float(values[i])
    if i == 0 and isinstance(t.get("rung"), (int, float)):
        return float(t["rung"])  # a pruned trial: its first-rung score
    return None


def search_svg(stage: str, search: dict[str, Any], path: Path) -> Path:
    """The chart of one search's trials (see the module docstring)."""
    trials = [t for t in search["trials"] if _value(t, 0) is not None]
    objectives = [o["metric"] for o in search.get("objectives", [])] or ["objective"]
    two = len(objectives) >= 2
    chosen = (search.get("chosen") or {}).get("number")
    front = set(search.get("pareto") or [])
    w, h, x0, x1, y0, y1 = 640, 420, 70, 610, 50, 360
    svg = Svg(w, h, f"search {stage}: " + (f"{objectives[0]} against {objectives[1]}" if two
                                           else f"{objectives[0]} per trial"))
    xs = [(_value(t, 1) if two else float(t["number"])) for t in trials]
    ys = [_value(t, 0) for t in trials]
    pts = [(x, y, t) for x, y, t in zip(xs, ys, trials) if x is not None and y is not None]
    if not pts:
        svg.text(w / 2, h / 2, "no finished trial", size=12)
        path.write_text(svg.render(), encoding="utf-8")
        return path
    ax = Axis(min(p[0] for p in pts), max(p[0] for p in pts), x0, x1)
    ay = Axis(min(p[1] for p in pts), max(p[1] for p in pts), y1, y0)
    _y_axis(svg, ay, x0, x1, objectives[0])
    svg.line(x0, y1, x1, y1)
    for t in ax.ticks:
        svg.text(ax(t), y1 + 16, _fmt(t), size=10)
    svg.text((x0 + x1) / 2, y1 + 34, objectives[1] if two else "trial", size=11)
    if two:
        line = sorted((p for p in pts if p[2]["number"] in front), key=lambda p: p[0])
        if len(line) > 1:
            d = " ".join(f"{ax(x):.1f},{ay(y):.1f}" for x, y, _ in line)
            svg.add(f'<polyline class="front" points="{d}" fill="none" stroke="{PALETTE[0]}" '
                    'stroke-width="1.5"/>')
    else:
        maximize = (search.get("objectives") or [{}])[0].get("direction", "maximize") == "maximize"
        best, steps = None, []
        for x, y, t in sorted(pts, key=lambda p: p[0]):
            if t.get("state") == "complete" and t.get("feasible", True):
                best = y if best is None else (max(best, y) if maximize else min(best, y))
            if best is not None:
                steps.append(f"{ax(x):.1f},{ay(best):.1f}")
        if len(steps) > 1:
            svg.add(f'<polyline class="front" points="{" ".join(steps)}" fill="none" '
                    f'stroke="{PALETTE[0]}" stroke-width="1.5"/>')
    for x, y, t in pts:
        state = t.get("state")
        infeasible = state == "complete" and not t.get("feasible", True)
        color = "#9a9a9a" if infeasible else PALETTE[1]
        fill = "none" if state == "pruned" else color
        svg.add(f'<circle class="trial" cx="{ax(x):.1f}" cy="{ay(y):.1f}" r="4" fill="{fill}" '
                f'stroke="{color}"/>')
        if t["number"] == chosen:
            svg.add(f'<circle class="chosen" cx="{ax(x):.1f}" cy="{ay(y):.1f}" r="9" fill="none" '
                    f'stroke="{PALETTE[3]}" stroke-width="2"/>')
            svg.text(ax(x) + 12, ay(y) - 10, f"chosen: trial {chosen}", size=11, anchor="start")
    svg.text(x1, h - 12, "filled: complete; hollow: pruned (first-rung score); grey: breaks a "
             "constraint", size=10, anchor="end")
    path.write_text(svg.render(), encoding="utf-8")
    return path


def search_markdown(report: dict[str, Any], charts: dict[str, Path], rel: Any) -> list[str]:
    """The "Searches" section of report.md (empty when the run searched nothing)."""
    found = search_stages(report)
    if not found:
        return []
    lines = ["## Searches", "",
             "Each searched merge tried candidates on its dev data and wrote the chosen one; its "
             "scores on test data are in the evaluate stages above.", ""]
    for stage, s in found.items():
        counts = s.get("counts") or {}
        chosen = s.get("chosen") or {}
        objectives = ", ".join(f"{o['metric']} ({o.get('direction', 'maximize')})"
                               for o in s.get("objectives", []))
        lines += [f"### {stage}", "",
                  f"- study `{s.get('study')}`, sampler {s.get('sampler')}, seed {s.get('seed')}, "
                  f"{s.get('workers', 1)} worker(s)",
                  f"- objectives: {objectives}"
                  + (f"; constraints: {', '.join(s['constraints'])}" if s.get("constraints") else ""),
                  f"- {len(s['trials'])} trials ({counts.get('complete', 0)} complete, "
                  f"{counts.get('pruned', 0)} pruned, {counts.get('fail', 0)} failed; "
                  f"{s.get('reused', 0)} kept from an earlier run) in {s.get('search_s')} s",
                  f"- chosen: trial {chosen.get('number')} ({chosen.get('method')}), "
                  + ", ".join(f"{k} {v:.4g}" for k, v in (chosen.get("metrics") or {}).items()
                              if isinstance(v, (int, float))),
                  f"- params: `{chosen.get('params')}`", ""]
        front = [t for t in s["trials"] if t["number"] in set(s.get("pareto") or [])]
        if len(front) > 1:
            names = [o["metric"] for o in s.get("objectives", [])]
            lines += ["| front trial | " + " | ".join(names) + " |",
                      "|---|" + "---:|" * len(names)]
            for t in front:
                lines.append(f"| {t['number']}{' (chosen)' if t['number'] == chosen.get('number') else ''} | "
                             + " | ".join(f"{v:.4g}" for v in t["values"]) + " |")
            lines.append("")
        if stage in charts:
            lines += [f"![trials of the search {stage}]({rel(charts[stage])})", ""]
    return lines
