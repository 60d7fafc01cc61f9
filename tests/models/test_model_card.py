"""Every model folder a stage writes carries a README.md model card."""

from __future__ import annotations

import json

from helpers import ties_recipe

from engine.cli.commands import main
from engine.models.card import write_card


def test_a_merged_model_gets_a_card_naming_its_recipe_inputs_params_and_cost(tmp_path, tiny_model_family):
    fam = tiny_model_family
    recipe = ties_recipe(tmp_path / "merge.yaml", fam, "cards", density=0.3)
    work = tmp_path / "work"
    assert main(["run", str(recipe), "--workdir", str(work)]) == 0
    card = (work / "merged" / "README.md").read_text()
    marker = json.loads((work / "merged" / ".lingoforge-stage.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- lingoforge" in card and "- ties" in card
    assert "stage `merged` (merge, plugin `ties`) of recipe `cards`" in card
    assert f"| base | base | {fam['base']} |" in card and f"| models | a | {fam['a']} |" in card
    assert "| density | 0.3 |" in card
    assert marker["fingerprint"] in card
    # a second run is a cache hit: the card is the one written with the output
    assert main(["run", str(recipe), "--workdir", str(work)]) == 0
    assert (work / "merged" / "README.md").read_text() == card


def test_engine_merge_writes_a_card_too(tmp_path, tiny_model_family):
    fam = tiny_model_family
    out = tmp_path / "out"
    assert main(["merge", "--method", "task-arithmetic", "--base", str(fam["base"]),
                 "--model", str(fam["a"]), "--out", str(out)]) == 0
    assert "plugin `task-arithmetic`" in (out / "README.md").read_text()


def test_a_readme_the_plugin_wrote_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    assert write_card(tmp_path, recipe="r", stage=None, record={}, inputs={}, version="0") is None
    assert (tmp_path / "README.md").read_text() == "mine"
