"""The shipped vocabulary recipes run (shortened), and the vocabulary stage's params are
checked before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from engine.cli.commands import main

ROOT = Path(__file__).resolve().parents[3]


def _short(recipe: Path, steps: int = 2) -> list[str]:
    sets = []
    for stage in yaml.safe_load(recipe.read_text())["stages"]:
        params = stage.get("params") or {}
        if "steps" in params:
            sets += ["--set", f"stages.{stage['name']}.params.steps={steps}"]
        if stage["stage"] == "evaluate":
            key = "max_items" if stage["plugin"] == "task-accuracy" else "max_documents"
            sets += ["--set", f"stages.{stage['name']}.params.{key}=8"]
    return sets


@pytest.mark.slow
def test_the_transplant_recipe_runs(tmp_path, capsys):
    recipe = ROOT / "recipes" / "vocab-transplant.yaml"
    work = tmp_path / "run"
    assert main(["run", str(recipe), "--workdir", str(work), *_short(recipe)]) == 0, capsys.readouterr().err
    report = json.loads((work / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    meta = json.loads((work / "transplanted" / "lingoforge.json").read_text())
    assert meta["kind"] == "transplanted-tokenizer" and meta["added_tokens"] > 0
    assert stages["transplanted"]["notes"]["vocabulary"]["new_size"] == meta["vocab_size"]
    before = load_file(work / "transplanted" / "model.safetensors")
    after = load_file(work / "embeddings" / "model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    bpb = json.loads((work / "perplexity" / "metrics.json").read_text())
    assert all(bpb[m]["bpb/lum"] > 0 for m in ("base", "ct-lum", "transplanted", "embeddings"))


@pytest.mark.slow
def test_the_extend_recipe_runs(tmp_path, capsys):
    recipe = ROOT / "recipes" / "vocab-transfer.yaml"
    work = tmp_path / "run"
    assert main(["run", str(recipe), "--workdir", str(work), *_short(recipe)]) == 0, capsys.readouterr().err
    report = json.loads((work / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    made = json.loads((work / "vocab-lum" / "lingoforge.json").read_text())
    rows = sum(b - a for a, b in made["new_rows"])
    assert rows == made["added_tokens"] > 0
    assert stages["rows-lum"]["notes"]["train_only"]["rows"] == rows
    assert (work / "merge-ta" / "config.json").is_file()
    assert json.loads((work / "merge-ta" / "config.json").read_text())["vocab_size"] == made["vocab_size"]


def test_the_vocabulary_stage_params_are_checked(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "models": {"base": {"builtin": "tiny-base"}}, "stages": [
        {"name": "v", "stage": "adapt-language", "plugin": "vocabulary", "model": "base",
         "data": {"builtin": "lum/train.txt"}, "params": {"tokenizer": "learn", "seed": 0}}]}))
    assert main(["validate", str(recipe)]) == 2
    assert "tokenizer: learn needs vocab_size" in capsys.readouterr().err
