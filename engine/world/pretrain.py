"""The built-in base model: a tiny Llama pretrained on the world.

The package ships one build of it (``engine/world/shipped-models/tiny-base/``, written by
``python -m engine.world --write-shipped``); this module is what made it, and what
``python -m engine.world --rebuild`` runs on a user's machine. The loop is plain
PyTorch on purpose: it must not depend on the engine's trainer (which users tune and
plugins change), so that the base model every demo starts from stays the same. It runs
seeded, with deterministic algorithms on, on the pretraining mixture packed into
128-token sequences; rebuilding on the same kind of CPU with the same torch version and
thread count gives a byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.core.artifacts import write_meta
from engine.core.console import current, make_progress
from engine.world import corpus
from engine.world.tokenizer import VOCAB_SIZE, train_tokenizer

#: the base model's shape (``model_config`` reports it without building anything)
ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
#: token ids of <pad>, <s>, </s>: the tokenizer's special tokens come first, in this order
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

SEQ_LEN = 128
PRETRAIN_STEPS = 900
BATCH_SIZE = 16
PEAK_LR = 3e-3
WARMUP_STEPS = 10
SEED = 0


def llama_config() -> Any:
    """The ``LlamaConfig`` of the base model (vocabulary size fixed by the tokenizer)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, architectures=["LlamaForCausalLM"], **ARCHITECTURE)


def config_dict() -> dict[str, Any]:
    """What ``config.json`` of the built model holds, computed without building it."""
    import json

    config = json.loads(llama_config().to_json_string(use_diff=True))
    config.setdefault("dtype", "float32")  # save_pretrained records the weights' dtype
    return config


def pack_sequences(docs: list[list[int]], n_sequences: int, seed: int,
                   seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``n_sequences`` rows of ``seq_len`` tokens: documents as ``<s> ... </s>``, in a
    fresh seeded order each epoch, concatenated and cut (the tail of an epoch is
    dropped)."""
    rng = random.Random(seed)
    rows: list[list[int]] = []
    while len(rows) < n_sequences:
        order = list(range(len(docs)))
        rng.shuffle(order)
        stream = [t for i in order for t in (BOS_ID, *docs[i], EOS_ID)]
        rows += [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return torch.tensor(rows[:n_sequences], dtype=torch.long)


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretraining_data(n_sequences: int = PRETRAIN_STEPS * BATCH_SIZE, seed: int = SEED,
                     save_to: Path | None = None) -> tuple[Any, torch.Tensor]:
    """The tokenizer trained on the pretraining mixture (saved into ``save_to`` as soon as
    it is trained, before it encodes anything), and the ``n_sequences`` packed rows the
    pretraining steps consume in order (a few seconds, no training)."""
    mixture = corpus.pretrain_lines()
    texts = [line for lang in sorted(mixture) for line in mixture[lang]]
    tokenizer = train_tokenizer(texts)
    if save_to is not None:
        tokenizer.save_pretrained(str(save_to))
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return tokenizer, pack_sequences(docs, n_sequences, seed)


def rows_digest(rows: torch.Tensor) -> str:
    """sha256 of packed rows (shape and int64 values), recorded with the shipped build so a
    test sees, without pretraining, whether the code would still feed it the same data."""
    h = hashlib.sha256(repr(tuple(rows.shape)).encode())
    h.update(rows.to(torch.int64).contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()


def build_base_model(folder: Path, *, steps: int = PRETRAIN_STEPS, batch_size: int = BATCH_SIZE,
                     lr: float = PEAK_LR, seed: int = SEED, verbose: bool = False) -> dict[str, Any]:
    """Train the tokenizer and pretrain the base model into ``folder``.

    ``steps`` and ``batch_size`` are the small-size knobs the tests turn down to check
    determinism cheaply. Returns a summary (losses, seconds, tokens seen).
    """
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, data = pretraining_data(steps * batch_size, seed, save_to=folder)

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        try:
            torch.manual_seed(seed)
            model = LlamaForCausalLM(llama_config())
            model.train()
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
            no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=lr, betas=(0.9, 0.95), eps=1e-8)
            progress = make_progress(current())
            bar = progress.add_task("building the built-in world: pretraining tiny-base",
                                    total=steps, unit="steps")
            with progress:
                for step in range(steps):
                    _pretrain_step(model, opt, data, step, steps, batch_size, lr, losses)
                    progress.update(bar, advance=1, info=f"loss {losses[-1]:.3f}")
                    if verbose and (step % 10 == 0 or step == steps - 1):
                        print(f"  step {step:3d}/{steps} loss {losses[-1]:.3f} "
                              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
    model.eval()
    model.save_pretrained(str(folder))
    summary = {
        "builtin": "tiny-base", "steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN,
        "peak_lr": lr, "seed": seed, "tokens_seen": steps * batch_size * SEQ_LEN,
        "final_loss": round(losses[-1], 4) if losses else None,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
    }
    write_meta(folder, summary)
    summary["seconds"] = time.perf_counter() - started
    return summary


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, lines: list[str], batch_size: int = 16) -> float:
    """Token-level perplexity of ``lines`` (each ``<s> line </s>``, scored separately)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(lines), batch_size):
        seqs = [[BOS_ID, *tokenizer(t, add_special_tokens=False)["input_ids"], EOS_ID][:SEQ_LEN * 4]
                for t in lines[i:i + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target, keep = ids[:, 1:], mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
        total_nll += nll.item()
        total_tokens += int(keep.sum())
    return math.exp(total_nll / max(1, total_tokens))


def _pretrain_step(model: Any, opt: torch.optim.Optimizer, data: torch.Tensor, step: int,
                   steps: int, batch_size: int, lr: float, losses: list[float]) -> None:
    """One optimizer step of the base model's pretraining (its loss appended to ``losses``)."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, steps, lr)
    batch = data[step * batch_size:(step + 1) * batch_size]
    loss = model(input_ids=batch, labels=batch).loss
    if not torch.isfinite(loss):
        raise RuntimeError(f"pretraining diverged at step {step} (loss {loss.item()})")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
