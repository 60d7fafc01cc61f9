"""Reproduction 2: ELO (arXiv 2601.03648) on the built-in world, over seeds.

Two measurements per seed, both on ``tiny-base`` and lum text mixed 9:1 with English:

1. **The recipe** ``recipes/papers/elo.yaml`` (``engine run`` in a fresh process, via
   ``_papers.run_recipe``): ELO with the embedding and head frozen (the paper's
   default), ELO with ``train_embeddings``, and full CT, at equal steps (equal
   tokens); each merged with the English SFT model by task arithmetic and each
   fine-tuned on the English task afterwards; lum and en perplexity and task accuracy.
2. **Curves to a target** (in this process, the engine's own training loop and the
   ``elo`` / ``elo-align`` plugins' code, the recipe's hyperparameters): full CT with
   its lum perplexity probed every ``--ct-every`` steps; ELO stage 1 with a *branch*
   every ``--elo-every`` steps: the sub-model's layers (and embedding/head) are put
   back into a fresh copy of the base (``elo_align.reinsert``), the alignment
   fine-tune runs, and the full model's lum perplexity is measured. A branch point's
   cost is stage 1 so far plus that branch's reinsertion and alignment, so every
   point is what an ELO run with that stage-1 budget would cost; branching is exact
   because stage 1 uses a constant learning rate after warmup. Perplexity is the
   ``perplexity`` plugin's per-document measure on ``lum/test.txt``, taken with the
   clock paused. Targets: CT's own perplexity at ``--targets`` steps.

FLOPs are counted per token from the model's shape (``flops_per_token``): forward
``2 * P`` for every matmul parameter on the forward path plus attention's
``2 * (s + 1) * d`` per layer (scores and weighted sum under a causal mask, ``s`` the
sequence length, ``d`` the attention width); backward ``2 * P`` for activation
gradients of every matmul from the head down to the earliest trainable module (the
embedding lookup has none), ``2 * P`` weight gradients for trainable matmuls only,
and twice the attention term for every layer the backward reaches. Full CT is then
``~6 N`` per token, ELO stage 1 touches 2 of 8 layers and the head.

``--select-lr`` instead chooses each method's learning rate: 80 lum documents (every
tenth) are held out of ``lum/train.txt`` (and of the alignment mix), each method
trains on the rest at every lr of ``--lr-grid`` for the recipe's step budget, and the
lr with the lowest held-out perplexity wins; the test files are never read. The
recipe's lrs were set from its output (kept in the results JSON under
``lr_selection``).

    flock /tmp/lingoforge-bench.lock python benchmarks/papers/repro_elo.py            # seeds 0,1,2
    flock /tmp/lingoforge-bench.lock python benchmarks/papers/repro_elo.py --select-lr
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "speed"))  # _harness: the training benchmarks' random Llamas
import _harness as h  # noqa: E402
import _papers as P  # noqa: E402
from bench_time_to_quality import Clock, DocumentPerplexity  # noqa: E402

RECIPE = P.ROOT / "recipes" / "papers" / "elo.yaml"
OUT = HERE.parent / "results" / "repro_elo.json"

#: method -> (stage-1 stage, aligned model, merged model, adapt-then-SFT model) in the recipe
METHODS = {
    "ELO (embedding/head frozen)": ("elo-lum", "elo-lum-aligned", "merge-elo", "elo-then-sft"),
    "ELO + train_embeddings": ("elo-emb-lum", "elo-emb-lum-aligned", "merge-elo-emb", "elo-emb-then-sft"),
    "full CT": ("ct-lum", "ct-lum", "merge-ct", "ct-then-sft"),
}
CURVE_KEYS = {"full CT": "ct", "ELO (embedding/head frozen)": "elo", "ELO + train_embeddings": "elo-emb"}


# --- FLOPs --------------------------------------------------------------------------

def flops_per_token(config: dict[str, Any], *, layers: int, trainable_layers: int, head_trains: bool,
                    embedding_trains: bool, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token of a Llama stack of ``layers`` decoder layers (the full
    model, or ELO's sub-model) of which ``trainable_layers`` train. In every case here
    the lowest layer trains, so the backward runs through the whole stack; whether the
    embedding trains too changes no matmul count (its gradient is a lookup's
    scatter-add), only whether the head adds ``2 * V * d`` weight-gradient FLOPs. See
    the module docstring for the formula."""
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    layer = d * q + 2 * d * kv + q * d + 3 * d * ff      # q, k, v, o; gate, up, down
    head = v * d
    attn = 2 * (seq_len + 1) * q                          # per layer: QK^T and AV, causal average
    fwd = 2 * (layers * layer + head) + layers * attn
    # the backward reaches layer 0 whenever anything at or below it trains (always here)
    act = 2 * (layers * layer + head)
    wgrad = 2 * (trainable_layers * layer + (head if head_trains else 0))
    bwd_attn = 2 * layers * attn
    return {"forward": fwd, "backward": act + wgrad + bwd_attn, "total": fwd + act + wgrad + bwd_attn}


