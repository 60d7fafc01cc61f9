"""Greedy generation for evaluation: batched, left-padded, KV-cached, deterministic.

Exact-match evaluation needs what a model *writes* after a prompt, not how likely a
given answer is, so this module runs the model autoregressively. It is the one
place in evaluation where a model generates (:mod:`engine.evaluation.scoring` is the one where
it scores); :class:`GenerationPlan` is the generation counterpart of
:class:`~engine.evaluation.EvalPlan`, run by the same per-model driver.

How a batch is generated
------------------------
* **Greedy, nothing else**: each new token is the argmax of the last position's
  logits (``torch.argmax``: the lowest id wins a tie). The model's
  ``generation_config`` (sampling, temperature, repetition penalties, ...) is *not*
  consulted, so a model folder cannot change what is measured; only its EOS ids are
  read from it. The loop is written here rather than calling ``model.generate``,
  whose configuration merges the folder's ``generation_config.json`` into ours.
* Prompts are sorted longest first, cut into batches of ``batch_size`` and
  **left-padded** (every row's next token is then at the same column) with an
  attention mask and explicit ``position_ids`` counted from each row's first real
  token, so a padded row sees exactly what it would alone.
* The prompt runs once (``use_cache=True``, only the last position's logits kept);
  each step then feeds one token per row with the **KV cache**. Rows that are done
  leave the batch (their cache rows are dropped), so a batch costs what its longest
  answer costs. Models that cannot continue from a KV cache (found by
  :func:`engine.models.capabilities.probe`, which the evaluators report) re-run the whole
  sequence each step (same tokens, slower).

When a generation stops (:class:`StopRule`)
-------------------------------------------
At the first of: an EOS token (the tokenizer's ``eos_token_id`` and every id of the
model's ``generation_config.eos_token_id``; never part of the text), ``max_new_tokens``
generated tokens, or a **stop string** found in the decoded text. Stop strings are
searched from the first non-whitespace character of the output, so a model that opens
with a newline is not cut to nothing by the default stop ``"\\n"``; the text is cut
just before the earliest stop string. Text is decoded with
``skip_special_tokens=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.models.capabilities import Capabilities, probe

__all__ = ["Generation", "GenerationPlan", "StopRule", "eos_ids", "generate_greedy"]

Result = tuple[dict[str, float], dict[str, int]]


@dataclass(frozen=True)
class StopRule:
    """When a greedy generation ends: ``max_new_tokens``, EOS, or a ``stop`` string."""

    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty (an empty string stops at once)")

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` before its first stop string (searched after the leading
        whitespace), and whether one was found."""
        start = len(text) - len(text.lstrip())
        ends = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if not ends:
            return text, False
        return text[:min(ends)], True


