"""The quickstart over seeds: its final table as mean ± sd.

Runs ``recipes/quickstart.yaml`` once per seed (every seeded stage gets the seed, see
``benchmarks/papers/_papers.py``), each in its own workdir, and prints every model's target-
and source-language figures, plus the gap between the best merge and the better of its
two parents (``ct-lum`` and ``sft-en``) on the target-language task.

    python benchmarks/papers/quickstart_seeds.py --seeds 0-2
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
    mean_sd,
    metric,
    run_seeds,
    seed_arguments,
    stage,
)

RECIPE = ROOT / "recipes" / "quickstart.yaml"
MODELS = ["base", "elo-lum-aligned", "ct-lum", "sft-en", "merge-ta", "merge-ties", "merge-slack-ties"]
MERGES = ["merge-ta", "merge-ties", "merge-slack-ties"]
PARENTS = ["ct-lum", "sft-en"]
COLUMNS = [("task", "acc/lum"), ("task", "exact_match/lum"), ("perplexity", "ppl/lum"),
           ("task", "acc/en"), ("task", "exact_match/en"), ("perplexity", "ppl/en")]


def main() -> None:
    args = seed_arguments(__doc__.splitlines()[0], "quickstart_seeds.json").parse_args()
    reports = run_seeds(RECIPE, args, "lingoforge-qs-seeds-")
    seeds = sorted(reports)

    def col(model: str, ev: str, key: str) -> list[float]:
        return [metric(reports[s], ev, model, key) for s in seeds]

    rows = [[m, *(fmt(col(m, ev, k)) for ev, k in COLUMNS)] for m in MODELS]
    header = ["model", *(k for _, k in COLUMNS)]
    print(f"\nquickstart, seeds {seeds}, {machine()}\n")
    print(markdown_table(header, rows))
    gaps = {}
    for key in ("acc/lum", "exact_match/lum"):
        per_seed = []
        for s in seeds:
            best_merge = max(metric(reports[s], "task", m, key) for m in MERGES)
            better_parent = max(metric(reports[s], "task", m, key) for m in PARENTS)
            per_seed.append(best_merge - better_parent)
        gaps[key] = per_seed
        print(f"\nbest merge minus better parent, {key}: {fmt(per_seed)} (per seed: "
              + ", ".join(f"{g:+.3f}" for g in per_seed) + ")")
    wall = [reports[s]["wall_time_s"] for s in seeds]
    print(f"run wall time per seed (world cached): {fmt(wall, 1)} s")
    result = {
        "machine": machine(), "seeds": seeds, "recipe": str(RECIPE.relative_to(ROOT)),
        "overrides": args.set, "metrics": {m: {f"{ev}:{k}": col(m, ev, k) for ev, k in COLUMNS} for m in MODELS},
        "merge_minus_better_parent": gaps,
        "merge_minus_better_parent_mean": {k: mean_sd(v)[0] for k, v in gaps.items()},
        "wall_time_s": wall,
        "stage_wall_s": {st["name"]: [stage(reports[s], st["name"])["wall_time_s"] for s in seeds]
                         for st in reports[seeds[0]]["stages"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
