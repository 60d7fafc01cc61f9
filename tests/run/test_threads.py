"""runtime.threads: the rule for 'auto', and that the setting reaches torch and report.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.api import LayerSelection, PluginParams, hookimpl
from engine.core.errors import RecipeError
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.registry.manager import pm
from engine.run import threads
from engine.run.runner import Runner


class SeeThreads:
    """A selector that notes the thread counts torch has while the stage runs."""

    name = "see-threads"
    Params = PluginParams

    def run(self, context, inputs, params) -> LayerSelection:
        context.note("seen_intra_op", torch.get_num_threads())
        return LayerSelection(context.stage_name, [0], 4, "the first")


class _Plugin:
    @hookimpl
    def register_layer_selectors(self, register):
        register(SeeThreads())


@pytest.fixture
def see_threads():
    pm.register(_Plugin(), name="see-threads-plugin")
    try:
        yield
    finally:
        pm.unregister(name="see-threads-plugin")


def _recipe(tmp_path: Path, model: Path, runtime: str, stage_runtime: str = "") -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: threads
        runtime: {runtime}
        models:
          base: {{path: {model}}}
        stages:
          - name: one
            stage: select-layers
            plugin: see-threads
            model: base
          - name: two
            stage: select-layers
            plugin: see-threads
            model: base
            {stage_runtime}
        """))
    return f


def _run(recipe: Path, work: Path) -> dict:
    plan = plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
    return Runner(plan, work).run()


# --- the rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(("default", "cpus", "runs", "expected"), [
    (8, 4, 1, 4),     # confined to 4 of 8 cores: no more threads than cores
    (2, 16, 1, 2),    # never more than torch would use
    (4, 4, 2, 2),     # two engine runs share the cores
    (2, 2, 2, 1),     # two quickstarts on a 2-core machine: one thread each
    (16, 16, 40, 1),  # more runs than cores: still at least one
])
def test_auto_rule(default, cpus, runs, expected):
    n, reason = threads.auto_threads(default, cpus, runs)
    assert n == expected
    assert f"{cpus} cores available" in reason
    assert ("shared by" in reason) == (runs > 1)


def test_live_runs_counts_registered_processes_and_forgets_dead_ones(tmp_path):
    assert threads.live_runs(tmp_path) == 1  # nobody registered: the caller alone
    with threads.RunRegistration(tmp_path):
        assert threads.live_runs(tmp_path) == 1
        code = ("import sys, time; from pathlib import Path; from engine.run import threads\n"
                "with threads.RunRegistration(Path(sys.argv[1])):\n"
                "    print('in', flush=True); time.sleep(60)\n")
        other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "in"
            assert threads.live_runs(tmp_path) == 2
        finally:
            other.kill()  # SIGKILL: the kernel drops its lock, its file stays behind
            other.wait()
        assert len(list(tmp_path.iterdir())) == 2
        assert threads.live_runs(tmp_path) == 1  # the dead run's file is removed
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity API on this platform")
    code = "from engine.run.threads import available_cpus; print(available_cpus())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert done.stdout.strip() == "1"


@pytest.mark.parametrize("bad", [0, -1, "many", True, 1.5])
def test_bad_thread_settings_are_recipe_errors(tmp_path, tiny_model, see_threads, bad):
    with pytest.raises(RecipeError, match="threads"):
        load_recipe(_recipe(tmp_path, tiny_model, f"{{threads: {json.dumps(bad)}}}"))


# --- it reaches torch and the report -----------------------------------------------------------


def test_threads_reach_torch_and_the_report_per_stage(tmp_path, tiny_model, see_threads, monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)  # 2 threads are not capped on 1 core
    before = torch.get_num_threads()  # 1: the suite's autouse fixture
    report = _run(_recipe(tmp_path, tiny_model, "{threads: 2}", "runtime: {threads: 1}"),
                  tmp_path / "w")
    one, two = report["stages"]
    assert one["notes"]["seen_intra_op"] == one["threads"]["intra_op"] == 2
    assert one["threads"]["setting"] == 2 and one["threads"]["reason"] == "set in the recipe"
    assert two["notes"]["seen_intra_op"] == two["threads"]["intra_op"] == 1  # stage override
    assert report["threads"]["recipe"] == 2
    assert report["threads"]["cpus_available"] == threads.available_cpus()
    on_disk = json.loads((tmp_path / "w" / "report.json").read_text())
    assert on_disk["stages"][0]["threads"]["intra_op"] == 2
    assert torch.get_num_threads() == before  # an in-process caller keeps its setting


def test_auto_threads_are_what_the_rule_says(tmp_path, tiny_model, see_threads, monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    monkeypatch.setattr(threads, "live_runs", lambda: 2)  # another engine run on the machine
    monkeypatch.setattr(threads, "torch_default_threads", lambda: 8)
    report = _run(_recipe(tmp_path, tiny_model, "{threads: auto}"), tmp_path / "w")
    for record in report["stages"]:
        assert record["notes"]["seen_intra_op"] == record["threads"]["intra_op"] == 2
        assert "shared by 2 engine runs" in record["threads"]["reason"]


def test_auto_is_the_default(tmp_path, tiny_model, see_threads):
    report = _run(_recipe(tmp_path, tiny_model, "{}"), tmp_path / "w")
    assert report["stages"][0]["threads"]["setting"] == "auto"


def test_null_threads_leave_torch_alone(tmp_path, tiny_model, see_threads):
    torch.set_num_threads(1)
    report = _run(_recipe(tmp_path, tiny_model, "{threads: null}"), tmp_path / "w")
    assert report["stages"][0]["threads"]["setting"] is None
    assert report["stages"][0]["notes"]["seen_intra_op"] == 1


def test_thread_count_is_not_part_of_the_cache_key(tmp_path, tiny_model, see_threads):
    work = tmp_path / "w"
    _run(_recipe(tmp_path, tiny_model, "{threads: 1}"), work)
    again = _run(_recipe(tmp_path, tiny_model, "{threads: 2}"), work)
    assert [r["cache"] for r in again["stages"]] == ["hit", "hit"]


def test_a_fresh_process_sets_inter_op_threads_too(tmp_path, tiny_model):
    """engine run in its own process: both intra- and inter-op counts are what the recipe asks
    (torch's inter-op default on this machine is its core count, so 1 proves it was set)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: interop
        runtime: {{threads: 1}}
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: picked
            stage: select-layers
            plugin: first-last
            model: base
        """))
    work = tmp_path / "w"
    subprocess.run([sys.executable, "-m", "engine.cli", "run", str(recipe), "--workdir", str(work)],
                   check=True, capture_output=True)
    record = json.loads((work / "report.json").read_text())["stages"][0]
    assert record["threads"] == {"setting": 1, "intra_op": 1, "inter_op": 1,
                                 "reason": "set in the recipe"}
