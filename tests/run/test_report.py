"""End-of-run summary and ``engine report``: report.md and SVG charts from a real run folder.

The run folder is made by running a real recipe (a 3-step CT training, perplexity
and retention) on the tiny model, so the report is read back from the files the
runner and trainers really write; chance lines and error bars are checked on a run
folder written by hand (the tiny recipe has no choice task).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import textwrap
import xml.etree.ElementTree as ET

import pytest
from rich.console import Console

from engine.cli.commands import main
from engine.cli.report import add_parser, cmd_report
from engine.core import outputs
from engine.core.errors import EngineError
from engine.run.report.charts import log_ticks, loss_axes, spread
from engine.run.report.files import load_run, make_report
from engine.run.report.metrics import best_values, direction, legend, order_columns
from engine.run.report.tables import metrics_table

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """A finished run: base -> ct (3 steps), then perplexity and retention on both.
    Returns (workdir, recipe path, what `engine run` printed on stdout)."""
    root = tmp_path_factory.mktemp("report-run")
    text = root / "en.txt"
    text.write_text("the cat sits on the mat and the dog runs in the park\n"
                    "a small model learns words from a small corpus of text\n" * 6)
    recipe = root / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: report-demo
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text}, language: en}}
            params: {{steps: 3, batch_size: 2, seq_len: 16, lr: 0.01}}
          - name: ppl
            stage: evaluate
            plugin: perplexity
            models: [base, ct]
            data: {{path: {text}, language: en}}
          - name: keep
            stage: evaluate
            plugin: retention
            models: [base, ct]
            data: {{path: {text}, language: en}}
            params: {{reference: base, metrics: [ppl]}}
        """))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", str(recipe), "--workdir", str(root / "work")]) == 0
    return root / "work", recipe, out.getvalue()


def test_engine_run_prints_the_summary_and_writes_report_md_and_charts(run_dir):
    workdir, recipe, printed = run_dir
    flat = " ".join(printed.split())
    assert "Summary of report-demo: 2 models scored against base" in flat
    assert "en: adapted by ct" in flat and "no interval is available" in flat
    assert f"engine report {workdir}" in flat and f"engine status {recipe}" in flat
    assert f"wrote {workdir / 'report.md'} and 3 charts" in flat
    text = (workdir / "report.md").read_text()
    assert "## Summary of report-demo" in text
    for name in ("metrics", "cost", "loss"):
        assert f"](report/{name}.svg)" in text
        ET.parse(workdir / "report" / f"{name}.svg")  # well-formed XML


def test_report_md_and_charts_are_rebuilt_on_every_run(run_dir):
    workdir, recipe, _ = run_dir
    (workdir / "report.md").write_text("STALE")
    (workdir / "report" / "old-chart.png").write_bytes(b"stale")
    outputs.mark_output(workdir / "report", "report charts")  # a chart an earlier run drew
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(recipe), "--workdir", str(workdir)]) == 0  # every stage cached
    assert "STALE" not in (workdir / "report.md").read_text()
    assert sorted(p.name for p in (workdir / "report").iterdir() if not p.name.startswith(".")) == [
        "cost.svg", "loss.svg", "metrics.svg"]  # (beside the engine's marker)
    report = json.loads((workdir / "report.json").read_text())
    ct = next(s for s in report["stages"] if s["name"] == "ct")
    assert ct["cache"] == "hit" and ct["wall_time_s"] > 0  # the reused work's cost is kept
    assert report["lineage"]["ct"] == {"stage": "adapt-language", "plugin": "ct", "inputs": ["base"],
                                       "languages": {"en": 1.0}}


