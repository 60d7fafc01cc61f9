"""GPU check: CT vs ELO stage-1 throughput and peak memory, CT with 8-bit frozen layers,
a 4-model merge on the GPU against the CPU, and scoring throughput, on random
Llama-shape models (nothing is downloaded), through the engine's own code paths.

The command to run on one lent GPU (meant to end within 8 minutes: a shape not begun
after ``--time-limit`` seconds is skipped, and said so; never timed on a GPU yet; writes
``gpu_check.json`` and ``gpu_check.md`` into the folder given), from the repository
root, in a Python with a CUDA build of torch and the project's dependencies (the
``8bit`` extra included); the first part installs the engine itself without network::

    python -c "import torch; assert torch.cuda.is_available(), torch.__version__" \
      && pip install --no-deps --no-build-isolation -e . \
      && python benchmarks/speed/gpu_check.py --out "$OUT/gpu_check" --time-limit 420

(``nox -s gpu`` runs the same.) On a machine without CUDA, or with ``--tiny``, the
same code runs at tiny size on the CPU (tests/test_gpu_check.py does, in seconds):
those figures measure nothing about GPUs and are labelled ``"size": "tiny"``.

What runs, per shape (``1b``: hidden 2048, 16 layers, 32 heads, 8 kv heads,
intermediate 8192, vocab 128256; ``8b-8l``: Llama-3.1-8B's layer shape with 8 of its
32 layers, when the device has room for it):

* ``ct``: full continual training through :func:`engine.training.train` (float32
  master weights, bf16 autocast on CUDA, AdamW), tokens/s of the last half of the
  steps and peak allocated GPU memory;
* ``elo``: ELO stage 1, the sub-model of the first and last layer built by the elo
  plugin's :func:`prepare_submodel`, trained by the same loop;
* ``ct_frozen_8bit``: first and last layer trained, the rest loaded in 8 bits
  (bitsandbytes LLM.int8) through :meth:`StageContext.load_model`;
* ``merge``: TIES of 4 fine-tuned copies onto the base through the runner's merge
  stage, ``params.device`` cuda against cpu (wall seconds, the same output);
* ``scoring``: :func:`engine.evaluation.scoring.score_spans` over random spans, tokens/s;
* next to every training figure, :mod:`engine.recipe.estimate`'s peak estimate for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GiB = 1024**3
SHAPES: dict[str, dict[str, int]] = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
    "8b-8l": dict(hidden=4096, layers=8, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=176, vocab=512),
}
#: (micro-batch, seq_len, steps) per size
RUN = {"gpu": (4, 2048, 12), "tiny": (2, 64, 6)}


def build(folder: Path, shape: dict[str, int], seed: int, dtype: torch.dtype) -> Path:
    """A random Llama of ``shape`` saved as an HF folder (safetensors, no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(str(folder))
    return folder


def batches(vocab: int, micro: int, seq: int, seed: int = 0):
    """Endless random micro-batches in the loop's format (CPU tensors)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (micro, seq), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # the CPU allocator keeps no peak; process RSS is reported once, labelled
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GiB


def train_case(name: str, work: Path, source: Path, shape: dict[str, int], device: torch.device,
               *, elo: bool = False, frozen_8bit: bool = False) -> dict[str, Any]:
    """One training case through the engine's loop; tokens/s of the second half of the steps."""
    from engine.models import arch
    from engine.recipe import estimate
    from engine.testing.builders import make_stage_context
    from engine.training.loop import LOG_FILE, TrainerParams, train
    from engine_plugins.elo import prepare_submodel

    micro, seq, steps = RUN["gpu" if device.type == "cuda" else "tiny"]
    mixed = "bf16" if device.type == "cuda" else "no"
    params = TrainerParams(steps=steps, batch_size=micro, seq_len=seq, lr=1e-5, log_every=steps // 2,
                           checkpoint_every=0, mixed_precision=mixed)
    ctx = make_stage_context(work, name, device=str(device))
    _reset(device)
    ends = [0, shape["layers"] - 1]
    if elo:
        model, _, _ = prepare_submodel(source, ends, dtype=torch.float32, device=device)
    elif frozen_8bit:
        model = ctx.load_model(source, dtype=torch.float32, load_in_8bit=True,
                               int8_skip_modules=[f"model.layers.{i}" for i in ends])
        arch.train_only_layers(model, ends)
    else:
        model = ctx.load_model(source, dtype=torch.float32)
    loaded_gb = _peak_gb(device)
    result = train(ctx, model, batches(shape["vocab"], micro, seq), params)
    lines = [json.loads(x) for x in (ctx.output_dir / LOG_FILE).read_text().splitlines()]
    peak = _peak_gb(device)
    est_shape = estimate.Shape(**{k: shape[k] for k in ("hidden", "layers", "heads", "kv_heads",
                                                        "intermediate", "vocab")})
    setup = estimate.TrainSetup(
        micro_batch=micro, seq_len=seq, model_layers=2 if elo else shape["layers"],
        trained_layers=tuple(range(2)) if elo else tuple(ends) if frozen_8bit else tuple(range(shape["layers"])),
        train_embeddings=not (elo or frozen_8bit), frozen_8bit=frozen_8bit, mixed_precision=mixed == "bf16")
    out = {"steps": steps, "micro_batch": micro, "seq_len": seq, "tokens": result.state.tokens,
           "tok_s": lines[-1]["tok_s"], "seconds": result.seconds, "final_loss": result.losses[-1],
           "trainable_params": ctx.stats.trainable_params, "forward_params": ctx.stats.forward_params,
           "peak_gb": peak, "after_load_gb": loaded_gb,
           "estimate_gb": estimate.estimate_training(est_shape, setup).total / GiB}
    del model, result
    _reset(device)
    return out


def merge_case(work: Path, base: Path, shape: dict[str, int], devices: list[str]) -> dict[str, Any]:
    """TIES of 4 models onto ``base`` through the runner, once per device."""
    from engine.testing.recipes import run_recipe

    models = {"base": {"path": str(base)}}
    for k in range(4):
        models[f"m{k}"] = {"path": str(build(work / f"m{k}", shape, seed=10 + k, dtype=torch.bfloat16))}
    out: dict[str, Any] = {"models": 4, "method": "ties"}
    for device in devices:
        recipe = {"name": f"merge-{device}", "runtime": {"device": device}, "models": models,
                  "stages": [{"name": "merged", "stage": "merge", "plugin": "ties", "base": "base",
                              "models": [f"m{k}" for k in range(4)],
                              "params": {"density": 0.5, "device": device}}]}
        began = time.perf_counter()
        report = run_recipe(recipe, work / f"merge-{device}", use_cache=False)
        out[f"{device}_s"] = time.perf_counter() - began
        out[f"{device}_stage_s"] = report["stages"][0]["wall_time_s"]
        out[f"{device}_output_bytes"] = sum(p.stat().st_size for p in (work / f"merge-{device}" / "merged")
                                            .glob("*.safetensors"))
    return out


def scoring_case(source: Path, shape: dict[str, int], device: torch.device) -> dict[str, Any]:
    """:func:`engine.evaluation.scoring.score_spans` over random spans: tokens/s (second pass timed)."""
    from engine.evaluation.scoring import score_spans
    from engine.evaluation.spans import Span
    from engine.models import modelio

    micro, seq, _ = RUN["gpu" if device.type == "cuda" else "tiny"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = modelio.load_model(source, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(1)
    spans = [Span(tuple(torch.randint(0, shape["vocab"], (seq + 1,), generator=gen).tolist()), seq)
             for _ in range(micro * 4)]
    score_spans(model, spans[:micro], batch_size=micro, device=device, pad_id=0)  # warm-up
    _reset(device)
    began = time.perf_counter()
    scores = score_spans(model, spans, batch_size=micro, device=device, pad_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens = len(spans) * seq
    out = {"spans": len(scores), "tokens": tokens, "tok_s": tokens / seconds, "peak_gb": _peak_gb(device),
           "batch_size": micro, "dtype": str(dtype).removeprefix("torch.")}
    del model
    _reset(device)
    return out


def fits(shape: dict[str, int], device: torch.device) -> bool:
    """Whether full CT of ``shape`` (fp32 weights + AdamW + activations) fits the device."""
    if device.type != "cuda":
        return True
    from engine.recipe import estimate

    micro, seq, _ = RUN["gpu"]
    s = estimate.Shape(**{k: shape[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab")})
    need = estimate.estimate_training(s, estimate.TrainSetup(
        micro_batch=micro, seq_len=seq, model_layers=s.layers, trained_layers=tuple(range(s.layers)),
        mixed_precision=True)).total
    return need < torch.cuda.get_device_properties(0).total_memory * estimate.HEADROOM


def run_check(out_dir: Path, *, tiny: bool, time_limit: float = 420.0) -> dict[str, Any]:
    """Every case; returns what is written to ``gpu_check.json``."""
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    size = "gpu" if device.type == "cuda" else "tiny"
    names = ["1b", "8b-8l"] if size == "gpu" else ["tiny"]
    if size == "tiny":  # tiny matmuls on a shared CPU: one thread keeps figures steady
        torch.set_num_threads(1)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    result: dict[str, Any] = {
        "size": size, "device": torch.cuda.get_device_name(0) if size == "gpu" else "cpu", "cpu": cpu,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "shapes": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        for name in names:
            shape = SHAPES[name]
            entry: dict[str, Any] = {"shape": shape}
            result["shapes"][name] = entry
            if not fits(shape, device):
                entry["skipped"] = "full CT does not fit this device's memory (engine.recipe.estimate)"
                continue
            if time.perf_counter() - began > time_limit:
                entry["skipped"] = f"time limit {time_limit:.0f}s reached"
                continue
            source = build(work / f"{name}-base", shape, seed=0, dtype=torch.float32)
            entry["ct"] = train_case(f"{name}-ct", work, source, shape, device)
            entry["elo"] = train_case(f"{name}-elo", work, source, shape, device, elo=True)
            entry["elo_vs_ct_tok_s"] = entry["elo"]["tok_s"] / entry["ct"]["tok_s"]
            entry["ct_frozen_8bit"] = train_case(f"{name}-ct8", work, source, shape, device, frozen_8bit=True)
            entry["scoring"] = scoring_case(source, shape, device)
            if name == names[0]:
                merge = merge_case(work, source, shape, ["cuda", "cpu"] if device.type == "cuda" else ["cpu"])
                if "cuda_s" in merge:
                    merge["cpu_vs_cuda"] = merge["cpu_s"] / merge["cuda_s"]
                entry["merge"] = merge
                for k in range(4):
                    shutil.rmtree(work / f"m{k}", ignore_errors=True)
            shutil.rmtree(source, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["wall_s"] = time.perf_counter() - began
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(result))
    return result


TABLE_HEADER = ("| shape | case | tokens/s | peak GB (measured) | peak GB (estimate) | trainable params |\n"
                "|---|---|---|---|---|---|\n")


def _gb(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The markdown table of a result (what docs/benchmarks.md shows)."""
    lines = [f"GPU check ({result['size']}, {result['device']}; CPU {result['cpu']}; torch {result['torch']}; "
             f"{result['date']}; {result['wall_s']:.0f} s)\n\n", TABLE_HEADER]
    for name, entry in result["shapes"].items():
        if "skipped" in entry:
            lines.append(f"| {name} | all | skipped: {entry['skipped']} | | | |\n")
            continue
        for case in ("ct", "elo", "ct_frozen_8bit"):
            row = entry[case]
            if "skipped" in row:
                lines.append(f"| {name} | {case} | skipped: {row['skipped']} | | | |\n")
                continue
            lines.append(f"| {name} | {case} | {row['tok_s']:.0f} | {_gb(row['peak_gb'])} | "
                         f"{row['estimate_gb']:.3g} | {row['trainable_params']:,} |\n")
        sc = entry["scoring"]
        lines.append(f"| {name} | scoring ({sc['dtype']}) | {sc['tok_s']:.0f} | {_gb(sc['peak_gb'])} | | |\n")
        lines.append(f"\n{name}: ELO / CT tokens/s = {entry['elo_vs_ct_tok_s']:.2f}\n")
        if "merge" in entry:
            m = entry["merge"]
            cuda = f"{m['cuda_s']:.1f} s on CUDA, " if "cuda_s" in m else ""
            lines.append(f"{name}: TIES merge of 4 models: {cuda}{m['cpu_s']:.1f} s on the CPU\n")
        lines.append("\n| shape | case | tokens/s | peak GB (measured) | peak GB (estimate) | trainable params |\n"
                     "|---|---|---|---|---|---|\n" if name != list(result["shapes"])[-1] else "")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (automatic without CUDA)")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="skip the remaining shapes after this many seconds")
    args = parser.parse_args(argv)
    result = run_check(args.out, tiny=args.tiny, time_limit=args.time_limit)
    sys.stdout.write((args.out / "gpu_check.md").read_text())
    return 0 if result["shapes"] else 1


if __name__ == "__main__":
    sys.exit(main())
