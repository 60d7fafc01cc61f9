"""Reproduction 3: language-specific merging for maintenance (arXiv 2601.16127).

Runs ``recipes/papers/language-merging.yaml`` over seeds, twice per seed in one
workdir: the initial run (lum has the first half of its task records), then the
update (lum gets all of them). In the update only lum's SFT, the merges and the
evaluations of the per-language setup run again (the stage cache serves en, vel and
dor), while the joint SFT has to be retrained on everything. Reports, mean ± sd over
seeds:

- initial training cost of both setups (wall time and tokens of the training stages,
  from report.json) and the cost of the update, with the ratio
  per-language update / joint retrain (target <= 40%);
- per-language task accuracy (multiple choice and exact match) of the merged models
  against the joint model after the update (target: within 5 points), and perplexity.

Variants: ``full`` (full fine-tunes, the recipe as written) and ``lora`` (every SFT a
LoRA adapter, r 16, alpha 32, lr 1e-3, merged as adapters).

    python benchmarks/papers/repro_language_merging.py                 # seeds 0,1,2, full and lora
    python benchmarks/papers/repro_language_merging.py --seeds 0 --variants full
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _papers import (  # noqa: E402
    ROOT,
    fmt,
    machine,
    markdown_table,
    mean_sd,
    metric,
    parse_seeds,
    recipe_stages,
    run_recipe,
    seed_arguments,
    seed_sets,
    stage,
)

RECIPE = ROOT / "recipes" / "papers" / "language-merging.yaml"
OUT = ROOT / "benchmarks" / "results" / "repro_language_merging.json"
LANGS = ("en", "vel", "dor", "lum")
PER_LANGUAGE = tuple(f"sft-{lang}" for lang in LANGS)
JOINT = "sft-joint"
MERGES = ("merge-ta", "merge-ties", "merge-dare-ties")
UPDATED = "lum"
JOINT_LUM_INDEX = 3          # sft-joint's data entry for lum
EPOCHS = 4                   # every model sees each of its records this often
LORA = "{r: 16, alpha: 32, save: adapter}"
LORA_LR = "1.0e-3"
TARGET_RATIO = 0.40
TARGET_GAP = 0.05


def records_in(builtin: str) -> int:
    from engine import world
    from engine.data.files import count_records

    return count_records(world.data_path(builtin))


def budget_steps(records: int, batch_size: int) -> int:
    return math.ceil(EPOCHS * records / batch_size)


def check_budget() -> dict[str, Any]:
    """The recipe's steps must follow the epoch budget; returns the update's numbers."""
    stages = {s["name"]: s for s in recipe_stages(RECIPE)}
    n = {lang: records_in(f"{lang}/task-train.jsonl") for lang in LANGS}
    half = n[UPDATED] // 2           # "0:50%" rounds down
    initial = dict(n, **{UPDATED: half})
    for lang in LANGS:
        p = stages[f"sft-{lang}"]["params"]
        want = budget_steps(initial[lang], p["batch_size"])
        if p["steps"] != want:
            raise SystemExit(f"sft-{lang}: recipe has {p['steps']} steps, the {EPOCHS}-epoch budget "
                             f"for {initial[lang]} records is {want}")
    pj = stages[JOINT]["params"]
    if pj["steps"] != budget_steps(sum(initial.values()), pj["batch_size"]):
        raise SystemExit(f"{JOINT}: steps do not follow the {EPOCHS}-epoch budget")
    weights = [d["weight"] for d in stages[JOINT]["data"]]
    if weights != [initial[lang] for lang in LANGS]:
        raise SystemExit(f"{JOINT}: weights {weights} are not the record counts {initial}")
    return {"records_initial": initial, "records_update": n,
            "lum_steps": budget_steps(n[UPDATED], stages[f"sft-{UPDATED}"]["params"]["batch_size"]),
            "joint_steps": budget_steps(sum(n.values()), pj["batch_size"])}


def update_sets(budget: dict[str, Any]) -> list[str]:
    """lum's new data: all of its records, with the steps the epoch budget gives."""
    lum = budget["records_update"][UPDATED]
    return [f"stages.sft-{UPDATED}.data.records=0:100%",
            f"stages.sft-{UPDATED}.params.steps={budget['lum_steps']}",
            f"stages.{JOINT}.data.{JOINT_LUM_INDEX}.records=0:100%",
            f"stages.{JOINT}.data.{JOINT_LUM_INDEX}.weight={lum}",
            f"stages.{JOINT}.params.steps={budget['joint_steps']}"]


