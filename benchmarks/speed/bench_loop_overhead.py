"""The shared training loop vs a plain PyTorch loop: same model, batches, optimizer.

The plain loop is what one would write by hand: AdamW, LambdaLR warmup/cosine, grad
clipping, ``loss.backward()``. The engine loop adds accelerate, loss bookkeeping,
logging and the progress/report counters. Both run in this process, alternating
(ABAB...), on an 8-layer Llama (hidden 256, vocab 4096); medians of seconds per step.

    flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_loop_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

VOCAB = 4096


def plain(model: torch.nn.Module, batches, steps: int, lr: float) -> list[float]:
    from engine.training.loop import lr_factor

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total=steps, warmup=1, schedule="cosine"))
    model.train()
    times = []
    for _ in range(steps):
        times.append(time.perf_counter())
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter())
    return times


def engine_loop(model: torch.nn.Module, batches, steps: int, lr: float, work: Path) -> list[float]:
    from engine.training.loop import TrainerParams, train

    times: list[float] = []

    def timed():
        while True:
            times.append(time.perf_counter())
            yield next(batches)

    p = TrainerParams(steps=steps, batch_size=8, seq_len=128, lr=lr, warmup_steps=1, log_every=10,
                      checkpoint_every=0)
    train(h.context(work, "engine"), model, timed(), p)
    times.append(time.perf_counter())
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    work = h.scratch()
    folder = h.build_llama(work / "m", layers=8, hidden=256, vocab=VOCAB)
    per_step: dict[str, list[float]] = {"plain": [], "engine": []}
    for r in range(a.reps):
        for mode in ("plain", "engine") if r % 2 == 0 else ("engine", "plain"):
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            batches = h.random_batches(VOCAB, 8, 128, seed=r)
            t = (plain(model, batches, a.steps, 1e-4) if mode == "plain"
                 else engine_loop(model, batches, a.steps, 1e-4, work))
            per_step[mode].append((t[-1] - t[1]) / (a.steps - 1))  # first step is warm-up
            print(f"  round {r + 1} {mode}: {per_step[mode][-1]:.4f} s/step", file=sys.stderr)
    med = {m: statistics.median(v) for m, v in per_step.items()}
    print(f"\nShared loop vs plain PyTorch, 8-layer Llama hidden 256 vocab 4096, batch 8 x 128, "
          f"{a.steps} steps x {a.reps} alternating rounds (medians); {h.machine()}\n")
    print("| loop | s/step (median) | tokens/s | all rounds s/step |")
    print("|---|---|---|---|")
    for m in ("plain", "engine"):
        print(f"| {m} | {med[m]:.4f} | {8 * 128 / med[m]:.0f} | {', '.join(f'{x:.4f}' for x in per_step[m])} |")
    print(f"\nengine throughput = **{med['plain'] / med['engine']:.1%}** of the plain loop's")
    print(f"\ncommand: flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_loop_overhead.py "
          f"--steps {a.steps} --reps {a.reps}")


if __name__ == "__main__":
    main()
