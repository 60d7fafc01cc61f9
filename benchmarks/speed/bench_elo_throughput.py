"""ELO stage-1 vs full continual pretraining: throughput and peak memory, one run.

Both train the same 16-layer Llama (hidden 256, vocab 4096) with the shared loop
(:func:`engine.training.train`), same batch and sequence length. Full CT trains every
parameter of the full model; ELO trains layers 0 and 15 in the detached sub-model
(``embed -> layer 0 -> layer 15 -> norm -> head``, embeddings and head frozen). Each
measurement runs in a fresh process (its own peak RSS), alternating CT/ELO; medians.

The bound printed beside the ratio is a FLOP count of one training step of each:
per token a layer costs 2 x its matmul parameters + 4 x seq x hidden for attention
forward, the head 2 x hidden x vocab; backward costs 2x forward for what trains and
1x (input gradient only) for frozen modules the gradient passes through.

    flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_elo_throughput.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

LAYERS, HIDDEN, VOCAB, INTER = 16, 256, 4096, 1024


def step_flops(layers: int, seq_len: int, train_head: bool) -> float:
    """Per-token FLOPs of one training step (forward + backward) of ``layers`` trained
    layers and a head that trains (``train_head``) or only passes the gradient."""
    layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) + 4 * seq_len * HIDDEN
    head = 2 * HIDDEN * VOCAB
    return 3 * layers * layer + (3 if train_head else 2) * head


def child(mode: str, model_dir: Path, steps: int, batch: int, seq_len: int) -> None:
    from engine.models import arch
    from engine.training.loop import TrainerParams, train

    torch.set_num_threads(2)
    base_rss = h.peak_rss_mb()
    if mode == "ct":
        model = h.context(h.scratch(), "load").load_model(model_dir, dtype=torch.float32)
    else:
        model, _ = arch.load_submodel(model_dir, [0, LAYERS - 1])
        arch.train_only_layers(model, [0, 1])
    params = TrainerParams(steps=steps + 2, batch_size=batch, seq_len=seq_len, lr=1e-4, log_every=1,
                           checkpoint_every=0)
    ctx = h.context(h.scratch(), mode)
    times: list[float] = []

    class Timed:  # times each step from the batch requests (the loop asks one per step)
        def __init__(self) -> None:
            self.it = h.random_batches(VOCAB, batch, seq_len)

        def __iter__(self):
            return self

        def __next__(self):
            times.append(time.perf_counter())
            return next(self.it)

    train(ctx, model, Timed(), params)
    times.append(time.perf_counter())
    per_step = (times[-1] - times[2]) / steps  # two warm-up steps excluded
    print(json.dumps({"tok_s": batch * seq_len / per_step, "step_s": per_step, "peak_rss_mb": h.peak_rss_mb(),
                      "rss_before_model_mb": base_rss, "trainable": ctx.stats.trainable_params,
                      "forward_params": ctx.stats.forward_params}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    if a.child:
        return child(a.child, Path(a.model), a.steps, a.batch, a.seq_len)
    model = h.build_llama(h.scratch() / "m", layers=LAYERS, hidden=HIDDEN, vocab=VOCAB, intermediate=INTER)
    args = ["--model", str(model), "--steps", str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len)]
    res = h.alternate(Path(__file__), ["ct", "elo"], a.reps, args)
    ct, elo = h.median(res["ct"], "tok_s"), h.median(res["elo"], "tok_s")
    bound = step_flops(LAYERS, a.seq_len, True) / step_flops(2, a.seq_len, False)
    print(f"\nELO stage 1 vs full CT, {LAYERS}-layer Llama, hidden {HIDDEN}, vocab {VOCAB}, batch {a.batch} x "
          f"seq {a.seq_len}, {a.steps} timed steps, {a.reps} alternating rounds (medians); {h.machine()}\n")
    print("| run | trainable / forward params | tokens/s | s/step | peak RSS MB | RSS before model MB |")
    print("|---|---|---|---|---|---|")
    for name, rows in (("full CT", res["ct"]), ("ELO stage 1", res["elo"])):
        r = rows[0]
        print(f"| {name} | {r['trainable']:,} / {r['forward_params']:,} | {h.median(rows, 'tok_s'):.0f} | "
              f"{h.median(rows, 'step_s'):.3f} | {h.median(rows, 'peak_rss_mb'):.0f} | "
              f"{h.median(rows, 'rss_before_model_mb'):.0f} |")
    print(f"\nspeedup ELO/CT: **{elo / ct:.2f}x** (FLOP-count bound {bound:.2f}x, "
          f"{elo / ct / bound:.0%} of it)")
    print("\ncommand: flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_elo_throughput.py "
          f"--steps {a.steps} --batch {a.batch} --seq-len {a.seq_len} --reps {a.reps}")


if __name__ == "__main__":
    main()
