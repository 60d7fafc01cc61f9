"""The runner: order, atomic outputs, the cache, report.json and lifecycle hooks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.core import outputs
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.registry.manager import pm
from engine.run.runner import Runner, StageFailed


@pytest.fixture
def recipe(tmp_path, tiny_model, text_file, test_plugin) -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: demo
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: picked
            stage: select-layers
            plugin: all-layers
            model: base
          - name: adapted
            stage: adapt-language
            plugin: copy-model
            model: base
            layers: picked
            data: {{path: {text_file}}}
          - name: scores
            stage: evaluate
            plugin: line-count
            models: [base, adapted]
            data: {{path: {text_file}}}
        """))
    return f


def run(recipe: Path, workdir: Path, overrides=()):
    plan = plan_recipe(load_recipe(recipe, list(overrides)), recipe.parent, str(recipe))
    return Runner(plan, workdir).run()


def test_run_writes_outputs_and_report(recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "work"
    report = run(recipe, work)
    assert [r["name"] for r in report["stages"]] == ["picked", "adapted", "scores"]
    assert json.loads((work / "report.json").read_text())["finished"] is True
    assert json.loads((work / "picked" / "layers.json").read_text())["indices"] == [0, 1, 2, 3]
    AutoModelForCausalLM.from_pretrained(work / "adapted")
    metrics = json.loads((work / "scores" / "metrics.json").read_text())
    assert metrics["adapted"]["lines"] == metrics["_counts"]["base"]["lines"] > 0
    rec = report["stages"][1]
    for key in ("wall_time_s", "tokens", "trainable_params", "forward_params", "peak_rss_mb",
                "cache", "metrics"):
        assert key in rec
    assert rec["tokens"] == 7 and rec["cache"] == "miss"
    assert report["stages"][2]["metrics"]["base"]["lines"] > 0
    # nothing hidden but the kept versions and the workdir's marker; each stage folder links
    # to its current one
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == [
        ".lingoforge-workdir.json", ".stages"]
    assert (work / "adapted").is_symlink() and (work / "adapted").resolve().parent == \
        (work / ".stages" / "adapted").resolve()


def test_second_run_hits_the_cache_until_something_changes(recipe, tmp_path):
    work = tmp_path / "work"
    run(recipe, work)
    again = run(recipe, work)
    assert [r["cache"] for r in again["stages"]] == ["hit", "hit", "hit"]
    assert again["stages"][1]["tokens"] == 7
    changed = run(recipe, work, ["stages.scores.data.weight=2"])
    assert [r["cache"] for r in changed["stages"]] == ["hit", "hit", "miss"]


def test_failed_stage_leaves_no_output_and_names_the_stage(recipe, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(StageFailed, match="stage 'adapted' \\(copy-model\\) failed: RuntimeError: asked to fail"):
        run(recipe, work, ["stages.adapted.params.fail=true"])
    assert (work / "picked").is_dir()
    assert not (work / "adapted").exists() and not (work / ".stages" / "adapted").exists()
    assert [p.name for p in work.iterdir() if p.name.startswith(".") and p.is_dir()] == [".stages"]
    report = json.loads((work / "report.json").read_text())
    assert report["finished"] is False and [r["name"] for r in report["stages"]] == ["picked"]


def test_failed_rerun_keeps_previous_good_output(recipe, tmp_path):
    work = tmp_path / "work"
    run(recipe, work)
    with pytest.raises(StageFailed):
        run(recipe, work, ["stages.adapted.params.fail=true"])
    assert (work / "adapted" / "config.json").is_file()


def test_lifecycle_hooks_observe_the_run(recipe, tmp_path, test_plugin):
    observer = test_plugin.Observer()
    pm.register(observer, name="observer")
    try:
        work = tmp_path / "work"
        run(recipe, work)
        run(recipe, work)
    finally:
        pm.unregister(name="observer")
    assert observer.events[:7] == ["started:picked", "finished:picked:miss", "started:adapted",
                                   "finished:adapted:miss", "started:scores", "finished:scores:miss",
                                   "run:3"]
    assert observer.events[7:] == ["run:3"]  # cached stages do not start


def test_params_marked_not_in_result_keep_the_cache(tmp_path, tiny_model, text_file):
    """Changing how often a trainer logs or checkpoints does not re-run it."""
    recipe = tmp_path / "ct.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: ct-cache
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
            params: {{steps: 2, batch_size: 2, seq_len: 16, log_every: 1}}
        """))
    work = tmp_path / "work"
    assert run(recipe, work)["stages"][0]["cache"] == "miss"
    assert run(recipe, work, ["stages.ct.params.log_every=2",
                              "stages.ct.params.checkpoint_every=1"])["stages"][0]["cache"] == "hit"
    assert run(recipe, work, ["stages.ct.params.lr=0.01"])["stages"][0]["cache"] == "miss"


def test_stale_temporary_folders_are_removed(recipe, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    stale = outputs.temp_dir(".adapted.tmp-", work)  # one a killed run left
    (stale / "config.json").write_text("{}")
    mine = work / ".adapted.tmp-abc123"  # named like one, but the user's
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    run(recipe, work)
    assert not stale.exists()
    assert (mine / "config.json").read_text() == "{}"


def test_model_code_is_imported_before_the_first_stage(recipe, tmp_path):
    report = run(recipe, tmp_path / "work")
    assert report["startup"]["architectures_imported"] == ["LlamaForCausalLM"]
    assert report["startup"]["import_s"] >= 0
    # a run served wholly from the cache has nothing to import
    again = run(recipe, tmp_path / "work")
    assert {r["cache"] for r in again["stages"]} == {"hit"}
    assert again["startup"] == {"architectures_imported": [], "import_s": 0.0}


def test_a_merge_only_run_imports_no_model_code(tmp_path, tiny_model_family):
    """Merges stream tensors (the stage kinds table: loads_models false): no modelling
    code is imported for them (3.5 s of CPU for Llama on 2 cores)."""
    recipe = tmp_path / "merge.yaml"
    fam = tiny_model_family
    recipe.write_text(textwrap.dedent(f"""
        name: merge-only
        models:
          base: {{path: {fam['base']}}}
          a: {{path: {fam['a']}}}
        stages:
          - {{name: merged, stage: merge, plugin: ties, base: base, models: [a]}}
        """))
    report = run(recipe, tmp_path / "work")
    assert report["stages"][0]["cache"] == "miss"
    assert report["startup"] == {"architectures_imported": [], "import_s": 0.0}


def test_import_architecture_leaves_custom_and_broken_folders_to_their_stage(tmp_path, tiny_model):
    from engine.models.modelio import import_architecture

    assert import_architecture(tiny_model) == "LlamaForCausalLM"
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for folder in (custom, unknown, broken, tmp_path / "missing"):
        assert import_architecture(folder) is None
