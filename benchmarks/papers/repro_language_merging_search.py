"""Reproduction 3 with a merge search: per-language weights found on dev data.

``recipes/papers/language-merging.yaml`` (full fine-tunes) with searched merges added, run
as the reproduction runs it: the initial run (lum has half of its task records), then the
update in the same workdir (lum gets all of them; only ``sft-lum``, the joint model, the
merges and the evaluations run again). Added stages, all task arithmetic over the four
per-language SFT models with ``normalize: true`` (a weighted average of task vectors):

* ``merge-searched``: a weight per language in [0, 2] and ``lambda`` in [0.5, 2];
* ``merge-searched-layers``: the same with ``layer_groups: 3`` (a weight gradient of three
  anchors per language);
* in the update only, ``merge-searched-warm``: ``merge-searched`` started from the initial
  run's study (``warm_start``: its best 4 trials first).

Each search scores a candidate on the four languages' dev questions
(``<lang>/task-dev.jsonl``, never a test question) against the joint model through the
``retention`` evaluator: it maximises ``delta_acc/lum-dev`` (the candidate minus the joint
model on lum) under ``delta_acc/<lang>-dev >= -0.05`` for en, vel and dor. The budget is
``--trials`` (default 40) per search. Test scores (held-out questions) come from the
recipe's ``task`` stage (multiple choice only; its generation sources and the perplexity
stage are left out here to keep the run short). Reports, mean ± sd over seeds, after the update: each merge minus
the joint model per language (target: lum within 5 points, the others staying within 5),
and for the warm start, the trials each search needed to reach the initial study's best dev
value.

    python benchmarks/papers/repro_language_merging_search.py --seeds 0-2
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _papers import (  # noqa: E402
    fmt,
    machine,
    markdown_table,
    mean_sd,
    metric,
    parse_seeds,
    run_recipe,
    seed_arguments,
    seed_sets,
    stage,
)
from repro_language_merging import JOINT, LANGS, MERGES, RECIPE, check_budget, update_sets  # noqa: E402

SEARCHED = ("merge-searched", "merge-searched-layers")
WARM = "merge-searched-warm"
GAP = -0.05


def search_block(trials: int, *, layer_groups: int = 1, warm: Path | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {
        "space": {"weight": "auto", "lambda": "auto"},
        "layer_groups": layer_groups,
        "evaluate": [{"plugin": "retention", "models": [JOINT],
                      "data": [{"builtin": f"{lang}/task-dev.jsonl", "language": f"{lang}-dev"} for lang in LANGS],
                      "params": {"reference": JOINT, "metrics": ["acc"]}}],
        "objectives": [{"metric": "delta_acc/lum-dev", "direction": "maximize"}],
        "constraints": [f"delta_acc/{lang}-dev >= {GAP}" for lang in LANGS if lang != "lum"],
        "trials": trials,
    }
    if warm is not None:
        block.update(warm_start=str(warm), warm_start_trials=4)
    return block


def write_recipe(path: Path, trials: int, warm: Path | None) -> Path:
    data = yaml.safe_load(RECIPE.read_text())
    merges = [{"name": name, "stage": "merge", "plugin": "task-arithmetic", "base": "base",
               "models": [f"sft-{lang}" for lang in LANGS], "params": {"normalize": True},
               "search": search_block(trials, layer_groups=3 if name.endswith("layers") else 1)}
              for name in SEARCHED]
    if warm is not None:
        merges.append({**merges[0], "name": WARM, "search": search_block(trials, warm=warm)})
    # scored by multiple choice only (the table this script prints): the generation sources
    # and the perplexity stage of the reproduction are left out, to keep the run short
    data["stages"] = [s for s in data["stages"] if s["name"] != "perplexity"]
    at = next(i for i, s in enumerate(data["stages"]) if s["stage"] == "evaluate")
    data["stages"][at:at] = merges
    for s in data["stages"]:
        if s["stage"] == "evaluate":
            s["models"] = [*s["models"], *(m["name"] for m in merges)]
            s["data"] = [d for d in s["data"] if d["builtin"].endswith("task-test.jsonl")]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trials_to_reach(search: dict[str, Any], target: float) -> int | None:
    """The number of trials after which the best feasible dev value reached ``target``."""
    best = None
    for i, t in enumerate(sorted(search["trials"], key=lambda t: t["number"]), 1):
        if t.get("feasible") and t.get("values"):
            best = t["values"][0] if best is None else max(best, t["values"][0])
        if best is not None and best >= target - 1e-12:
            return i
    return None


def one_seed(seed: int, work: Path, budget: dict[str, Any], trials: int, extra: list[str]) -> dict[str, Any]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    sets = [*seed_sets(RECIPE, seed), *(f"stages.{m}.search.seed={seed}" for m in SEARCHED), *extra]
    first = run_recipe(write_recipe(work / "initial.yaml", trials, None), work / "run", sets)
    study = work / "initial-study.db"
    shutil.copyfile(work / "run" / ".search" / "merge-searched.db", study)
    update = write_recipe(work / "update.yaml", trials, study)
    second = run_recipe(update, work / "run", [*sets, f"stages.{WARM}.search.seed={seed}", *update_sets(budget)])
    ran = [s["name"] for s in second["stages"] if s.get("cache") == "miss" and s["name"].startswith("sft")]
    if sorted(ran) != sorted(["sft-lum", JOINT]):
        raise RuntimeError(f"the update re-trained {ran}, expected only sft-lum and {JOINT}")
    out: dict[str, Any] = {"seed": seed, "scores": {}, "searches": {}}
    for m in (JOINT, *MERGES, *SEARCHED, WARM):
        out["scores"][m] = {lang: metric(second, "task", m, f"acc/{lang}") for lang in LANGS}
    initial_best = stage(first, "merge-searched")["notes"]["search"]["chosen"]["values"][0]
    for name in (*SEARCHED, WARM):
        s = stage(second, name)["notes"]["search"]
        out["searches"][name] = {"trials": len(s["trials"]), **s["counts"], "seconds": s["search_s"],
                                 "chosen": s["chosen"], "reach_initial_best": trials_to_reach(s, initial_best)}
    out["initial_best_dev"] = initial_best
    out["initial_search"] = {n: {"seconds": stage(first, n)["notes"]["search"]["search_s"],
                                 "chosen": stage(first, n)["notes"]["search"]["chosen"]} for n in SEARCHED}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = seed_arguments(__doc__.split("\n\n")[0], "repro_language_merging_search.json")
    ap.add_argument("--trials", type=int, default=40, help="trials per search (default 40)")
    args = ap.parse_args(argv)
    budget = check_budget()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="repro-lm-search-"))
    results = []
    t0 = time.perf_counter()
    for seed in parse_seeds(args.seeds):
        t = time.perf_counter()
        results.append(one_seed(seed, root / f"seed{seed}", budget, args.trials, args.set))
        print(f"seed {seed}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    seeds = [r["seed"] for r in results]
    print(f"\nlanguage merging with search, seeds {seeds}, {args.trials} trials per search, {machine()}\n")
    print("Test accuracy after the update (multiple choice, 128 held-out questions per language):\n")
    models = (JOINT, *MERGES, *SEARCHED, WARM)
    print(markdown_table(["model", *LANGS], [[m, *(fmt([r["scores"][m][lang] for r in results]) for lang in LANGS)]
                                              for m in models]))
    print("\nMerged minus joint after the update, points (target: lum within 5, the others within 5):\n")
    gaps = {}
    rows = []
    for m in (*MERGES, *SEARCHED, WARM):
        row = [m]
        for lang in LANGS:
            d = [100 * (r["scores"][m][lang] - r["scores"][JOINT][lang]) for r in results]
            gaps[f"{m}/{lang}"] = mean_sd(d)
            row.append(fmt(d, 1))
        rows.append(row)
    print(markdown_table(["merge", *LANGS], rows))
    print("\nSearches in the update (trials, complete/pruned, seconds, trials to reach the initial study's best dev value):\n")
    rows = []
    for name in (*SEARCHED, WARM):
        got = [r["searches"][name] for r in results]
        reach = [g["reach_initial_best"] for g in got]
        rows.append([name, fmt([g["trials"] for g in got], 1), fmt([g["complete"] for g in got], 1) + " / "
                     + fmt([g["pruned"] for g in got], 1), fmt([g["seconds"] for g in got], 1),
                     ", ".join("not reached" if x is None else str(x) for x in reach)])
    print(markdown_table(["search", "trials", "complete / pruned", "seconds", "trials to initial best (per seed)"],
                         rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "seeds": seeds, "trials": args.trials,
                                    "overrides": args.set, "results": results,
                                    "gaps_points": gaps, "wall_s": time.perf_counter() - t0}, indent=1))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
