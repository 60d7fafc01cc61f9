"""The maintenance recipe: per-language LoRA adapters merged into one model, and the
update workflow it exists for: new data for one language retrains that language only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.cli.commands import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "maintenance.yaml"
LANGS = ("lum", "dor", "vel")

pytest.importorskip("peft")


def test_maintenance_recipe_validates(capsys):
    assert main(["validate", str(RECIPE)]) == 0
    assert "6 stages" in capsys.readouterr().err


@pytest.mark.slow
def test_new_data_for_one_language_retrains_only_that_language(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from engine import world

    monkeypatch.setenv("COLUMNS", "200")
    lum = tmp_path / "lum.txt"
    shutil.copy(world.data_path("lum/train.txt"), lum)
    work = tmp_path / "run"
    args = ["run", str(RECIPE), "--workdir", str(work),
            "--set", f"stages.lora-lum.data.0={{path: {lum}, language: lum, weight: 9}}",
            "--set", "stages.perplexity.params.max_documents=8"]
    for lang in LANGS:
        args += ["--set", f"stages.lora-{lang}.params.steps=3"]

    def cache() -> dict[str, str]:
        report = json.loads((work / "report.json").read_text())
        return {r["name"]: r["cache"] for r in report["stages"]}

    assert main(args) == 0
    assert set(cache().values()) == {"miss"}
    for lang in LANGS:  # adapters, not full models
        assert (work / f"lora-{lang}" / "adapter_config.json").is_file()
        assert not (work / f"lora-{lang}" / "config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(work / "merged")
    assert merged.config.num_hidden_layers == 8
    before = json.loads((work / "perplexity" / "metrics.json").read_text())

    # lum gets new text: put first, so that even the 3 steps read it (a streaming shuffle
    # buffer would not reach lines appended at the end of the file)
    new = world.data_path("lum/test.txt").read_text().splitlines()[:20]
    lum.write_text("\n".join(new) + "\n" + lum.read_text())
    assert main(args) == 0
    assert cache() == {"lora-lum": "miss", "lora-dor": "hit", "lora-vel": "hit",
                       "merged": "miss", "merged-ties": "miss", "perplexity": "miss"}
    after = json.loads((work / "perplexity" / "metrics.json").read_text())
    assert after["lora-dor"] == before["lora-dor"] and after["lora-vel"] == before["lora-vel"]
    assert after["lora-lum"] != before["lora-lum"]
