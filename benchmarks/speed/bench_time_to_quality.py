"""Time to quality: ELO (stage 1 + alignment) vs full CT on the built-in world.

Both start from ``tiny-base`` and train on ``lum/train.txt`` mixed 9:1 with
``en/train.txt`` (the quickstart's data), batch 16 x 128, with the same loop
(:func:`engine.training.train`). Every few steps the target-language perplexity on
``lum/test.txt`` is measured with the clock paused, in two ways:

* ``ppl`` (packed): the test documents joined with EOS and cut into 128-token blocks,
  exactly the way the trainers pack their text (``engine.training.batching``: ``BOS text EOS``);
* ``ppl_doc`` (document): each document on its own, after BOS, which is what the
  ``perplexity`` evaluation plugin reports (the same engine code computes it).

Full CT is run once per learning rate in ``--ct-lrs``; for each measure, the run with the
lowest final perplexity is the baseline, its final perplexity the target and its wall
time the yardstick. ELO stage 1 trains the detached first and last layers (and, with
``--train-embeddings``, the embedding and head) with the same schedule and warmup, at
``--elo-lr`` (default: the lr of the best CT run by packed perplexity). The sub-model
is built and saved by the ``elo`` plugin's own code, its trained tensors are put back
with ``elo_align.reinsert``, and the full model is fine-tuned on ``mix/align.txt``.
ELO's wall time runs from the start of stage 1 (sub-model loading and saving, the full
model's loading and the reinsertion included). ELO's points after reinsertion are
full-model perplexities; the sub-model's own perplexity during stage 1 is recorded
beside them for information and never counts towards a target.

The figure is the wall time at which ELO's full model first reaches a target, as a
fraction of that target's CT run. Curves are written to ``--out`` (JSON).

Until 2026-11-21 the trainers packed documents as ``text EOS`` while ``tiny-base`` was
pretrained on ``BOS text EOS`` and the plugin scores ``BOS text``; ``engine.training.batching``
now starts every document with BOS, so training and both measures agree.

    flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_time_to_quality.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

#: the two perplexities measured, by their key in a curve point
MEASURES = {"ppl": "packed perplexity", "ppl_doc": "document perplexity"}


def eval_blocks(tokenizer: Any, path: Path, seq_len: int, *, bos: bool = False) -> torch.Tensor:
    """``path``'s documents packed as the trainers pack text: ``text EOS`` (``BOS text EOS``
    with ``bos``), concatenated and cut into ``seq_len`` blocks."""
    from engine.training.batching import pack

    eos, start = tokenizer.eos_token_id, [tokenizer.bos_token_id] if bos else []
    docs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return torch.tensor(list(pack(([*start, *ids, eos] for ids in tokenizer(docs)["input_ids"]), seq_len)))


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


class DocumentPerplexity:
    """The ``perplexity`` plugin's measure on one text file: each document scored on
    its own after BOS (``engine.evaluation.choices.plan_perplexity`` + ``EvalPlan.run``)."""

    def __init__(self, tokenizer: Any, path: Path, label: str, max_length: int = 512) -> None:
        from engine.api import DataSource
        from engine.evaluation.choices import plan_perplexity, read_documents

        source = DataSource(path, language=label)
        texts = read_documents([source], None, "bench")
        self.tokenizer, self.key = tokenizer, f"ppl/{label}"
        self.plan = plan_perplexity(tokenizer, [source], texts, max_length, max_length // 2)

    def __call__(self, model: torch.nn.Module) -> float:
        was = model.training
        metrics, _ = self.plan.run(model, self.tokenizer, batch_size=16, device="cpu")
        model.train(was)
        return float(metrics[self.key])


class Clock:
    """Wall seconds since creation, less the time spent inside :meth:`paused`."""

    def __init__(self) -> None:
        self.start, self.pauses = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.start - self.pauses

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.pauses += time.perf_counter() - t0


class Probe:
    """Wraps a batch stream: before every ``every``-th optimizer step, pause ``clock``
    and measure ``model``'s perplexities; records (wall seconds, step, ppl, ppl_doc)."""

    def __init__(self, batches: Iterator[Any], model: torch.nn.Module, blocks: torch.Tensor,
                 documents: DocumentPerplexity, every: int, grad_accum: int, clock: Clock) -> None:
        self.batches, self.model, self.blocks, self.documents = batches, model, blocks, documents
        self.clock = clock
        self.every, self.grad_accum = every, grad_accum
        self.calls = 0
        self.points: list[dict[str, float]] = []

    def record(self, step: int) -> None:
        wall = self.clock.now()
        with self.clock.paused():
            self.points.append({"wall_s": round(wall, 3), "step": step,
                                "ppl": round(perplexity(self.model, self.blocks), 4),
                                "ppl_doc": round(self.documents(self.model), 4)})

    def __iter__(self) -> Probe:
        return self

    def __next__(self) -> Any:
        if self.calls % self.grad_accum == 0 and (self.calls // self.grad_accum) % self.every == 0:
            self.record(self.calls // self.grad_accum)
        self.calls += 1
        return next(self.batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct-steps", type=int, default=150)
    ap.add_argument("--ct-lrs", default="2e-3,3e-3,4e-3,6e-3",
                    help="comma-separated CT learning rates; the best final ppl is the target")
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine", "linear"],
                    help="lr schedule of CT and ELO stage 1")
    ap.add_argument("--warmup", type=int, default=10, help="warmup steps of CT and ELO stage 1")
    ap.add_argument("--elo-steps", type=int, default=180)
    ap.add_argument("--elo-lr", type=float, default=None, help="ELO stage-1 lr (default: CT's best)")
    ap.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction, default=True,
                    help="ELO stage 1 also trains the embedding and head (elo param train_embeddings)")
    ap.add_argument("--layers", default="0,-1", help="decoder layers ELO detaches (elo param layers)")
    ap.add_argument("--align-steps", type=int, default=10)
    ap.add_argument("--align-lr", type=float, default=1e-3)
    ap.add_argument("--align-schedule", default="constant", choices=["constant", "cosine", "linear"])
    ap.add_argument("--eval-every", type=int, default=10, help="CT and stage-1 probe interval; alignment: /5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "results" / "time_to_quality.json")
    a = ap.parse_args()

    from engine import world
    from engine.api import DataSource
    from engine.models import arch
    from engine.models.modelio import load_tokenizer
    from engine.training.batching import training_batches
    from engine.training.loop import TrainerParams, train
    from engine_plugins.elo import prepare_submodel
    from engine_plugins.elo_align import reinsert

    torch.set_num_threads(2)
    base = world.model_path("tiny-base")
    tok = load_tokenizer(base)
    blocks = eval_blocks(tok, world.data_path("lum/test.txt"), 128, bos=True)
    documents = DocumentPerplexity(tok, world.data_path("lum/test.txt"), "lum")
    en_blocks = eval_blocks(tok, world.data_path("en/test.txt"), 128, bos=True)
    en_documents = DocumentPerplexity(tok, world.data_path("en/test.txt"), "en")
    mix = [DataSource(world.data_path("lum/train.txt"), language="lum", weight=9),
           DataSource(world.data_path("en/train.txt"), language="en", weight=1)]
    hp = {"batch_size": 16, "seq_len": 128, "seed": a.seed, "log_every": 10, "checkpoint_every": 0}
    work = h.scratch()

    def stream(sources: list[DataSource], p: TrainerParams) -> Iterator[Any]:
        return training_batches(tok, sources, seq_len=p.seq_len, batch_size=p.micro_batch_size, seed=p.seed)

    def english(model: torch.nn.Module) -> dict[str, float]:
        return {"ppl": round(perplexity(model, en_blocks), 4), "ppl_doc": round(en_documents(model), 4)}

    base_en = english(h.context(work, "base").load_model(base, dtype=torch.float32))

    # full CT, one run per lr
    ct_runs: dict[str, dict[str, Any]] = {}
    for lr in [float(x) for x in a.ct_lrs.split(",")]:
        ctx = h.context(work, f"ct-{lr:g}")
        model = ctx.load_model(base, dtype=torch.float32)
        p = TrainerParams(steps=a.ct_steps, lr=lr, schedule=a.schedule, warmup_steps=a.warmup, **hp)
        clock = Clock()
        probe = Probe(stream(mix, p), model, blocks, documents, a.eval_every, p.grad_accum, clock)
        train(ctx, model, probe, p)
        probe.record(a.ct_steps)
        last = probe.points[-1]
        ct_runs[f"{lr:g}"] = {"lr": lr, "curve": probe.points, "wall_s": last["wall_s"],
                              "s_per_step": round(last["wall_s"] / a.ct_steps, 4),
                              "final": {k: last[k] for k in MEASURES}, "en": english(model)}
        print(f"CT lr {lr:g}: lum ppl {last['ppl']:.3f} (document {last['ppl_doc']:.3f}) in {last['wall_s']:.1f} s",
              file=sys.stderr)
        del model
    best = {m: min(ct_runs.values(), key=lambda r, m=m: r["final"][m]) for m in MEASURES}

    # ELO stage 1 on the detached sub-model, then reinsertion and alignment, one clock
    elo_lr = a.elo_lr if a.elo_lr is not None else best["ppl"]["lr"]
    clock = Clock()
    layers = [int(x) for x in a.layers.split(",")]
    sub, idx, trained = prepare_submodel(base, layers, train_embeddings=a.train_embeddings)
    p1 = TrainerParams(steps=a.elo_steps, lr=elo_lr, schedule=a.schedule, warmup_steps=a.warmup, **hp)
    sub_probe = Probe(stream(mix, p1), sub, blocks, documents, a.eval_every, p1.grad_accum, clock)
    train(h.context(work, "elo"), sub, sub_probe, p1)
    sub_probe.record(a.elo_steps)
    sub_dir = work / "elo-sub"
    sub.save_pretrained(str(sub_dir))
    stage1_s = clock.now()
    full = h.context(work, "align").load_model(base, dtype=torch.float32)
    n = arch.model_num_layers(full)
    reinsert(full, sub_dir, {"source_num_layers": n, "layer_indices": idx, "trained_tensors": trained})
    pa = TrainerParams(steps=a.align_steps, lr=a.align_lr, schedule=a.align_schedule, **hp)
    align_probe = Probe(stream([DataSource(world.data_path("mix/align.txt"))], pa), full, blocks, documents,
                        max(1, a.eval_every // 5), pa.grad_accum, clock)
    align_start = clock.now()
    train(h.context(work, "align-train"), full, align_probe, pa)
    align_probe.record(a.align_steps)
    elo_points = align_probe.points
    elo_en = english(full)
    align_s_per_step = (elo_points[-1]["wall_s"] - align_start) / a.align_steps

    targets: dict[str, dict[str, Any]] = {}
    for m in MEASURES:
        reached = next((pt for pt in elo_points if pt[m] <= best[m]["final"][m]), None)
        targets[m] = {"target": best[m]["final"][m], "ct_lr": best[m]["lr"], "ct_wall_s": best[m]["wall_s"],
                      "elo_best": min(pt[m] for pt in elo_points), "reached": reached,
                      "fraction": round(reached["wall_s"] / best[m]["wall_s"], 4) if reached else None}
    result = {
        "measures": MEASURES, "targets": targets,
        "base": {k: ct_runs[next(iter(ct_runs))]["curve"][0][k] for k in MEASURES}, "base_en": base_en,
        "ct_runs": ct_runs, "elo": elo_points, "elo_stage1_submodel": sub_probe.points,
        "elo_stage1_s": round(stage1_s, 3), "elo_lr": elo_lr, "elo_trained_tensors": trained, "elo_en": elo_en,
        "s_per_step": {"ct": best["ppl"]["s_per_step"],
                       "elo_stage1": round(sub_probe.points[-1]["wall_s"] / a.elo_steps, 4),
                       "alignment": round(align_s_per_step, 4)},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "machine": h.machine(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))

    emb = " + embedding/head" if a.train_embeddings else ""
    print(f"\nTime to quality on the built-in world (tiny-base, lum 9:1 en, batch 16 x 128, "
          f"{a.schedule} lr, {a.warmup} warmup steps); {h.machine()}\n")
    print("lum and en perplexity: packed (training format) / document (the perplexity plugin's)\n")
    print("| run | lr | steps | wall s (training) | s/step | lum ppl | en ppl |")
    print("|---|---|---|---|---|---|---|")

    def pair(d: dict[str, float]) -> str:
        return f"{d['ppl']:.3f} / {d['ppl_doc']:.3f}"

    print(f"| base model | - | 0 | 0 | - | {pair(result['base'])} | {pair(base_en)} |")
    for r in ct_runs.values():
        mark = "".join(f" (best by {MEASURES[m]})" for m in MEASURES if r is best[m])
        print(f"| full CT{mark} | {r['lr']:g} | {a.ct_steps} | {r['wall_s']:.1f} | {r['s_per_step']:.3f} "
              f"| {pair(r['final'])} | {pair(r['en'])} |")
    print(f"| ELO stage 1 (sub-model, layers {idx}{emb}) | {elo_lr:g} | {a.elo_steps} | {stage1_s:.1f} "
          f"| {result['s_per_step']['elo_stage1']:.3f} | ({pair(sub_probe.points[-1])}, sub-model) | - |")
    print(f"| ELO + alignment (full model) | {a.align_lr:g} | {a.elo_steps} + {a.align_steps} "
          f"| {elo_points[-1]['wall_s']:.1f} | {align_s_per_step:.3f} | {pair(elo_points[-1])} | {pair(elo_en)} |")
    print()
    for m, t in targets.items():
        if t["reached"]:
            print(f"{MEASURES[m]}: ELO reaches CT's final ppl {t['target']:.3f} at {t['reached']['wall_s']:.1f} s "
                  f"(alignment step {t['reached']['step']}, ppl {t['reached'][m]:.3f}) = **{t['fraction']:.0%} of "
                  f"CT's {t['ct_wall_s']:.1f} s**")
        else:
            print(f"{MEASURES[m]}: ELO does NOT reach CT's final ppl {t['target']:.3f} (best {t['elo_best']:.3f})")
    for m in MEASURES:
        print(f"\n{MEASURES[m]} curves (wall s, ppl)")
        print("  CT:", [(x["wall_s"], x[m]) for x in best[m]["curve"]])
        print("  ELO sub-model, stage 1:", [(x["wall_s"], x[m]) for x in sub_probe.points])
        print("  ELO full model, alignment:", [(x["wall_s"], x[m]) for x in elo_points])
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                     if k not in ("out", "train_embeddings") and v is not None)
    flags += " --train-embeddings" if a.train_embeddings else " --no-train-embeddings"
    print(f"\ncurves: {a.out}\ncommand: flock /tmp/lingoforge-bench.lock python "
          f"benchmarks/speed/bench_time_to_quality.py {flags}")


if __name__ == "__main__":
    main()
