"""Slower or degraded paths the engine can be pushed onto, found by asking the library.

The project's rule: detect what a model, tokenizer or device can do by what the library
offers (or by trying it, :mod:`engine.models.capabilities`), never by an argument's name, and
never take a slower path without saying so. Each function here answers one such question
and returns None when the fast path is taken, else a sentence saying what happens
instead; :meth:`engine.run.context.StageContext.slow_path` logs it once per stage and records
it in report.json under the stage's notes ``slow_paths``.

* :func:`tokenizer_path`: transformers hands back a pure-Python ("slow") tokenizer when
  no Rust ("fast") one exists for a folder; ``is_fast`` is the library's own answer.
* :func:`attention_path`: transformers picks SDPA (or flash) attention when the model
  class supports it and falls back to the eager implementation otherwise;
  ``config._attn_implementation`` is what it chose.
* :func:`auto_dtype_path` / :func:`auto_precision_path`: ``dtype: auto`` and
  ``mixed_precision: auto`` are bfloat16 on a GPU; a GPU without bfloat16 gets float32.
* :func:`loss_scaling_path`: the training loop passes ``num_items_in_batch`` so that
  gradient accumulation matches one large batch; a model whose ``forward`` swallows the
  keyword (``**kwargs``) and averages per micro-batch is found by trying it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["attention_path", "auto_dtype_path", "auto_precision_path", "loss_scaling_path",
           "tokenizer_path"]


def tokenizer_path(tokenizer: Any) -> str | None:
    """None for a fast (Rust) tokenizer; a sentence for a pure-Python one."""
    if getattr(tokenizer, "is_fast", None) is False:
        return (f"{type(tokenizer).__name__} is a pure-Python tokenizer (no fast tokenizer for "
                "this folder): tokenizing is slower; add a tokenizer.json to use a fast one")
    return None


def attention_path(model: torch.nn.Module) -> str | None:
    """None when attention runs through SDPA or a flash kernel; a sentence for eager."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == "eager":
        return (f"{type(model).__name__} runs eager attention (SDPA/flash attention not used "
                "for this model class or config): attention is slower and holds the full "
                "attention matrix")
    return None


def _bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def auto_dtype_path(device: torch.device,
                    bf16_supported: Callable[[], bool] = _bf16_supported) -> str | None:
    """For ``runtime.dtype: auto``: a sentence when a GPU runs in float32 because it has no
    bfloat16 (on the CPU float32 is the intended choice, not a fallback)."""
    if device.type == "cuda" and not bf16_supported():
        return ("runtime.dtype 'auto' is float32 on this GPU (no bfloat16 support): twice the "
                "memory of bfloat16; set runtime.dtype: float16 to halve it")
    return None


def auto_precision_path(device: torch.device,
                        bf16_supported: Callable[[], bool] = _bf16_supported) -> str | None:
    """For ``mixed_precision: auto``: a sentence when a GPU trains without autocast
    because it has no bfloat16."""
    if device.type == "cuda" and not bf16_supported():
        return ("mixed_precision 'auto' is off on this GPU (no bfloat16 support): training runs "
                "in full precision; set mixed_precision: fp16 for autocast with loss scaling")
    return None


def loss_scaling_path(model: torch.nn.Module, device: torch.device) -> str | None:
    """Whether ``model`` divides its loss by ``num_items_in_batch``, found by trying:
    one tiny labelled forward with the count given as n and as 2n must halve the loss.
    None when it does; a sentence when the keyword is ignored (or refused)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 4)
    ids = (torch.tensor([[3, 5, 7, 11]], dtype=torch.long) % vocab).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            one = model(**batch, num_items_in_batch=3).loss
            two = model(**batch, num_items_in_batch=6).loss
        ok = one is not None and two is not None and bool(torch.isclose(
            one.float(), 2 * two.float(), rtol=1e-3, atol=1e-6))
    except (TypeError, ValueError):
        ok = False
    finally:
        model.train(was_training)
    if ok:
        return None
    return (f"{type(model).__name__} ignores num_items_in_batch: its loss is the mean of each "
            "micro-batch, so with grad_accum > 1 or several processes micro-batches with fewer "
            "target tokens weigh more than one large batch would give them")