def test_report_markdown_marks_a_best_only_outside_the_noise(run_dir):
    workdir = run_dir[0]
    md, charts, note = make_report(workdir)
    assert note is None and md == workdir / "report.md"
    text = md.read_text()
    ppl = json.loads((workdir / "ppl" / "metrics.json").read_text())
    (a, b), se = (ppl[m]["ppl/en"] for m in ("base", "ct")), ppl["_stderr"]
    outside = abs(a - b) > 1.96 * math.hypot(se["base"]["ppl/en"], se["ct"]["ppl/en"])
    scores = text.split("## Scores")[1].split("## Cost")[0]
    assert (f"**{min(a, b):.4g}**" in scores) == outside and f"{max(a, b):.4g} |" in scores
    assert scores.count("**") == 2 * outside  # retention_ppl has no interval: never bold
    assert "| model | retention_ppl/en ↑ |" in text and "| base | 1 |" in text
    assert "retention 1.0 = reference kept" in text
    report = json.loads((workdir / "report.json").read_text())
    for stage in report["stages"]:
        assert f"| {stage['name']} |" in text
    losses = [json.loads(x)["loss"] for x in (workdir / "ct" / "train_log.jsonl").read_text().splitlines()]
    assert f"| ct | 3 | {losses[0]:.4g} | {losses[-1]:.4g} |" in text
    assert set(charts) == {"metrics", "cost", "loss"}


def test_report_no_charts_removes_the_old_chart_folder(run_dir, capsys):
    workdir = run_dir[0]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    assert cmd_report(parser.parse_args(["report", str(workdir), "--no-charts"]), Console(stderr=True)) == 0
    assert not (workdir / "report").exists() and "![" not in (workdir / "report.md").read_text()
    assert cmd_report(parser.parse_args(["report", str(workdir)]), Console(stderr=True)) == 0
    assert (workdir / "report" / "metrics.svg").is_file()
    assert "wrote" in capsys.readouterr().err


def _choice_run(folder):
    """A run folder written by hand: three models on a 4-choice task, 400 items each."""
    values = {"base": {"acc/xx": 0.26}, "a": {"acc/xx": 0.30}, "b": {"acc/xx": 0.70}}
    (folder / "score").mkdir(parents=True)
    (folder / "score" / "metrics.json").write_text(json.dumps({
        **values, "_counts": {m: {"acc/xx": 400} for m in values}, "_chance": {"acc/xx": 0.25}}))
    (folder / "a").mkdir()
    (folder / "a" / "train_log.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 5.0 / i, "tokens": 100 * (i + i % 2), "tok_s": 50.0})
        + "\n" for i in range(1, 7)))
    stages = [{"name": "a", "stage": "adapt-language", "plugin": "ct", "wall_time_s": 3.0,
               "tokens": 600, "trainable_params": 10, "forward_params": 10, "cache": "miss"},
              {"name": "score", "stage": "evaluate", "plugin": "task-accuracy", "wall_time_s": 1.0,
               "metrics": values}]
    (folder / "report.json").write_text(json.dumps({"recipe": "hand", "stages": stages}))
    return folder


def test_metrics_svg_has_error_bars_and_a_chance_line(tmp_path):
    folder = _choice_run(tmp_path / "run")
    md, charts, _ = make_report(folder)
    root = ET.parse(charts["metrics"]).getroot()
    bars = [e for e in root.iter(f"{SVG}path") if e.get("class") == "errorbar"]
    chance = [e for e in root.iter(f"{SVG}line") if e.get("class") == "chance"]
    assert len(bars) == 3 and len(chance) == 1 and chance[0].get("stroke-dasharray")
    outlined = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "bar" and e.get("stroke")]
    assert [e.find(f"{SVG}title").text for e in outlined] == ["b: 0.7"]  # named outside the noise
    text = md.read_text()
    assert "| b | **0.7** |" in text and "Chance level: acc/xx 0.25." in text
    loss = ET.parse(charts["loss"]).getroot()
    curves = [e for e in loss.iter(f"{SVG}polyline") if e.get("class") == "curve"]
    assert len(curves) == 3  # one stage against steps, tokens and seconds


