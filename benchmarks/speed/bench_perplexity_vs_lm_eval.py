"""Perplexity scoring time: the engine against lm-evaluation-harness on the same documents.

Both sides compute the same numbers: for every document, the summed log-likelihood of
all its text tokens, each predicted from BOS and the document's tokens before it.

* **engine**: what the ``perplexity`` evaluate plugin runs per model
  (``encode_document`` + ``document_spans`` + ``score_spans``, its default ``batch_size``
  and window), summed per document.
* **lm-eval**: ``HFLM(pretrained=<folder>, batch_size=...)`` and its
  ``loglikelihood_rolling`` (the request type of its perplexity tasks), the documented API
  of lm-evaluation-harness's Hugging Face backend, at each ``--lm-eval-batch-sizes``
  value (1 is its default); the engine is compared with the fastest. ``auto`` is not
  among the defaults: on a CPU its probe (five forwards of ``max_batch_size`` x
  ``max_length`` positions, here 64 x 1024) never runs out of memory, so it picks 64 after
  costing more than scoring the documents.

* **floor**: no scorer at all, a lower bound: only the matrix products of the model's
  linear layers over every position the documents have, 2048 positions a product. Exact
  fp32 scoring of these documents cannot take less than this on the machine (it leaves
  out attention, norms, activations and the softmax); the script reports it against
  lm-eval and the engine.

The model is a random Llama (seed 0; default 16 layers, hidden 256, intermediate 1024,
vocab 4096, context 1024) saved once to a temporary folder with the built-in world's
tokenizer; the documents are lines of the built-in world's training text (``en``,
``vel``, ``dor``, ``lum`` in turn), all shorter than the window, so that both sides score
every document in one window and their per-document totals must agree to float rounding
(the script reports the largest difference).

Every measurement runs in a fresh subprocess with the same torch thread count: load the
model (timed apart), score the first 16 documents once (warm-up, every side alike), then
time tokenizing and scoring all documents. Rounds alternate (engine, lm-eval settings,
then the reverse order, ...); the script reports medians, min and max, the ratio of
medians, and the largest per-document difference of the summed log-likelihoods.
``--baseline-root DIR`` also times the engine of another source tree (a before/after in
the same run). Run it under the shared lock::

    flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_perplexity_vs_lm_eval.py

``--quick`` is a smoke run (120 documents, 2 layers, 1 round). ``--json PATH`` writes the
figures (benchmarks/results/perplexity_vs_lm_eval.json is the committed run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

WARMUP_DOCS = 16
LANGUAGES = ("en", "vel", "dor", "lum")


def prepare(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The model folder (random Llama + the world's tokenizer) and the documents file."""
    from _harness import build_llama
    from transformers import AutoTokenizer

    from engine.world import data_path, model_path

    model_dir = build_llama(folder / "model", layers=args.layers, hidden=args.hidden,
                            vocab=args.vocab, intermediate=args.intermediate, seed=0)
    AutoTokenizer.from_pretrained(str(model_path("tiny-base"))).save_pretrained(str(model_dir))
    lines = {lang: [t for t in data_path(f"{lang}/train.txt").read_text(encoding="utf-8").splitlines()
                    if t.strip()] for lang in LANGUAGES}
    docs = [lines[LANGUAGES[i % len(LANGUAGES)]][i // len(LANGUAGES)] for i in range(args.docs)]
    docs_file = folder / "docs.json"
    docs_file.write_text(json.dumps(docs), encoding="utf-8")
    return model_dir, docs_file


# --- the measured sides (each in its own process) ----------------------------------------


def engine_side(model_dir: Path, docs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from engine.evaluation.scoring import score_spans
    from engine.evaluation.spans import context_length, document_spans, encode_document
    from engine.models import modelio
    from engine_plugins.perplexity import Perplexity

    params = Perplexity.Params()
    NEW = hasattr(params, "batch_tokens")  # noqa: N806 - the script also times older trees
    t0 = time.perf_counter()
    model = modelio.load_model(model_dir, device="cpu")
    tok = modelio.load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    window = params.max_length or context_length(modelio.read_config(model_dir), tok)
    stride = params.stride or max(1, window // 2)

    def score(texts: list[str]) -> list[float]:
        per_doc = [document_spans(encode_document(tok, t), window, stride) for t in texts]
        flat = [s for spans in per_doc for s in spans]
        scores = iter(score_spans(model, flat, batch_size=params.batch_size, device="cpu",
                                  pad_id=tok.pad_token_id,
                                  **({"max_tokens": params.batch_tokens} if NEW else {})))
        return [sum(next(scores).logprob for _ in spans) for spans in per_doc]

    score(docs[:WARMUP_DOCS])
    t0 = time.perf_counter()
    totals = score(docs)
    return {"load_s": load_s, "score_s": time.perf_counter() - t0, "totals": totals,
            "setting": f"batch_size={params.batch_size}"
                       + (f", batch_tokens={params.batch_tokens}" if NEW else "")
                       + f", window {window}"}


def lm_eval_side(model_dir: Path, docs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    bs = args.lm_eval_batch_size
    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), batch_size=int(bs) if bs.isdigit() else bs, device="cpu")
    load_s = time.perf_counter() - t0

    def score(texts: list[str]) -> list[float]:
        requests = [Instance(request_type="loglikelihood_rolling", doc={"text": t},
                             arguments=(t,), idx=0) for t in texts]
        return [float(x) for x in lm.loglikelihood_rolling(requests, disable_tqdm=True)]

    score(docs[:WARMUP_DOCS])
    t0 = time.perf_counter()
    totals = score(docs)
    return {"load_s": load_s, "score_s": time.perf_counter() - t0, "totals": totals,
            "setting": f"batch_size={bs}, max_length {lm.max_length}"}


def floor_side(model_dir: Path, docs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """A lower bound for any exact fp32 scorer of this model on this machine: the matrix
    products of the model's linear layers (every projection, the MLPs and the head) over
    every position the documents have (each document's tokens after BOS, as the engine
    encodes them), 2048 positions a product as the engine's batches hold, and nothing else:
    no attention, norms, activations, softmax, padding or Python. Its "totals" are not
    scores."""
    import torch

    from engine.evaluation.spans import encode_document
    from engine.models import modelio

    t0 = time.perf_counter()
    model = modelio.load_model(model_dir, device="cpu").eval()
    tok = modelio.load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    chunk = 2048
    x = torch.randn(chunk, max(w.shape[1] for w in weights))
    outs = {w.shape[0]: torch.empty(chunk, w.shape[0]) for w in weights}

    def score(texts: list[str]) -> list[float]:
        positions = sum(len(encode_document(tok, text)) for text in texts)
        with torch.inference_mode():
            for k in range(0, positions, chunk):
                n = min(chunk, positions - k)
                for w in weights:
                    torch.mm(x[:n, :w.shape[1]], w.t(), out=outs[w.shape[0]][:n])
        return [float(positions)]

    score(docs[:WARMUP_DOCS])
    t0 = time.perf_counter()
    totals = score(docs)
    flops = 2 * totals[0] * sum(w.numel() for w in weights)
    return {"load_s": load_s, "score_s": time.perf_counter() - t0, "totals": totals,
            "gflop": round(flops / 1e9, 1),
            "setting": f"the linear layers' products alone, {int(totals[0])} positions, "
                       f"{chunk} a product ({flops / 1e9:.0f} GFLOP)"}


def child(side: str, args: argparse.Namespace) -> None:
    import torch

    if args.engine_root:  # an older tree of the engine (and its plugins), for a before/after
        root = Path(args.engine_root)
        sys.path[:0] = [str(root), str(root / ".pypath")]
    torch.set_num_threads(args.threads)
    docs = json.loads(Path(args.docs_file).read_text(encoding="utf-8"))
    run = {"engine": engine_side, "lm-eval": lm_eval_side, "floor": floor_side}[side]
    out = run(Path(args.model_dir), docs, args)
    print(json.dumps({"side": side, **out}))


def run_child(side: str, args: argparse.Namespace, model_dir: Path, docs_file: Path) -> dict[str, Any]:
    """One measurement in a fresh process; ``side`` is ``engine``, ``engine@base`` (the tree
    given by ``--baseline-root``) or ``lm-eval@<batch_size>``."""
    kind, _, arg = side.partition("@")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind,
           "--model-dir", str(model_dir), "--docs-file", str(docs_file),
           "--threads", str(args.threads)]
    if kind == "lm-eval":
        cmd += ["--lm-eval-batch-size", arg]
    elif arg == "base":
        cmd += ["--engine-root", str(args.baseline_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{side} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent: alternate, summarise --------------------------------------------------------


def versions() -> dict[str, str]:
    import lm_eval
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"), "python": platform.python_version()}


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def agreement(a: list[float], b: list[float]) -> dict[str, float]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    return {"max_abs_diff": diffs[worst], "at_doc": worst, "doc_loglik_there": a[worst]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="measurements per side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on every side")
    parser.add_argument("--lm-eval-batch-sizes", default="1,8,64",
                        help="HFLM batch_size values to time, comma-separated (its default is 1); "
                             "the engine is compared with the fastest")
    parser.add_argument("--baseline-root", type=Path,
                        help="also time the engine of this source tree (a before/after)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 120 documents, 2 layers, 1 round")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--child", choices=("engine", "lm-eval", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--docs-file", help=argparse.SUPPRESS)
    parser.add_argument("--lm-eval-batch-size", default="1", help=argparse.SUPPRESS)
    parser.add_argument("--engine-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args)
        return 0
    if args.quick:
        args.docs, args.layers, args.rounds = 120, 2, 1

    folder = Path(tempfile.mkdtemp(prefix="lingoforge-ppl-bench-"))
    model_dir, docs_file = prepare(folder, args)
    lm_sides = [f"lm-eval@{bs.strip()}" for bs in args.lm_eval_batch_sizes.split(",") if bs.strip()]
    sides = ["engine", *(["engine@base"] if args.baseline_root else []), *lm_sides, "floor"]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            res = run_child(side, args, model_dir, docs_file)
            runs[side].append(res)
            print(f"  round {r + 1} {side}: scoring {res['score_s']:.2f} s "
                  f"(load {res['load_s']:.2f} s)", file=sys.stderr, flush=True)

    times = {side: [r["score_s"] for r in rows] for side, rows in runs.items()}
    med = {side: statistics.median(t) for side, t in times.items()}
    best = min(lm_sides, key=med.__getitem__)
    ratio = med["engine"] / med[best]
    engine = runs["engine"][0]["totals"]
    result = {
        "command": "flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_perplexity_vs_lm_eval.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": _harness.cpu_name(), "logical_cpus": os.cpu_count(),
                    "torch_threads": args.threads, **versions()},
        "model": {"arch": "Llama (random init, seed 0)", "layers": args.layers, "hidden": args.hidden,
                  "intermediate": args.intermediate, "vocab": args.vocab, "context": 1024},
        "documents": {"count": args.docs, "source": "built-in world train.txt lines, "
                      + "/".join(LANGUAGES) + " in turn", "total_nll": round(-sum(engine), 3)},
        "rounds": args.rounds,
        "order": "round 1 " + ", ".join(sides) + "; even rounds reversed",
        "sides": {side: {"setting": runs[side][0]["setting"], **summary(times[side]),
                         "rounds_s": [round(t, 3) for t in times[side]],
                         "load_median_s": round(statistics.median(r["load_s"] for r in runs[side]), 3)}
                  for side in sides},
        "fastest_lm_eval": best,
        "ratio_engine_over_fastest_lm_eval": round(ratio, 3),
        "ratio_engine_over_lm_eval_default": round(med["engine"] / med["lm-eval@1"], 3)
        if "lm-eval@1" in med else None,
        "target_ratio": 0.25,
        "target_met": ratio <= 0.25,
        "floor_over_fastest_lm_eval": round(med["floor"] / med[best], 3),
        "engine_over_floor": round(med["engine"] / med["floor"], 3),
        "agreement": {side: agreement(engine, runs[side][0]["totals"]) for side in sides[1:]
                      if side != "floor"},
        "engine_rounds_max_abs_diff": max((abs(x - y) for r in runs["engine"][1:]
                                           for x, y in zip(r["totals"], engine, strict=True)),
                                          default=0.0),
    }
    if args.baseline_root:
        result["ratio_engine_over_base"] = round(med["engine"] / med["engine@base"], 3)
    print(f"machine: {result['machine']}")
    print(f"model: {result['model']}; {args.docs} documents; {args.rounds} rounds per side, "
          f"{result['order']}")
    print("\n| side | setting | median s | min s | max s | max abs diff of per-document "
          "log-likelihood vs engine |\n|---|---|---|---|---|---|")
    for side in sides:
        s = result["sides"][side]
        diff = result["agreement"].get(side, {}).get("max_abs_diff")
        print(f"| {side} | {s['setting']} | {s['median_s']:.2f} | {s['min_s']:.2f} | "
              f"{s['max_s']:.2f} | {'-' if diff is None else f'{diff:.2g}'} |")
    print(f"\nratio engine / {best} (medians): {ratio:.3f} (target <= 0.25: "
          f"{'met' if ratio <= 0.25 else 'missed'})")
    print(f"floor (the linear layers' matrix products alone) / {best}: "
          f"{result['floor_over_fastest_lm_eval']:.3f}; engine / floor: {result['engine_over_floor']:.3f}")
    if result["ratio_engine_over_lm_eval_default"] is not None:
        print(f"ratio engine / lm-eval default batch_size=1: {result['ratio_engine_over_lm_eval_default']:.3f}")
    if args.baseline_root:
        print(f"ratio engine / engine@base: {result['ratio_engine_over_base']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
