"""The evaluation cache (engine.evaluation.cache) through the real runner, and the evaluation
progress bar's counts with the real evaluators.

Loads are counted from what the engine records for every model it really loads
(``notes.attention``, written by ``StageContext.load_model``; ``notes.capabilities``,
written after the model's probe) and from the positions fed (``tokens``), never from a
mock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.progress import Progress

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.evaluation.cache import CACHE_DIR, model_content
from engine.evaluation.driver import EvalPlan, evaluate_models, plan_batches
from engine.run.context import StageContext
from engine.run.runtime import Runtime
from engine.testing import run_recipe
from engine.testing.builders import build_family, build_tiny_llama, write_choice_file
from engine_plugins.task_accuracy import TaskAccuracy, load_items, plan_choices

NAMES = ("m0", "m1", "m2", "m3", "m4", "m5", "m6")
GEN = [{"prompt": "question what color is the sky answer", "answer": "blue"},
       {"prompt": "the cat sits on the", "answer": "mat"},
       {"prompt": "a small model learns words from a", "answer": "small"}]


@pytest.fixture
def world(tmp_path) -> dict[str, Path]:
    """Seven tiny models (one tokenizer) and a text, a choice and a generation file."""
    models = build_family(tmp_path / "models", names=NAMES)
    data = tmp_path / "data"
    data.mkdir()
    (data / "docs.txt").write_text("the cat sits on the mat\nlum vela dora sen kato lumi\n"
                                   "a small model learns words from a small corpus of text\n")
    write_choice_file(data / "items.jsonl")
    (data / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in GEN) + "\n")
    return {**models, "data": data, "tokenizer": tmp_path / "models" / "tokenizer"}


def recipe(world: dict[str, Path]) -> dict:
    d = world["data"]
    return {
        "name": "eval-cache",
        "models": {n: {"path": str(world[n])} for n in NAMES},
        "runtime": {"device": "cpu"},
        "stages": [
            {"name": "ppl", "stage": "evaluate", "plugin": "perplexity", "models": list(NAMES),
             "data": [{"path": str(d / "docs.txt"), "format": "text", "language": "xx"}],
             "params": {"batch_size": 2, "bits_per_byte": True}},
            {"name": "task", "stage": "evaluate", "plugin": "task-accuracy", "models": list(NAMES),
             "data": [{"path": str(d / "items.jsonl"), "format": "choice", "language": "xx"},
                      {"path": str(d / "gen.jsonl"), "format": "generation", "language": "xx"}],
             "params": {"batch_size": 2, "max_new_tokens": 3}},
        ],
    }


def stages(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["stages"]}


def metrics_json(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "metrics.json").read_text())


def change_weights(folder: Path, seed: int) -> None:
    """New weights in the same folder (same shape and tokenizer): what retraining does."""
    from transformers import AutoTokenizer

    build_tiny_llama(folder, tokenizer=AutoTokenizer.from_pretrained(str(folder)), seed=seed)


def test_changing_one_of_seven_models_rescores_only_it(world, tmp_path):
    work = tmp_path / "run"
    first = stages(run_recipe(recipe(world), work))
    for name in ("ppl", "task"):
        assert first[name]["notes"]["eval_cache"]["scored"] == list(NAMES)
        assert first[name]["notes"]["eval_cache"]["reused"] == []
    assert len(list((work / CACHE_DIR).glob("*.json"))) == 2 * len(NAMES)  # (model, evaluation)
    before = {name: metrics_json(work, name) for name in ("ppl", "task")}

    change_weights(world["m3"], seed=99)
    second = stages(run_recipe(recipe(world), work))
    for name in ("ppl", "task"):
        rec = second[name]
        assert rec["cache"] != "hit"  # the stage itself re-ran (one input changed)
        note = rec["notes"]["eval_cache"]
        assert note["scored"] == ["m3"]
        assert sorted(note["reused"]) == sorted(set(NAMES) - {"m3"})
        assert set(rec["notes"]["attention"]) == {"m3"}  # the only model loaded
        assert set(rec["notes"]["capabilities"]) == {"m3"}
        assert rec["tokens"] * len(NAMES) == first[name]["tokens"]  # same-shaped work, 1 of 7
        assert note["saved_tokens"] == first[name]["tokens"] * 6 // 7
        assert set(note["saved"]) == set(note["reused"])
        assert all(c["wall_s"] > 0 for c in note["saved"].values())
    assert len(list((work / CACHE_DIR).glob("*.json"))) == 2 * len(NAMES) + 2

    fresh = tmp_path / "fresh"
    run_recipe(recipe(world), fresh, use_cache=False)
    for name in ("ppl", "task"):
        cached, plain = metrics_json(work, name), metrics_json(fresh, name)
        assert cached == plain  # metrics, counts, stderr and chance, bit for bit
        assert cached["m3"] != before[name]["m3"]  # the change is seen ...
        assert all(cached[n] == before[name][n] for n in NAMES if n != "m3")  # ... only there
    task = metrics_json(work, "task")
    assert task["_chance"] == {"acc/xx": pytest.approx((1 / 3 + 1 / 2) / 2),
                               "acc_norm/xx": pytest.approx((1 / 3 + 1 / 2) / 2)}
    assert set(task["_stderr"]["m0"]) == {"acc/xx", "acc_norm/xx", "exact_match/xx"}
    assert set(metrics_json(work, "ppl")["_stderr"]["m0"]) == {"ppl/xx", "bpb/xx"}


def test_no_cache_and_corrupt_entries_are_never_trusted(world, tmp_path):
    work = tmp_path / "run"
    spec = recipe(world)
    spec["stages"] = spec["stages"][:1]
    first = stages(run_recipe(spec, work))["ppl"]
    owner = {model_content(world[n], work): n for n in NAMES}
    by_model = {owner[json.loads(e.read_text())["key"]["model"]]: e
                for e in (work / CACHE_DIR).glob("*.json")}
    entries = [by_model[n] for n in ("m1", "m2", "m3")]
    entries[0].write_text("{not json")
    saved = json.loads(entries[1].read_text())
    saved["result"]["metrics"] = {"ppl/xx": 1.0}  # a shape that does not hold together
    entries[1].write_text(json.dumps(saved))
    saved = json.loads(entries[2].read_text())
    saved["key"]["batch_size"] = 7  # an entry written for another key
    entries[2].write_text(json.dumps(saved))
    (world["m0"] / "note.txt").write_text("a new file: the stage re-runs")  # input changed
    second = stages(run_recipe(spec, work))["ppl"]
    note = second["notes"]["eval_cache"]
    assert sorted(note["scored"]) == ["m0", "m1", "m2", "m3"]  # the change + three bad entries
    assert sorted(note["rejected_entries"]) == sorted(e.name for e in entries[:3])
    for e in entries[:3]:  # rewritten, whole
        assert json.loads(e.read_text())["result"]["counts"]
    rescored = metrics_json(work, "ppl")
    again = stages(run_recipe(spec, work, use_cache=False))["ppl"]  # --no-cache: all scored
    assert "eval_cache" not in again["notes"]
    assert set(again["notes"]["attention"]) == set(NAMES)
    assert metrics_json(work, "ppl") == rescored
    assert first["notes"]["eval_cache"]["scored"] == list(NAMES)


def test_an_evaluator_that_passes_no_params_is_not_cached(world, tmp_path):
    context = StageContext(run_name="t", stage_name="s", stage_kind="evaluate", plugin="mine",
                           workdir=tmp_path, output_dir=tmp_path / "out",
                           runtime=Runtime(device="cpu"), use_cache=True)
    items = load_items(DataSource(world["data"] / "items.jsonl", "choice"), TaskAccuracy.Params())

    def build(tokenizer, max_length):
        spans, _ = plan_choices(tokenizer, items, max_length)
        return EvalPlan(spans, lambda scores: ({"n": float(len(scores))}, {"n": len(scores)}))

    models = [ModelArtifact(n, world[n]) for n in NAMES[:2]]
    for _ in range(2):
        art = evaluate_models(context, models, build, batch_size=2)
        assert art.metrics["m0"] == {"n": 5.0}
    assert not (tmp_path / CACHE_DIR).exists()
    assert "eval_cache" not in context.stats.notes
    assert set(context.stats.notes["attention"]) == {"m0", "m1"}


# --- the progress bar --------------------------------------------------------------------


class Recording(Progress):
    """A rich Progress that keeps (completed, total, info) after every update."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.seen: list[tuple[float, float | None, str]] = []

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if "advance" in kwargs:
            task = self._tasks[task_id]
            self.seen.append((task.completed, task.total, task.fields.get("info", "")))