@dataclass(frozen=True)
class Generation:
    """What a model wrote after one prompt.

    ``text`` is decoded and cut by the stop rule (not normalised); ``tokens`` are the
    generated ids the text was decoded from (EOS excluded); ``reason`` says why it
    ended: ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (``max_new_tokens``).
    """

    text: str
    tokens: tuple[int, ...]
    reason: Literal["eos", "stop", "length"]


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's
    ``generation_config.eos_token_id`` (an int or a list, e.g. a chat model's
    end-of-turn token)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, toks in enumerate(rows):
        ids[row, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[row, width - len(toks):] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (pads get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class _Batch:
    """The state of one batch being generated: which rows are still running."""

    def __init__(self, tokenizer: Any, rule: StopRule, eos: frozenset[int], n_rows: int) -> None:
        self.tokenizer, self.rule, self.eos = tokenizer, rule, eos
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.done: list[Generation | None] = [None] * n_rows
        self.active = list(range(n_rows))  # batch rows still running, in tensor order

    def step(self, picked: list[int]) -> list[int]:
        """Record one token per active row; the tensor rows that keep running."""
        keep = []
        for j, (row, tok) in enumerate(zip(self.active, picked, strict=True)):
            toks = self.tokens[row]
            if tok in self.eos:
                self.done[row] = Generation(self._decode(toks), tuple(toks), "eos")
                continue
            toks.append(tok)
            cut, stopped = self.rule.cut(self._decode(toks)) if self.rule.stop else ("", False)
            if stopped:
                self.done[row] = Generation(cut, tuple(toks), "stop")
            elif len(toks) >= self.rule.max_new_tokens:
                self.done[row] = Generation(self._decode(toks), tuple(toks), "length")
            else:
                keep.append(j)
        self.active = [self.active[j] for j in keep]
        return keep

    def _decode(self, toks: list[int]) -> str:
        """The text of ``toks``: a row that ends without a stop string holds none."""
        return self.tokenizer.decode(toks, skip_special_tokens=True)


def _generate_batch(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Sequence[int]],
                    rule: StopRule, *, device: torch.device, pad_id: int, eos: frozenset[int],
                    caps: Capabilities) -> tuple[list[Generation], int]:
    """Greedy generations for ``rows`` (prompt ids), and the positions fed."""
    state = _Batch(tokenizer, rule, eos, len(rows))
    ids, mask = _left_padded(rows, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = _positions(mask)
    use_cache = caps.kv_cache
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                              "use_cache": use_cache}
    fed = int(mask.sum())
    while True:
        if caps.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        picked = out.logits[:, -1].argmax(dim=-1)
        keep = state.step(picked.tolist())
        if not keep:
            break
        index = torch.tensor(keep, dtype=torch.long, device=device)
        new = picked[index][:, None]
        mask = torch.cat([mask[index], torch.ones_like(new)], dim=1)
        if use_cache:
            cache = caps.cache_of(out)
            if len(keep) < picked.shape[0]:
                cache.batch_select_indices(index)
            last = kwargs["position_ids"][index, -1:]
            kwargs = {"input_ids": new, "attention_mask": mask, "position_ids": last + 1,
                      caps.cache_argument: cache, "use_cache": True}
            fed += len(keep)
        else:
            ids = torch.cat([ids[index], new], dim=1)
            kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask),
                      "use_cache": False}
            fed += int(mask.sum())
    return [g for g in state.done if g is not None], fed


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    rule: StopRule,
    *,
    batch_size: int,
    device: torch.device | str,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy generations for every prompt (token ids), in the order of ``prompts``.

    Puts the model in eval mode and runs under ``torch.inference_mode``; batches of
    ``batch_size`` prompts, longest first (see the module doc). ``on_batch(fed)`` is
    called after each batch with the positions it fed the model (padding excluded).
    Every prompt must hold at least one token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("a prompt is empty (a model needs one token to generate from)")
    device = torch.device(device)
    model.eval()
    eos = eos_ids(model, tokenizer)
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), *sorted(eos))
                if isinstance(p, int)), 0)
    caps = probe(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            chunk = order[k:k + batch_size]
            gens, fed = _generate_batch(model, tokenizer, [prompts[i] for i in chunk], rule,
                                        device=device, pad_id=pad, eos=eos, caps=caps)
            for i, gen in zip(chunk, gens, strict=True):
                results[i] = gen
            if on_batch is not None:
                on_batch(fed)
    return results  # type: ignore[return-value]


@dataclass
class GenerationPlan:
    """Prompts to complete greedily for one tokenizer and window, and how to turn the
    generations into metrics: ``summarize(generations)`` receives one
    :class:`Generation` per prompt, in order, and returns ``(metrics, counts)``."""

    prompts: list[tuple[int, ...]]
    rule: StopRule
    summarize: Callable[[list[Generation]], Any]  # ModelScores or (metrics, counts)

    def num_steps(self) -> int:
        """Progress units :meth:`run` reports: one per prompt."""
        return len(self.prompts)

    def num_batches(self, batch_size: int, share_prefix: bool = True) -> int:
        """Batches of prompts :meth:`run` generates."""
        return -(-len(self.prompts) // batch_size)

    def run(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int,
            device: torch.device | str, share_prefix: bool = True,
            on_batch: Callable[[int, int], None] | None = None) -> Any:
        """Generate for every prompt with one loaded model and summarise; ``on_batch(fed,
        n)`` after each batch with the positions it fed and the prompts it completed."""
        left = [len(self.prompts)]

        def advance(fed: int) -> None:
            n = min(batch_size, left[0])
            left[0] -= n
            if on_batch is not None:
                on_batch(fed, n)

        gens = generate_greedy(model, tokenizer, self.prompts, self.rule, batch_size=batch_size,
                               device=device, on_batch=advance)
        return self.summarize(gens)
