"""The report's charts as SVG, written in pure Python (no plotting library to install).

Three charts, each one standalone ``.svg`` file that any browser, editor or Markdown
viewer shows:

- ``metrics.svg``: one panel per language and metric kind, one bar per model, a 95%
  error bar on every value that has an interval (:mod:`engine.run.report.intervals`), a dashed
  chance line on choice tasks, a dashed reference line at 1.0 (retention) or 0.0
  (delta); perplexities spanning more than 20x on a log axis.
- ``cost.svg``: wall time per stage (a cached stage shows the time its reused work
  took, paler) and trainable against forward parameters per stage.
- ``loss.svg``: training loss per stage against three x axes side by side, optimizer
  steps, tokens seen and training seconds, so a method that is cheaper per step shows
  it. Tokens and seconds come from ``train_log.jsonl`` (``tokens``; ``elapsed_s``, or
  else the window rate ``tok_s``); a log whose rows lack them leaves that panel empty
  with a note.

Elements carry classes (``bar``, ``errorbar``, ``chance``, ``reference``, ``curve``) so
that tests and style sheets can find them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from engine.run.report.metrics import format_params, lower_is_better, metric_language, order_columns

#: perplexity-like values spanning more than this factor get a log axis
LOG_SCALE_RATIO = 20.0
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac")
FONT = 'font-family="sans-serif"'


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    return f"{v:.4g}"


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over [lo, hi]: powers of ten, with 2 and 5 between them, and
    every integer multiple when the range is under a decade, so there are always
    enough labelled ticks to read a value."""
    lo_e, hi_e = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in range(lo_e, hi_e + 1) for m in mults]
        inside = [t for t in ticks if lo <= t <= hi]
        if len(inside) >= 4:
            return inside
    return inside or [lo, hi]


class Axis:
    """A value axis: maps data to pixels, linear or log."""

    def __init__(self, lo: float, hi: float, start: float, end: float, log: bool = False):
        self.log = log and lo > 0
        if self.log:
            lo, hi = lo / 1.15, hi * 1.15
            self.ticks = log_ticks(lo, hi)
        else:
            self.ticks = linear_ticks(lo, hi)
            lo, hi = min(lo, self.ticks[0]), max(hi, self.ticks[-1])
        self.lo, self.hi, self.start, self.end = lo, hi, start, end

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.start + f * (self.end - self.start)


class Svg:
    """An SVG document built element by element."""

    def __init__(self, width: float, height: float, title: str):
        self.width, self.height = width, height
        self.parts = [f'<rect width="{width}" height="{height}" fill="white"/>',
                      f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="16" '
                      f'{FONT}>{escape(title)}</text>']

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, s: str, size: int = 11, anchor: str = "middle",
             extra: str = "") -> None:
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
                 f'{FONT}{extra}>{escape(s)}</text>')

    def line(self, x1: float, y1: float, x2: float, y2: float, cls: str = "", stroke: str = "#333",
             dash: str = "", width: float = 1.0) -> None:
        attrs = f' class="{cls}"' if cls else ""
        attrs += f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line{attrs} x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                 f'stroke="{stroke}" stroke-width="{width}"/>')

    def render(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width:.0f}" '
                f'height="{self.height:.0f}" viewBox="0 0 {self.width:.0f} {self.height:.0f}">\n'
                + "\n".join(self.parts) + "\n</svg>\n")


def _y_axis(svg: Svg, axis: Axis, x0: float, x1: float, label: str) -> None:
    for t in axis.ticks:
        y = axis(t)
        svg.line(x0, y, x1, y, stroke="#e5e5e5")
        svg.text(x0 - 4, y + 4, _fmt(t), size=10, anchor="end")
    svg.line(x0, axis.start, x0, axis.end)
    svg.text(x0 - 38, (axis.start + axis.end) / 2, label, size=10,
             extra=f' transform="rotate(-90 {x0 - 38:.1f} {(axis.start + axis.end) / 2:.1f})"')


def _legend(svg: Svg, names: Sequence[str], x: float, y: float) -> None:
    for k, name in enumerate(names):
        yy = y + 16 * k
        svg.add(f'<rect x="{x:.1f}" y="{yy - 9:.1f}" width="10" height="10" '
                f'fill="{PALETTE[k % len(PALETTE)]}"/>')
        svg.text(x + 14, yy, name, size=11, anchor="start")


# --- metrics ----------------------------------------------------------------------------------