class WithoutKVCache(StageContext):
    """A context whose models (real tiny Llamas) ignore a KV cache and have no
    ``logits_to_keep``: the engine must score every span in plain batches."""

    def load_model(self, model, **kwargs):
        from types import SimpleNamespace

        import torch

        inner = super().load_model(model, **kwargs)

        class NoCache(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner, self.config = inner, inner.config

            def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None,
                        **ignored):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, use_cache=False)
                return SimpleNamespace(logits=out.logits, cache=None, past_key_values=None)

        return NoCache() if model.name == "slow" else inner


def test_evaluation_bar_counts_what_advances(world, tmp_path):
    """Multiple choice (shared prefix for one model, plain batches for a model without a
    KV cache) and generation in one stage: the bar never passes its total, ends on it,
    advances once per batch and shows a rate."""
    progress = Recording()
    context = WithoutKVCache(run_name="t", stage_name="task", stage_kind="evaluate",
                             plugin="task-accuracy", workdir=tmp_path, output_dir=tmp_path / "o",
                             runtime=Runtime(device="cpu"), progress=progress)
    data = [DataSource(world["data"] / "items.jsonl", "choice", language="xx"),
            DataSource(world["data"] / "gen.jsonl", "generation", language="xx")]
    params = TaskAccuracy.Params(batch_size=2, max_new_tokens=3, num_fewshot=1)
    models = [ModelArtifact("fast", world["m0"]), ModelArtifact("slow", world["m1"])]
    art = TaskAccuracy().run(context, StageInputs(models=models, data=data), params)
    assert not art.errors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(world["m0"]))
    spans, _ = plan_choices(tok, load_items(data[0], params), 256)
    assert any(b.shared for b in plan_batches(spans, 2))  # the fast model shares prefixes
    per_model = len(spans) + len(GEN)
    assert progress.seen, "the bar never advanced"
    assert all(done <= total for done, total, _ in progress.seen)
    assert progress.seen[-1][:2] == (2 * per_model, 2 * per_model)
    plain = -(-len(spans) // 2)  # the slow model's plain batches
    assert len(progress.seen) >= plain + 2 * -(-len(GEN) // 2)
    assert all("tok_s=" in info for _, _, info in progress.seen)
    assert "model=slow 2/2" in progress.seen[-1][2]


def test_stage_outputs_are_known_by_their_marker_inputs_by_their_files(world, tmp_path):
    """A merged model re-made with other params is re-scored (its marker's fingerprint
    changed); a copy of a stage output used as an input model is known by its files, so
    new weights under its copied marker are re-scored too, never served the old result."""
    work = tmp_path / "run"
    copy = tmp_path / "copy"
    spec = recipe(world)
    spec["stages"] = [
        {"name": "merged", "stage": "merge", "plugin": "task-arithmetic", "base": "m0",
         "models": ["m1", "m2"], "params": {"lambda": 1.0}},
        {**spec["stages"][0], "models": ["m0", "m1", "merged"]},
    ]
    run_recipe(spec, work)
    import shutil

    shutil.copytree(work / "merged", copy)  # with its .lingoforge-stage.json
    spec["models"]["copy"] = {"path": str(copy)}
    spec["stages"][1]["models"].append("copy")
    first = stages(run_recipe(spec, work))["ppl"]["notes"]["eval_cache"]
    assert first["scored"] == ["copy"] and sorted(first["reused"]) == ["m0", "m1", "merged"]

    second = stages(run_recipe(spec, work, overrides=["stages.merged.params.lambda=0.5"]))
    assert second["ppl"]["notes"]["eval_cache"]["scored"] == ["merged"]

    change_weights(copy, seed=7)  # the copied marker still names the old merge
    third = stages(run_recipe(spec, work, overrides=["stages.merged.params.lambda=0.5"]))
    assert third["ppl"]["notes"]["eval_cache"]["scored"] == ["copy"]