def test_loss_axes_spread_window_counters_and_derive_seconds():
    assert spread([200.0, 200.0, 400.0, 400.0]) == [100.0, 200.0, 300.0, 400.0]
    assert spread([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    log = [{"step": 1, "loss": 2, "tokens": 200, "tok_s": 100.0}, {"step": 2, "loss": 1, "tokens": 200,
            "tok_s": 100.0}, {"step": 3, "loss": 1, "tokens": 500, "tok_s": 300.0}]
    axes = loss_axes(log)
    assert axes["tokens"] == [100.0, 200.0, 500.0] and axes["seconds"] == [1.0, 2.0, 3.0]
    assert loss_axes([{"step": 1, "loss": 2.0}])["seconds"] == [None]  # nothing to derive from


def test_log_axis_has_enough_ticks():
    assert log_ticks(2.5, 9.7) == [3, 4, 5, 6, 7, 8, 9]
    assert log_ticks(1.1, 45_930) == [10, 100, 1000, 10_000]
    assert log_ticks(1.1, 450) == [2, 5, 10, 20, 50, 100, 200]
    assert log_ticks(0.9, 2e6) == [1, 10, 100, 1e3, 1e4, 1e5, 1e6]


def test_legend_mentions_retention_only_when_shown():
    assert "retention" not in legend(["acc/en", "ppl/lum"])
    assert "retention 1.0" in legend(["retention_ppl/en"]) and "delta 0.0" in legend(["delta_acc/en"])


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(EngineError, match="no report.json"):
        load_run(tmp_path)


def test_report_reads_errors_and_counts(run_dir):
    run = load_run(run_dir[0])
    assert run.counts["ppl"]["ct"]["ppl/en"] > 0
    assert set(run.logs) == {"ct"} and run.logs["ct"][-1]["step"] == 3
    assert run.all_metrics["ct"].keys() == {"ppl/en", "retention_ppl/en"}


def test_report_metrics_table_groups_languages_and_directions():
    report = {"stages": [{"stage": "evaluate", "metrics": {
        "base": {"ppl/mn": 40.0, "acc/en": 0.5, "ppl/en": 10.0, "retention_ppl/en": 1.0},
        "merged": {"ppl/mn": 20.0, "acc/en": 0.6, "ppl/en": 12.0, "retention_ppl/en": 0.8}}}]}
    assert order_columns(report["stages"][0]["metrics"]["base"]) == \
        ["acc/en", "ppl/en", "retention_ppl/en", "ppl/mn"]
    rows = report["stages"][0]["metrics"]
    assert best_values(rows, ["ppl/mn", "retention_ppl/en", "acc/en"]) == \
        {"ppl/mn": 20.0, "retention_ppl/en": 1.0, "acc/en": 0.6}
    assert direction("ppl/en") == "↓" and direction("retention_ppl/en") == "↑"
    table = metrics_table(report)
    assert [c.header for c in table.columns] == \
        ["model", "acc/en ↑", "ppl/en ↓", "retention_ppl/en ↑", "ppl/mn ↓"]
    assert "*" not in "".join(table.columns[1]._cells)  # no counts: no interval, no best mark


def test_metrics_table_stars_only_outside_the_noise():
    def table(n):
        return metrics_table({"stages": [{"stage": "evaluate", "metrics": {
            "base": {"acc/en": 0.5}, "merged": {"acc/en": 0.6}},
            "counts": {"base": {"acc/en": n}, "merged": {"acc/en": n}}}]})

    assert table(50).columns[1]._cells == ["0.5", "0.6"]  # ±0.19 at 50 items
    assert table(5000).columns[1]._cells == ["0.5", "[bold green]0.6*[/]"]
    assert "retention" not in table(50).title


def test_an_align_stage_continues_its_elo_stage_on_every_loss_axis():
    from engine.run.report.charts import continued_axes

    elo = [{"step": 1, "loss": 3.0, "tokens": 100, "elapsed_s": 1.0},
           {"step": 2, "loss": 2.5, "tokens": 200, "elapsed_s": 2.0}]
    align = [{"step": 1, "loss": 2.4, "tokens": 50, "elapsed_s": 4.0}]
    axes = continued_axes({"elo": elo, "aligned": align, "ct": elo}, {"aligned": "elo"})
    assert axes["aligned"] == {"step": [3.0], "tokens": [250.0], "seconds": [6.0]}
    assert axes["elo"] == axes["ct"] == loss_axes(elo)  # stages not continuing are unchanged