def metrics_svg(evidence: Any, path: Path, winners: dict[str, str | None] | None = None) -> Path:
    """Bars per model for each language and metric kind, error bars and chance lines.
    ``evidence`` is an :class:`engine.run.report.summary.Evidence`; ``winners`` (metric -> model named
    outside the noise) outlines those bars."""
    values, winners = evidence.values, winners or {}
    models = list(values)
    columns = order_columns(m for v in values.values() for m in v)
    langs = list(dict.fromkeys(metric_language(c) for c in columns))
    kinds = sorted({c.partition("/")[0] for c in columns})
    pw, ph, left, top = max(220.0, 26.0 * len(models) + 60), 200.0, 70.0, 50.0
    width = left + pw * len(kinds) + 190
    height = top + (ph + 40) * len(langs) + 30
    svg = Svg(width, height, "Scores per model and language: 95% intervals, dashed red line: "
              "chance, outlined: best outside the noise")
    for r, lang in enumerate(langs):
        for c, kind in enumerate(kinds):
            metric = f"{kind}/{lang}" if lang else kind
            if metric not in columns:
                continue
            x0, y0 = left + c * pw, top + r * (ph + 40) + 20
            _metric_panel(svg, evidence, metric, models, x0, y0, pw - 70, ph, winners.get(metric))
    _legend(svg, models, left + pw * len(kinds) - 40, top + 30)
    path.write_text(svg.render(), encoding="utf-8")
    return path


def _metric_panel(svg: Svg, ev: Any, metric: str, models: list[str], x0: float, y0: float,
                  w: float, h: float, winner: str | None) -> None:
    shown = [(k, m) for k, m in enumerate(models) if metric in ev.values[m]]
    scores = {m: ev.score(m, metric) for _, m in shown}
    ivs = {m: s.interval() for m, s in scores.items()}
    vals = [s.value for s in scores.values()]
    ext = vals + [v for iv in ivs.values() if iv for v in (iv.low, iv.high)]
    chance = ev.chance.get(metric)
    kind = metric.partition("/")[0]
    ref = 1.0 if kind.startswith("retention") else 0.0 if kind.startswith("delta") else None
    ext += [v for v in (chance, ref) if v is not None]
    positive = [v for v in vals if v > 0]
    log = bool(lower_is_better(metric) and positive and max(positive) / min(positive) > LOG_SCALE_RATIO)
    lo = min(positive) if log else min(0.0, min(ext))
    axis = Axis(lo, max(ext), y0 + h, y0 + 18, log=log)
    _y_axis(svg, axis, x0, x0 + w, metric.partition("/")[0] + (" (log)" if log else ""))
    better = "lower is better" if lower_is_better(metric) else "higher is better"
    note = "" if any(ivs.values()) else "; no interval"
    svg.text(x0 + w / 2, y0 + 8, f"{metric} ({better}{note})", size=12)
    base_y = axis(axis.lo if log else max(axis.lo, 0.0) if axis.lo <= 0 <= axis.hi else axis.lo)
    bw = w / max(len(shown), 1)
    for i, (k, m) in enumerate(shown):
        v, iv = scores[m].value, ivs[m]
        x, y = x0 + i * bw + bw * 0.15, axis(v)
        outline = ' stroke="black" stroke-width="2"' if m == winner else ""
        svg.add(f'<rect class="bar" x="{x:.1f}" y="{min(y, base_y):.1f}" width="{bw * 0.7:.1f}" '
                f'height="{abs(base_y - y):.1f}" fill="{PALETTE[k % len(PALETTE)]}"{outline}>'
                f'<title>{escape(m)}: {v:.4g}</title></rect>')
        cx = x + bw * 0.35
        if iv is not None:
            lo_y, hi_y = axis(iv.low), axis(iv.high)
            svg.add(f'<path class="errorbar" d="M{cx:.1f},{lo_y:.1f}V{hi_y:.1f}M{cx - 4:.1f},'
                    f'{lo_y:.1f}h8M{cx - 4:.1f},{hi_y:.1f}h8" stroke="black" fill="none"/>')
        if len(shown) <= 8:
            svg.text(cx, min(y, axis(iv.high) if iv else y) - 3, f"{v:.3g}", size=8)
    if chance is not None:
        svg.line(x0, axis(chance), x0 + w, axis(chance), cls="chance", stroke="#c00", dash="6 4")
        svg.text(x0 + w - 2, axis(chance) - 3, f"chance {chance:g}", size=9, anchor="end",
                 extra=' fill="#c00"')
    if ref is not None:
        svg.line(x0, axis(ref), x0 + w, axis(ref), cls="reference", stroke="#777", dash="3 3")
    svg.line(x0, y0 + h, x0 + w, y0 + h)


# --- cost -------------------------------------------------------------------------------------


