"""The searched merge against the guessed one, over training seeds, on held-out test data.

Runs ``recipes/search.yaml`` once per seed (the CT and SFT training seeds and the search's
seed all set to it; each seed in its own workdir), and prints, per seed and as mean ± sd:

* lum and English test accuracy (task by choice, 128 items each) of the parents, the
  default task-arithmetic merge (``merge-ta``) and the searched one (``merge-searched``);
* the searched merge minus the default one, with the 95% interval of that difference
  (Newcombe's, for two proportions: conservative for these paired items);
* the search's cost: trials (complete / pruned), seconds, the chosen weights and their
  dev-set score.

    python benchmarks/papers/quickstart_search.py --seeds 0-2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _papers import (  # noqa: E402
    ROOT,
    fmt,
    machine,
    markdown_table,
    metric,
    parse_seeds,
    run_recipe,
    seed_arguments,
    seed_sets,
    stage,
)

from engine.run.report.intervals import newcombe  # noqa: E402

RECIPE = ROOT / "recipes" / "search.yaml"
MODELS = ["base", "ct-lum", "sft-en", "merge-ta", "merge-searched"]
N_ITEMS = 128


def main() -> None:
    args = seed_arguments(__doc__.splitlines()[0], "quickstart_search.json").parse_args()
    import tempfile
    import time

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lingoforge-qs-search-"))
    reports = {}
    for seed in parse_seeds(args.seeds):
        t0 = time.perf_counter()
        sets = [*seed_sets(RECIPE, seed), f"stages.merge-searched.search.seed={seed}", *args.set]
        reports[seed] = run_recipe(RECIPE, work / f"seed{seed}", sets)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    seeds = sorted(reports)
    print(f"\nrecipes/search.yaml, seeds {seeds}, {machine()}\n")
    rows = [[m, *(fmt([metric(reports[s], "task", m, k) for s in seeds]) for k in ("acc/lum", "acc/en"))]
            for m in MODELS]
    print(markdown_table(["model", "acc/lum", "acc/en"], rows))
    per_seed = []
    for s in seeds:
        r = reports[s]
        search = stage(r, "merge-searched")["notes"]["search"]
        row = {"seed": s}
        for key in ("acc/lum", "acc/en"):
            a, b = metric(r, "task", "merge-searched", key), metric(r, "task", "merge-ta", key)
            iv = newcombe(a, N_ITEMS, b, N_ITEMS)
            row[key] = {"searched": a, "default": b, "diff": a - b, "ci95": [iv.low, iv.high]}
        row["search"] = {"trials": len(search["trials"]), **search["counts"], "seconds": search["search_s"],
                         "chosen": search["chosen"], "wall_s": stage(r, "merge-searched")["wall_time_s"]}
        per_seed.append(row)
    print("\nper seed: searched minus default task arithmetic (95% interval of the difference)\n")
    print(markdown_table(
        ["seed", "acc/lum diff", "acc/en diff", "trials (complete/pruned)", "search s", "chosen weights",
         "dev acc/lum-dev"],
        [[row["seed"],
          f"{row['acc/lum']['diff']:+.3f} [{row['acc/lum']['ci95'][0]:+.3f}, {row['acc/lum']['ci95'][1]:+.3f}]",
          f"{row['acc/en']['diff']:+.3f} [{row['acc/en']['ci95'][0]:+.3f}, {row['acc/en']['ci95'][1]:+.3f}]",
          f"{row['search']['trials']} ({row['search']['complete']}/{row['search']['pruned']})",
          f"{row['search']['seconds']:.1f}",
          ", ".join(f"{k} {v:.2f}" for k, v in row["search"]["chosen"]["params"]["weight"].items()),
          f"{row['search']['chosen']['metrics']['acc/lum-dev']:.3f}"] for row in per_seed]))
    for key in ("acc/lum", "acc/en"):
        print(f"\nsearched minus default, {key}: {fmt([row[key]['diff'] for row in per_seed])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "seeds": seeds, "per_seed": per_seed,
                                    "table": {m: {k: [metric(reports[s], "task", m, k) for s in seeds]
                                                  for k in ("acc/lum", "acc/en")} for m in MODELS}},
                                   indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
