"""Shared pieces of the training benchmarks: a random Llama of a given shape, a
StageContext without a runner, and a fresh-process runner for peak-memory figures.

Each measured run happens in its own subprocess (``python bench_x.py --child MODE``), so
its peak RSS is its own; the parent alternates modes (ABAB...) so that load from other
users of the machine hits every mode alike, and reports medians.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def build_llama(folder: Path, *, layers: int, hidden: int, vocab: int, intermediate: int | None = None,
                seed: int = 0) -> Path:
    """A random Llama saved as an HF folder (no tokenizer: benchmarks feed token ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def context(workdir: Path, name: str) -> Any:
    from engine.run.context import StageContext
    from engine.run.runtime import Runtime

    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(run_name="bench", stage_name=name, stage_kind="adapt-language", plugin="bench",
                        workdir=workdir, output_dir=out, runtime=Runtime(device="cpu"))


def random_batches(vocab: int, batch: int, seq_len: int, seed: int = 0):
    """Endless random token batches (throughput does not depend on the text)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, mode: str, args: list[str]) -> dict[str, Any]:
    """Run ``script --child mode args`` and parse the JSON line it prints last."""
    proc = subprocess.run([sys.executable, str(script), "--child", mode, *args], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(script: Path, modes: list[str], reps: int, args: list[str], *,
              same_order: bool = False) -> dict[str, list[dict[str, Any]]]:
    """ABBA...: ``reps`` rounds, each running every mode once in a fresh process; the
    order reverses every other round unless ``same_order`` (ABCABC...)."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(reps):
        for m in modes if r % 2 == 0 or same_order else list(reversed(modes)):
            res = run_child(script, m, args)
            results[m].append(res)
            print(f"  round {r + 1} {m}: {json.dumps(res)}", file=sys.stderr)
    return results


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {date.today().isoformat()}")


def lscpu() -> dict[str, str]:
    """``lscpu``'s fields (``Model name``, ``L2 cache``, ``Flags`` ...); empty where it is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def cpu_name() -> str:
    return lscpu().get("Model name") or platform.processor() or "unknown CPU"


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="lingoforge-bench-"))
