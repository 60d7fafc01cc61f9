"""Every recipe the project ships validates, and the paper scripts' seeding reaches every
seeded stage; one reproduction runs end to end, shortened, over two seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.commands import main
from engine.recipe.spec import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
sys.path.insert(0, str(ROOT / "benchmarks" / "papers"))

from _papers import parse_seeds, seed_sets  # noqa: E402


def test_recipes_are_found():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert {"quickstart.yaml", "maintenance.yaml", "papers/low-resource-merging.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_shipped_recipe_validates(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_seed_sets_reach_every_training_stage(recipe):
    sets = seed_sets(recipe, 7)
    overrides = {s.split("=")[0]: s.split("=")[1] for s in sets}
    loaded = load_recipe(recipe, overrides=[f"{k}={v}" for k, v in overrides.items()])
    for st in loaded.stages:
        params = st.params if isinstance(st.params, dict) else {}
        if st.stage in ("adapt-language", "align"):
            assert params.get("seed") == 7, f"{recipe.name}: stage {st.name} is not seeded"


def test_parse_seeds():
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("3,5") == [3, 5] and parse_seeds("4") == [4]


#: the scripts' evaluations cut to a few items, each answer to a few tokens: these tests check
#: the scripts' plumbing over seeds, not their numbers (most of their time was generation)
SHORT_EVAL = ["stages.perplexity.params.max_documents=4", "stages.task.params.max_items=4",
              "stages.task.params.max_new_tokens=3"]


def run_seed_script(script: str, short: list[str], tmp_path: Path, *args: str) -> tuple[str, dict]:
    """Run ``benchmarks/<script>`` over seeds 0 and 1 with ``short`` overrides (and any
    further ``args``); (stdout, its JSON)."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "papers" / script), "--seeds", "0,1",
           "--workdir", str(tmp_path / "w"), "--out", str(out), *args]
    for s in short:
        cmd += ["--set", s]
    # every engine run inside the script's process: the imports paid once, not per run
    env = dict(os.environ, LINGOFORGE_PAPERS_IN_PROCESS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_low_resource_reproduction_runs_over_two_seeds(tmp_path):
    recipe = ROOT / "recipes" / "papers" / "low-resource-merging.yaml"
    stages = [s.name for s in load_recipe(recipe).stages]
    short = [f"stages.{n}.params.steps=2" for n in stages if n.startswith(("ct", "sft"))]
    short += SHORT_EVAL
    stdout, result = run_seed_script("repro_low_resource_merging.py", short, tmp_path)
    assert "CT-then-SFT" in stdout and "slack 1 − TIES" in stdout
    assert result["seeds"] == [0, 1] and result["overrides"] == short
    assert result["budgets_steps"] == [5, 20, 80, 320]
    # the two seeds trained different models: their CT perplexities differ
    ppl = result["metrics"]["ct-5"]["perplexity:ppl/lum"]
    assert len(ppl) == 2 and ppl[0] != ppl[1]
    for b in ("5", "320"):
        for key in ("acc/lum", "exact_match/lum"):
            assert len(result["questions"][b][key]["best_merge_minus_ct_sft"]) == 2


@pytest.mark.slow
def test_quickstart_seeds_script_reports_the_merge_gap(tmp_path):
    short = ["stages.elo-lum.params.steps=2", "stages.elo-lum-aligned.params.steps=1",
             "stages.ct-lum.params.steps=3", "stages.sft-en.params.steps=2", *SHORT_EVAL]
    stdout, result = run_seed_script("quickstart_seeds.py", short, tmp_path)
    m = result["metrics"]
    for key in ("acc/lum", "exact_match/lum"):
        want = [max(m[x][f"task:{key}"][i] for x in ("merge-ta", "merge-ties", "merge-slack-ties"))
                - max(m[x][f"task:{key}"][i] for x in ("ct-lum", "sft-en")) for i in range(2)]
        assert result["merge_minus_better_parent"][key] == pytest.approx(want)
    assert "best merge minus better parent, acc/lum" in stdout


@pytest.mark.slow
def test_language_merging_reproduction_updates_only_lum(tmp_path):
    recipe = ROOT / "recipes" / "papers" / "language-merging.yaml"
    short = [f"stages.{s.name}.params.steps=2" for s in load_recipe(recipe).stages if s.name.startswith("sft")]
    short += SHORT_EVAL
    # the script itself fails when the update re-trains anything but lum's model
    stdout, result = run_seed_script("repro_language_merging.py", short, tmp_path, "--variants", "full")
    assert result["seeds"] == [0, 1] and result["overrides"] == short
    runs = result["variants"]["full"]["runs"]
    assert [r["update"]["per_language"]["ran"] for r in runs] == [["sft-lum"], ["sft-lum"]]
    for r in runs:
        pl, joint = r["update"]["per_language"], r["update"]["joint"]
        assert r["ratios"]["update_tokens"] == pytest.approx(pl["tokens"] / joint["tokens"])
        assert pl["tokens"] > 0 and joint["tokens"] > 0
