"""benchmarks/speed/gpu_check.py runs at tiny size on the CPU, and what it writes are measurements."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "speed"))

import gpu_check  # noqa: E402

from engine.recipe import estimate  # noqa: E402


def test_gpu_check_tiny_writes_consistent_measurements(tmp_path):
    result = gpu_check.run_check(tmp_path, tiny=True)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["size"] == "tiny" and saved["device"] == "cpu" and saved["wall_s"] > 0
    entry = saved["shapes"]["tiny"]
    shape = estimate.Shape(**{k: v for k, v in entry["shape"].items()})
    micro, seq, steps = gpu_check.RUN["tiny"]
    layer = shape.layer_params
    for case in ("ct", "elo", "ct_frozen_8bit"):
        row = entry[case]
        assert row["tokens"] == steps * micro * seq, case
        assert row["tok_s"] > 0 and row["seconds"] > 0 and row["estimate_gb"] > 0, case
        assert math.isfinite(row["final_loss"]) and abs(row["final_loss"] - math.log(shape.vocab)) < 1, case
        assert row["peak_gb"] is None  # no CUDA: never a made-up GPU figure
    assert entry["ct"]["trainable_params"] == entry["ct"]["forward_params"] == shape.params
    assert entry["elo"]["trainable_params"] == 2 * layer  # the detached first and last layer
    assert entry["elo"]["forward_params"] == 2 * layer + shape.embed_params
    assert entry["ct_frozen_8bit"]["trainable_params"] == 2 * layer
    assert entry["elo_vs_ct_tok_s"] == entry["elo"]["tok_s"] / entry["ct"]["tok_s"]
    assert entry["elo"]["estimate_gb"] < entry["ct"]["estimate_gb"]
    sc = entry["scoring"]
    assert sc["spans"] == 4 * micro and sc["tokens"] == sc["spans"] * seq and sc["tok_s"] > 0
    merge = entry["merge"]
    assert merge["models"] == 4 and merge["cpu_s"] >= merge["cpu_stage_s"] > 0
    assert merge["cpu_output_bytes"] >= shape.params * 2  # the merged model was written (bf16 inputs)
    assert "cuda_s" not in merge
    table = (tmp_path / "gpu_check.md").read_text()
    assert gpu_check.TABLE_HEADER in table
    assert f"| tiny | ct | {entry['ct']['tok_s']:.0f} |" in table
    assert "ELO / CT tokens/s" in table and "TIES merge of 4 models" in table
