"""Merge search (engine.merging.search): the space read from declared params, validate's
refusals, and real studies (Optuna, a SQLite file, in-memory candidates) run by the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import state
from pydantic import Field

from engine.api.merging import MergeMethod, TiesParams
from engine.core.errors import RecipeError
from engine.merging.search.space import build_space, param_range
from engine.recipe.spec import parse_recipe
from engine.recipe.validate import plan_recipe
from engine.testing.recipes import run_recipe

WORDS = ["cat", "dog", "mat", "park", "sky", "blue", "small", "model", "text", "words"]


def _items(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 3 + 1) % len(WORDS)]
        out.append({"prompt": f"question {i} what is the {a} of the {b} answer",
                    "choices": [f" {WORDS[(i + k) % len(WORDS)]}" for k in range(3)], "label": i % 3})
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def task_files(tmp_path):
    rows = _items(24)
    return {"dev": _jsonl(tmp_path / "dev.jsonl", rows[:16]),
            "test": _jsonl(tmp_path / "test.jsonl", rows[16:]),
            "all": _jsonl(tmp_path / "all.jsonl", rows)}


def _recipe(family, files, *, search: dict | None = None, plugin: str = "task-arithmetic",
            evaluate_test: bool = True, models=("a", "b")) -> dict:
    block = {
        "space": {"weight": {m: [0.0, 1.0] for m in models}},
        "evaluate": [{"plugin": "task-accuracy",
                      "data": {"path": str(files["dev"]), "language": "dev"}}],
        "objectives": [{"metric": "acc/dev", "direction": "maximize"}],
        "trials": 6, "startup_trials": 3,
    }
    block.update(search or {})
    stages = [{"name": "searched", "stage": "merge", "plugin": plugin, "base": "base",
               "models": list(models), "search": block}]
    if evaluate_test:
        stages.append({"name": "scores", "stage": "evaluate", "plugin": "task-accuracy",
                       "models": ["base", "searched"], "data": {"path": str(files["test"]), "language": "test"}})
    return {"name": "search-test", "models": {k: {"path": str(v)} for k, v in family.items()},
            "stages": stages}


def _plan(recipe: dict, folder: Path):
    return plan_recipe(parse_recipe(recipe, "<recipe>"), folder, "<recipe>")


def _search_notes(report: dict, name: str = "searched") -> dict:
    return next(s for s in report["stages"] if s["name"] == name)["notes"]["search"]


# --- the space ---------------------------------------------------------------------------


def test_space_comes_from_the_declared_params():
    from engine.registry.manager import implementations

    ties = implementations()["merge"]["ties"].impl
    space = build_space({"ties": ties.Params}, "ties", ["a", "b"], None, 1, {}, {})
    names = {d.name: d for d in space.dimensions()}
    assert set(names) == {"weight[a]", "weight[b]", "lambda", "normalize", "density[a]", "density[b]"}
    assert (names["density[a]"].low, names["density[a]"].high) == (pytest.approx(0.01), 1.0)  # (0, 1]
    assert (names["weight[a]"].low, names["weight[a]"].high) == (0.0, 2.0)  # declared search range
    assert names["normalize"].choices == (False, True)
    # what the stage fixes is not searched
    fixed = build_space({"ties": ties.Params}, "ties", ["a", "b"], None, 1, {}, {"density": 0.5})
    assert not any(d.name.startswith("density") for d in fixed.dimensions())


def test_space_narrows_and_refuses_what_the_validator_does_not_accept():
    from engine.registry.manager import implementations

    Params = implementations()["merge"]["slack-ties"].impl.Params
    ok = build_space({"slack-ties": Params}, "slack-ties", ["a", "b"], {"slack": [0.2, 0.6]}, 1, {}, {})
    assert [(d.name, d.low, d.high) for d in ok.dimensions()] == [("slack", 0.2, 0.6)]
    with pytest.raises(RecipeError, match=r"space.slack: \[0.5, 1.5\] reaches outside .*\[0, 1\]"):
        build_space({"slack-ties": Params}, "slack-ties", ["a", "b"], {"slack": [0.5, 1.5]}, 1, {}, {})
    with pytest.raises(RecipeError, match="'protect' has no usable range"):
        build_space({"slack-ties": Params}, "slack-ties", ["a", "b"], {"protect": "auto"}, 1, {}, {})
    with pytest.raises(RecipeError, match=r"\['gamma'\] is not a param of 'slack-ties'"):
        build_space({"slack-ties": Params}, "slack-ties", ["a", "b"], {"gamma": [0, 1]}, 1, {}, {})
    with pytest.raises(RecipeError, match="names model.*'z'"):
        build_space({"slack-ties": Params}, "slack-ties", ["a", "b"], {"density": {"z": [0.1, 0.5]}}, 1, {}, {})


class _Unbounded(MergeMethod):
    name = "unbounded-test"

    class Params(TiesParams):
        gamma: float = Field(1.0, description="A number any value of which is valid.")

    def merge(self, stacked, p, tensor):
        return stacked.sum(0) * p.gamma * p.lambda_ * sum(p.weight) * sum(p.density) * (1 + p.normalize)


def test_a_param_without_a_usable_range_is_named():
    with pytest.raises(RecipeError, match="'gamma' has no usable range .* give one, e.g. 'gamma: \\[0.1, 1.0\\]'"):
        build_space({"u": _Unbounded.Params}, "u", ["a"], {"gamma": "auto"}, 1, {}, {})
    space = build_space({"u": _Unbounded.Params}, "u", ["a"], {"gamma": [0.5, 4]}, 1, {}, {})
    assert space.dimensions()[0].high == 4
    # by default an unbounded param is left out, not guessed
    default = build_space({"u": _Unbounded.Params}, "u", ["a"], None, 1, {}, {})
    assert "gamma" not in {d.name for d in default.dimensions()}
    lo, hi, *_ = param_range(_Unbounded.Params.model_fields["gamma"], "gamma")
    assert lo is None and hi is None


def test_layer_groups_and_filters_give_gradients_and_overrides_the_method_accepts():
    from engine.registry.manager import implementations

    ties = implementations()["merge"]["ties"].impl
    space = build_space({"ties": ties.Params}, "ties", ["a", "b"], {"density": [0.2, 0.9], "lambda": "auto"},
                        3, {"attn": "self_attn", "mlp": "mlp"}, {})
    dims = space.dimensions()
    assert len(dims) == 3 * 3 * 2 + 3  # density: 2 models x 3 anchors, lambda: 1, each for plain + 2 filters
    drawn = {d.name: (d.low + d.high) / 2 for d in dims}
    values = space.spaces["ties"].values(drawn)
    assert values["density"]["a"] == [pytest.approx(0.55)] * 3
    assert [o["match"] for o in values["overrides"]] == ["self_attn", "mlp"]
    params = ties.Params.model_validate(values)  # what a trial hands the method
    assert params.overrides[0].values["density"]["b"] == [pytest.approx(0.55)] * 3


# --- validate ------------------------------------------------------------------------------


def test_validate_names_a_metric_no_evaluator_produces(tiny_model_family, task_files, tmp_path):
    recipe = _recipe(tiny_model_family, task_files,
                     search={"objectives": [{"metric": "acc/lum", "direction": "maximize"}]})
    with pytest.raises(RecipeError, match=r"objective 'acc/lum': no evaluator .* available: acc/dev, acc_norm/dev"):
        _plan(recipe, tmp_path)


def test_validate_refuses_dev_data_that_overlaps_the_test_data(tiny_model_family, task_files, tmp_path):
    same_file = _recipe(tiny_model_family, {**task_files, "test": task_files["dev"]})
    with pytest.raises(RecipeError, match="dev data overlaps the test data of evaluate stage 'scores'.*both read"):
        _plan(same_file, tmp_path)
    shared_items = _recipe(tiny_model_family, {**task_files, "test": task_files["all"]})
    with pytest.raises(RecipeError, match="share records"):
        _plan(shared_items, tmp_path)
    # one file, disjoint record ranges: fine; overlapping ones: refused
    ranged = _recipe(tiny_model_family, task_files)
    ranged["stages"][0]["search"]["evaluate"][0]["data"] = {"path": str(task_files["all"]), "records": "0:16",
                                                             "language": "dev"}
    ranged["stages"][1]["data"] = {"path": str(task_files["all"]), "records": "16:", "language": "test"}
    _plan(ranged, tmp_path)
    ranged["stages"][1]["data"]["records"] = "12:"
    with pytest.raises(RecipeError, match="records 12:16 in common"):
        _plan(ranged, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"trials": 0}, "trials: Input should be greater than or equal to 1"),
    ({"trials": None}, "give a budget"),
    ({"methods": ["tie"]}, "methods: .*'tie'.*ties"),
    ({"sampler": "cmaes", "objectives": [{"metric": "acc/dev"}, {"metric": "acc_norm/dev"}]},
     "cmaes optimises one objective"),
    ({"constraints": ["acc_norm/dev >> 1"]}, "is not 'METRIC >= NUMBER'"),
])
def test_validate_refuses_bad_search_blocks(tiny_model_family, task_files, tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        _plan(_recipe(tiny_model_family, task_files, search=change), tmp_path)


def test_search_belongs_to_merge_stages(tiny_model_family, task_files, tmp_path):
    recipe = _recipe(tiny_model_family, task_files)
    recipe["stages"][1]["search"] = recipe["stages"][0]["search"]
    with pytest.raises(RecipeError, match="'search' belongs to merge stages; this is a evaluate stage"):
        _plan(recipe, tmp_path)


# --- running -------------------------------------------------------------------------------


def test_a_search_writes_the_chosen_candidate_and_records_every_trial(tiny_model_family, task_files, tmp_path):
    from engine.merging.search.candidate import InMemoryMerge
    from engine.testing.builders import make_stage_context

    recipe = _recipe(tiny_model_family, task_files)
    report = run_recipe(recipe, tmp_path / "w")
    notes = _search_notes(report)
    assert len(notes["trials"]) == 6 and notes["counts"]["complete"] + notes["counts"]["pruned"] == 6
    assert (tmp_path / "w" / ".search" / "searched.db").is_file()
    chosen = notes["chosen"]
    done = [t for t in notes["trials"] if t["state"] == "complete"]
    assert chosen["values"][0] == max(t["values"][0] for t in done)
    assert chosen["number"] in notes["pareto"]
    # the written model is the chosen candidate, tensor for tensor
    from helpers import merge_impl

    from engine.core.artifacts import ModelArtifact
    from engine.core.inputs import StageInputs

    impl = merge_impl("task-arithmetic")
    ctx = make_stage_context(tmp_path / "ctx", "searched", "merge", "task-arithmetic")
    inputs = StageInputs(base=ModelArtifact("base", tiny_model_family["base"]),
                         models=[ModelArtifact(n, tiny_model_family[n]) for n in ("a", "b")])
    merger = InMemoryMerge(ctx, inputs)
    merger.apply(impl, impl.Params.model_validate(chosen["params"]))
    written = state(tmp_path / "w" / "searched")
    for name, p in merger.model.named_parameters():
        if name in written:
            torch.testing.assert_close(p.detach(), written[name].to(p.dtype), rtol=0, atol=1e-6)
    # the written model scores on the dev data what the chosen trial scored
    dev = {"name": "check", "models": {"searched": {"path": str(tmp_path / "w" / "searched")}},
           "stages": [{"name": "dev-scores", "stage": "evaluate", "plugin": "task-accuracy",
                       "models": ["searched"], "data": {"path": str(task_files["dev"]), "language": "dev"}}]}
    again = run_recipe(dev, tmp_path / "check")
    scored = next(s for s in again["stages"] if s["name"] == "dev-scores")["metrics"]["searched"]
    assert scored["acc/dev"] == pytest.approx(chosen["metrics"]["acc/dev"])
    # report.md has the search's section and chart
    from engine.run.report.files import make_report

    make_report(tmp_path / "w")
    md = (tmp_path / "w" / "report.md").read_text()
    assert "## Searches" in md and f"chosen: trial {chosen['number']}" in md
    svg = (tmp_path / "w" / "report" / "search-searched.svg").read_text()
    assert svg.count('class="trial"') == 6 and svg.count('class="chosen"') == 1
    # the model card names the search
    card = (tmp_path / "w" / "searched" / "README.md").read_text()
    assert "search" in card.lower() and f"trial {chosen['number']}" in card


def test_a_larger_budget_continues_the_same_study(tiny_model_family, task_files, tmp_path):
    run_recipe(_recipe(tiny_model_family, task_files), tmp_path / "w")
    report = run_recipe(_recipe(tiny_model_family, task_files, search={"trials": 9}), tmp_path / "w")
    notes = _search_notes(report)
    assert notes["reused"] == 6 and len(notes["trials"]) == 9
    again = run_recipe(_recipe(tiny_model_family, task_files, search={"trials": 9}), tmp_path / "w")
    assert next(s for s in again["stages"] if s["name"] == "searched")["cache"] == "hit"


def test_constraints_and_two_objectives_give_a_feasible_front(tiny_model_family, task_files, tmp_path):
    search = {"objectives": [{"metric": "acc/dev"}, {"metric": "acc_norm/dev"}],
              "constraints": ["acc_norm/dev >= 0.3"], "trials": 8, "choose": "acc_norm/dev"}
    notes = _search_notes(run_recipe(_recipe(tiny_model_family, task_files, search=search), tmp_path / "w"))
    by_number = {t["number"]: t for t in notes["trials"]}
    for n in notes["pareto"]:
        assert by_number[n]["feasible"] and by_number[n]["metrics"]["acc_norm/dev"] >= 0.3
    for t in notes["trials"]:
        if t["state"] == "complete":
            assert t["feasible"] == (t["metrics"]["acc_norm/dev"] >= 0.3)
    chosen = notes["chosen"]
    assert chosen["metrics"]["acc_norm/dev"] == max(by_number[n]["metrics"]["acc_norm/dev"] for n in notes["pareto"])


def test_the_method_itself_can_be_a_choice(tiny_model_family, task_files, tmp_path):
    search = {"methods": ["ties"], "space": None, "trials": 8, "prune": False}
    recipe = _recipe(tiny_model_family, task_files, search=search)
    recipe["stages"][0]["params"] = {"lambda": 1.0}
    notes = _search_notes(run_recipe(recipe, tmp_path / "w"))
    assert {t["method"] for t in notes["trials"]} <= {"task-arithmetic", "ties"}
    assert any(d.startswith("ties.density[a]") for d in notes["space"])
    assert "method in ['task-arithmetic', 'ties']" in notes["space"]


def test_warm_start_queues_the_previous_best_trials_first(tiny_model_family, task_files, tmp_path):
    first = _search_notes(run_recipe(_recipe(tiny_model_family, task_files), tmp_path / "old"))
    best = sorted((t for t in first["trials"] if t["feasible"]), key=lambda t: (-t["values"][0], t["number"]))
    recipe = _recipe(tiny_model_family, task_files,
                     search={"warm_start": str(tmp_path / "old"), "warm_start_trials": 2, "trials": 3})
    notes = _search_notes(run_recipe(recipe, tmp_path / "new"))
    warm = [t for t in notes["trials"] if t.get("warm_start")]
    assert [t["number"] for t in warm] == [0, 1]
    for got, want in zip(warm, best[:2]):
        for model in ("a", "b"):
            assert got["params"]["weight"][model] == pytest.approx(want["params"]["weight"][model])


def test_the_cost_table_counts_a_search_in_the_merge_it_chose():
    from engine.run.report.cost import cost_blocks, merges_built_on, methods

    lineage = {"ct": {"stage": "adapt-language", "plugin": "ct", "inputs": ["base"], "languages": {"lum": 1.0}},
               "sft": {"stage": "adapt-language", "plugin": "sft", "inputs": ["base"], "languages": {"en": 1.0}},
               "m": {"stage": "merge", "plugin": "ties", "inputs": ["base", "ct", "sft"]}}
    trials = [{"number": i, "state": "complete"} for i in range(40)]
    report = {"lineage": lineage, "stages": [
        {"name": "ct", "plugin": "ct", "wall_time_s": 10.0, "tokens": 100, "trainable_params": 5},
        {"name": "sft", "plugin": "sft", "wall_time_s": 5.0, "tokens": 50, "trainable_params": 5},
        {"name": "m", "plugin": "ties", "wall_time_s": 31.5, "tokens": 0,
         "notes": {"search": {"trials": trials, "search_s": 30.25}}}]}
    found = methods(report, "lum")
    merges = merges_built_on(report, found)
    assert merges[0].plugins == ["ct", "sft", "ties (search: 40 trials, 30.2 s)"]
    assert merges[0].wall_time_s == 46.5  # the training it is built from, plus the search and the merge
    note = cost_blocks(found, merges)[1].text
    assert "A searched merge's time includes its search" in note


def test_validate_names_a_param_without_a_usable_range(tiny_model_family, task_files, tmp_path):
    recipe = _recipe(tiny_model_family, task_files, plugin="slack-ties", search={"space": {"protect": "auto"}})
    with pytest.raises(RecipeError, match=r"stage 'searched' search: space.protect: 'protect' has no usable range"):
        _plan(recipe, tmp_path)


def test_a_seeded_search_is_reproducible(tiny_model_family, task_files, tmp_path):
    runs = [_search_notes(run_recipe(_recipe(tiny_model_family, task_files, search={"seed": 3}), tmp_path / w))
            for w in ("one", "two")]
    assert [t["params"] for t in runs[0]["trials"]] == [t["params"] for t in runs[1]["trials"]]
    assert [t["values"] for t in runs[0]["trials"]] == [t["values"] for t in runs[1]["trials"]]
    other = _search_notes(run_recipe(_recipe(tiny_model_family, task_files, search={"seed": 4}), tmp_path / "three"))
    assert [t["params"] for t in other["trials"]] != [t["params"] for t in runs[0]["trials"]]
