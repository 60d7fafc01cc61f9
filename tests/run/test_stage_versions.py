"""Kept stage versions: every finished version stays under .stages/<stage>/<fingerprint>/,
<workdir>/<stage> links to the current one, going back to an earlier --set is a cache hit
with no training, and --only/--from select what runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import ct_stage, line_count_stage, write_recipe

from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.run import stage_cache
from engine.run.runner import STAGE_FILE, Runner
from engine.run.status import MissingInputs, Selection


@pytest.fixture
def ct_recipe(tmp_path, tiny_model, text_file, test_plugin) -> Path:
    return write_recipe(tmp_path / "ct.yaml", "versions", {"base": tiny_model},
                        [ct_stage(text_file), line_count_stage(text_file, ["base", "ct"])])


def run(recipe: Path, workdir: Path, overrides=(), only=(), from_stages=(), use_cache=True):
    plan = plan_recipe(load_recipe(recipe, list(overrides)), recipe.parent, str(recipe))
    selection = Selection.from_args(plan, only, from_stages)
    return Runner(plan, workdir, use_cache=use_cache, selection=selection).run()


def weights(folder: Path) -> dict:
    from helpers import state

    return state(folder)


def test_going_back_to_an_earlier_set_is_a_cache_hit(ct_recipe, tmp_path):
    import torch

    work = tmp_path / "w"
    first = run(ct_recipe, work)
    w2 = weights(work / "ct")
    second = run(ct_recipe, work, ["stages.ct.params.steps=3"])
    assert [r["cache"] for r in second["stages"]] == ["miss", "miss"]
    assert any(not torch.equal(w2[k], v) for k, v in weights(work / "ct").items())
    back = run(ct_recipe, work)  # the first --set again: both versions are kept
    assert [r["cache"] for r in back["stages"]] == ["hit", "hit"]
    assert {k: torch.equal(w2[k], v) for k, v in weights(work / "ct").items()} == \
        dict.fromkeys(w2, True)
    kept = sorted(p.name for p in (work / ".stages" / "ct").iterdir())
    assert len(kept) == 2 and (work / "ct").is_symlink()
    assert os.readlink(work / "ct") == os.path.join(".stages", "ct", first["stages"][0]["fingerprint"])
    # a hit keeps the cost of the run that made it; the report sums what was reused
    assert back["stages"][0]["wall_time_s"] == first["stages"][0]["wall_time_s"] > 0
    assert back["stages"][0]["tokens"] == first["stages"][0]["tokens"] > 0
    assert back["reused_wall_time_s"] == pytest.approx(
        sum(r["wall_time_s"] for r in first["stages"]), abs=2e-3)
    assert first["reused_wall_time_s"] == 0
    saved = json.loads((work / "report.json").read_text())
    assert saved["reused_wall_time_s"] == back["reused_wall_time_s"]


def test_marker_records_what_the_fingerprint_hashes(ct_recipe, tmp_path):
    work = tmp_path / "w"
    report = run(ct_recipe, work)
    marker = json.loads((work / "scores" / STAGE_FILE).read_text())
    assert stage_cache.fingerprint_hash(marker["components"]) == marker["fingerprint"]
    assert marker["inputs"] == {"models": ["base", "ct"]}
    assert marker["components"]["inputs"]["models"][1] == report["stages"][0]["fingerprint"]
    ct = json.loads((work / "ct" / STAGE_FILE).read_text())
    assert ct["components"]["params"]["steps"] == 2 and ct["created"].endswith("Z")


def test_an_older_layout_folder_is_adopted_as_a_version(ct_recipe, tmp_path):
    work = tmp_path / "w"
    first = run(ct_recipe, work)
    for name in ("ct", "scores"):  # the layout before versions: real folders, no .stages
        real = (work / name).resolve()
        (work / name).unlink()
        shutil.move(real, work / name)
    shutil.rmtree(work / ".stages")
    again = run(ct_recipe, work)
    assert [r["cache"] for r in again["stages"]] == ["hit", "hit"]
    fp = first["stages"][0]["fingerprint"]
    assert (work / "ct").is_symlink() and (work / ".stages" / "ct" / fp / "config.json").is_file()


def test_a_kept_version_not_current_is_relinked_without_work(ct_recipe, tmp_path):
    """As after a kill between keeping a version and switching the link to it."""
    work = tmp_path / "w"
    first = run(ct_recipe, work)
    second = run(ct_recipe, work, ["stages.ct.params.steps=3"])
    stage_cache.make_current(work, "ct", first["stages"][0]["fingerprint"])  # the older link
    again = run(ct_recipe, work, ["stages.ct.params.steps=3"])
    assert again["stages"][0]["cache"] == "hit"
    assert os.readlink(work / "ct").endswith(second["stages"][0]["fingerprint"])


def test_from_reruns_the_stage_and_everything_downstream(ct_recipe, tmp_path):
    work = tmp_path / "w"
    run(ct_recipe, work)
    forced = run(ct_recipe, work, from_stages=["ct"])
    assert [r["cache"] for r in forced["stages"]] == ["miss", "miss"]
    only_scores = run(ct_recipe, work, from_stages=["scores"])
    assert [r["cache"] for r in only_scores["stages"]] == ["hit", "miss"]
    assert len(list((work / ".stages" / "ct").iterdir())) == 1  # same fingerprint, replaced


def test_only_runs_the_stage_with_its_inputs_from_the_cache(ct_recipe, tmp_path):
    work = tmp_path / "w"
    with pytest.raises(MissingInputs, match="--only scores: input 'ct' has no cached version"):
        run(ct_recipe, work, only=["scores"])
    assert not (work / "scores").exists() and not (work / ".stages").exists()
    run(ct_recipe, work, only=["ct"])
    assert not (work / "scores").exists()
    changed = run(ct_recipe, work, ["stages.scores.data.weight=2"], only=["scores"])
    assert [(r["name"], r["cache"]) for r in changed["stages"]] == [("ct", "hit"), ("scores", "miss")]
    with pytest.raises(MissingInputs, match=r"input 'ct'.*stale: params.steps 2 -> 5"):
        run(ct_recipe, work, ["stages.ct.params.steps=5"], only=["scores"])


def test_unknown_stage_names_are_refused(ct_recipe, tmp_path):
    from engine.core.errors import RecipeError

    with pytest.raises(RecipeError, match="--from 'nope': no stage of that name.*stages: ct, scores"):
        run(ct_recipe, tmp_path / "w", from_stages=["nope"])
