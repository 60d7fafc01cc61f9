"""How fast a tiny Llama learns to use its context: copying at a fixed offset against
copying by content (induction), on synthetic sequences.

Why this exists: reading a fact from a prompt ("The moth is green. The wolf is red.
What color is the wolf?") needs a model that can find an earlier mention and copy what
followed it, an *induction* circuit. This script measures, for the built-in world's model
shape, how many training steps that circuit takes to form when every training sequence
demands it, which bounds what a world pretrained in a few CPU minutes can be expected to
learn (docs/world.md, "What the base model can learn in minutes").

Two tasks, each a batch of random token sequences where the last part is predictable
only from the context:

* ``fixed``: ``x x`` with ``x`` of 32 tokens: the token 32 positions back is the answer
  (a positional head suffices);
* ``induction``: ``noise x x`` with ``x`` of 8-40 tokens at a random position: the
  answer follows the earlier occurrence of the current token (content-based lookup).

It prints the mean loss (nats) on the predictable positions every ``--every`` steps;
chance is ln(vocab range). A sharp drop is the circuit forming.

    python benchmarks/speed/bench_copy_learning.py --task fixed --steps 300
    python benchmarks/speed/bench_copy_learning.py --task induction --steps 1500 --layers 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def batch(task: str, gen: torch.Generator, rows: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (rows x 64 or 128) and a mask of the positions whose loss is reported."""
    if task == "fixed":
        x = torch.randint(10, 10 + vocab, (rows, 32), generator=gen)
        ids = torch.cat([x, x], 1)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 33:] = True  # targets of the second copy (position 32's target needs no copy)
        return ids, mask
    out, masks = [], []
    for _ in range(rows):
        n = int(torch.randint(8, 41, (1,), generator=gen))
        x = torch.randint(10, 10 + vocab, (n,), generator=gen)
        pre = torch.randint(10, 10 + vocab, (128 - 2 * n,), generator=gen)
        out.append(torch.cat([pre, x, x]))
        m = torch.zeros(128, dtype=torch.bool)
        m[128 - n + 1:] = True  # the second copy, after its first token
        masks.append(m)
    return torch.stack(out), torch.stack(masks)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("fixed", "induction"), default="induction")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=64, help="how many distinct tokens the sequences use")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.world.pretrain import ARCHITECTURE
    from engine.world.tokenizer import VOCAB_SIZE

    torch.manual_seed(args.seed)
    arch = dict(ARCHITECTURE, num_hidden_layers=args.layers)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB_SIZE, **arch))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 1)
    curve, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask = batch(args.task, gen, args.batch, args.vocab)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        nll.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0 or step == args.steps:
            loss = float(nll.detach()[mask[:, 1:]].mean())
            curve.append({"step": step, "copy_loss": round(loss, 3), "s": round(time.perf_counter() - started, 1)})
            print(f"step {step:5d}  loss on predictable positions {loss:.3f} nats "
                  f"(chance {math.log(args.vocab):.3f})  {curve[-1]['s']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
