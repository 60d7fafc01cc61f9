"""Held-out evaluation loss in the shared training loop, and ``keep_best``.

The held-out loss is checked against an independent recomputation (the model's own
mean loss per batch, weighted by target tokens) on a model trained separately to that
step; held-out documents are looked for in the training batches by a marker unique to
each document; a killed ``keep_best`` stage, run again, saves what an uninterrupted
run saves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import DataError, TrainingError
from engine.training.batching import training_batches
from engine.training.examples import IGNORE_INDEX
from engine.training.loop import KILL_ENV, LOG_FILE, TrainerParams, train
from engine.training.packing import model_inputs
from engine_plugins.elo import ELO
from engine_plugins.elo_align import ELOAlign
from engine_plugins.sft import SFT

ROOT = Path(__file__).resolve().parents[2]
N_DOCS = 40


@pytest.fixture
def marked_text(tmp_path) -> Path:
    """40 documents, each with a marker (``id007``) no other document contains."""
    f = tmp_path / "marked.txt"
    f.write_text("".join(f"id{i:03d} the cat sits on the mat and the dog runs {'far' if i % 2 else 'near'}\n"
                         for i in range(N_DOCS)))
    return f


@pytest.fixture
def marked_instructions(tmp_path) -> Path:
    f = tmp_path / "marked.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question id{i:03d} what is {i} plus one answer",
                                     "response": f" {i + 1}"}) + "\n" for i in range(N_DOCS)))
    return f


def _params(**kw) -> TrainerParams:
    return TrainerParams(**{"steps": 6, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "log_every": 4,
                            "schedule": "constant", "checkpoint_every": 0, **kw})


def _train(make_context, tiny_model, tok, data: Path, hp: TrainerParams, name: str, **kw):
    ctx = make_context(name)
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    batches = training_batches(tok, [DataSource(data)], seq_len=hp.seq_len, batch_size=hp.micro_batch_size,
                               seed=hp.seed, eval_fraction=hp.eval_fraction, **kw)
    return ctx, batches, train(ctx, model, batches, hp)


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / LOG_FILE).read_text().splitlines()]


def _markers(text: str) -> set[str]:
    import re

    return set(re.findall(r"id\d\d\d", text))


# --- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "packing"), [("text", "documents"), ("text", "stream"),
                                              ("instructions", "padded"), ("instructions", "documents")])
def test_held_out_items_never_in_training_batches(tiny_tokenizer, marked_text, marked_instructions, fmt, packing):
    data = marked_text if fmt == "text" else marked_instructions
    batches = training_batches(tiny_tokenizer, [DataSource(data, fmt)], seq_len=32, batch_size=4, seed=3,
                               packing=packing, eval_fraction=0.2)
    held = batches.heldout.held(0)
    assert len(held) == 8  # floor(40 * 0.2), drawn by the seed
    assert held == training_batches(tiny_tokenizer, [DataSource(data, fmt)], seq_len=32, batch_size=4, seed=3,
                                    packing=packing, eval_fraction=0.2).heldout.held(0)
    assert held != training_batches(tiny_tokenizer, [DataSource(data, fmt)], seq_len=32, batch_size=4, seed=4,
                                    packing=packing, eval_fraction=0.2).heldout.held(0)
    # rows in order, joined: a marker cut at a row's end is whole again
    stream = [i for _ in range(60) for row in next(batches)["input_ids"] for i in row.tolist()]
    held_markers = {f"id{i:03d}" for i in held}
    assert _markers(tiny_tokenizer.decode(stream)) == {f"id{i:03d}" for i in range(N_DOCS)} - held_markers
    evaluated = [i for b in batches.heldout.batches(batches.packed, "s") for row in b["input_ids"]
                 for i in row.tolist()]
    assert _markers(tiny_tokenizer.decode(evaluated)) == held_markers  # every held-out item, nothing else


def test_validation_errors(make_context, tiny_model, tiny_tokenizer, text_file):
    with pytest.raises(ValidationError, match=r"keep_best needs eval_fraction > 0"):
        TrainerParams(keep_best=True)
    for bad in (-0.1, 0.5):
        with pytest.raises(ValidationError, match=r"eval_fraction"):
            TrainerParams(eval_fraction=bad)
    with pytest.raises(ValidationError, match=r"eval_every"):
        TrainerParams(eval_every=0)
    # 16 documents: 0.05 holds out floor(0.8) = none
    with pytest.raises(DataError, match=r"stage 'tiny': params.eval_fraction 0.05 holds out none of the 16 "
                                        r"documents .*text.txt.*raise eval_fraction to at least 0.0625"):
        _train(make_context, tiny_model, tiny_tokenizer, text_file, _params(eval_fraction=0.05), "tiny")
    ctx = make_context("nosplit")
    plain = iter([])
    with pytest.raises(TrainingError, match=r"stage 'nosplit': params.eval_fraction is set, but this trainer's "
                                            r"batches carry no held-out split"):
        train(ctx, ctx.load_model(tiny_model, dtype=torch.float32), plain, _params(eval_fraction=0.1))


# --- the loss ---------------------------------------------------------------------------------


def _recomputed(model: torch.nn.Module, batches: list[dict], flat: bool) -> float:
    """Held-out mean token loss from the model's own per-batch mean loss."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**model_inputs(b, flat)).loss) * n
            count += n
    return total / count


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_eval_loss_rows_at_their_steps_match_recomputation(make_context, tiny_model, tiny_tokenizer,
                                                           marked_text, grad_accum):
    hp = _params(eval_fraction=0.25, eval_every=4, steps=6, grad_accum=grad_accum, log_every=1)
    ctx, batches, _ = _train(make_context, tiny_model, tiny_tokenizer, marked_text, hp, f"full{grad_accum}")
    rows = _rows(ctx.output_dir)
    assert [r["step"] for r in rows if "eval_loss" in r] == [4, 6]  # every 4 and the last step
    note = ctx.stats.notes["eval"]
    assert note["eval_loss"] == rows[-1]["eval_loss"] and note["step"] == 6
    assert note["held_out"] == 10 and note["of"] == N_DOCS and note["unit"] == "documents"
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert note["best_step"] == min(evals, key=evals.get) and "saved_step" not in note
    held = batches.heldout.batches(batches.packed, "x")
    for step in (4, 6):  # constant lr: a run of `step` steps has the longer run's weights at that step
        short = hp.model_copy(update={"steps": step})
        _, _, result = _train(make_context, tiny_model, tiny_tokenizer, marked_text, short, f"s{step}{grad_accum}")
        assert evals[step] == pytest.approx(_recomputed(result.model, held, batches.flatten), abs=1e-6)


