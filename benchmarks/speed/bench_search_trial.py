"""What a merge-search trial costs on the built-in world, and what 100 trials take.

Trains the two parents of ``recipes/search.yaml`` briefly (``ct-lum`` and ``sft-en``, 40
steps each: the cost of a trial does not depend on how long they trained), then runs, in
fresh workdirs sharing those models, a task-arithmetic search of the two weights scored on
``lum/task-dev.jsonl`` (128 multiple-choice items):

* ``1 worker, no pruning``: every trial a full dev evaluation (the merge plus 128 items);
* ``1 worker, pruning``: the default (a quarter of the dev items first);
* ``2 workers, pruning``: two processes on one study.

Each search has ``--trials`` trials (default 100). Reports per setup: the search's wall
time, trials per second, the median trial (merge, then scoring) and the stage's peak RSS;
and, for the memory goal, the tensors the in-memory candidate keeps against the base
model's size, and the peak RSS of the search stage against a plain streamed merge stage
of the same run (the process baseline).

    flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_search_trial.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "papers"))

from _papers import machine  # noqa: E402

SETUPS = {"1 worker, no pruning": {"workers": 1, "prune": False},
          "1 worker, pruning": {"workers": 1, "prune": True},
          "2 workers, pruning": {"workers": 2, "prune": True}}


def parents(work: Path) -> dict[str, Path]:
    from engine.testing.recipes import run_recipe

    recipe = {"name": "parents", "models": {"base": {"builtin": "tiny-base"}}, "stages": [
        {"name": "ct-lum", "stage": "adapt-language", "plugin": "ct", "model": "base",
         "data": {"builtin": "lum/train.txt", "language": "lum"},
         "params": {"steps": 40, "batch_size": 8, "seq_len": 128, "lr": 2e-3, "seed": 0}},
        {"name": "sft-en", "stage": "adapt-language", "plugin": "sft", "model": "base",
         "data": {"builtin": "en/task-train.jsonl"},
         "params": {"steps": 40, "batch_size": 16, "seq_len": 48, "lr": 5e-5, "seed": 0}}]}
    run_recipe(recipe, work)
    return {"ct-lum": work / "ct-lum", "sft-en": work / "sft-en"}


def search_recipe(models: dict[str, Path], trials: int, workers: int, prune: bool) -> dict:
    return {"name": "search-cost", "models": {"base": {"builtin": "tiny-base"},
                                              **{k: {"path": str(v)} for k, v in models.items()}},
            "stages": [
                {"name": "plain", "stage": "merge", "plugin": "task-arithmetic", "base": "base",
                 "models": ["ct-lum", "sft-en"]},
                {"name": "searched", "stage": "merge", "plugin": "task-arithmetic", "base": "base",
                 "models": ["ct-lum", "sft-en"],
                 "search": {"space": {"weight": "auto"},
                            "evaluate": [{"plugin": "task-accuracy",
                                          "data": {"builtin": "lum/task-dev.jsonl", "language": "lum-dev"}}],
                            "objectives": [{"metric": "acc/lum-dev"}], "trials": trials,
                            "workers": workers, "prune": prune, "seed": 0}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "search_trial.json")
    args = ap.parse_args()
    from engine import world
    from engine.core.artifacts import ModelArtifact
    from engine.core.inputs import StageInputs
    from engine.merging.search.candidate import InMemoryMerge
    from engine.testing.builders import make_stage_context
    from engine.testing.recipes import run_recipe

    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    models = parents(work / "parents")
    base = world.model_path("tiny-base")
    base_bytes = (base / "model.safetensors").stat().st_size
    ctx = make_stage_context(work / "mem", "mem", "merge", "task-arithmetic")
    merger = InMemoryMerge(ctx, StageInputs(base=ModelArtifact("base", base),
                                            models=[ModelArtifact(n, p) for n, p in models.items()]))
    kept = merger.memory_bytes()
    del merger
    results = {}
    for label, setup in SETUPS.items():
        t0 = time.perf_counter()
        report = run_recipe(search_recipe(models, args.trials, **setup), work / label.replace(" ", "-").replace(",", ""))
        outside = time.perf_counter() - t0
        stages = {s["name"]: s for s in report["stages"]}
        notes = stages["searched"]["notes"]["search"]
        trials = notes["trials"]
        full = [t for t in trials if t["state"] == "complete"]
        results[label] = {
            "search_s": notes["search_s"], "trials": len(trials), "counts": notes["counts"],
            "trials_per_s": len(trials) / notes["search_s"],
            "median_trial_s": statistics.median(t["seconds"] for t in trials),
            "median_complete_trial_s": statistics.median(t["seconds"] for t in full) if full else None,
            "median_merge_s": statistics.median(t["merge_s"] for t in trials if t.get("merge_s") is not None),
            "stage_wall_s": stages["searched"]["wall_time_s"], "run_outside_s": outside,
            "peak_rss_mb": stages["searched"]["peak_rss_mb"], "plain_merge_peak_rss_mb": stages["plain"]["peak_rss_mb"],
            "best": notes["chosen"]["values"][0],
        }
        print(label, json.dumps(results[label]), file=sys.stderr)
    print(f"\nmerge search cost, {args.trials} trials per setup, {machine()}\n")
    print("| setup | search s | trials/s | median trial s (complete trials) | median merge s | peak RSS MB "
          "(plain merge stage) | best dev acc |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['search_s']:.1f} | {r['trials_per_s']:.2f} | {r['median_trial_s']:.3f} "
              f"({r['median_complete_trial_s']:.3f}) | {r['median_merge_s']:.3f} | {r['peak_rss_mb']:.0f} "
              f"({r['plain_merge_peak_rss_mb']:.0f}) | {r['best']:.3f} |")
    print(f"\nin-memory candidate keeps {kept / 1e6:.1f} MB of tensors = {kept / base_bytes:.2f} x the base "
          f"model's weights ({base_bytes / 1e6:.1f} MB): the live model, the base and one copy per input (2)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "trials": args.trials, "base_bytes": base_bytes,
                                    "kept_bytes": kept, "setups": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