def cost_svg(stages: list[dict[str, Any]], path: Path) -> Path:
    """Wall time per stage, and trainable vs forward parameters per training stage."""
    n = len(stages)
    row, left, top, pw = 22.0, 150.0, 60.0, 330.0
    height = top + row * n + 60
    svg = Svg(left * 2 + pw * 2 + 180, height, "Cost per stage")
    times = [float(s.get("wall_time_s") or 0) for s in stages]
    tx = Axis(0.0, max(times + [1e-3]), left, left + pw)
    trained = [s for s in stages if s.get("forward_params")]
    px = Axis(0.0, max([float(s["forward_params"]) for s in trained] or [1.0]),
              2 * left + pw + 60, 2 * left + 2 * pw + 60)
    for axis, title in ((tx, "wall time (s); pale = cached, time of the reused run"),
                        (px, "parameters: forward (light), trainable (dark)")):
        svg.text((axis.start + axis.end) / 2, top - 18, title, size=12)
        for t in axis.ticks:
            svg.line(axis(t), top - 4, axis(t), top + row * n, stroke="#e5e5e5")
            label = _fmt(t) if axis is tx else format_params(int(t))
            svg.text(axis(t), top + row * n + 14, label, size=10)
    for i, s in enumerate(stages):
        y = top + i * row
        svg.text(left - 6, y + row * 0.65, s["name"], anchor="end")
        cached = s.get("cache") == "hit"
        svg.add(f'<rect class="bar" x="{tx(0):.1f}" y="{y + 3:.1f}" width="{tx(times[i]) - tx(0):.1f}" '
                f'height="{row - 6:.1f}" fill="{PALETTE[0]}" fill-opacity="{0.4 if cached else 1}"/>')
        svg.text(tx(times[i]) + 4, y + row * 0.65, f"{times[i]:.1f}s" + (" (cached)" if cached else ""),
                 size=10, anchor="start")
    for s in trained:
        i = stages.index(s)
        y = top + i * row
        svg.text(px.start - 6, y + row * 0.65, s["name"], anchor="end")
        fwd, trn = float(s["forward_params"]), float(s.get("trainable_params") or 0)
        svg.add(f'<rect class="bar" x="{px(0):.1f}" y="{y + 3:.1f}" width="{px(fwd) - px(0):.1f}" '
                f'height="{row - 6:.1f}" fill="{PALETTE[1]}" fill-opacity="0.35"/>')
        svg.add(f'<rect class="bar" x="{px(0):.1f}" y="{y + 6:.1f}" width="{px(trn) - px(0):.1f}" '
                f'height="{row - 12:.1f}" fill="{PALETTE[1]}"/>')
        svg.text(px(fwd) + 4, y + row * 0.65, f"{format_params(int(trn))} / {format_params(int(fwd))}",
                 size=10, anchor="start")
    path.write_text(svg.render(), encoding="utf-8")
    return path


# --- loss curves ------------------------------------------------------------------------------


def spread(values: list[float | None]) -> list[float | None]:
    """A counter logged once per window of steps (every row of the window carries the
    window's end value) spread evenly over the window's steps, starting from the end value
    of the window before; values that already rise every row are unchanged."""
    out: list[float | None] = list(values)
    i, prev = 0, 0.0
    while i < len(values):
        v = values[i]
        if v is None:
            i += 1
            continue
        j = i
        while j + 1 < len(values) and values[j + 1] == v:
            j += 1
        for k in range(i, j + 1):
            out[k] = prev + (v - prev) * (k - i + 1) / (j - i + 1)
        prev, i = v, j + 1
    return out


