"""Time to quality: ELO (stage 1 + alignment) vs full CT on the built-in world.

Both start from ``tiny-base`` and train on ``lum/train.txt`` mixed 9:1 with
``en/train.txt`` (the quickstart's settings). Every ``--eval-every`` steps the
target-language perplexity on ``lum/test.txt`` is measured with the clock paused, so
each curve is (training wall seconds, ppl). ELO's points come after alignment: stage 1
runs its steps, the layers are put back (``elo_align.reinsert``), and the full model is
fine-tuned on ``mix/align.txt``; its wall time includes stage 1.

The target is full CT's final perplexity; the figure is the wall time at which ELO first
reaches it, against CT's total. Curves are written to ``--out`` (JSON).

    flock /tmp/lingoforge-bench.lock python benchmarks/bench_time_to_quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402


def eval_blocks(tokenizer, path: Path, seq_len: int) -> torch.Tensor:
    from engine.batching import pack

    eos = tokenizer.eos_token_id
    docs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return torch.tensor(list(pack(([*ids, eos] for ids in tokenizer(docs)["input_ids"]), seq_len)))


def perplexity(model: torch.nn.Module, blocks: torch.Tensor) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in blocks.split(16):
            loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
            total += float(loss) * chunk.shape[0]
            n += chunk.shape[0]
    model.train(was)
    return math.exp(total / n)


class Probe:
    """Wraps a batch stream: before each optimizer step k (every ``every``), pause the
    clock and evaluate ``model``; records (wall seconds, step, ppl)."""

    def __init__(self, batches, model, blocks, every: int, grad_accum: int, offset: float = 0.0) -> None:
        self.batches, self.model, self.blocks = batches, model, blocks
        self.every, self.grad_accum, self.offset = every, grad_accum, offset
        self.calls, self.paused, self.start = 0, 0.0, time.perf_counter()
        self.points: list[dict[str, float]] = []

    def wall(self) -> float:
        return self.offset + time.perf_counter() - self.start - self.paused

    def record(self, step: int) -> None:
        t0 = time.perf_counter()
        self.points.append({"wall_s": round(self.wall(), 3), "step": step,
                            "ppl": round(perplexity(self.model, self.blocks), 4)})
        self.paused += time.perf_counter() - t0

    def __iter__(self):
        return self

    def __next__(self):
        if self.calls % self.grad_accum == 0 and (self.calls // self.grad_accum) % self.every == 0:
            self.record(self.calls // self.grad_accum)
        self.calls += 1
        return next(self.batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct-steps", type=int, default=150)
    ap.add_argument("--elo-steps", type=int, default=150)
    ap.add_argument("--align-steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "time_to_quality.json")
    a = ap.parse_args()

    from engine import arch, world
    from engine.api import DataSource
    from engine.batching import training_batches
    from engine.modelio import load_tokenizer
    from engine.training import TrainerParams, train
    from engine_plugins.elo_align import reinsert

    torch.set_num_threads(2)
    base = world.model_path("tiny-base")
    tok = load_tokenizer(base)
    blocks = eval_blocks(tok, world.data_path("lum/test.txt"), 128)
    mix = [DataSource(world.data_path("lum/train.txt"), language="lum", weight=9),
           DataSource(world.data_path("en/train.txt"), language="en", weight=1)]
    hp = {"batch_size": 16, "seq_len": 128, "lr": 2e-3, "seed": 0, "log_every": 10, "checkpoint_every": 0}
    work = h.scratch()

    def stream(sources, p):
        return training_batches(tok, sources, seq_len=p.seq_len, batch_size=p.micro_batch_size, seed=p.seed)

    # full CT
    ct_ctx = h.context(work, "ct")
    ct_model = ct_ctx.load_model(base, dtype=torch.float32)
    p = TrainerParams(steps=a.ct_steps, **hp)
    ct_probe = Probe(stream(mix, p), ct_model, blocks, a.eval_every, p.grad_accum)
    train(ct_ctx, ct_model, ct_probe, p)
    ct_probe.record(a.ct_steps)
    target = ct_probe.points[-1]["ppl"]

    # ELO stage 1 (its sub-model's ppl is not the full model's: no probe), then alignment
    elo_ctx = h.context(work, "elo")
    t0 = time.perf_counter()
    n = arch.num_layers(json.loads((base / "config.json").read_text()))
    sub, idx = arch.load_submodel(base, [0, n - 1])
    arch.train_only_layers(sub, [0, 1])
    p1 = TrainerParams(steps=a.elo_steps, **hp)
    sub = train(elo_ctx, sub, stream(mix, p1), p1).model
    sub_dir = work / "elo-sub"
    sub.save_pretrained(str(sub_dir))
    stage1_s = time.perf_counter() - t0
    full = h.context(work, "align").load_model(base, dtype=torch.float32)
    reinsert(full, sub_dir, {"source_num_layers": n, "layer_indices": idx})
    pa = TrainerParams(steps=a.align_steps, **{**hp, "lr": 5e-4})
    elo_probe = Probe(stream([DataSource(world.data_path("mix/align.txt"))], pa), full, blocks,
                      max(1, a.eval_every // 5), pa.grad_accum, offset=time.perf_counter() - t0)
    train(h.context(work, "align-train"), full, elo_probe, pa)
    elo_probe.record(a.align_steps)

    reached = next((pt for pt in elo_probe.points if pt["ppl"] <= target), None)
    ct_total = ct_probe.points[-1]["wall_s"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"ct": ct_probe.points, "elo": elo_probe.points, "elo_stage1_s": stage1_s,
                                 "target_ppl": target, "base_ppl": ct_probe.points[0]["ppl"],
                                 "machine": h.machine()}, indent=1))
    print(f"\nTime to quality on the built-in world (tiny-base, lum 9:1 en, batch 16 x 128); {h.machine()}\n")
    print("| run | steps | wall s (training) | final lum ppl |")
    print("|---|---|---|---|")
    print(f"| base model | 0 | 0 | {ct_probe.points[0]['ppl']:.2f} |")
    print(f"| full CT | {a.ct_steps} | {ct_total:.1f} | {target:.2f} |")
    print(f"| ELO stage 1 + align | {a.elo_steps} + {a.align_steps} | {elo_probe.points[-1]['wall_s']:.1f} "
          f"(stage 1 {stage1_s:.1f}) | {elo_probe.points[-1]['ppl']:.2f} |")
    if reached:
        print(f"\nELO reaches CT's final ppl {target:.2f} at {reached['wall_s']:.1f} s = "
              f"**{reached['wall_s'] / ct_total:.0%} of CT's wall time** (alignment step {reached['step']})")
    else:
        print(f"\nELO does NOT reach CT's final ppl {target:.2f} (best {min(x['ppl'] for x in elo_probe.points):.2f})")
    print("\nCT curve (wall s, ppl):", [(x["wall_s"], x["ppl"]) for x in ct_probe.points])
    print("ELO curve (wall s, ppl):", [(x["wall_s"], x["ppl"]) for x in elo_probe.points])
    print(f"\ncurves: {a.out}\ncommand: flock /tmp/lingoforge-bench.lock python benchmarks/bench_time_to_quality.py "
          f"--ct-steps {a.ct_steps} --elo-steps {a.elo_steps} --align-steps {a.align_steps} --eval-every {a.eval_every}")


if __name__ == "__main__":
    main()
