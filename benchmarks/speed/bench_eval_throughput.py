"""Evaluation scoring throughput against a plain batched forward over the same tokens.

What it measures, on a randomly initialised Llama big enough that the forward pass
dominates (default 12 layers, hidden 384, vocab 8192; nothing is downloaded):

* **perplexity path**: ``engine.evaluation.scoring.score_spans`` over documents of 64..256
  tokens versus *one plain batched forward per batch* over exactly the same batches
  (same right padding, ``use_cache=False``, full logits, no log-softmax). The ratio
  ``score / plain`` in tokens per second is the overhead of everything the engine
  adds (batch planning, ``logits_to_keep``, float32 log-softmax, gathering).
* **multiple-choice path**: items with a long shared context (few-shot style) and
  4 short choices, scored with ``share_prefix=False`` (every choice re-runs the
  context) and with the default shared-prefix KV-cache path; items per second.

Measurements alternate (A B A B ...) over ``--rounds`` rounds and report medians and
minimums, so that a neighbour's load on a shared machine hits both sides alike. Run it under the
shared lock::

    flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_eval_throughput.py

Prints a table and the exact command; ``--markdown`` prints the table as markdown.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.evaluation.scoring import batch_order, score_spans
from engine.evaluation.spans import Span


def build_model(layers: int, hidden: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def document_spans(n_docs: int, vocab: int, rng: random.Random) -> list[Span]:
    spans = []
    for _ in range(n_docs):
        ids = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(64, 256)))
        spans.append(Span(ids, len(ids) - 1))
    return spans


def choice_spans(n_items: int, vocab: int, rng: random.Random, context: int) -> list[Span]:
    spans = []
    for _ in range(n_items):
        ctx = tuple(rng.randrange(3, vocab) for _ in range(context))
        for _ in range(4):
            cont = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(1, 6)))
            spans.append(Span(ctx + cont, len(cont)))
    return spans


def plain_forward(model: torch.nn.Module, spans: list[Span], batch_size: int) -> None:
    """The yardstick: one forward per batch, same batches and padding as score_spans."""
    with torch.inference_mode():
        for indices in batch_order(spans, batch_size):
            rows = [spans[i].tokens[:-1] for i in indices]
            width = max(map(len, rows))
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, toks in enumerate(rows):
                ids[r, :len(toks)] = torch.tensor(toks)
                mask[r, :len(toks)] = 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per case and round, measured round-robin (A B A B ...) after one warm-up each."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=48)
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--context", type=int, default=192, help="context tokens per choice item")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    model = build_model(args.layers, args.hidden, args.vocab)
    docs = document_spans(args.docs, args.vocab, rng)
    items = choice_spans(args.items, args.vocab, rng, args.context)
    bs = args.batch_size

    def score(spans: list[Span], **kw: object) -> Callable[[], object]:
        return lambda: score_spans(model, spans, batch_size=bs, device="cpu", pad_id=0, **kw)

    runs = alternate({
        "plain": lambda: plain_forward(model, docs, bs),
        "score": score(docs),
        "mc_plain": score(items, share_prefix=False),
        "mc_shared": score(items),
    }, args.rounds)
    t = {name: statistics.median(v) for name, v in runs.items()}
    best = {name: min(v) for name, v in runs.items()}
    doc_tokens = sum(s.n_inputs for s in docs)
    n_params = sum(p.numel() for p in model.parameters())
    def row(label: str, name: str, ref: str, work: float, unit: str) -> tuple[str, ...]:
        return (label, f"{work / t[name]:,.2f} {unit}", f"{t[name]:.2f}", f"{best[name]:.2f}",
                f"{t[ref] / t[name]:.2f}", f"{best[ref] / best[name]:.2f}")

    rows = [
        row("plain batched forward (yardstick)", "plain", "plain", doc_tokens, "tok/s"),
        row("score_spans, documents", "score", "plain", doc_tokens, "tok/s"),
        row("multiple choice, share_prefix=False", "mc_plain", "mc_plain", args.items, "items/s"),
        row("multiple choice, shared prefix (KV cache)", "mc_shared", "mc_plain", args.items,
            "items/s"),
    ]
    command = "flock /tmp/lingoforge-bench.lock python " + " ".join(
        ["benchmarks/speed/bench_eval_throughput.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} "
          f"({n_params / 1e6:.1f}M params), fp32, {args.threads} threads, torch {torch.__version__}")
    print(f"documents: {args.docs} ({doc_tokens} tokens fed); items: {args.items} x 4 choices, "
          f"context {args.context} tokens; batch_size {bs}; medians of {args.rounds} ABAB rounds")
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}".rstrip())
    if args.markdown:
        print("\n| case | throughput (median) | median s | min s | speed vs yardstick "
              "(median) | (min) |\n|---|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        print(f"{'case':44s} {'median thr':>18s} {'med s':>7s} {'min s':>7s}  rel(med) rel(min)")
        for name, thr, sec, low, rel, rel_min in rows:
            print(f"{name:44s} {thr:>18s} {sec:>7s} {low:>7s}  x{rel:<7s} x{rel_min}")
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