def loss_axes(log: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per train_log row: ``step``, ``tokens`` and ``seconds`` (None where not known)."""
    steps = [float(r.get("step", i + 1)) for i, r in enumerate(log)]
    raw_tokens = [r.get("tokens") if isinstance(r.get("tokens"), (int, float)) else None for r in log]
    tokens = spread(raw_tokens)
    if all(isinstance(r.get("elapsed_s"), (int, float)) for r in log):
        seconds = spread([float(r["elapsed_s"]) for r in log])
    elif all(isinstance(r.get("tok_s"), (int, float)) and r["tok_s"] > 0 for r in log) and \
            all(t is not None for t in raw_tokens):
        # each window lasted (its tokens) / (its rate); rows of a window share both
        ends, prev_tokens, clock = [], 0.0, 0.0
        for i, r in enumerate(log):
            if i == 0 or raw_tokens[i] != raw_tokens[i - 1]:
                clock += (float(raw_tokens[i]) - prev_tokens) / float(r["tok_s"])
                prev_tokens = float(raw_tokens[i])
            ends.append(clock)
        seconds = spread(ends)
    else:
        seconds = [None] * len(log)
    return {"step": steps, "tokens": tokens, "seconds": seconds}


def _points(xs: list[Any], ys: list[Any]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(xs, ys, strict=True)
            if x is not None and isinstance(y, (int, float)) and math.isfinite(y)]


def continued_axes(logs: dict[str, list[dict[str, Any]]], after: dict[str, str]
                   ) -> dict[str, dict[str, list[float | None]]]:
    """:func:`loss_axes` of each stage, a stage named in ``after`` (stage -> the stage it
    continues: an align stage after its ELO stage) shifted to start where that one ended,
    so one method's stages make one curve of its whole cost."""
    axes: dict[str, dict[str, list[float | None]]] = {}

    def of(s: str, seen: tuple[str, ...] = ()) -> dict[str, list[float | None]]:
        if s not in axes:
            ax = loss_axes(logs[s])
            prev = after.get(s)
            if prev in logs and logs[prev] and prev not in seen:
                ends = {k: next((v for v in reversed(vs) if v is not None), 0.0)
                        for k, vs in of(prev, (*seen, s)).items()}
                ax = {k: [None if v is None else v + ends[k] for v in vs] for k, vs in ax.items()}
            axes[s] = ax
        return axes[s]

    for s in logs:
        of(s)
    return axes


def loss_svg(logs: dict[str, list[dict[str, Any]]], path: Path, after: dict[str, str] | None = None
             ) -> Path:
    """Training loss per stage against steps, tokens and seconds (three panels); a stage
    that evaluated held-out data also gets its ``eval_loss`` as a dashed line. A stage
    named in ``after`` continues the curve of the stage it builds on
    (:func:`continued_axes`)."""
    names = [s for s, log in logs.items() if log]
    axes = continued_axes({s: logs[s] for s in names}, after or {})
    curves = {s: (axes[s], [r.get("loss") for r in logs[s]], [r.get("eval_loss") for r in logs[s]])
              for s in names}
    losses = [v for _, ys, es in curves.values() for v in ys + es if isinstance(v, (int, float)) and math.isfinite(v)]
    left, top, pw, ph = 70.0, 60.0, 300.0, 260.0
    svg = Svg(left + 3 * (pw + 40) + 170, top + ph + 70, "Training loss per stage")
    labels = {"step": "optimizer step", "tokens": "tokens seen", "seconds": "training seconds"}
    positive = [v for v in losses if v > 0]
    log = bool(positive) and max(positive) / min(positive) > LOG_SCALE_RATIO
    ya = Axis(min(positive) if log else min(losses + [0.0]), max(losses + [1.0]), top + ph, top, log=log)
    for p, key in enumerate(labels):
        x0 = left + p * (pw + 40)
        pts = {s: _points(ax[key], ys) for s, (ax, ys, _) in curves.items()}
        held = {s: _points(ax[key], es) for s, (ax, _, es) in curves.items()}
        xs = [x for ps in pts.values() for x, _ in ps]
        axis = Axis(0.0, max(xs + [1.0]), x0, x0 + pw)
        _y_axis(svg, ya, x0, x0 + pw, "loss (nats/token)" + (" (log)" if log else "") if p == 0 else "")
        for t in axis.ticks:
            svg.text(axis(t), top + ph + 14, _fmt(t), size=10)
        svg.line(x0, top + ph, x0 + pw, top + ph)
        svg.text(x0 + pw / 2, top + ph + 32, labels[key], size=11)
        if not xs:
            svg.text(x0 + pw / 2, top + ph / 2, f"no {key} in train_log.jsonl", size=11)
        for k, s in enumerate(names):
            for ps, dash, title in ((pts[s], "", s), (held[s], ' stroke-dasharray="5 3"', f"{s} eval_loss")):
                if ps:
                    d = " ".join(f"{axis(x):.1f},{ya(y):.1f}" for x, y in ps)
                    svg.add(f'<polyline class="curve" points="{d}" fill="none" stroke-width="1.5"{dash} '
                            f'stroke="{PALETTE[k % len(PALETTE)]}"><title>{escape(title)}</title></polyline>')
    dashed = [" (dashed: eval_loss)" if any(v is not None for v in curves[s][2]) else "" for s in names]
    cont = {s: f", after {after[s]}" if after and after.get(s) in names else "" for s in names}
    _legend(svg, [f"{s} ({len(logs[s])} steps{cont[s]}){e}" for s, e in zip(names, dashed)],
            left + 3 * (pw + 40) - 20, top + 10)
    path.write_text(svg.render(), encoding="utf-8")
    return path


__all__ = ["Axis", "continued_axes", "cost_svg", "linear_ticks", "log_ticks", "loss_axes", "loss_svg",
           "metrics_svg", "spread"]
