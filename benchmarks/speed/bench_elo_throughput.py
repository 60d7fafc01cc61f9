"""ELO stage-1 vs full continual pretraining vs a plain PyTorch loop: throughput, a
per-phase profile and peak memory, one run.

All three train the same 16-layer Llama (hidden 256, intermediate 1024, vocab 4096) on
the same document-packed batches (random documents of 8-192 tokens packed into rows with
``position_ids`` restarting at each document, no attention mask, as
:func:`engine.training.packing.document_batch` builds them), same batch and sequence
length, float32, 2 torch threads:

* ``ct``: full CT through the shared loop (:func:`engine.training.train`), every parameter;
* ``elo``: ELO stage 1 through the same loop: layers 0 and 15 in the detached sub-model
  (``embed -> layer 0 -> layer 15 -> norm -> head``, embeddings and head frozen);
* ``plain``: full CT written by hand: ``torch.optim.AdamW`` with torch's defaults (weight
  decay 0, as the loop's default), ``loss.backward()``, the same gradient clipping to 1.0 as
  the loop's default, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``. The baseline the
  loop is held to.

Each measurement runs in a fresh process (its own peak RSS); rounds run CT, ELO, plain,
CT, ELO, plain, ...; ratios are taken within a round, then their median and range over
rounds. Each step is split into phases by hooks that cost the same in every mode
(a timestamp each): ``data`` (batch request to the model call: counting, device moves,
packing inputs), ``forward`` (model call, loss included), ``backward`` (to the last
gradient accumulated), ``clip`` (gradient-norm clipping, up to the optimizer step),
``optimizer`` (``step()``), ``host`` (scheduler, ``zero_grad``, logging, progress: up to
the next batch request). The loop logs every step (``log_every: 1``, its most host work).

The bound printed beside the ratio is a FLOP count of one training step of each:
per token a layer costs 2 x its matmul parameters + 4 x seq x hidden for attention
forward, the head 2 x hidden x vocab; backward costs 2x forward for what trains and
1x (input gradient only) for frozen modules the gradient passes through. It counts
matmul FLOPs only: element-wise work and the optimizer's passes over its state are not
in it. The run also measures the machine: copy bandwidth of a 256 MB and of an 8 MB
buffer and an fp32 matmul rate, against which the phases' traffic and FLOPs are read.

    flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_elo_throughput.py
    flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_elo_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

LAYERS, HIDDEN, VOCAB, INTER = 16, 256, 4096, 1024
MODES = ("ct", "elo", "plain")
#: with --unfused: full CT through the loop with torch's default AdamW (the loop before it took the fused kernel)
UNFUSED = "ct-unfused"
NAMES = {"ct": "full CT (engine)", "elo": "ELO stage 1 (engine)", "plain": "full CT (plain PyTorch)",
         UNFUSED: "full CT (engine, torch's default AdamW)"}
PHASES = ("data", "forward", "backward", "clip", "optimizer", "host")
RESULTS = h.ROOT / "benchmarks" / "results" / "elo_throughput.json"
#: AdamW's least traffic per trained parameter and step: read param, grad, exp_avg,
#: exp_avg_sq, write param, exp_avg, exp_avg_sq (4 bytes each in float32)
ADAMW_MIN_BYTES = 7 * 4


def layer_flops(seq_len: int) -> float:
    """Per-token forward FLOPs of one decoder layer."""
    return 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) + 4 * seq_len * HIDDEN


def step_flops(layers: int, seq_len: int, train_head: bool) -> float:
    """Per-token FLOPs of one training step (forward + backward) of ``layers`` trained
    layers and a head that trains (``train_head``) or only passes the gradient."""
    head = 2 * HIDDEN * VOCAB
    return 3 * layers * layer_flops(seq_len) + (3 if train_head else 2) * head


def forward_flops(layers: int, seq_len: int) -> float:
    return layers * layer_flops(seq_len) + 2 * HIDDEN * VOCAB


def packed_batches(batch: int, seq_len: int, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` document-packed batches of random documents (8-192 tokens each)."""
    from engine.training.packing import document_batch, pack_documents

    rng = random.Random(seed)

    def documents():
        while True:
            yield [rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 192))]

    blocks = pack_documents(documents(), seq_len)
    return [document_batch([next(blocks) for _ in range(batch)]) for _ in range(count)]