# --- in-process curves ----------------------------------------------------------------

class Every:
    """Wraps a batch stream; before the batch of every ``every``-th step it calls
    ``callback(step, wall)`` with ``clock`` paused (``wall`` read before pausing)."""

    def __init__(self, batches: Iterator[Any], every: int, callback: Callable[[int, float], None],
                 clock: Clock) -> None:
        self.batches, self.every, self.callback, self.clock = batches, every, callback, clock
        self.calls = 0

    def __iter__(self) -> Every:
        return self

    def __next__(self) -> Any:
        if self.calls % self.every == 0:
            wall = self.clock.now()
            with self.clock.paused():
                self.callback(self.calls, wall)
        self.calls += 1
        return next(self.batches)


class Lab:
    """The world, the recipe's hyperparameters and the pieces every curve needs."""

    def __init__(self, lum_train: Path, align: Path, eval_path: Path, eval_label: str) -> None:
        from engine import world
        from engine.api import DataSource
        from engine.models.modelio import load_tokenizer

        self.stages = {s["name"]: s for s in P.recipe_stages(RECIPE)}
        self.base = world.model_path("tiny-base")
        self.config = json.loads((self.base / "config.json").read_text())
        self.tok = load_tokenizer(self.base)
        self.mix = [DataSource(lum_train, language="lum", weight=9),
                    DataSource(world.data_path("en/train.txt"), language="en", weight=1)]
        self.align = [DataSource(align)]
        self.ppl = DocumentPerplexity(self.tok, eval_path, eval_label)
        self.work = Path(tempfile.mkdtemp(prefix="repro-elo-"))

    def params(self, stage: str, **over: Any) -> Any:
        from engine.training.loop import TrainerParams

        p = {k: v for k, v in self.stages[stage]["params"].items() if k in TrainerParams.model_fields}
        p.update(log_every=10, checkpoint_every=0)
        p.update(over)
        return TrainerParams(**p)

    def stream(self, sources: list[Any], p: Any) -> Iterator[Any]:
        from engine.training.batching import training_batches

        return training_batches(self.tok, sources, seq_len=p.seq_len, batch_size=p.micro_batch_size, seed=p.seed)

    def flops(self, kind: str, seq_len: int) -> float:
        n = self.config["num_hidden_layers"]
        if kind == "ct":
            f = flops_per_token(self.config, layers=n, trainable_layers=n, head_trains=True,
                                embedding_trains=True, seq_len=seq_len)
        else:
            emb = kind == "elo-emb"
            f = flops_per_token(self.config, layers=2, trainable_layers=2, head_trains=emb,
                                embedding_trains=emb, seq_len=seq_len)
        return f["total"]

    def ct_curve(self, seed: int, steps: int, every: int, lr: float | None = None) -> list[dict[str, float]]:
        from engine.training.loop import train

        over = {"steps": steps, "seed": seed} | ({"lr": lr} if lr else {})
        p = self.params("ct-lum", **over)
        per_step = self.flops("ct", p.seq_len) * p.batch_size * p.seq_len
        points: list[dict[str, float]] = []
        clock = Clock()
        model = h.context(self.work, "ct").load_model(self.base, dtype=torch.float32)

        def probe(step: int, wall: float) -> None:
            points.append({"step": step, "wall_s": round(wall, 3), "flops": step * per_step,
                           "ppl": round(self.ppl(model), 4)})

        batches = Every(self.stream(self.mix, p), every, probe, clock)
        train(h.context(self.work, "ct-train"), model, batches, p)
        probe(steps, clock.now())
        return points

    def elo_curve(self, seed: int, steps: int, every: int, *, embeddings: bool, lr: float | None = None,
                  head_only: bool = False) -> list[dict[str, float]]:
        from engine.models import arch
        from engine.training.loop import train
        from engine_plugins.elo import prepare_submodel
        from engine_plugins.elo_align import reinsert

        stage = "elo-emb-lum" if embeddings else "elo-lum"
        aligned = "elo-emb-lum-aligned" if embeddings else "elo-lum-aligned"
        over = {"steps": steps, "seed": seed} | ({"lr": lr} if lr else {})
        p1, pa = self.params(stage, **over), self.params(aligned, seed=seed)
        kind = "elo-emb" if embeddings else "elo"
        s1_step = self.flops(kind, p1.seq_len) * p1.batch_size * p1.seq_len
        if head_only:   # layers + head; embedding frozen (backward stops at layer 0 either way)
            s1_step = self.flops("elo", p1.seq_len) * p1.batch_size * p1.seq_len \
                + 2 * self.config["vocab_size"] * self.config["hidden_size"] * p1.batch_size * p1.seq_len
        align_flops = self.flops("ct", pa.seq_len) * pa.batch_size * pa.seq_len * pa.steps
        points: list[dict[str, float]] = []
        clock = Clock()
        sub, idx, trained = prepare_submodel(self.base, [0, -1], train_embeddings=embeddings)
        if head_only:
            arch.lm_head(sub).requires_grad_(True)
            trained = [name for name, q in sub.named_parameters() if q.requires_grad]
        full = h.context(self.work, "full").load_model(self.base, dtype=torch.float32)
        base_state = {k: t.clone() for k, t in full.state_dict().items()}
        meta = {"source_num_layers": arch.model_num_layers(full), "layer_indices": idx, "trained_tensors": trained}
        sub_dir = self.work / f"sub-{kind}"

        def branch(step: int, wall: float) -> None:
            t0 = time.perf_counter()
            sub.save_pretrained(str(sub_dir))
            full.load_state_dict(base_state)
            reinsert(full, sub_dir, meta)
            reinsert_s = time.perf_counter() - t0
            reinserted = self.ppl(full)
            full.requires_grad_(True)
            t1 = time.perf_counter()
            model = train(h.context(self.work, "align"), full, self.stream(self.align, pa), pa).model
            align_s = time.perf_counter() - t1
            points.append({"step": step, "stage1_s": round(wall, 3),
                           "wall_s": round(wall + reinsert_s + align_s, 3),
                           "flops": step * s1_step + align_flops, "ppl_reinserted": round(reinserted, 4),
                           "ppl": round(self.ppl(model), 4)})

        batches = Every(self.stream(self.mix, p1), every, branch, clock)
        train(h.context(self.work, f"elo-{kind}"), sub, batches, p1)
        branch(steps, clock.now())
        return points


