"""Vocabulary transfer on the built-in world: init methods of new rows, tokenizer transplant,
merging across tokenizers, and how long a tokenizer change takes.

The target language is the world's ``lum`` written in Cyrillic letters
(docs/examples/own_language_data.py), a script the world's tokenizer spells one byte per
token. Every model and number below is computed here, from the cached world model, with
the engine's own plugins (ct, sft, perplexity with bits per byte, task-accuracy,
task-arithmetic); per seed the init method's seed and the training data order change.

1. **Init methods** (``extend``): ``engine extend-tokenizer --tokens 500`` with each init
   method, then full CT on Cyrillic lum (9:1 with English, as docs/extend-tokenizer.md's
   recipe: batch 8, seq 128, lr 2e-3) for 20, 40 and 80 steps (separate runs, each with
   its own cosine schedule); held-out Cyrillic lum bits per byte at step 0 and after each.
2. **Transplant** (``transplant``): a BPE of 1536 tokens learned on Cyrillic lum + English
   train text replaces the tokenizer; bpb on English and Cyrillic lum test text at step 0
   against the untouched model, and after 40 steps of ``train_only: embeddings`` against
   extend-tokenizer (mean) with the same 40 steps.
3. **Merge across tokenizers** (``merge``): CT (80 steps) on the transplanted vocabulary
   (after the 40 embeddings-only steps), an English SFT model (100 steps, original
   vocabulary) transplanted onto the same tokenizer, merged by task arithmetic on the
   transplanted base; against the same merge with the original, shared tokenizer (CT
   80 steps on the original vocabulary). Task accuracy (multiple choice) in Cyrillic lum
   and English. The transplant's init method is fixed in advance: ``focus``.
4. **Time** (``time``): extend-tokenizer and transplant of the world model, each init
   method, wall time in-process (imports excluded) and of the whole command.

    flock /tmp/lingoforge-heavy.lock python benchmarks/papers/vocab_transfer.py --seeds 0-2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _papers import ROOT, machine  # noqa: E402

INITS = ["random", "mean", "omp", "focus"]
STEPS = [20, 40, 80]
#: the models of the transplant part trained for BUDGET["rows"] steps (the init fixed in advance)
TRAINED = ("focus", "extend-mean")
#: embeddings-only steps after a transplant, and CT steps before a merge
BUDGET = {"rows": 40, "ct": 80}
CT = {"batch_size": 8, "seq_len": 128, "lr": 2.0e-3, "log_every": 10, "checkpoint_every": 0}
SFT = {"steps": 100, "batch_size": 16, "seq_len": 48, "lr": 5.0e-5, "checkpoint_every": 0}
RESULTS = ROOT / "benchmarks" / "results" / "vocab_transfer.json"


def PARTIAL(part: str, value: Any) -> None:  # noqa: N802 - replaced by main() with a writer
    """Record a part's results so far (main() makes it write the results file)."""


def fmt(xs: list[float], digits: int = 3) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def ctx(work: Path, name: str, kind: str = "adapt-language"):
    from engine.testing import make_stage_context

    return make_stage_context(work, name, kind)


def sources(data: Path, *specs: tuple[str, str, float]):
    from engine.api import DataSource

    return [DataSource(path=data / f, format=fmt_of(str(data / f)), language=lang, weight=w)
            for f, lang, w in specs]


def fmt_of(name: str) -> str:
    from engine.data.files import detect_format

    return "text" if name.endswith(".txt") else detect_format(Path(name)) if Path(name).is_file() else "choice"


def train(work: Path, name: str, model: Path, data: list, steps: int, seed: int, *,
          snapshots: tuple[int, ...] = (), **extra: Any) -> Path | dict[int, Path]:
    """A ``ct`` stage; with ``snapshots``, also the model after each of those steps of the
    same run (from its checkpoints): ``{step: folder}`` with ``steps`` the final one."""
    from safetensors.torch import load_file

    from engine.api import ModelArtifact, StageInputs
    from engine.models.modelio import save_updated_copy
    from engine.training.checkpoint import CheckpointDir
    from engine_plugins.ct import CT as Ct

    c = ctx(work, name)
    every = {}
    if snapshots:
        c.checkpoint_dir = work / f"ck-{name}"
        every = {"checkpoint_every": snapshots[0], "keep_checkpoints": len(snapshots) + 1}
    art = Ct().run(c, StageInputs(model=ModelArtifact("m", model), data=data),
                   Ct.Params(**{**CT, **every}, steps=steps, seed=seed, **extra))
    if not snapshots:
        return Path(art.path)
    ckpts = CheckpointDir(c.checkpoint_dir)
    out = {steps: Path(art.path)}
    for step in snapshots:
        folder = work / f"{name}-at-{step}"
        save_updated_copy(Path(art.path), folder, load_file(str(ckpts.path(step) / "trainable.safetensors")))
        out[step] = folder
    return out


