"""Document packing: packed vs alone difference, and training tokens/s against stream packing.

For a random Llama (built here, nothing downloaded) and the engine's own batches of the
tiny corpus (short documents, so a block holds many: the most mask work per token):

* **difference**: every document segment of a few document-packed blocks is run alone;
  the largest logit difference and per-document loss difference to its packed run;
* **throughput**: training steps (forward, backward, AdamW) on document-packed blocks
  (position ids, block-causal mask) and on stream-packed blocks (all-ones mask, documents
  see each other), alternated step by step on the same process, tokens/s of each.

Run: ``python benchmarks/speed/bench_packing.py [--hidden 256 --layers 4 --seq-len 512]``
(prints a markdown table and the CPU).
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.core.inputs import DataSource
from engine.testing.builders import TINY_TEXT, build_tiny_llama, write_text_file
from engine.training.batching import packed_batches
from engine.training.packing import model_inputs


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _difference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float, int]:
    """(max |logit| difference, max per-document loss difference, documents compared)."""
    worst_logit = worst_loss = 0.0
    n = 0
    with torch.no_grad():
        logits = model(**model_inputs(batch, False)).logits
        for row in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
            for a, b in zip(starts, [*starts[1:], batch["input_ids"].shape[1]]):
                ids = batch["input_ids"][row:row + 1, a:b]
                if ids.shape[1] < 2:
                    continue
                alone = model(input_ids=ids).logits
                packed = logits[row:row + 1, a:b]
                worst_logit = max(worst_logit, float((packed - alone).abs().max()))
                ce = torch.nn.functional.cross_entropy
                la = ce(alone[0, :-1], ids[0, 1:])
                lp = ce(packed[0, :-1], ids[0, 1:])
                worst_loss = max(worst_loss, abs(float(la - lp)))
                n += 1
    return worst_logit, worst_loss, n


def _throughput(model: torch.nn.Module, streams: dict[str, object], steps: int) -> dict[str, float]:
    models = {k: copy.deepcopy(model).train() for k in streams}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    seconds = dict.fromkeys(streams, 0.0)
    tokens = dict.fromkeys(streams, 0)
    for step in range(steps + 1):
        for name, it in streams.items():
            batch = next(it)
            t0 = time.perf_counter()
            loss = models[name](**model_inputs(batch, False)).loss
            loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if step:  # the first step of each warms up
                seconds[name] += time.perf_counter() - t0
                tokens[name] += batch["input_ids"].numel()
    return {k: tokens[k] / seconds[k] for k in streams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = build_tiny_llama(root / "model", num_layers=args.layers, hidden=args.hidden)
        # longer position table than the builder's default for --seq-len > 256
        model = AutoModelForCausalLM.from_pretrained(path, max_position_embeddings=max(256, args.seq_len))
        tok = AutoTokenizer.from_pretrained(path)
        src = [DataSource(write_text_file(root / "text.txt", TINY_TEXT * 8))]
        diffs = {}
        for impl in ("sdpa", "eager"):
            m = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl,
                                                     max_position_embeddings=max(256, args.seq_len)).eval()
            batch = next(packed_batches(tok, src, seq_len=args.seq_len, batch_size=args.batch, documents=True))
            diffs[impl] = _difference(m, batch)
        streams = {mode: packed_batches(tok, src, seq_len=args.seq_len, batch_size=args.batch,
                                        documents=mode == "documents")
                   for mode in ("documents", "stream")}
        docs_per_block = float(next(packed_batches(tok, src, seq_len=args.seq_len, batch_size=args.batch,
                                                   documents=True))["position_ids"].eq(0).sum()) / args.batch
        tok_s = _throughput(model, streams, args.steps)
    params = sum(p.numel() for p in model.parameters())
    print(f"CPU: {_cpu()}, torch threads {args.threads}; Llama h{args.hidden} x{args.layers} layers "
          f"({params / 1e6:.2f}M params), seq_len {args.seq_len}, batch {args.batch}, "
          f"{docs_per_block:.1f} documents per block, {args.steps} timed steps per mode (alternated)\n")
    print("| attention | documents compared | max logit diff packed vs alone | max per-document loss diff |")
    print("|---|---|---|---|")
    for impl, (dl, dloss, n) in diffs.items():
        print(f"| {impl} | {n} | {dl:.2e} | {dloss:.2e} |")
    print("\n| training step (sdpa) | tokens/s |")
    print("|---|---|")
    for mode, v in tok_s.items():
        label = ("document packing (position ids, block-causal mask)" if mode == "documents"
                 else "stream packing (all-ones mask, cross-document attention)")
        print(f"| {label} | {v:,.0f} |")
    print(f"\ndocument / stream: {tok_s['documents'] / tok_s['stream']:.2f}x")


if __name__ == "__main__":
    main()
