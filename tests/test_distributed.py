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

from engine.recipe import load_recipe
from engine.runner import Runner
from engine.validate import plan_recipe

ROOT = Path(__file__).resolve().parents[1]


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
    assert leftovers == [".stages"], leftovers  # the kept versions; no rank temp dirs, no checkpoints
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_fsdp_full_ct_two_cpu_processes_match_one(tmp_path, tiny_model, text_file):
    """runtime.fsdp: each process holds half of every parameter, gradient and optimizer state
    (FSDP2 on gloo); the gathered model matches one process's to float rounding."""
    recipe = tmp_path / "fsdp.yaml"
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
            data: {{path: {text_file}}}
            params: {{steps: 4, batch_size: 8, grad_accum: 2, seq_len: 16, lr: 3.0e-3, log_every: 2,
                      checkpoint_every: 2}}
        """))
    multi = tmp_path / "multi"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "engine", "run", str(recipe), "--workdir", str(multi)],
                          env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = json.loads((multi / "report.json").read_text())["stages"][0]
    assert stage["notes"]["fsdp_processes"] == 2
    assert "checkpoint: fsdp" in stage["notes"]["slow_paths"]

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
