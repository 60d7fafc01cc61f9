"""Reproduction 1: merging for low-resource languages (arXiv 2407.03994), over seeds.

Runs ``recipes/papers/low-resource-merging.yaml`` once per seed and prints, per CT
budget, the target-language (lum) task accuracy (multiple choice and exact match) and
perplexity of CT alone, CT-then-SFT, and the merges of CT with the English SFT model
(task arithmetic, TIES, slack-TIES at slack 0.5 and 1), with English task accuracy
beside them; then the three questions of the paper as differences per seed:

* does merging beat CT-then-SFT when target data is scarce (best merge minus
  CT-then-SFT, per budget)?
* does the merge saturate as CT tokens grow (task arithmetic across budgets)?
* does slack-TIES help where TIES saturates (slack-TIES minus TIES, per budget)?

    python benchmarks/papers/repro_low_resource_merging.py --seeds 0-2
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _papers import (  # noqa: E402
    ROOT,
    fmt,
    machine,
    markdown_table,
    mean_sd,
    metric,
    recipe_stages,
    run_seeds,
    seed_arguments,
    stage,
)

RECIPE = ROOT / "recipes" / "papers" / "low-resource-merging.yaml"
KINDS = [("ct", "CT"), ("ct-sft", "CT-then-SFT"), ("ta", "TA merge"), ("ties", "TIES merge"),
         ("slack", "slack-TIES 0.5"), ("slack1", "slack-TIES 1.0")]
MERGES = ["ta", "ties", "slack", "slack1"]
FIGURES = [("task", "acc/lum", "lum task (MC)"), ("task", "exact_match/lum", "lum task (EM)"),
           ("perplexity", "ppl/lum", "lum ppl"), ("task", "acc/en", "en task (MC)"),
           ("task", "exact_match/en", "en task (EM)")]


def budgets() -> list[int]:
    return sorted(int(m.group(1)) for s in recipe_stages(RECIPE) if (m := re.fullmatch(r"ct-(\d+)", s["name"])))


def main() -> None:
    args = seed_arguments(__doc__.splitlines()[0], "repro_low_resource_merging.json").parse_args()
    t_all = time.perf_counter()
    reports = run_seeds(RECIPE, args, "lingoforge-repro1-")
    seeds = sorted(reports)
    bs = budgets()
    cfg = {s["name"]: s for s in recipe_stages(RECIPE)}
    tok_per_step = cfg[f"ct-{bs[0]}"]["params"]["batch_size"] * cfg[f"ct-{bs[0]}"]["params"]["seq_len"]

    def vals(model: str, ev: str, key: str) -> list[float]:
        return [metric(reports[s], ev, model, key) for s in seeds]

    out = {"machine": machine(), "seeds": seeds, "recipe": str(RECIPE.relative_to(ROOT)), "budgets_steps": bs,
           "overrides": args.set,
           "tokens_per_step": tok_per_step, "metrics": {}, "questions": {}}
    print(f"\nReproduction 1 (arXiv 2407.03994) on the built-in world, seeds {seeds}; {machine()}")
    for ev, key, label in FIGURES:
        print(f"\n{label}, mean ± sd over seeds (base {fmt(vals('base', ev, key))}, "
              f"English SFT {fmt(vals('sft-en', ev, key))})\n")
        rows = []
        for b in bs:
            rows.append([f"{b} steps ({b * tok_per_step // 1000}k tok)",
                         *(fmt(vals(f"{k}-{b}", ev, key)) for k, _ in KINDS)])
            for k, _ in KINDS:
                out["metrics"].setdefault(f"{k}-{b}", {})[f"{ev}:{key}"] = vals(f"{k}-{b}", ev, key)
        for m in ("base", "sft-en"):
            out["metrics"].setdefault(m, {})[f"{ev}:{key}"] = vals(m, ev, key)
        print(markdown_table(["CT budget", *(name for _, name in KINDS)], rows))

    def diff(a: str, b: str, key: str) -> list[float]:
        return [x - y for x, y in zip(vals(a, "task", key), vals(b, "task", key))]

    print("\nQuestions (differences per seed, mean ± sd)\n")
    rows = []
    for b in bs:
        q = {}
        for key in ("acc/lum", "exact_match/lum"):
            best = [max(metric(reports[s], "task", f"{k}-{b}", key) for k in MERGES) for s in seeds]
            ctsft = vals(f"ct-sft-{b}", "task", key)
            parents = [max(metric(reports[s], "task", f"ct-{b}", key), metric(reports[s], "task", "sft-en", key))
                       for s in seeds]
            q[key] = {
                "ta_minus_ct_sft": diff(f"ta-{b}", f"ct-sft-{b}", key),
                "best_merge_minus_ct_sft": [x - y for x, y in zip(best, ctsft)],
                "best_merge_minus_better_parent": [x - y for x, y in zip(best, parents)],
                "slack_minus_ties": diff(f"slack-{b}", f"ties-{b}", key),
                "slack1_minus_ties": diff(f"slack1-{b}", f"ties-{b}", key),
            }
        out["questions"][str(b)] = q
        rows.append([f"{b} steps", *(fmt(q[key][name]) for name in
                                     ("ta_minus_ct_sft", "best_merge_minus_better_parent", "slack_minus_ties",
                                      "slack1_minus_ties") for key in ("acc/lum", "exact_match/lum"))])
    print(markdown_table(["CT budget", "TA − CT-then-SFT (MC)", "(EM)", "best merge − better parent (MC)", "(EM)",
                          "slack 0.5 − TIES (MC)", "(EM)", "slack 1 − TIES (MC)", "(EM)"], rows))
    cost = {}
    for b in bs:
        cost[str(b)] = {k: mean_sd([stage(reports[s], f"{k}-{b}")["wall_time_s"] for s in seeds])[0]
                        for k in ("ct", "ct-sft", "ta", "ties", "slack")}
    out["stage_wall_s_mean"] = cost
    out["sft_en_wall_s_mean"] = mean_sd([stage(reports[s], "sft-en")["wall_time_s"] for s in seeds])[0]
    out["wall_time_s"] = time.perf_counter() - t_all
    print(f"\nwall time per stage (mean over seeds): sft-en {out['sft_en_wall_s_mean']:.1f} s; "
          + "; ".join(f"budget {b}: CT {c['ct']:.1f} s, CT-then-SFT's SFT {c['ct-sft']:.1f} s, TA merge {c['ta']:.2f} s"
                      for b, c in cost.items()))
    print(f"total {out['wall_time_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