def test_eval_off_or_on_leaves_training_bit_identical(make_context, tiny_model, tiny_tokenizer, marked_text):
    hp = _params(steps=5, log_every=1)
    ctx_a = make_context("plain")
    a = train(ctx_a, ctx_a.load_model(tiny_model, dtype=torch.float32),
              training_batches(tiny_tokenizer, [DataSource(marked_text)], seq_len=16, batch_size=4), hp)
    _, _, b = _train(make_context, tiny_model, tiny_tokenizer, marked_text, _params(steps=5, log_every=1,
                                                                                    eval_fraction=0.0), "zero")
    ctx_c = make_context("given")  # evaluating every step (explicit batches) changes nothing in training
    given = [next(training_batches(tiny_tokenizer, [DataSource(marked_text)], seq_len=16, batch_size=4, seed=9))]
    c = train(ctx_c, ctx_c.load_model(tiny_model, dtype=torch.float32),
              training_batches(tiny_tokenizer, [DataSource(marked_text)], seq_len=16, batch_size=4),
              _params(steps=5, log_every=1, eval_every=1), eval_batches=given)
    assert a.losses == b.losses == c.losses
    assert "eval" not in ctx_a.stats.notes and all("eval_loss" not in r for r in _rows(ctx_a.output_dir))
    assert [r["step"] for r in _rows(ctx_c.output_dir) if "eval_loss" in r] == [1, 2, 3, 4, 5]
    for (name, x), y, z in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                               c.model.state_dict().values()):
        assert torch.equal(x, y) and torch.equal(x, z), name


# --- keep_best --------------------------------------------------------------------------------

#: lr 0.1, constant: on these documents the held-out loss is lowest at step 3 of 5
DIVERGING = {"steps": 5, "batch_size": 4, "seq_len": 16, "lr": 0.1, "schedule": "constant", "log_every": 1,
             "eval_fraction": 0.25, "eval_every": 1, "checkpoint_every": 2}