def first_reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((pt for pt in curve if pt["ppl"] <= target), None)


def at_most(curve: list[dict[str, float]], key: str, limit: float) -> dict[str, float] | None:
    """The last point whose ``key`` (wall_s / flops / step) is within ``limit``."""
    inside = [pt for pt in curve if pt[key] <= limit * 1.0001]
    return inside[-1] if inside else None


# --- learning-rate selection (held-out train documents, never the test files) ---------

def select_lr(a: argparse.Namespace) -> None:
    from engine import world

    docs = [line for line in world.data_path("lum/train.txt").read_text().splitlines() if line.strip()]
    held = {i for i in range(len(docs)) if i % 10 == 9}
    tmp = Path(tempfile.mkdtemp(prefix="repro-elo-lr-"))
    (tmp / "lum-train.txt").write_text("\n".join(d for i, d in enumerate(docs) if i not in held) + "\n")
    (tmp / "lum-val.txt").write_text("\n".join(docs[i] for i in sorted(held)) + "\n")
    held_text = {docs[i].strip() for i in held}
    align = [line for line in world.data_path("mix/align.txt").read_text().splitlines()
             if line.strip() and line.strip() not in held_text]
    (tmp / "align.txt").write_text("\n".join(align) + "\n")
    lab = Lab(tmp / "lum-train.txt", tmp / "align.txt", tmp / "lum-val.txt", "lum")
    steps = lab.stages["ct-lum"]["params"]["steps"]
    grid = [float(x) for x in a.lr_grid.split(",")]
    table: dict[str, dict[str, float]] = {"ct": {}, "elo": {}, "elo-emb": {}}
    for lr in grid:
        table["ct"][f"{lr:g}"] = lab.ct_curve(0, steps, steps, lr=lr)[-1]["ppl"]
        table["elo"][f"{lr:g}"] = lab.elo_curve(0, steps, steps, embeddings=False, lr=lr)[-1]["ppl"]
        table["elo-emb"][f"{lr:g}"] = lab.elo_curve(0, steps, steps, embeddings=True, lr=lr)[-1]["ppl"]
        print(f"lr {lr:g}: held-out lum ppl CT {table['ct'][f'{lr:g}']:.3f}, ELO {table['elo'][f'{lr:g}']:.3f}, "
              f"ELO+emb {table['elo-emb'][f'{lr:g}']:.3f}", file=sys.stderr)
    chosen = {k: float(min(v, key=v.get)) for k, v in table.items()}
    print(P.markdown_table(["lr", "full CT", "ELO (frozen emb/head)", "ELO + train_embeddings"],
                           [[f"{lr:g}"] + [f"{table[k][f'{lr:g}']:.3f}" for k in table] for lr in grid]))
    print(f"\nchosen (lowest held-out ppl after {steps} steps, ELO after alignment): {chosen}")
    result = json.loads(a.out.read_text()) if a.out.is_file() else {}
    result["lr_selection"] = {"held_out": "every 10th lum/train.txt document (80), also removed from the "
                              "training text and the alignment mix", "steps": steps, "seed": 0,
                              "held_out_ppl": table, "chosen": chosen, "machine": P.machine(),
                              "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


# --- the reproduction -------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ct-steps", type=int, default=160, help="CT curve length (the recipe's budget x 2)")
    ap.add_argument("--ct-every", type=int, default=10)
    ap.add_argument("--elo-steps", type=int, default=240, help="ELO stage-1 curve length")
    ap.add_argument("--elo-every", type=int, default=20, help="ELO branch (reinsert + align) interval")
    ap.add_argument("--targets", default="40,80,160", help="CT steps whose lum ppl are the targets")
    ap.add_argument("--head-only", action=argparse.BooleanOptionalAction, default=True,
                    help="also a curve for ELO training layers + head, embedding frozen (investigation; "
                    "not in the recipe)")
    ap.add_argument("--no-curves", action="store_true")
    ap.add_argument("--select-lr", action="store_true")
    ap.add_argument("--lr-grid", default="1e-3,2e-3,4e-3,8e-3,1.6e-2")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--from-raw", type=Path, default=None,
                    help="re-tabulate the raw reports and curves a previous run saved (its --raw)")
    ap.add_argument("--raw", type=Path, default=Path(tempfile.gettempdir()) / "repro_elo_raw.json",
                    help="where the raw reports and curves are saved before tabulating")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(2)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if a.select_lr:
        select_lr(a)
        return

    from engine import world

    t_start = time.perf_counter()
    seeds = P.parse_seeds(a.seeds)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="repro-elo-runs-"))
    reports: dict[int, dict[str, Any]] = {}
    curves: dict[int, dict[str, list[dict[str, float]]]] = {}
    lab = None if a.no_curves else Lab(world.data_path("lum/train.txt"), world.data_path("mix/align.txt"),
                                       world.data_path("lum/test.txt"), "lum")
    if a.from_raw:
        raw = json.loads(a.from_raw.read_text())
        reports = {int(k): v for k, v in raw["reports"].items()}
        curves = {int(k): v for k, v in raw["curves"].items()}
        seeds = list(reports)
        lab = Lab(world.data_path("lum/train.txt"), world.data_path("mix/align.txt"),
                  world.data_path("lum/test.txt"), "lum") if curves else None
    for seed in [] if a.from_raw else seeds:
        t0 = time.perf_counter()
        reports[seed] = P.run_recipe(RECIPE, root / f"seed{seed}", P.seed_sets(RECIPE, seed))
        print(f"seed {seed}: recipe {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if lab is not None:
            t0 = time.perf_counter()
            c = {"ct": lab.ct_curve(seed, a.ct_steps, a.ct_every),
                 "elo": lab.elo_curve(seed, a.elo_steps, a.elo_every, embeddings=False),
                 "elo-emb": lab.elo_curve(seed, a.elo_steps, a.elo_every, embeddings=True)}
            if a.head_only:
                c["elo-head"] = lab.elo_curve(seed, a.elo_steps, a.elo_every, embeddings=False, head_only=True)
            curves[seed] = c
            print(f"seed {seed}: curves {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    if not a.from_raw:
        a.raw.write_text(json.dumps({"reports": reports, "curves": curves}))
    R = reports

    def col(model: str, ev: str, key: str) -> list[float]:
        return [P.metric(R[s], ev, model, key) for s in seeds]

    def stage_sum(names: list[str], key: str) -> list[float]:
        return [sum(P.stage(R[s], n).get(key) or 0 for n in names) for s in seeds]

    machine = P.machine()
    out: dict[str, Any] = {"recipe": str(RECIPE.relative_to(P.ROOT)), "seeds": seeds, "machine": machine,
                           "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(a).items()}}
    rows, models = [], ["base", "sft-en"]
    for m in METHODS.values():
        models += [m[1], m[2], m[3]]
    table1 = {}
    for model in models:
        table1[model] = {k: col(model, ev, k) for ev, k in
                         (("perplexity", "ppl/lum"), ("perplexity", "ppl/en"), ("task", "acc/lum"),
                          ("task", "exact_match/lum"), ("task", "acc/en"), ("task", "exact_match/en"))}
    out["recipe_metrics"] = table1
    for model in models:
        t = table1[model]
        rows.append([model, P.fmt(t["ppl/lum"]), P.fmt(t["ppl/en"]), P.fmt(t["acc/lum"]),
                     P.fmt(t["exact_match/lum"]), P.fmt(t["acc/en"]), P.fmt(t["exact_match/en"])])
    cost_rows, costs = [], {}
    for name, (s1, aligned, _, _) in METHODS.items():
        names = [s1] if s1 == aligned else [s1, aligned]
        costs[name] = {"wall_s": stage_sum(names, "wall_time_s"), "stage1_wall_s": stage_sum([s1], "wall_time_s"),
                       "trainable": P.stage(R[seeds[0]], s1).get("trainable_params"),
                       "forward": P.stage(R[seeds[0]], s1).get("forward_params"),
                       "tokens": stage_sum(names, "tokens")}
    ct_wall = costs["full CT"]["wall_s"]
    for name, c in costs.items():
        ratio = [w / cw for w, cw in zip(c["wall_s"], ct_wall, strict=True)]
        cost_rows.append([name, f"{c['trainable']:,} / {c['forward']:,}", P.fmt(c["stage1_wall_s"], 1),
                          P.fmt(c["wall_s"], 1), P.fmt(ratio, 2), f"{c['tokens'][0]:,}"])
    out["recipe_costs"] = costs

    text = [f"Reproduction 2: ELO (arXiv 2601.03648); seeds {a.seeds}; {machine}\n",
            "Equal steps (recipes/papers/elo.yaml): 80 steps x 8 x 128 tokens of lum:en 9:1 per adapter; "
            "ELO + 20 alignment steps on mix/align.txt. Stage costs from report.json:\n",
            P.markdown_table(["method", "trainable / forward params (stage 1)", "stage-1 wall s",
                              "wall s incl. alignment", "wall vs CT", "tokens"], cost_rows), "",
            "Scores (perplexity per document; task: choice accuracy and exact match on 128 held-out questions, "
            "chance 0.25 by choice):\n",
            P.markdown_table(["model", "lum ppl", "en ppl", "lum choice", "lum exact", "en choice", "en exact"],
                             rows)]

    if curves:
        tgt_steps = [int(x) for x in a.targets.split(",")]
        kinds = list(curves[seeds[0]])
        label = {v: k for k, v in CURVE_KEYS.items()} | {"elo-head": "ELO + head only (investigation)"}
        ttt: dict[str, Any] = {}
        trows = []
        for ts in tgt_steps:
            entry: dict[str, Any] = {"target_ppl": [], "per_kind": {k: [] for k in kinds}}
            for s in seeds:
                ct_pt = next(pt for pt in curves[s]["ct"] if pt["step"] == ts)
                entry["target_ppl"].append(ct_pt["ppl"])
                for k in kinds:
                    hit = first_reach(curves[s][k], ct_pt["ppl"])
                    entry["per_kind"][k].append(None if hit is None else {
                        "step": hit["step"], "wall_s": hit["wall_s"], "flops": hit["flops"],
                        "wall_vs_ct": hit["wall_s"] / ct_pt["wall_s"], "flops_vs_ct": hit["flops"] / ct_pt["flops"]})
            ttt[str(ts)] = entry
            for k in kinds:
                hits = [x for x in entry["per_kind"][k] if x is not None]
                reached = f"{len(hits)}/{len(seeds)}"
                if hits:
                    trows.append([f"CT@{ts}: {P.fmt(entry['target_ppl'])}", label[k], reached,
                                  P.fmt([x["wall_s"] for x in hits], 1),
                                  P.fmt([x["flops"] / 1e12 for x in hits], 3),
                                  P.fmt([x["wall_vs_ct"] for x in hits], 2), P.fmt([x["flops_vs_ct"] for x in hits], 2)])
                else:
                    best = [min(pt["ppl"] for pt in curves[s][k]) for s in seeds]
                    trows.append([f"CT@{ts}: {P.fmt(entry['target_ppl'])}", label[k], reached,
                                  f"never (best ppl {P.fmt(best)})", "-", "-", "-"])
        out["time_to_target"] = ttt
        # equal budgets: CT's recipe budget (80 steps) in steps, wall time and FLOPs
        budget = int(next(s for s in P.recipe_stages(RECIPE) if s["name"] == "ct-lum")["params"]["steps"])
        erows, equal = [], {}
        for k in kinds:
            vals: dict[str, list[float]] = {"step": [], "wall_s": [], "flops": []}
            for s in seeds:
                ct_pt = next(pt for pt in curves[s]["ct"] if pt["step"] == budget)
                for key in vals:
                    pt = at_most(curves[s][k], key, ct_pt[key])
                    vals[key].append(float("nan") if pt is None else pt["ppl"])
            equal[k] = vals
            erows.append([label[k], P.fmt(vals["step"]), P.fmt(vals["wall_s"]), P.fmt(vals["flops"])])
        out["equal_budget_ppl"] = equal
        # where ELO's gain comes from, at the recipe's budget: stage 1 alone (reinserted, not
        # aligned), stage 1 + alignment, and alignment alone (the branch at stage-1 step 0)
        drows, parts = [], {}
        for k in kinds:
            pick = [next(pt for pt in curves[s][k] if pt["step"] == budget) for s in seeds] if k != "ct" else None
            if pick is None:
                continue
            zero = [curves[s][k][0]["ppl"] for s in seeds]
            parts[k] = {"reinserted": [pt["ppl_reinserted"] for pt in pick], "aligned": [pt["ppl"] for pt in pick],
                        "alignment_only": zero}
            drows.append([label[k], P.fmt(parts[k]["reinserted"]), P.fmt(parts[k]["aligned"]), P.fmt(zero)])
        out["gain_decomposition"] = parts
        # cost per step, from the curves (one process, after warm-up)
        srows, per_step = [], {}
        for k in kinds:
            if k == "ct":
                v = [(c["ct"][-1]["wall_s"] - c["ct"][1]["wall_s"]) / (c["ct"][-1]["step"] - c["ct"][1]["step"])
                     for c in curves.values()]
            else:
                v = [(c[k][-1]["stage1_s"] - c[k][1]["stage1_s"]) / (c[k][-1]["step"] - c[k][1]["step"])
                     for c in curves.values()]
            per_step[k] = v
            srows.append([label[k] + ("" if k == "ct" else ", stage 1"), P.fmt(v, 4)])
        align_s = [c["elo"][0]["wall_s"] - c["elo"][0]["stage1_s"] for c in curves.values()]
        srows.append([f"alignment ({P.stage(R[seeds[0]], 'elo-lum-aligned')['tokens'] // 1024}k tokens, "
                      "whole, incl. reinsertion)", P.fmt(align_s, 3)])
        out["s_per_step"] = per_step | {"alignment_total_s": align_s}
        per_token = {k: lab.flops(k, 128) for k in ("ct", "elo", "elo-emb")}
        out["flops_per_token"] = per_token
        out["curves"] = {str(s): c for s, c in curves.items()}
        ct_s = [c["ct"][-1]["wall_s"] / a.ct_steps for c in curves.values()]
        text += ["", f"Time and FLOPs to a target lum perplexity (curves: CT probed every {a.ct_every} steps to "
                 f"{a.ct_steps}; ELO stage 1 to {a.elo_steps} steps, reinserted and aligned every {a.elo_every}; "
                 f"an ELO point's cost includes its alignment). Training FLOPs per token: CT "
                 f"{per_token['ct'] / 1e6:.2f} M, ELO stage 1 {per_token['elo'] / 1e6:.2f} M (CT/ELO "
                 f"{per_token['ct'] / per_token['elo']:.2f}x), with train_embeddings {per_token['elo-emb'] / 1e6:.2f} M "
                 f"({per_token['ct'] / per_token['elo-emb']:.2f}x); CT {P.fmt(ct_s, 3)} s/step:\n",
                 P.markdown_table(["target (CT's ppl at step)", "method", "reached", "wall s", "TFLOPs",
                                   "wall vs CT", "FLOPs vs CT"], trows), "",
                 f"lum perplexity at CT's {budget}-step budget, measured three ways (the last curve point within it):\n",
                 P.markdown_table(["method", "equal steps", "equal wall time", "equal FLOPs"], erows), "",
                 f"Where ELO's lum gain comes from, at {budget} stage-1 steps (lum ppl; base "
                 f"{curves[seeds[0]]['ct'][0]['ppl']:.3f}):\n",
                 P.markdown_table(["method", "stage 1 reinserted, not aligned", "stage 1 + alignment",
                                   "alignment alone (no stage 1)"], drows), "",
                 "Wall seconds per step, from the curves (steps after the first probe):\n",
                 P.markdown_table(["run", "s/step"], srows)]
    total = time.perf_counter() - t_start
    out["total_wall_s"] = round(total, 1)
    previous = json.loads(a.out.read_text()) if a.out.is_file() else {}
    if "lr_selection" in previous:
        out["lr_selection"] = previous["lr_selection"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    text += ["", f"total {total:.0f} s; results: {a.out.relative_to(P.ROOT) if a.out.is_relative_to(P.ROOT) else a.out}"]
    print("\n".join(text))


if __name__ == "__main__":
    main()
