"""Checkpoint and resume: a killed training stage, run again, ends where an uninterrupted
run ends (bitwise on the CPU), and bad checkpoints are never loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.api import DataSource
from engine.core.errors import TrainingError
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import CHECKPOINTS_DIR, Runner
from engine.training.batching import training_batches
from engine.training.checkpoint import CheckpointDir
from engine.training.examples import Batch
from engine.training.loop import KILL_ENV, LOG_FILE, TrainerParams, train

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, tiny_model: Path, text_file: Path, plugin: str = "ct", extra: str = "") -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: resume
        models:
          base: {{path: {tiny_model}}}
        runtime: {{device: cpu}}
        stages:
          - name: trained
            stage: adapt-language
            plugin: {plugin}
            model: base
            data: {{path: {text_file}}}
            params: {{steps: 8, batch_size: 4, grad_accum: 2, seq_len: 16, lr: 3.0e-3,
                      warmup_steps: 2, log_every: 1, checkpoint_every: 2{extra}}}
        """))
    return f


def _run(recipe: Path, workdir: Path) -> dict:
    plan = plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    return Runner(plan, workdir).run()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_ct_killed_stage_resumes_bitwise(tmp_path, tiny_model, text_file):
    recipe = _recipe(tmp_path, tiny_model, text_file)
    killed = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = list((killed / CHECKPOINTS_DIR / "trained").glob("*/step-*"))
    assert [p.name for p in ckpts] == ["step-4"]  # every 2 steps, the newest kept
    assert not (killed / "trained").exists()

    report = _run(recipe, killed)  # run the recipe again: resumes at step 4
    assert report["stages"][0]["notes"]["resumed_from_step"] == 4
    assert not (killed / CHECKPOINTS_DIR).exists()  # removed after success
    log = [json.loads(x) for x in (killed / "trained" / LOG_FILE).read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 9))

    clean = tmp_path / "clean"
    _run(recipe, clean)
    a, b = _weights(killed / "trained"), _weights(clean / "trained")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    clean_log = [json.loads(x)["loss"] for x in (clean / "trained" / LOG_FILE).read_text().splitlines()]
    assert [x["loss"] for x in log] == clean_log


def test_ct_lora_killed_stage_resumes_bitwise(tmp_path, tiny_model, text_file):
    """A LoRA run checkpoints only the adapter matrices (the frozen base is re-read) and,
    killed and run again, writes the same adapter as an uninterrupted run. Dropout on
    the LoRA branch makes the RNG restore matter too."""
    recipe = _recipe(tmp_path, tiny_model, text_file,
                     extra=", lora: {r: 4, alpha: 8, dropout: 0.1, save: adapter}")
    killed = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    [ckpt] = list((killed / CHECKPOINTS_DIR / "trained").glob("*/step-*"))
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapter only

    report = _run(recipe, killed)
    assert report["stages"][0]["notes"]["resumed_from_step"] == 4
    clean = tmp_path / "clean"
    _run(recipe, clean)
    a = load_file(str(killed / "trained" / "adapter_model.safetensors"))
    b = load_file(str(clean / "trained" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[json.loads(x)["loss"] for x in (run / "trained" / LOG_FILE).read_text().splitlines()]
              for run in (killed, clean)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


class _Crash(RuntimeError):
    pass


def _batches(tok, text_file: Path, hp: TrainerParams, crash_at: int | None = None,
             model: torch.nn.Module | None = None, poison_at: int | None = None) -> Iterator[Batch]:
    """Real batches; optionally crash (a killed data loader) or poison the model with NaN
    when micro-batch ``crash_at``/``poison_at`` is requested."""
    it = training_batches(tok, [DataSource(text_file)], seq_len=hp.seq_len,
                          batch_size=hp.micro_batch_size, seed=hp.seed)
    for i, batch in enumerate(it):
        if i == crash_at:
            raise _Crash(f"crash at micro-batch {i}")
        if i == poison_at and model is not None:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))
        yield batch