def _recipe(tiny_model: Path, data: Path, **params) -> dict:
    return {"name": "best", "runtime": {"device": "cpu"}, "models": {"base": {"path": str(tiny_model)}},
            "stages": [{"name": "ct", "stage": "adapt-language", "plugin": "ct", "model": "base",
                        "data": {"path": str(data)}, "params": {**DIVERGING, **params}}]}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_keep_best_saves_the_best_steps_weights(tiny_model, marked_text, tmp_path, lingoforge_run_recipe):
    report = lingoforge_run_recipe(_recipe(tiny_model, marked_text, keep_best=True), tmp_path / "best")
    note = report["stages"][0]["notes"]["eval"]
    evals = {r["step"]: r["eval_loss"] for r in _rows(tmp_path / "best" / "ct")}
    assert note["best_step"] == min(evals, key=evals.get) == 3 and note["saved_step"] == 3
    assert note["best_eval_loss"] == evals[3] < evals[5]
    assert note["saved_model"] == "the saved model is from step 3 (lowest eval_loss), not the last step 5"
    lingoforge_run_recipe(_recipe(tiny_model, marked_text, steps=3), tmp_path / "three")
    lingoforge_run_recipe(_recipe(tiny_model, marked_text), tmp_path / "last")
    best, three, last = (_weights(tmp_path / w / "ct") for w in ("best", "three", "last"))
    assert best.keys() == three.keys()
    for key in best:
        assert torch.equal(best[key], three[key]), key
    assert any(not torch.equal(best[k], last[k]) for k in best)


def test_keep_best_killed_stage_resumes_to_the_same_result(tiny_model, marked_text, tmp_path,
                                                           lingoforge_run_recipe):
    """Killed after the step-4 checkpoint (the best, step 3, is only in the checkpoint),
    run again: the same saved weights, log and notes as an uninterrupted run."""
    recipe = tmp_path / "r.json"  # JSON is YAML
    recipe.write_text(json.dumps(_recipe(tiny_model, marked_text, keep_best=True)))
    killed = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "4", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    [ckpt] = list((killed / ".checkpoints" / "ct").glob("*/step-4"))
    assert json.loads((ckpt / "state.json").read_text())["eval"]["best_step"] == 3
    assert (ckpt / "best.safetensors").is_file()
    report = lingoforge_run_recipe(recipe, killed)
    notes = report["stages"][0]["notes"]
    assert notes["resumed_from_step"] == 4
    clean = tmp_path / "clean"
    clean_notes = lingoforge_run_recipe(recipe, clean)["stages"][0]["notes"]
    for key in ("best_step", "best_eval_loss", "eval_loss", "saved_step"):
        assert notes["eval"][key] == clean_notes["eval"][key], key
    a, b = _weights(killed / "ct"), _weights(clean / "ct")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [{k: v for k, v in r.items() if k in ("step", "loss", "eval_loss")} for r in _rows(killed / "ct")]
    assert strip == [{k: v for k, v in r.items() if k in ("step", "loss", "eval_loss")} for r in _rows(clean / "ct")]


# --- the other trainers -----------------------------------------------------------------------


def test_sft_lora_elo_and_elo_align_evaluate(make_context, tiny_model, marked_instructions, marked_text):
    pytest.importorskip("peft")
    few = {"steps": 4, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "log_every": 2, "eval_fraction": 0.1,
           "eval_every": 2}
    runs = []
    ctx = make_context("sft-lora")
    SFT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=[DataSource(marked_instructions, "instructions")]),
              SFT.Params(**few, lora={"r": 4, "alpha": 8, "dropout": 0.1}, keep_best=True))
    runs.append(ctx)
    ctx = make_context("elo")
    sub = ELO().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), data=[DataSource(marked_text)]),
                    ELO.Params(**few))
    runs.append(ctx)
    ctx = make_context("elo-align", stage_kind="align")
    ELOAlign().run(ctx, StageInputs(model=sub, data=[DataSource(marked_text)]), ELOAlign.Params(**few))
    runs.append(ctx)
    for ctx in runs:
        rows = _rows(ctx.output_dir)
        assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4], ctx.stage_name
        note = ctx.stats.notes["eval"]
        assert note["held_out"] == 4 and note["eval_loss"] == rows[-1]["eval_loss"] > 0, ctx.stage_name
    assert runs[0].stats.notes["eval"]["unit"] == "examples" and "saved_step" in runs[0].stats.notes["eval"]


def test_trackers_get_eval_loss(tiny_model, marked_text, tmp_path, lingoforge_run_recipe):
    pytest.importorskip("tensorboardX")
    from test_tracking import read_scalars

    recipe = _recipe(tiny_model, marked_text, lr=3e-3, eval_every=2)
    recipe["runtime"]["log_with"] = ["tensorboard"]
    lingoforge_run_recipe(recipe, tmp_path / "tb")
    scalars = read_scalars(tmp_path / "tb" / "trackers" / "tensorboard" / "ct")
    evals = {r["step"]: r["eval_loss"] for r in _rows(tmp_path / "tb" / "ct") if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 5]
    assert scalars["eval/loss"] == pytest.approx(evals)