def bpb(work: Path, models: dict[str, Path], data: list) -> dict[str, dict[str, float]]:
    from engine.api import ModelArtifact, StageInputs
    from engine_plugins.perplexity import Perplexity

    c = ctx(work, f"ppl-{len(list(work.iterdir()))}", "evaluate")
    art = Perplexity().run(c, StageInputs(models=[ModelArtifact(n, p) for n, p in models.items()], data=data),
                           Perplexity.Params(bits_per_byte=True, batch_size=16))
    return art.metrics


def task(work: Path, models: dict[str, Path], data: list) -> dict[str, dict[str, float]]:
    from engine.api import ModelArtifact, StageInputs
    from engine_plugins.task_accuracy import TaskAccuracy

    c = ctx(work, f"task-{len(list(work.iterdir()))}", "evaluate")
    art = TaskAccuracy().run(c, StageInputs(models=[ModelArtifact(n, p) for n, p in models.items()], data=data),
                             TaskAccuracy.Params())
    return art.metrics


def texts_of(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prepare(work: Path) -> Path:
    """Cyrillic lum (train, test, task) and English files in ``work/data``."""
    from engine import world

    data = work / "data"
    subprocess.run([sys.executable, str(ROOT / "docs/examples/own_language_data.py"), str(data)], check=True,
                   capture_output=True)
    for name in ("train.txt", "test.txt", "task-test.jsonl"):
        shutil.copyfile(world.data_path(f"en/{name}"), data / f"en-{name}")
    shutil.copyfile(world.data_path("en/task-train.jsonl"), data / "en-task-train.jsonl")
    return data


# --- 1. init methods ---------------------------------------------------------------------------


def part_extend(work: Path, data: Path, base: Path, seeds: list[int]) -> dict[str, Any]:
    from engine.models.tokenizer.extend import extend_tokenizer

    lum = texts_of(data / "train.txt")
    test = sources(data, ("test.txt", "lum", 1.0))
    mix = sources(data, ("train.txt", "lum", 9.0), ("en-train.txt", "en", 1.0))
    out: dict[str, Any] = {"untouched": bpb(work, {"base": base}, test)["base"]["bpb/lum"]}
    for seed in seeds:  # every init of a seed before the next seed: a stopped run still compares them
        for init in INITS:
            folder = work / f"ext-{init}-{seed}"
            extend_tokenizer(base, lum, folder, new_tokens=500, init=init, seed=seed)
            # one run of STEPS[-1] steps, read after each of STEPS (its checkpoints)
            row = {0: folder, **train(work, f"ct-{init}-{seed}", folder, mix, STEPS[-1], seed,
                                      snapshots=tuple(STEPS[:-1]))}
            scores = bpb(work, {str(k): v for k, v in row.items()}, test)
            for k in row:
                out.setdefault(init, {}).setdefault(str(k), []).append(scores[str(k)]["bpb/lum"])
            print(f"  extend {init} seed {seed}: " + ", ".join(
                f"{k}: {scores[str(k)]['bpb/lum']:.3f}" for k in row), flush=True)
            PARTIAL("extend", out)
    return out


# --- 2. transplant -----------------------------------------------------------------------------


def part_transplant(work: Path, data: Path, base: Path, seeds: list[int]) -> dict[str, Any]:
    from engine.models.tokenizer.extend import extend_tokenizer
    from engine.models.tokenizer.transplant import transplant_tokenizer

    both = texts_of(data / "train.txt") + texts_of(data / "en-train.txt")
    test = sources(data, ("test.txt", "lum", 1.0), ("en-test.txt", "en", 1.0))
    mix = sources(data, ("train.txt", "lum", 9.0), ("en-train.txt", "en", 1.0))
    untouched = bpb(work, {"base": base}, test)["base"]
    out: dict[str, Any] = {"untouched": untouched, "step0": {}, "step40": {}, "vocab": None}
    for seed in seeds:
        models0: dict[str, Path] = {}
        for init in INITS:
            res = transplant_tokenizer(base, work / f"tp-{init}-{seed}", vocab_size=1536, texts=both,
                                       init=init, seed=seed)
            out["vocab"] = {"size": res.new_size, "shared": res.shared, "made": len(res.added)}
            models0[init] = res.folder
        ext = extend_tokenizer(base, texts_of(data / "train.txt"), work / f"tp-ext-{seed}", new_tokens=500,
                               init="mean", seed=seed).folder
        models0["extend-mean"] = ext
        scores0 = bpb(work, {k: v for k, v in models0.items()}, test)
        trained = {k: train(work, f"tp-emb-{k}-{seed}", v, mix, BUDGET["rows"], seed,
                            train_only="embeddings")
                   for k, v in models0.items() if k in TRAINED}
        scores40 = bpb(work, trained, test)
        for k in models0:
            for lang in ("lum", "en"):
                out["step0"].setdefault(k, {}).setdefault(lang, []).append(scores0[k][f"bpb/{lang}"])
                if k in scores40:
                    out["step40"].setdefault(k, {}).setdefault(lang, []).append(scores40[k][f"bpb/{lang}"])
        print(f"  transplant seed {seed}: step 0 " + ", ".join(
            f"{k} lum {scores0[k]['bpb/lum']:.3f} en {scores0[k]['bpb/en']:.3f}" for k in models0)
            + "; step 40 " + ", ".join(f"{k} lum {scores40[k]['bpb/lum']:.3f}" for k in scores40), flush=True)
        PARTIAL("transplant", out)
    return out


# --- 3. merge across tokenizers ------------------------------------------------------------------


def merge(work: Path, name: str, base: Path, models: list[Path]) -> Path:
    from engine.cli.commands import main

    out = work / name
    args = ["merge", "--method", "task-arithmetic", "--base", f"base={base}", "--out", str(out)]
    for i, m in enumerate(models):
        args += ["--model", f"m{i}={m}"]
    if main(args) != 0:
        raise RuntimeError(f"merge {name} failed")
    return out


def part_merge(work: Path, data: Path, base: Path, seeds: list[int], init: str = "focus") -> dict[str, Any]:
    from engine.api import ModelArtifact, StageInputs
    from engine.models.tokenizer.transplant import transplant_tokenizer
    from engine_plugins.sft import SFT as Sft

    both = texts_of(data / "train.txt") + texts_of(data / "en-train.txt")
    mix = sources(data, ("train.txt", "lum", 9.0), ("en-train.txt", "en", 1.0))
    tasks = sources(data, ("task-test.jsonl", "lum", 1.0), ("en-task-test.jsonl", "en", 1.0))
    out: dict[str, Any] = {"init": init}
    for seed in seeds:
        c = ctx(work, f"sft-{seed}")
        sft = Path(Sft().run(c, StageInputs(model=ModelArtifact("base", base),
                                            data=sources(data, ("en-task-train.jsonl", "en", 1.0))),
                             Sft.Params(**SFT, seed=seed)).path)
        # shared tokenizer: CT on the original vocabulary, merged with the SFT model
        ct = train(work, f"mg-ct-{seed}", base, mix, BUDGET["ct"], seed)
        shared = merge(work, f"mg-shared-{seed}", base, [ct, sft])
        # transplanted: base and SFT model given the learned tokenizer; rows, then CT
        base_t = transplant_tokenizer(base, work / f"mg-base-t-{seed}", vocab_size=1536, texts=both,
                                      init=init, seed=seed).folder
        sft_t = transplant_tokenizer(sft, work / f"mg-sft-t-{seed}", tokenizer=base_t, texts=both,
                                     init=init, seed=seed).folder
        rows = train(work, f"mg-rows-{seed}", base_t, mix, BUDGET["rows"], seed, train_only="embeddings")
        ct_t = train(work, f"mg-ct-t-{seed}", rows, mix, BUDGET["ct"], seed)
        moved = merge(work, f"mg-moved-{seed}", base_t, [ct_t, sft_t])
        scores = task(work, {"sft": sft, "ct": ct, "shared": shared, "ct-t": ct_t, "sft-t": sft_t,
                             "transplanted": moved}, tasks)
        for k, v in scores.items():
            for lang in ("lum", "en"):
                out.setdefault(k, {}).setdefault(lang, []).append(v[f"acc/{lang}"])
        PARTIAL("merge", out)
        print(f"  merge seed {seed}: " + ", ".join(
            f"{k} lum {v['acc/lum']:.3f} en {v['acc/en']:.3f}" for k, v in scores.items()), flush=True)
    return out


# --- 4. time -----------------------------------------------------------------------------------------


def part_time(work: Path, data: Path) -> dict[str, Any]:
    """In-process seconds (imports excluded, lingoforge.json's ``seconds``) and the whole command."""
    out: dict[str, Any] = {}
    for init in INITS:
        for what, argv in (
            ("extend", ["extend-tokenizer", "builtin:tiny-base", "--data", str(data / "train.txt"),
                        "--tokens", "500"]),
            ("transplant", ["transplant-tokenizer", "builtin:tiny-base", "--vocab-size", "1536",
                            "--data", str(data / "train.txt"), "--data", str(data / "en-train.txt")])):
            folder = work / f"time-{what}-{init}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "engine", *argv, "--init", init, "--output", str(folder)],
                           check=True, capture_output=True, cwd=ROOT)
            whole = time.perf_counter() - t0
            inside = json.loads((folder / "lingoforge.json").read_text())["seconds"]
            out[f"{what}/{init}"] = {"in_process_s": inside, "command_s": round(whole, 2)}
            print(f"  {what} {init}: {inside:.2f} s in-process, {whole:.2f} s command", flush=True)
    return out