class PhaseClock:
    """Timestamps of each step's phases, from hooks on the model, the trained
    parameters and every optimizer's ``step`` (the same hooks in every mode)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.steps: list[dict[str, float]] = []
        self.now: dict[str, float] | None = None
        self.optimizer: dict[str, Any] = {}
        now = time.perf_counter
        model.register_forward_pre_hook(lambda *_: self._mark("fwd0", now(), first=True))
        model.register_forward_hook(lambda *_: self._mark("fwd1", now()))
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _p: self._mark("bwd1", now()))
        register_optimizer_step_pre_hook(self._opt_pre)
        register_optimizer_step_post_hook(lambda *_: self._mark("opt1", now()))

    def _mark(self, key: str, t: float, first: bool = False) -> None:
        if self.now is not None and not (first and key in self.now):
            self.now[key] = t

    def _opt_pre(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._mark("opt0", time.perf_counter())
        if not self.optimizer and self.now is not None:  # a training step's, not a capability probe's
            d = optimizer.defaults
            self.optimizer = {"class": type(optimizer).__name__, "foreach": d.get("foreach"),
                              "fused": d.get("fused"), "weight_decay": [g["weight_decay"] for g in
                                                                        optimizer.param_groups]}

    def batches(self, items: list[dict[str, torch.Tensor]]):
        """The batches, marking a step's start at each request."""
        for item in items:
            self._next()
            yield item
        raise RuntimeError("more batches asked for than the run was given")

    def _next(self) -> None:
        t = time.perf_counter()
        if self.now is not None:
            self.now["end"] = t
            self.steps.append(self.now)
        self.now = {"start": t}

    def phases(self, first: int, count: int) -> dict[str, list[float]]:
        """Seconds of each phase of steps ``first .. first + count - 1``."""
        keys = ("start", "fwd0", "fwd1", "bwd1", "opt0", "opt1", "end")
        out: dict[str, list[float]] = {p: [] for p in PHASES}
        for s in self.steps[first:first + count]:
            missing = [k for k in keys if k not in s]
            if missing:
                raise RuntimeError(f"a step lacks the marks {missing}: the hooks did not all fire")
            for phase, a, b in zip(PHASES, keys, keys[1:]):
                out[phase].append(s[b] - s[a])
        return out