def test_ct_resume_with_adamw_8bit_and_accumulation(make_context, tiny_model, tiny_tokenizer,
                                                    text_file, tmp_path):
    """Optimizer state of bitsandbytes (quantised moments) survives the safetensors round trip."""
    hp = TrainerParams(steps=6, batch_size=4, grad_accum=2, seq_len=16, lr=3e-3, log_every=1,
                       checkpoint_every=2, optimizer="adamw-8bit")
    ctx = make_context("ck")
    ctx.checkpoint_dir = tmp_path / "ckpt"
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    with pytest.raises(_Crash):
        train(ctx, model, _batches(tiny_tokenizer, text_file, hp, crash_at=7), hp)
    assert CheckpointDir(ctx.checkpoint_dir).steps() == [2]
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    resumed = train(ctx, model, _batches(tiny_tokenizer, text_file, hp), hp)
    assert ctx.stats.notes["resumed_from_step"] == 2 and len(resumed.losses) == 4

    ref_ctx = make_context("ref")
    ref = train(ref_ctx, ref_ctx.load_model(tiny_model, dtype=torch.float32),
                _batches(tiny_tokenizer, text_file, hp), hp)
    assert resumed.losses == ref.losses[2:]
    for (name, x), y in zip(resumed.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_ct_nan_keeps_last_good_checkpoint(make_context, tiny_model, tiny_tokenizer, text_file, tmp_path):
    hp = TrainerParams(steps=8, batch_size=2, seq_len=16, log_every=4, checkpoint_every=2)
    ctx = make_context("nan")
    ctx.checkpoint_dir = tmp_path / "ckpt"
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    with pytest.raises(TrainingError, match=r"loss became nan at step 6 of 8.*last good checkpoint "
                                            r"\(step 4\) is kept"):
        train(ctx, model, _batches(tiny_tokenizer, text_file, hp, model=model, poison_at=5), hp)
    ck = CheckpointDir(ctx.checkpoint_dir)
    assert ck.steps() == [4]
    saved = ck.load_latest()
    assert all(torch.isfinite(t).all() for t in saved.trainable.values())


def test_checkpoint_ignores_torn_and_incomplete_saves(tmp_path):
    ck = CheckpointDir(tmp_path / "c", keep=2)
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    ck.save(step=3, state={"tokens": 10, "micro_batches": 3}, trainable={"w": p}, optimizer=opt.state_dict())
    (tmp_path / "c" / ".tmp-step-5-999").mkdir()  # killed during a save
    (tmp_path / "c" / "step-6").mkdir()  # no state.json: incomplete
    assert ck.steps() == [3]
    loaded = ck.load_latest()
    assert loaded.step == 3 and torch.equal(loaded.trainable["w"], p.detach())
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    fresh.load_state_dict(loaded.optimizer)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (loaded.path / "optimizer.json").write_text("{not json")
    with pytest.raises(TrainingError, match="step-3 is unreadable"):
        ck.load_latest()


def test_a_save_clears_unfinished_saves_of_killed_runs(tmp_path):
    ck = CheckpointDir(tmp_path / "c", keep=2)
    stale = tmp_path / "c" / ".tmp-step-5-999"
    stale.mkdir(parents=True)
    (stale / ".tmpAb12Cd").write_bytes(b"half a tensor file")  # a writer's scratch file
    p = torch.nn.Parameter(torch.randn(2))
    ck.save(step=6, state={"tokens": 1, "micro_batches": 1}, trainable={"w": p},
            optimizer=torch.optim.SGD([p], lr=0.1).state_dict())
    assert not stale.exists() and ck.steps() == [6]
    assert not [q for q in (tmp_path / "c").iterdir() if q.name.startswith(".tmp-")]


def test_auto_cadence_checkpoints_an_80_step_stage():
    assert TrainerParams(steps=80).checkpoint_interval == 20  # steps 20, 40, 60
    assert TrainerParams(steps=160).checkpoint_interval == 40
    assert TrainerParams(steps=12).checkpoint_interval == 10  # never more often than every 10
    assert TrainerParams(steps=100_000).checkpoint_interval == 500
    assert TrainerParams(steps=80, checkpoint_every=0).checkpoint_interval == 0


def test_resumed_stage_counts_whole_stage_and_logs_live(tmp_path, tiny_model, text_file):
    """Killed at step 5 and run again: the record counts all 8 steps' tokens, the log
    rows carry cumulative tokens and elapsed seconds, and the live log sits in
    <workdir>/logs/<stage>/ beside the output's copy."""
    recipe = _recipe(tmp_path, tiny_model, text_file)
    killed = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    live = killed / "logs" / "trained" / LOG_FILE
    assert [json.loads(x)["step"] for x in live.read_text().splitlines()] == [1, 2, 3, 4, 5]
    report = _run(recipe, killed)
    stage = report["stages"][0]
    assert stage["notes"]["resumed_from_step"] == 4
    assert stage["tokens"] == 8 * 4 * 16  # the whole stage's, not the resumed half
    seconds = stage["notes"]["training_seconds"]
    assert 0 < seconds["this_run"] < seconds["whole_stage"]
    log = [json.loads(x) for x in (killed / "trained" / LOG_FILE).read_text().splitlines()]
    assert [r["tokens"] for r in log] == [4 * 16 * s for s in range(1, 9)]
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(log, log[1:]))
    assert live.read_text() == (killed / "trained" / LOG_FILE).read_text()