def markdown(results: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's section from a results file."""
    out = []
    ext = results.get("extend")
    if ext:
        out.append(f"Held-out Cyrillic lum bits per byte (untouched model: {ext['untouched']:.3f}), "
                   "mean ± sd over seeds:\n")
        out.append("| init | step 0 | 20 steps | 40 steps | 80 steps |\n|---|---:|---:|---:|---:|")
        for init in (i for i in INITS if i in ext):
            out.append(f"| {init} | " + " | ".join(fmt(ext[init][k]) for k in ("0", *map(str, STEPS))) + " |")
        out.append("")
        if ext.get("partial"):
            out.append(f"(stopped early: {len(ext['mean']['0']) if 'mean' in ext else 0} seed(s) of mean)\n")
        for k in (("0", "40") if all(m in ext for m in ("mean", "omp", "focus")) else ()):
            best = min(("omp", "focus"), key=lambda m: statistics.mean(ext[m][k]))
            gain = statistics.mean(ext["mean"][k]) - statistics.mean(ext[best][k])
            spread = max(statistics.stdev(ext[m][k]) if len(ext[m][k]) > 1 else 0.0 for m in ("mean", best))
            verdict = "below mean by more than the seed spread" if gain > spread else (
                "below mean, but not by more than the seed spread" if gain > 0 else "not below mean")
            out.append(f"- after {k} steps: the better new method is {best}, {gain:+.3f} bpb against mean "
                       f"(largest seed sd of the two {spread:.3f}): {verdict}.")
        out.append("")
    tp = results.get("transplant")
    if tp:
        u = tp["untouched"]
        v = tp["vocab"]
        out.append(f"Transplant (learned BPE: {v['size']} tokens, {v['shared']} shared with the world's, "
                   f"{v['made']} made): bits per byte; untouched model lum {u['bpb/lum']:.3f}, en "
                   f"{u['bpb/en']:.3f}:\n")
        out.append("| model | lum, step 0 | en, step 0 | en vs untouched | lum, 40 steps | en, 40 steps |\n"
                   "|---|---:|---:|---:|---:|---:|")
        for k in [*INITS, "extend-mean"]:
            s0, s40 = tp["step0"][k], tp["step40"].get(k)
            ratio = statistics.mean(s0["en"]) / u["bpb/en"]
            late = f"{fmt(s40['lum'])} | {fmt(s40['en'])}" if s40 else "- | -"
            out.append(f"| {k} | {fmt(s0['lum'])} | {fmt(s0['en'])} | {ratio:.2f}x | {late} |")
        out.append("")
        for k in INITS:
            ratio = statistics.mean(tp["step0"][k]["en"]) / u["bpb/en"]
            out.append(f"- {k}: English at step 0 is {ratio:.2f}x the untouched model's bpb "
                       f"({'within' if ratio <= 1.10 else 'not within'} 10%).")
        for k in TRAINED:
            if k != "extend-mean" and k in tp["step40"] and "extend-mean" in tp["step40"]:
                a, b = statistics.mean(tp["step40"][k]["lum"]), statistics.mean(tp["step40"]["extend-mean"]["lum"])
                out.append(f"- after {BUDGET['rows']} embeddings-only steps, lum: transplant ({k}) {a:.3f} against "
                           f"extend-tokenizer (mean) {b:.3f}: {'at least as good' if a <= b else 'worse'}.")
        out.append("")
    mg = results.get("merge")
    if mg:
        out.append(f"Merge across tokenizers (init {mg['init']}): task accuracy (multiple choice), "
                   "mean ± sd over seeds:\n")
        out.append("| model | lum | en |\n|---|---:|---:|")
        for k, label in (("sft", "English SFT (original vocabulary)"), ("ct", "CT, original vocabulary"),
                         ("shared", "merge, shared original tokenizer"), ("sft-t", "English SFT, transplanted"),
                         ("ct-t", "CT, transplanted vocabulary"), ("transplanted", "merge, transplanted tokenizer")):
            out.append(f"| {label} | {fmt(mg[k]['lum'])} | {fmt(mg[k]['en'])} |")
        out.append("")
    tm = results.get("time")
    if tm:
        out.append("| command | init | in-process s | whole command s |\n|---|---|---:|---:|")
        for key, v in tm.items():
            what, init = key.split("/")
            out.append(f"| {what} | {init} | {v['in_process_s']:.2f} | {v['command_s']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-2", help="e.g. 0-2 or 0,3")
    parser.add_argument("--parts", default="time,extend,transplant,merge")
    parser.add_argument("--merge-seeds", help="seeds of the merge part (default: --seeds)")
    parser.add_argument("--keep", type=Path, help="keep the work folder here (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="2 training steps everywhere: check the script runs")
    parser.add_argument("--keep-results", action="store_true",
                        help="keep the parts of the results file this run does not measure")
    parser.add_argument("--markdown", action="store_true", help="print the tables of the last results and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    if args.smoke:
        STEPS[:] = [2]
        SFT["steps"] = 2
        BUDGET.update(rows=2, ct=2)
        RESULTS = RESULTS.with_name("vocab_transfer_smoke.json")
    a, _, b = args.seeds.partition("-")
    seeds = list(range(int(a), int(b) + 1)) if b else [int(s) for s in args.seeds.split(",")]
    merge_seeds = [int(x) for x in args.merge_seeds.split(",")] if args.merge_seeds else seeds
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from engine import world

    base = world.model_path("tiny-base")
    work = args.keep or Path(tempfile.mkdtemp(prefix="lingoforge-vocab-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work)
    results: dict[str, Any] = {"machine": machine(), "seeds": seeds, "merge_seeds": merge_seeds,
                               "torch_threads": torch.get_num_threads()}
    if RESULTS.is_file() and args.keep_results:  # parts measured by an earlier run are kept
        results = {**json.loads(RESULTS.read_text()), **results}
    t0 = time.perf_counter()

    def partial(part: str, value: Any) -> None:
        RESULTS.write_text(json.dumps({**results, part: {**value, "partial": True},
                                       "seconds": round(time.perf_counter() - t0)}, indent=1))

    global PARTIAL
    PARTIAL = partial
    for part in args.parts.split(","):
        print(f"{part} ...", flush=True)
        fn = {"time": lambda: part_time(work, data), "extend": lambda: part_extend(work, data, base, seeds),
              "transplant": lambda: part_transplant(work, data, base, seeds),
              "merge": lambda: part_merge(work, data, base, merge_seeds)}[part]
        results[part] = fn()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({**results, "seconds": round(time.perf_counter() - t0)}, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1)[:6000])
    print(f"written {RESULTS}; {machine()}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
