"""The quickstart recipe end to end, shortened with --set so it takes seconds per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli.commands import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"

SHORT = [
    "stages.elo-lum.params.steps=4", "stages.elo-lum-aligned.params.steps=2",
    "stages.ct-lum.params.steps=4", "stages.sft-en.params.steps=4",
    "stages.perplexity.params.max_documents=16", "stages.task.params.max_items=16",
]


def test_quickstart_validates(capsys):
    assert main(["validate", str(RECIPE)]) == 0
    assert "10 stages" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("COLUMNS", "200")
    work = tmp_path / "run"
    args = ["run", str(RECIPE), "--workdir", str(work)]
    for s in SHORT:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "metrics" in out and "merge-slack-ties" in out
    report = json.loads((work / "report.json").read_text())
    assert report["finished"]
    by_name = {r["name"]: r for r in report["stages"]}
    assert len(by_name) == 10
    for name, rec in by_name.items():
        assert rec["wall_time_s"] >= 0
        if rec["stage"] in ("adapt-language", "merge", "align"):
            model = AutoModelForCausalLM.from_pretrained(work / name)
            assert model.config.num_hidden_layers == (2 if name == "elo-lum" else 8)
    for trainer in ("elo-lum", "ct-lum", "sft-en", "elo-lum-aligned"):
        assert by_name[trainer]["tokens"] > 0
        assert 0 < by_name[trainer]["trainable_params"] <= by_name[trainer]["forward_params"]
    # ELO trains two of eight layers, through a two-layer sub-model
    assert by_name["elo-lum"]["trainable_params"] < by_name["ct-lum"]["trainable_params"] / 3
    assert by_name["elo-lum"]["forward_params"] < by_name["ct-lum"]["forward_params"]
    ppl = json.loads((work / "perplexity" / "metrics.json").read_text())
    task = json.loads((work / "task" / "metrics.json").read_text())
    for model in ("base", "merge-ties", "merge-slack-ties"):
        assert ppl[model]["ppl/lum"] > 1 and ppl[model]["ppl/en"] > 1
        assert 0 <= task[model]["acc/lum"] <= 1
    # a second run is served from the cache
    assert main(args) == 0
    again = json.loads((work / "report.json").read_text())
    assert {r["cache"] for r in again["stages"]} == {"hit"}