def plain_train(model: torch.nn.Module, batches, steps: int, lr: float) -> None:
    """Full CT by hand: what the loop is held to."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = next(batches)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def child(mode: str, model_dir: Path, steps: int, warmup: int, batch: int, seq_len: int) -> None:
    from engine.models import arch
    from engine.training.loop import TrainerParams, train

    torch.set_num_threads(2)
    base_rss = h.peak_rss_mb()
    if mode == UNFUSED:
        from engine.training import levers

        levers.adamw_kernel = lambda params: ("default", "benchmark: torch's default AdamW")
    if mode == "elo":
        model, _ = arch.load_submodel(model_dir, [0, LAYERS - 1])
        arch.train_only_layers(model, [0, 1])
    else:
        model = h.context(h.scratch(), "load").load_model(model_dir, dtype=torch.float32)
    total = warmup + steps + 1  # the last step is not timed: its end is the loop's wind-down
    clock = PhaseClock(model)
    batches = clock.batches(packed_batches(batch, seq_len, total))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    forward = sum(p.numel() for p in model.parameters())
    if mode == "plain":
        plain_train(model, batches, total, 1e-4)
    else:
        params = TrainerParams(steps=total, batch_size=batch, seq_len=seq_len, lr=1e-4, log_every=1,
                               checkpoint_every=0)
        ctx = h.context(h.scratch(), mode)
        train(ctx, model, batches, params)
        assert (ctx.stats.trainable_params, ctx.stats.forward_params) == (trainable, forward)
    phases = clock.phases(warmup, steps)
    step_times = [sum(v) for v in zip(*phases.values())]
    per_step = sum(step_times) / steps
    print(json.dumps({"tok_s": batch * seq_len / per_step, "step_s": per_step,
                      "phase_ms": {p: 1e3 * sum(v) / steps for p, v in phases.items()},
                      "step_s_all": step_times, "peak_rss_mb": h.peak_rss_mb(),
                      "rss_before_model_mb": base_rss, "trainable": trainable, "forward_params": forward,
                      "optimizer": clock.optimizer, "threads": torch.get_num_threads()}))


def probe_machine() -> dict[str, float]:
    """Copy bandwidth (GB/s, read + write) of a 256 MB and an 8 MB buffer, fp32 matmul GFLOP/s
    at the shape of a layer's MLP projection (1024 tokens x 256 -> 1024): bests of a few tries."""
    torch.set_num_threads(2)

    def best(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    out = {}
    for name, mb, reps in (("copy_gbs_256mb", 256, 5), ("copy_gbs_8mb", 8, 200)):
        a = torch.ones(mb * 2**18)
        b = torch.empty_like(a)
        out[name] = 2 * a.numel() * 4 / best(lambda: b.copy_(a), reps) / 1e9  # noqa: B023
    x, w = torch.randn(1024, HIDDEN), torch.randn(HIDDEN, INTER)
    out["matmul_gflops"] = 2 * 1024 * HIDDEN * INTER / best(lambda: x @ w, 50) / 1e9
    return out


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=8, help="timed steps of full CT and of the plain loop")
    ap.add_argument("--elo-steps", type=int, default=24, help="timed steps of ELO (its steps are short)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps of each run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=4, help="rounds, each CT, ELO, plain in fresh processes")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of a few steps, no JSON")
    ap.add_argument("--unfused", action="store_true", help=f"a fourth mode each round: {NAMES[UNFUSED]}")
    ap.add_argument("--json", type=Path, default=None, help=f"write the results here (default {RESULTS}, "
                    "not with --quick)")
    a = ap.parse_args()
    if a.child == "probe":
        return print(json.dumps(probe_machine()))
    if a.child:
        steps = a.elo_steps if a.child == "elo" else a.steps
        return child(a.child, Path(a.model), steps, a.warmup, a.batch, a.seq_len)
    if a.quick:
        a.steps, a.elo_steps, a.warmup, a.reps = 2, 4, 1, 2
    out_json = a.json or (None if a.quick else RESULTS)
    model = h.build_llama(h.scratch() / "m", layers=LAYERS, hidden=HIDDEN, vocab=VOCAB, intermediate=INTER)
    load_before = os.getloadavg()
    probes = [h.run_child(Path(__file__), "probe", [])]  # a child: the parent's peak RSS is inherited
    args = ["--model", str(model), "--steps", str(a.steps), "--elo-steps", str(a.elo_steps), "--warmup",
            str(a.warmup), "--batch", str(a.batch), "--seq-len", str(a.seq_len)]
    began = time.perf_counter()
    modes = [*MODES, *([UNFUSED] if a.unfused else [])]
    res = h.alternate(Path(__file__), modes, a.reps, args, same_order=True)
    wall = time.perf_counter() - began
    probes.append(h.run_child(Path(__file__), "probe", []))
    load_after = os.getloadavg()
    tokens = a.batch * a.seq_len
    probe = {k: statistics.median(p[k] for p in probes) for k in probes[0]}
    cpu = h.lscpu()
    bound = step_flops(LAYERS, a.seq_len, True) / step_flops(2, a.seq_len, False)
    tok = {m: [r["tok_s"] for r in res[m]] for m in modes}
    ratios = {"ct/plain": spread([c / p for c, p in zip(tok["ct"], tok["plain"])]),
              "elo/plain": spread([e / p for e, p in zip(tok["elo"], tok["plain"])]),
              "elo/ct": spread([e / c for e, c in zip(tok["elo"], tok["ct"])])}
    if a.unfused:
        ratios["ct/ct-unfused"] = spread([c / u for c, u in zip(tok["ct"], tok[UNFUSED])])
    phase = {m: {p: statistics.median(r["phase_ms"][p] for r in res[m]) for p in PHASES} for m in modes}
    flops = {m: step_flops(2, a.seq_len, False) if m == "elo" else step_flops(LAYERS, a.seq_len, True)
             for m in modes}
    fwd_flops = {m: forward_flops(2 if m == "elo" else LAYERS, a.seq_len) for m in modes}
    state: dict[str, dict[str, float]] = {}
    for m in modes:
        r = res[m][0]
        state[m] = {"weights_mb": r["forward_params"] * 4 / 2**20, "grads_mb": r["trainable"] * 4 / 2**20,
                    "adam_state_mb": r["trainable"] * 8 / 2**20,
                    "optimizer_min_gbs": r["trainable"] * ADAMW_MIN_BYTES / (phase[m]["optimizer"] / 1e3) / 1e9,
                    "fwd_gflops": tokens * fwd_flops[m] / (phase[m]["forward"] / 1e3) / 1e9,
                    "fwd_bwd_gflops": tokens * flops[m] / ((phase[m]["forward"] + phase[m]["backward"]) / 1e3) / 1e9}

    machine = (f"{h.cpu_name()} (L2 {cpu.get('L2 cache', '?')}, L3 {cpu.get('L3 cache', '?')}, torch CPU "
               f"capability {torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs, {h.machine()}")
    print(f"\nELO stage 1 vs full CT vs plain PyTorch, {LAYERS}-layer Llama, hidden {HIDDEN}, intermediate "
          f"{INTER}, vocab {VOCAB}, batch {a.batch} x seq {a.seq_len}, document-packed; {a.steps} timed steps "
          f"(ELO {a.elo_steps}) after {a.warmup} warm-up, {a.reps} rounds {', '.join(modes)} (medians); {machine}; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {wall:.0f} s\n")
    print("| run | trainable / forward params | tokens/s | s/step | peak RSS MB | RSS before model MB |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        rows = res[m]
        r = rows[0]
        print(f"| {NAMES[m]} | {r['trainable']:,} / {r['forward_params']:,} | {h.median(rows, 'tok_s'):.0f} | "
              f"{h.median(rows, 'step_s'):.3f} | {h.median(rows, 'peak_rss_mb'):.0f} | "
              f"{h.median(rows, 'rss_before_model_mb'):.0f} |")
    print("\nms per step by phase (median over rounds of each run's mean):\n")
    print("| run | " + " | ".join(PHASES) + " | step |")
    print("|---|" + "---|" * (len(PHASES) + 1))
    for m in modes:
        print(f"| {NAMES[m]} | " + " | ".join(f"{phase[m][p]:.1f}" for p in PHASES)
              + f" | {sum(phase[m].values()):.1f} |")
    print("\n| ratio of tokens/s | median | min-max | rounds |")
    print("|---|---|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | **{v['median']:.3f}** | {v['min']:.3f}-{v['max']:.3f} | "
              f"{', '.join(f'{x:.3f}' for x in v['rounds'])} |")
    ct_plain = ratios["ct/plain"]["median"]
    print(f"\nCT/plain >= 0.90: {'met' if ct_plain >= 0.90 else 'NOT met'} ({ct_plain:.3f}); ELO/CT "
          f"{ratios['elo/ct']['median']:.2f}x against the FLOP-count bound {bound:.2f}x "
          f"({ratios['elo/ct']['median'] / bound:.0%} of it)")
    print(f"\nmachine probes (median of before/after): copy {probe['copy_gbs_256mb']:.1f} GB/s (256 MB), "
          f"{probe['copy_gbs_8mb']:.1f} GB/s (8 MB); matmul {probe['matmul_gflops']:.0f} GFLOP/s\n")
    print("| run | weights MB | grads MB | AdamW state MB | forward GFLOP/s | forward+backward GFLOP/s | "
          "optimizer GB/s at AdamW's least traffic |")
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        s = state[m]
        print(f"| {NAMES[m]} | {s['weights_mb']:.1f} | {s['grads_mb']:.1f} | {s['adam_state_mb']:.1f} | "
              f"{s['fwd_gflops']:.1f} | {s['fwd_bwd_gflops']:.1f} | {s['optimizer_min_gbs']:.1f} |")
    print("\noptimizers: " + "; ".join(f"{m}: {json.dumps(res[m][0]['optimizer'])}" for m in modes))
    cmd = ("flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_elo_throughput.py"
           + (" --quick" if a.quick else f" --steps {a.steps} --elo-steps {a.elo_steps} --warmup {a.warmup} "
              f"--batch {a.batch} --seq-len {a.seq_len} --reps {a.reps}") + (" --unfused" if a.unfused else ""))
    print(f"\ncommand: {cmd}")
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({
            "command": cmd, "machine": machine, "cpu": h.cpu_name(),
            "caches": {k: cpu.get(k) for k in ("L1d cache", "L2 cache", "L3 cache")},
            "load_average": [load_before[0], load_after[0]], "wall_s": wall, "probes": probes,
            "shape": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER, "vocab": VOCAB,
                      "batch": a.batch, "seq_len": a.seq_len},
            "steps": {"ct": a.steps, "plain": a.steps, "elo": a.elo_steps, "warmup": a.warmup, "rounds": a.reps},
            "flop_bound": bound, "ratios": ratios, "phase_ms": phase, "state": state, "runs": res,
        }, indent=1) + "\n")
        print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
