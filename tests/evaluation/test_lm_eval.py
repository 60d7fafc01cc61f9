"""``lm-eval``: the lm-evaluation-harness bridge, on a task defined from local files.

The harness runs fully offline here: a custom task YAML reads a local jsonl through
``dataset_path: json``. Its accuracy is checked against a plain per-choice
log-likelihood loop written the harness's way (context without BOS, continuation
split after the context's tokens, ``acc_norm`` dividing by characters).
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import write_choice_task

from engine.api import ModelArtifact, StageInputs
from engine.core.errors import EngineError, ModelLoadError
from engine_plugins.lm_eval import (
    LmEval,
    flatten_results,
    register_evaluators,
    resolve_include_path,
)

ITEMS = [
    ("question what color is the sky answer", [" blue", " cat", " mat"], 0),
    ("the cat sits on the", [" mat", " sky", " park"], 0),
    ("the dog runs in the", [" park", " blue"], 0),
    ("lum vela dora sen", [" kato", " the", " answer"], 0),
    ("a small corpus of", [" text", " lum", " question what"], 0),
    ("kato lumi vel", [" ados", " sits"], 1),
]


@pytest.fixture
def task_dir(tmp_path):
    return write_choice_task(tmp_path, ITEMS)


def harness_reference(model_dir, tokenizer) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hits = hits_norm = 0
    with torch.no_grad():
        for prompt, choices, label in ITEMS:
            lls = []
            for choice in choices:
                whole = tokenizer(prompt + choice, add_special_tokens=False)["input_ids"]
                ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                cont = whole[len(ctx):]
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1], -1)
                pos = torch.arange(len(ctx) - 1, len(whole) - 1)
                lls.append(logprobs[pos, torch.tensor(cont)].sum().item())
            normed = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
            hits += max(range(len(lls)), key=lambda i: (lls[i], -i)) == label
            hits_norm += max(range(len(normed)), key=lambda i: (normed[i], -i)) == label
    return hits / len(ITEMS), hits_norm / len(ITEMS)


def run(make_context, models, **params):
    context = make_context("harness", stage_kind="evaluate", plugin="lm-eval")
    inputs = StageInputs(models=[ModelArtifact(n, p) for n, p in models.items()])
    return LmEval().run(context, inputs, LmEval.Params(**params)), context


def test_lm_eval_local_task_matches_reference(tiny_model, tiny_tokenizer, task_dir, tmp_path,
                                             make_context, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    art, context = run(make_context, {"tiny": tiny_model, "gone": tmp_path / "nope"},
                       tasks=["tiny_mc"], include_path=str(task_dir), batch_size=4)
    acc, acc_norm = harness_reference(tiny_model, tiny_tokenizer)
    assert art.metrics["tiny"] == {"acc/tiny_mc": acc, "acc_norm/tiny_mc": acc_norm}
    assert art.counts["tiny"] == {"acc/tiny_mc": len(ITEMS), "acc_norm/tiny_mc": len(ITEMS)}
    assert "nope" in art.errors["gone"]


def test_lm_eval_missing_dependency_is_a_clear_run_error(tiny_model, make_context, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "lm_eval" else importlib_find(name, *a))
    with pytest.raises(EngineError, match=r"pip install 'lingoforge\[lm-eval\]'"):
        run(make_context, {"tiny": tiny_model}, tasks=["x"])
    got = []
    register_evaluators(got.append)  # registering never needs lm_eval
    assert [impl.name for impl in got] == ["lm-eval"]


def importlib_find(name, *args):
    import importlib.machinery

    return importlib.machinery.PathFinder.find_spec(name, *args)


def test_lm_eval_flatten_results():
    out = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "exact_match,strict-match": 0.25, "acc_norm_stderr,none": "N/A"}},
           "n-samples": {"t": {"original": 8, "effective": 4}}}
    metrics, counts, stderr = flatten_results(out)
    assert metrics == {"acc/t": 0.5, "exact_match_strict-match/t": 0.25}
    assert counts == {"acc/t": 4, "exact_match_strict-match/t": 4}
    assert stderr == {"acc/t": 0.1}


def test_lm_eval_no_loadable_model(tmp_path, task_dir, make_context):
    pytest.importorskip("lm_eval")
    with pytest.raises(ModelLoadError, match="no model could be scored"):
        run(make_context, {"gone": tmp_path / "nope"}, tasks=["tiny_mc"],
            include_path=str(task_dir))


# --- include_path is relative to the recipe file, like every other recipe path ----------------


def _recipe(folder, model, include_path):
    path = folder / "eval.yaml"
    path.write_text(f"name: harness-rel\nmodels:\n  tiny: {{path: {model}}}\nstages:\n"
                    f"  - name: harness\n    stage: evaluate\n    plugin: lm-eval\n"
                    f"    models: [tiny]\n    data: [{{path: items.jsonl}}]\n    params: {{tasks: [tiny_mc], include_path: {include_path}}}\n")
    return path


def test_lm_eval_include_path_is_relative_to_the_recipe_not_the_cwd(tiny_model, tmp_path, monkeypatch,
                                                                    make_context):
    from engine.cli.common import load_plan

    project = tmp_path / "project"
    project.mkdir()
    write_choice_task(project, ITEMS)  # project/tasks/tiny_mc.yaml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    stage = load_plan(_recipe(project, tiny_model, "tasks"), []).stages[0]
    assert stage.params.include_path == str(project / "tasks")
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    context = make_context("harness", stage_kind="evaluate", plugin="lm-eval")
    art = LmEval().run(context, StageInputs(models=[ModelArtifact("tiny", tiny_model)]), stage.params)
    assert set(art.metrics["tiny"]) == {"acc/tiny_mc", "acc_norm/tiny_mc"}


def test_lm_eval_missing_include_path_is_a_validation_error_naming_the_field(tiny_model, tmp_path,
                                                                             monkeypatch):
    from engine.cli.common import load_plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks").mkdir()  # a folder of that name in the cwd must not be picked up
    project = tmp_path / "project"
    project.mkdir()
    (project / "items.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(EngineError, match=r"stage 'harness' params\.include_path: 'tasks' is not a "
                                          r"folder \(.*project/tasks; .*relative to the recipe"):
        load_plan(_recipe(project, tiny_model, "tasks"), [])


def test_lm_eval_resolve_include_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    assert resolve_include_path(None, tmp_path) is None
    assert resolve_include_path(str(tmp_path / "a"), "/nonexistent") == str(tmp_path / "a")  # absolute
    assert resolve_include_path("a", tmp_path) == str(tmp_path / "a")
    assert resolve_include_path("x", None) == str(tmp_path / "x")  # no recipe: the cwd, unchecked
    assert LmEval.Params(tasks=["t"], include_path="a").include_path == str(tmp_path / "a")