def test_loss_chart_draws_eval_loss_dashed(tmp_path):
    import xml.etree.ElementTree as ET

    from engine.run.report.charts import loss_svg

    svg = "{http://www.w3.org/2000/svg}"
    log = [{"step": i, "loss": 3.0 - 0.1 * i, "tokens": 64 * i, "elapsed_s": 0.5 * i,
            **({"eval_loss": 3.1 - 0.05 * i} if i % 2 == 0 else {})} for i in range(1, 7)]
    root = ET.parse(loss_svg({"ct": log, "plain": [{k: v for k, v in r.items() if k != "eval_loss"} for r in log]},
                             tmp_path / "loss.svg")).getroot()
    curves = [e for e in root.iter(f"{svg}polyline") if e.get("class") == "curve"]
    dashed = [e for e in curves if e.get("stroke-dasharray")]
    assert len(curves) == 9 and len(dashed) == 3  # 2 stages x 3 panels, and ct's eval_loss in each
    assert {e.find(f"{svg}title").text for e in dashed} == {"ct eval_loss"}
    assert all(len(e.get("points").split()) == 3 for e in dashed)  # steps 2, 4, 6
    assert "ct (6 steps) (dashed: eval_loss)" in ET.tostring(root, encoding="unicode")


def test_eval_loss_under_bf16_autocast(make_context, tiny_model, tiny_tokenizer, marked_text):
    from engine.training.levers import cpu_autocast_problem

    if cpu_autocast_problem():
        pytest.skip(cpu_autocast_problem())
    hp = _params(eval_fraction=0.25, eval_every=3, steps=3, log_every=1, mixed_precision="bf16")
    ctx, batches, result = _train(make_context, tiny_model, tiny_tokenizer, marked_text, hp, "bf16")
    [row] = [r for r in _rows(ctx.output_dir) if "eval_loss" in r]
    held = batches.heldout.batches(batches.packed, "x")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward the loop ran
        assert row["eval_loss"] == pytest.approx(_recomputed(result.model, held, batches.flatten), abs=1e-6)
    assert row["eval_loss"] == pytest.approx(_recomputed(result.model, held, batches.flatten), rel=2e-2)


@pytest.mark.slow
def test_two_processes_evaluate_without_deadlock_and_match_one(tiny_model, marked_text, tmp_path,
                                                               lingoforge_run_recipe):
    """Every rank evaluates the whole held-out set: two CPU processes (gloo) finish, log
    the eval loss once, and keep the same best step as one process."""
    import shutil

    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not installed")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(_recipe(tiny_model, marked_text, keep_best=True, batch_size=8, grad_accum=2,
                                         checkpoint_every=0)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "engine", "run", str(recipe), "--workdir", str(tmp_path / "multi")],
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads((tmp_path / "multi" / "report.json").read_text())["stages"][0]["notes"]["eval"]
    single = lingoforge_run_recipe(recipe, tmp_path / "single")["stages"][0]["notes"]["eval"]
    rows = [r for r in _rows(tmp_path / "multi" / "ct") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert multi["best_step"] == single["best_step"] and multi["saved_step"] == single["saved_step"]
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)


def test_keep_best_with_lora_saves_the_best_steps_adapter(tiny_model, marked_text, tmp_path, lingoforge_run_recipe):
    """LoRA (dropout on, so eval mode matters): the saved adapter is the best step's."""
    pytest.importorskip("peft")
    # lr 3, no clipping: on these documents the adapter's held-out loss is lowest at step 2 of 5
    lora = {"lr": 3.0, "max_grad_norm": 0, "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "save": "adapter"}}
    report = lingoforge_run_recipe(_recipe(tiny_model, marked_text, keep_best=True, **lora), tmp_path / "best")
    note = report["stages"][0]["notes"]["eval"]
    assert note["saved_step"] == note["best_step"] < 5
    lingoforge_run_recipe(_recipe(tiny_model, marked_text, steps=note["best_step"], **lora), tmp_path / "short")
    lingoforge_run_recipe(_recipe(tiny_model, marked_text, **lora), tmp_path / "last")
    best, short, last = (load_file(str(tmp_path / w / "ct" / "adapter_model.safetensors"))
                         for w in ("best", "short", "last"))
    assert best.keys() == short.keys() and all(torch.equal(best[k], short[k]) for k in best)
    assert any(not torch.equal(best[k], last[k]) for k in best)
