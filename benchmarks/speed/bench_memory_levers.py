"""Activation checkpointing: peak activation memory, loss and step time of full CT.

Full continual pretraining of a 16-layer Llama (hidden 256, intermediate 1024, vocab
4096) at seq_len 1024 with the shared loop (:func:`engine.training.train`), with and
without ``gradient_checkpointing``. Each run is a fresh process (``--child off|on``);
the parent alternates them (ABAB) and reports medians.

Memory is read from the kernel, not estimated: the child runs with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor's pages go back to the OS
and the resident set follows the live tensors. At the start of each step (the loop asks
the batch iterator for the step's batch) the child reads its resident set and resets
the kernel's high-water mark (``/proc/self/clear_refs``); at the next step's start it
reads the mark. Their difference is the step's peak memory above what lives between
steps (weights and optimizer state). *Activation memory* is the mark read when the forward
pass returns (a forward hook), before any gradient exists: what the forward holds for the
backward pass (with checkpointing, each layer's input; its insides are recomputed one
layer at a time in the backward pass, which the whole step's peak includes). The whole
step's peak also holds the gradients (freed after every optimizer step).
A second figure, the bytes autograd saves for backward (outside checkpointed regions;
counted with ``torch.autograd.graph.saved_tensors_hooks``, one count per storage), shows
what the forward pass holds. The first training step (it allocates the optimizer state)
is not measured. The losses of both runs are compared step by step.

    flock /tmp/lingoforge-bench.lock nice -n 5 python benchmarks/speed/bench_memory_levers.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

from engine.testing import saved_activation_bytes  # noqa: E402

LAYERS, HIDDEN, VOCAB, INTER = 16, 256, 4096, 1024
MB = 2 ** 20


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes autograd holds for backward after one forward (one count per storage; the
    weights, which autograd saves too, are not counted)."""
    total, out = saved_activation_bytes(model, **batch)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def child(mode: str, model_dir: Path, steps: int, batch: int, seq_len: int) -> None:
    from engine.training import levers
    from engine.training.loop import TrainerParams, train

    torch.set_num_threads(2)
    model = h.context(h.scratch(), "load").load_model(model_dir, dtype=torch.float32)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    checkpointing = mode == "on"

    probe = next(h.random_batches(VOCAB, batch, seq_len, seed=99))
    model.train()
    if checkpointing:
        levers.enable_checkpointing(model, "bench")
    saved = saved_bytes(model, probe)
    if checkpointing:
        levers.disable_checkpointing(model)

    params = TrainerParams(steps=steps, batch_size=batch, seq_len=seq_len, lr=1e-4, log_every=1,
                           checkpoint_every=0, max_grad_norm=1.0, gradient_checkpointing=checkpointing)
    peaks: list[int] = []
    forward_peaks: list[int] = []
    times: list[float] = []

    class Measured:  # the loop asks for one batch at the start of every step
        def __init__(self) -> None:
            self.it = h.random_batches(VOCAB, batch, seq_len)
            self.start: tuple[float, int] | None = None

        def __iter__(self):
            return self

        def __next__(self):
            now, status = time.perf_counter(), _status()
            if self.start is not None:
                times.append(now - self.start[0])
                peaks.append(status["VmHWM"] - self.start[1])
            _reset_peak()
            status = _status()
            self.start = (time.perf_counter(), status["VmRSS"])
            return next(self.it)

    measured = Measured()

    def after_forward(*_: object) -> None:  # no gradient exists yet: this is what the forward holds
        if measured.start is not None:
            forward_peaks.append(_status()["VmHWM"] - measured.start[1])

    model.register_forward_hook(after_forward)
    result = train(h.context(h.scratch(), mode), model, measured, params)
    next(measured)  # closes the last step's window
    # step 1 allocates the optimizer state; the loop's first forward is its loss-scaling probe only
    # when grad_accum > 1, so forward_peaks has one entry per step
    print(json.dumps({"mode": mode, "losses": result.losses, "peak_step_mb": statistics.median(peaks[1:]) / MB,
                      "activation_mb": statistics.median(forward_peaks[1:]) / MB, "grad_mb": grad_bytes / MB,
                      "saved_mb": saved / MB, "step_s": statistics.median(times[1:])}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.model), args.steps, args.batch, args.seq_len)
        return

    model = h.build_llama(h.scratch() / "m", layers=LAYERS, hidden=HIDDEN, vocab=VOCAB, intermediate=INTER)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "2"}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.reps):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model),
                                   "--steps", str(args.steps), "--batch", str(args.batch),
                                   "--seq-len", str(args.seq_len)], capture_output=True, text=True,
                                  timeout=1200, env=env)
            if proc.returncode:
                raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[mode].append(res)
            print(f"  round {r + 1} {mode}: {json.dumps(res)}", file=sys.stderr)

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    diffs = [abs(a - b) for x, y in zip(runs["off"], runs["on"]) for a, b in zip(x["losses"], y["losses"])]
    act_off, act_on = med("off", "activation_mb"), med("on", "activation_mb")
    print(f"{LAYERS}-layer Llama h{HIDDEN} (intermediate {INTER}, vocab {VOCAB}), full CT, batch {args.batch} x "
          f"seq_len {args.seq_len}, {args.steps} steps x {args.reps} runs per mode; {h.machine()}")
    print("| | checkpointing off | on | on / off |")
    print("|---|---:|---:|---:|")
    for key, label in (("activation_mb", "activation memory: peak during the forward pass (MB)"),
                       ("peak_step_mb", "peak of the whole step, gradients included (MB)"),
                       ("saved_mb", "autograd-saved bytes after forward (MB)"),
                       ("step_s", "step time (s)")):
        off, on = med("off", key), med("on", key)
        print(f"| {label} | {off:.1f} | {on:.1f} | {on / off:.2f} |")
    print(f"activation memory reduction: {100 * (1 - act_on / act_off):.1f}%  "
          f"(gradients {med('off', 'grad_mb'):.1f} MB in both)")
    print(f"largest per-step loss difference on vs off: {max(diffs):.2e} (losses {runs['off'][0]['losses']})")


if __name__ == "__main__":
    main()
