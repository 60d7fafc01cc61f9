"""Data-parallel training: ``torchrun --nproc_per_node 2 -m engine run`` on the CPU (gloo)
trains like one process with the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import CHECKPOINTS_DIR, Runner
from engine.training.loop import KILL_ENV

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, tiny_model: Path, text_file: Path) -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: ddp
        models:
          base: {{path: {tiny_model}}}
        runtime: {{device: cpu}}
        stages:
          - name: picked
            stage: select-layers
            plugin: first-last
            model: base
          - name: ct-ends
            stage: adapt-language
            plugin: ct
            model: base
            layers: picked
            data: {{path: {text_file}}}
            params: {{steps: 6, batch_size: 8, grad_accum: 2, seq_len: 16, lr: 3.0e-3, log_every: 2,
                      checkpoint_every: 3}}
        """))
    return f


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ct_first_last_two_cpu_processes_match_one(tmp_path, tiny_model, text_file):
    recipe = _recipe(tmp_path, tiny_model, text_file)
    multi = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--standalone"]
    proc = subprocess.run([*torchrun, "-m", "engine", "run", str(recipe), "--workdir", str(multi)],
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads((multi / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["picked", "ct-ends"]
    assert report["stages"][1]["tokens"] == 6 * 8 * 16  # the global batch, counted once
    leftovers = sorted(p.name for p in multi.iterdir() if p.name.startswith("."))
    # the kept versions and the workdir's marker; no rank temp dirs, no checkpoints
    assert leftovers == [".lingoforge-workdir.json", ".stages"], leftovers
    log = [json.loads(x) for x in (multi / "ct-ends" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 7))  # written once, by rank 0

    torch.set_num_threads(1)
    single = tmp_path / "single"
    plan = plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    Runner(plan, single).run()
    a = load_file(str(multi / "ct-ends" / "model.safetensors"))
    b = load_file(str(single / "ct-ends" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    changed = [k for k in a if not torch.equal(a[k], base[k])]
    assert changed and all(k.startswith(("model.layers.0.", "model.layers.3.")) for k in changed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    single_log = [json.loads(x) for x in (single / "ct-ends" / "train_log.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in log] == pytest.approx([x["loss"] for x in single_log], rel=1e-4)


#: runs engine's CLI under torchrun, counting the reduce-scatters FSDP2 sends (one per
#: sharded module per synced backward pass), in COUNT_DIR/rank<r>
_COUNTING_CLI = """
import os, sys
import torch.distributed as dist
calls = 0
_reduce_scatter = dist.reduce_scatter_single
def _counting(*args, **kwargs):
    global calls
    calls += 1
    return _reduce_scatter(*args, **kwargs)
dist.reduce_scatter_single = _counting
from engine.cli import main
code = main(sys.argv[1:])
with open(os.path.join(os.environ["COUNT_DIR"], "rank" + os.environ["RANK"]), "w") as fh:
    fh.write(str(calls))
sys.exit(code)
"""


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           *args], env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=150)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model) -> tuple[Path, Path, list[int]]:
    """One uninterrupted 2-process FSDP run of a full-CT stage, shared by the FSDP tests:
    (recipe, workdir, reduce-scatters each process sent)."""
    from engine.testing import write_text_file

    root = tmp_path_factory.mktemp("fsdp")
    recipe = root / "fsdp.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: fsdp
        models:
          base: {{path: {tiny_model}}}
        runtime: {{device: cpu, fsdp: true}}
        stages:
          - name: ct-full
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {write_text_file(root / "text.txt")}}}
            params: {{steps: 4, batch_size: 8, grad_accum: 2, seq_len: 16, lr: 3.0e-3, log_every: 2,
                      checkpoint_every: 2}}
        """))
    (root / "cli.py").write_text(_COUNTING_CLI)
    (root / "counts").mkdir()
    workdir = root / "multi"
    proc = _torchrun([str(root / "cli.py"), "run", str(recipe), "--workdir", str(workdir)],
                     COUNT_DIR=str(root / "counts"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return recipe, workdir, [int((root / "counts" / f"rank{r}").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_fsdp_full_ct_two_cpu_processes_match_one(tmp_path, tiny_model, fsdp_run):
    """runtime.fsdp: each process holds half of every parameter, gradient and optimizer state
    (FSDP2 on gloo); the gathered model matches one process's to float rounding. With
    grad_accum 2 the gradients are reduced once per step, not once per micro-batch."""
    recipe, multi, reduce_scatters = fsdp_run
    stage = json.loads((multi / "report.json").read_text())["stages"][0]
    assert stage["notes"]["fsdp_processes"] == 2
    assert "slow_paths" not in stage["notes"]  # checkpoints are saved as without FSDP
    assert not (multi / ".checkpoints").exists()  # saved at step 2, removed after success
    # 4 steps x (4 decoder layers + the root), each one reduce-scatter per step: the first
    # micro-batch of each step runs under no_sync (without it, 40)
    assert reduce_scatters == [4 * 5, 4 * 5]

    torch.set_num_threads(1)
    single = tmp_path / "single"
    plan = plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    Runner(plan, single).run()
    assert "fsdp_processes" not in json.loads((single / "report.json").read_text())["stages"][0]["notes"]
    a = load_file(str(multi / "ct-full" / "model.safetensors"))
    b = load_file(str(single / "ct-full" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    assert a.keys() == b.keys() == base.keys()
    for key in a:
        assert not torch.equal(a[key], base[key]), f"{key} did not train"
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    logs = [[json.loads(x)["loss"] for x in (w / "ct-full" / "train_log.jsonl").read_text().splitlines()]
            for w in (multi, single)]
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_fsdp_killed_stage_resumes_bitwise(tmp_path, tiny_model, fsdp_run):
    """A 2-process FSDP stage SIGKILLed after step 3 left the step-2 checkpoint: the whole
    trainable tensors and optimizer state (gathered from the shards), in the format of an
    unsharded run's. Run again, every process loads its shards of it and the stage ends
    bitwise equal to the uninterrupted FSDP run (same sharding, same reduction order)."""
    recipe, clean, _ = fsdp_run
    killed = tmp_path / "killed"
    proc = _torchrun(["-m", "engine", "run", str(recipe), "--workdir", str(killed)], **{KILL_ENV: "3"})
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert not (killed / "ct-full").exists()
    [ckpt] = (killed / CHECKPOINTS_DIR / "ct-full").glob("*/step-*")
    assert ckpt.name == "step-2" and not list(ckpt.parent.glob(".tmp-*"))
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json", ".jsonl"}  # no pickles
    base = load_file(str(tiny_model / "model.safetensors"))
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}  # whole, not shards
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert sorted(v.numel() for k, v in moments.items() if k.endswith(".exp_avg")) == sorted(
        v.numel() for v in base.values())
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    shutil.copytree(killed, one, symlinks=True)

    proc = _torchrun(["-m", "engine", "run", str(recipe), "--workdir", str(killed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = json.loads((killed / "report.json").read_text())["stages"][0]
    assert stage["notes"]["resumed_from_step"] == 2
    assert stage["tokens"] == 4 * 8 * 16  # the whole stage's
    assert not (killed / CHECKPOINTS_DIR).exists()
    a = load_file(str(killed / "ct-full" / "model.safetensors"))
    b = load_file(str(clean / "ct-full" / "model.safetensors"))
    assert a.keys() == b.keys() == base.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [[json.loads(x) for x in (w / "ct-full" / "train_log.jsonl").read_text().splitlines()]
            for w in (killed, clean)]
    assert [x["step"] for x in logs[0]] == [1, 2, 3, 4]
    assert [x["loss"] for x in logs[0]] == [x["loss"] for x in logs[1]]

    # the checkpoint does not depend on the sharding: one process resumes it too (where
    # runtime.fsdp does nothing), to float rounding, as one process matches two
    torch.set_num_threads(1)
    report = Runner(plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe)), one).run()
    assert report["stages"][0]["notes"]["resumed_from_step"] == 2
    c = load_file(str(one / "ct-full" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(c[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
