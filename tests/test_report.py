"""End-of-run tables and ``engine report``: report.md and charts from a real run folder.

The run folder is made by running a real recipe (a 3-step CT training, perplexity
and retention) on the tiny model, so the report is read back from the files the
runner and trainers really write.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

import pytest
from rich.console import Console

from engine.cli import main
from engine.cli_report import add_parser, cmd_report
from engine.errors import EngineError
from engine.report import best_values, direction, metrics_table, order_columns
from engine.report_files import load_run, make_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """A finished run: base -> ct (3 steps), then perplexity and retention on both."""
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
            data: {{path: {text}}}
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
    assert main(["run", str(recipe), "--workdir", str(root / "work")]) == 0
    return root / "work"


def test_report_markdown_and_charts(run_dir):
    pytest.importorskip("matplotlib", reason="charts need the [report] extra")
    md, charts, note = make_report(run_dir)
    assert note is None and md == run_dir / "report.md"
    text = md.read_text()
    report = json.loads((run_dir / "report.json").read_text())
    ppl = json.loads((run_dir / "ppl" / "metrics.json").read_text())
    best = min(ppl["base"]["ppl/en"], ppl["ct"]["ppl/en"])
    assert f"**{best:.4g}**" in text  # lower perplexity marked best
    assert "| model | retention_ppl/en ↑ |" in text and "| base | 1 |" in text
    for stage in report["stages"]:
        assert f"| {stage['name']} |" in text
    losses = [json.loads(x)["loss"] for x in (run_dir / "ct" / "train_log.jsonl").read_text().splitlines()]
    assert f"| ct | 3 | {losses[0]:.4g} | {losses[-1]:.4g} |" in text
    assert set(charts) == {"metrics", "cost", "loss"}
    for name, path in charts.items():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
        assert f"](report/{name}.png)" in text


def test_report_without_matplotlib_still_writes_markdown(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    (run_dir / "report.md").unlink(missing_ok=True)
    assert cmd_report(parser.parse_args(["report", str(run_dir)]), Console(stderr=True)) == 0
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "lingoforge[report]" in err
    text = (run_dir / "report.md").read_text()
    assert "matplotlib is not installed" in text and "![" not in text


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(EngineError, match="no report.json"):
        load_run(tmp_path)


def test_report_reads_errors_and_counts(run_dir, tmp_path):
    run = load_run(run_dir)
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