def variant_sets(variant: str) -> list[str]:
    if variant == "full":
        return []
    if variant == "lora":
        sets = []
        for name in (*PER_LANGUAGE, JOINT):
            sets += [f"stages.{name}.params.lora={LORA}", f"stages.{name}.params.lr={LORA_LR}"]
        return sets
    raise SystemExit(f"unknown variant {variant!r} (full, lora)")


def cost(report: dict[str, Any], names: tuple[str, ...], *, misses_only: bool) -> dict[str, Any]:
    recs = [stage(report, n) for n in names]
    if misses_only:
        recs = [r for r in recs if r["cache"] == "miss"]
    return {"wall_s": sum(r["wall_time_s"] for r in recs), "tokens": sum(r["tokens"] or 0 for r in recs),
            "max_wall_s": max((r["wall_time_s"] for r in recs), default=0.0),
            "ran": [r["name"] for r in recs]}


def scores(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    models = [*PER_LANGUAGE, JOINT, *MERGES, "base"]
    out: dict[str, dict[str, float]] = {}
    for m in models:
        row = {}
        for lang in LANGS:
            row[f"acc/{lang}"] = metric(report, "task", m, f"acc/{lang}")
            row[f"em/{lang}"] = metric(report, "task", m, f"exact_match/{lang}")
            row[f"ppl/{lang}"] = metric(report, "perplexity", m, f"ppl/{lang}")
        out[m] = row
    return out


def one_seed(variant: str, seed: int, workdir: Path, budget: dict[str, Any],
             extra: list[str] = ()) -> dict[str, Any]:
    """The initial run and the update for one seed; ``extra`` overrides (e.g. to shorten
    a trial) come last in both runs."""
    if workdir.exists():
        shutil.rmtree(workdir)
    sets = seed_sets(RECIPE, seed) + variant_sets(variant)
    t0 = time.perf_counter()
    first = run_recipe(RECIPE, workdir, [*sets, *extra])
    second = run_recipe(RECIPE, workdir, [*sets, *update_sets(budget), *extra])
    update_pl = cost(second, PER_LANGUAGE, misses_only=True)
    if update_pl["ran"] != [f"sft-{UPDATED}"]:
        raise RuntimeError(f"the update re-trained {update_pl['ran']}, expected only sft-{UPDATED}: "
                           "the stage cache did not serve the other languages")
    update_joint = cost(second, (JOINT,), misses_only=True)
    if update_joint["ran"] != [JOINT]:
        raise RuntimeError("the joint model was not retrained in the update")
    remerge = sum(stage(second, m)["wall_time_s"] for m in MERGES)
    result = {
        "variant": variant, "seed": seed,
        "initial": {"per_language": cost(first, PER_LANGUAGE, misses_only=False),
                    "joint": cost(first, (JOINT,), misses_only=False),
                    "scores": scores(first)},
        "update": {"per_language": update_pl, "joint": update_joint, "remerge_wall_s": remerge,
                   "scores": scores(second)},
        "run_wall_s": {"initial": first["wall_time_s"], "update": second["wall_time_s"],
                       "both_outside": time.perf_counter() - t0},
    }
    pl, jt = result["update"]["per_language"], result["update"]["joint"]
    ip, ij = result["initial"]["per_language"], result["initial"]["joint"]
    result["ratios"] = {
        "update_wall": pl["wall_s"] / jt["wall_s"],
        "update_tokens": pl["tokens"] / jt["tokens"],
        "update_wall_with_remerge": (pl["wall_s"] + remerge) / jt["wall_s"],
        "initial_wall": ip["wall_s"] / ij["wall_s"],
        "initial_tokens": ip["tokens"] / ij["tokens"],
        "initial_wall_parallel": ip["max_wall_s"] / ij["wall_s"],
    }
    return result


def col(results: list[dict[str, Any]], *path: str) -> list[float]:
    vals = []
    for r in results:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(v)
    return vals


def tables(variant: str, results: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = [f"### {variant}: cost (training stages, report.json; mean ± sd over {len(results)} seeds)", ""]
    rows = [
        ["joint SFT", fmt(col(results, "initial", "joint", "wall_s"), 1),
         fmt(col(results, "initial", "joint", "tokens"), 0),
         fmt(col(results, "update", "joint", "wall_s"), 1), fmt(col(results, "update", "joint", "tokens"), 0),
         "1 (reference)"],
        ["per-language SFT (4 models) + merge", fmt(col(results, "initial", "per_language", "wall_s"), 1),
         fmt(col(results, "initial", "per_language", "tokens"), 0),
         fmt(col(results, "update", "per_language", "wall_s"), 1),
         fmt(col(results, "update", "per_language", "tokens"), 0),
         f"{fmt(col(results, 'ratios', 'update_wall'))} by time, "
         f"{fmt(col(results, 'ratios', 'update_tokens'))} by tokens"],
    ]
    lines.append(markdown_table(["setup", "initial training s", "initial tokens", "update training s",
                                 "update tokens", "update cost / joint retrain"], rows))
    lines += ["", f"Initial per-language / joint: {fmt(col(results, 'ratios', 'initial_wall'))} by time, "
              f"{fmt(col(results, 'ratios', 'initial_tokens'))} by tokens; with the four per-language "
              f"trainings in parallel (the longest one): {fmt(col(results, 'ratios', 'initial_wall_parallel'))}. "
              f"Update with the three re-merges counted: {fmt(col(results, 'ratios', 'update_wall_with_remerge'))}. "
              f"The update re-trained only {results[0]['update']['per_language']['ran']}.", ""]

    summary: dict[str, Any] = {"ratios": {k: mean_sd(col(results, "ratios", k)) for k in results[0]["ratios"]}}
    for when in ("update", "initial"):
        lines += [f"### {variant}: task accuracy {'after the update' if when == 'update' else 'before the update'} "
                  "(choice / exact match, 128 held-out questions per language, chance 0.25 by choice)", ""]
        rows = []
        for m in ("base", *PER_LANGUAGE, JOINT, *MERGES):
            rows.append([m] + [f"{fmt(col(results, when, 'scores', m, f'acc/{lang}'))} / "
                               f"{fmt(col(results, when, 'scores', m, f'em/{lang}'))}" for lang in LANGS])
        lines += [markdown_table(["model", *LANGS], rows), ""]
    lines += [f"### {variant}: merged minus joint after the update (points; target within {TARGET_GAP * 100:.0f})", ""]
    rows = []
    gaps: dict[str, Any] = {}
    for m in MERGES:
        row = [m]
        for lang in LANGS:
            cells = []
            for key in ("acc", "em"):
                diff = [100 * (r["update"]["scores"][m][f"{key}/{lang}"] - r["update"]["scores"][JOINT][f"{key}/{lang}"])
                        for r in results]
                gaps[f"{m}/{key}/{lang}"] = mean_sd(diff)
                cells.append(fmt(diff, 1))
            row.append(" / ".join(cells))
        rows.append(row)
    lines += [markdown_table(["merge", *LANGS], rows), ""]
    summary["gaps_points"] = gaps
    lines += [f"### {variant}: perplexity after the update (held-out text)", ""]
    rows = [[m] + [fmt(col(results, "update", "scores", m, f"ppl/{lang}"), 2) for lang in LANGS]
            for m in ("base", *PER_LANGUAGE, JOINT, *MERGES)]
    lines += [markdown_table(["model", *LANGS], rows), ""]
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    ap = seed_arguments(__doc__.split("\n\n")[0], OUT.name)
    ap.add_argument("--variants", default="full,lora", help="full, lora or both (comma-separated)")
    args = ap.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    budget = check_budget()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="repro-lm-"))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"recipe": str(RECIPE.relative_to(ROOT)), "machine": machine(), "seeds": seeds,
                           "epochs": EPOCHS, "budget": budget, "overrides": args.set, "variants": {}}
    text = [f"Machine: {out['machine']}", ""]
    for variant in variants:
        results = []
        for seed in seeds:
            print(f"[{variant}] seed {seed} ...", file=sys.stderr, flush=True)
            results.append(one_seed(variant, seed, root / variant / f"seed-{seed}", budget, args.set))
        table, summary = tables(variant, results)
        text.append(table)
        out["variants"][variant] = {"runs": results, "summary": summary}
    out["total_wall_s"] = time.perf_counter() - t0
    text.append(f"Total wall time: {out['total_wall_s']:.0f} s")
    print("\n".join(text))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
