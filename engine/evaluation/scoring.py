"""Batched scoring of :class:`~engine.evaluation.spans.Span` s: the only place a model runs in evaluation.

How sequences are scored
------------------------
* A span of ``L`` tokens feeds ``tokens[:-1]`` (at most ``max_length`` positions); the
  logits at position ``j`` give the log-probability of ``tokens[j + 1]``. The last
  token's own logits would predict nothing we score, so it is never fed.
* **Plain batches**: spans are sorted by length (longest first) and cut into batches of
  ``batch_size``, so a batch holds sequences of similar length (little padding) and the
  largest batch runs first (an out-of-memory error shows at once, not after an hour).
  With ``max_tokens`` a batch of short spans takes more of them, as many as fit in
  ``max_tokens`` padded positions (never fewer than ``batch_size``): fewer, larger
  forwards use a CPU's matrix units better and pay each layer's fixed cost less often
  (1500 one-line documents scored in three quarters of the time with 2048 positions per
  pass, docs/benchmarks.md). Memory is at most that of
  ``batch_size`` spans of the longest length or of ``max_tokens`` positions.
  A batch is right-padded with an attention mask: every real token keeps its position
  ids 0..n-1 and causal attention never lets a real token see a pad, so padded and
  unpadded scores agree to float rounding.
* **Shared-prefix batches**: spans whose *context* (the tokens before the scored ones)
  is identical, such as the choices of one multiple-choice item, are scored with one
  forward over the context (``use_cache=True``) whose last logits predict every
  continuation's first token, then one forward over all continuations that reuses the
  context's key/value cache (under whatever keyword :func:`engine.models.capabilities.probe`
  finds the model takes it), each row with the cache of its own
  context and explicit ``position_ids``. A 4-choice item with a 200-token prompt then
  costs 200 + (choice lengths) positions instead of 4 x 200. The log-likelihoods equal
  the plain path's to float rounding (tests check 1e-5). ``batch_size`` bounds every
  forward: a batch runs up to ``batch_size`` contexts in one pass, then their
  continuations in passes of at most ``batch_size`` rows, each with a copy of just its
  rows of the cache (so memory stays that of ``batch_size`` sequences).
* Only the logit positions a batch scores are projected onto the vocabulary
  (``logits_to_keep``, when the model supports it). A plain batch's scored positions are
  then gathered, without padding, in chunks of at most :data:`PICK_ELEMENTS` logits, and
  each chunk's ``log p(target) = logit[target] - logsumexp(logits)`` is taken in float32
  (no float32 ``batch x length x vocab`` copy, no log-softmax tensor written, no Python
  work per row or token); per-span sums are accumulated in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.evaluation.spans import Span, SpanScore
from engine.models.capabilities import Capabilities, probe

__all__ = ["MIN_SAVED_FRACTION", "MIN_SAVED_TOKENS", "PICK_ELEMENTS", "Batch", "batch_order",
           "num_batches", "plan_batches", "score_spans"]

#: fewest fed positions a shared-prefix group must save to be worth its second forward
MIN_SAVED_TOKENS = 16
#: least share of a group's plain fed positions that sharing its context must save
MIN_SAVED_FRACTION = 0.25
#: most logits (positions x vocabulary) a plain batch turns into log-probabilities at once
PICK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Batch:
    """Spans scored together. ``groups`` is empty for a plain batch; for a
    shared-prefix batch it partitions ``indices`` into spans with one context each.
    ``fed_tokens`` is the number of positions the model is fed (padding excluded)."""

    indices: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...] = ()
    fed_tokens: int = 0

    @property
    def shared(self) -> bool:
        return bool(self.groups)


def batch_order(spans: Sequence[Span], batch_size: int,
                max_tokens: int | None = None) -> list[list[int]]:
    """Indices of ``spans`` in plain batches: longest first, so batches pad little;
    ``batch_size`` spans each, or with ``max_tokens`` as many as fit in that many padded
    positions (at least ``batch_size``)."""
    order = sorted(range(len(spans)), key=lambda i: -spans[i].n_inputs)
    return _cut(spans, order, batch_size, max_tokens)


def _cut(spans: Sequence[Span], order: list[int], batch_size: int,
         max_tokens: int | None) -> list[list[int]]:
    """``order`` (longest first) cut into batches (see :func:`batch_order`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    out = []
    k = 0
    while k < len(order):
        rows = batch_size
        if max_tokens is not None:  # the first span is the batch's widest
            rows = max(batch_size, max_tokens // max(1, spans[order[k]].n_inputs))
        out.append(order[k:k + rows])
        k += rows
    return out


def num_batches(n_spans: int, batch_size: int) -> int:
    """Plain batches needed for ``n_spans`` spans (shared batches: ``len(plan_batches())``)."""
    return -(-n_spans // batch_size)


def plan_batches(spans: Sequence[Span], batch_size: int, *, share_prefix: bool = True,
                 min_saved_tokens: int = MIN_SAVED_TOKENS,
                 max_tokens: int | None = None) -> list[Batch]:
    """Every span in exactly one batch: shared-prefix batches for contexts that two or
    more spans share (when ``share_prefix``), plain batches for the rest (cut as
    :func:`batch_order` cuts them, ``max_tokens`` included).

    A group is shared only when it saves at least ``min_saved_tokens`` fed positions
    (``(spans - 1) * context length``) *and* at least :data:`MIN_SAVED_FRACTION` of what
    its spans would feed alone: a shared batch costs two forwards and a copy of the
    context's KV cache per continuation row, which does not pay for, say, many documents
    that share nothing but BOS (their saving grows with their number, their cost faster).
    A group of more than ``batch_size`` spans (2 at least) is cut into groups that size (each
    runs its context once), so no batch holds more than ``batch_size`` continuations
    per context and progress advances evenly."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    by_context: dict[tuple[int, ...], list[int]] = {}
    if share_prefix:
        for i, span in enumerate(spans):
            by_context.setdefault(span.context, []).append(i)
    groups = []
    for members in by_context.values():
        size = max(2, batch_size)
        for k in range(0, len(members), size):
            g = members[k:k + size]
            saved = (len(g) - 1) * spans[g[0]].n_context
            alone = sum(spans[i].n_inputs for i in g)
            if len(g) > 1 and saved >= min_saved_tokens and saved >= MIN_SAVED_FRACTION * alone:
                groups.append(g)
    grouped = {i for g in groups for i in g}
    plain = [i for i in range(len(spans)) if i not in grouped]

    batches: list[Batch] = []
    groups.sort(key=lambda g: -spans[g[0]].n_context)
    current: list[list[int]] = []
    for group in groups:
        if len(current) == batch_size:
            batches.append(_shared_batch(spans, current))
            current = []
        current.append(group)
    if current:
        batches.append(_shared_batch(spans, current))
    plain.sort(key=lambda i: -spans[i].n_inputs)
    for chunk in _cut(spans, plain, batch_size, max_tokens):
        batches.append(Batch(tuple(chunk), (), sum(spans[i].n_inputs for i in chunk)))
    batches.sort(key=lambda b: -max(spans[i].n_inputs for i in b.indices))  # biggest first
    return batches


def _shared_batch(spans: Sequence[Span], groups: list[list[int]]) -> Batch:
    fed = sum(spans[g[0]].n_context + sum(spans[i].n_targets - 1 for i in g) for g in groups)
    return Batch(tuple(i for g in groups for i in g), tuple(tuple(g) for g in groups), fed)


def _padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, toks in enumerate(rows):
        ids[row, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        mask[row, :len(toks)] = 1
    return ids, mask


def _pick(logits: torch.Tensor, targets: Sequence[int]) -> tuple[torch.Tensor, bool]:
    """Log-probabilities of ``targets`` under ``logits`` (rows), and whether all are argmax."""
    logits = logits.float()
    tgt = torch.tensor(targets, dtype=torch.long, device=logits.device)
    picked = torch.log_softmax(logits, dim=-1).gather(-1, tgt[:, None]).squeeze(-1)
    return picked.double(), bool((logits.argmax(dim=-1) == tgt).all())


def _score_plain(model: torch.nn.Module, spans: Sequence[Span], device: torch.device,
                 pad_id: int, keep: bool) -> list[SpanScore]:
    ids, mask = _padded([s.tokens[:-1] for s in spans], pad_id)
    width = ids.shape[1]
    # logits at position j predict token j+1; row r scores positions [n_in - n_t, n_in)
    lo = min(s.n_inputs - s.n_targets for s in spans)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "use_cache": False}
    offset = 0
    if keep and lo > 0:
        kwargs["logits_to_keep"] = torch.arange(lo, width, device=device)
        offset = lo
    logits = model(**kwargs).logits
    # the scored positions of every row, flattened: (row, column in logits, target, span)
    starts = [s.n_inputs - s.n_targets - offset for s in spans]
    counts = [s.n_targets for s in spans]
    owner = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(counts))
    first = torch.tensor([r * logits.shape[1] + c for r, c in enumerate(starts)])
    cum = torch.tensor([0, *counts]).cumsum(0)[:-1]
    flat = first[owner] + torch.arange(len(owner)) - cum[owner]
    targets = torch.tensor([t for s in spans for t in s.tokens[-s.n_targets:]], dtype=torch.long)
    logprob, missed = _pick_flat(logits.reshape(-1, logits.shape[-1]), flat.to(logits.device),
                                 targets.to(logits.device))
    sums = torch.zeros(len(spans), dtype=torch.float64).index_add_(0, owner, logprob.cpu())
    wrong = torch.zeros(len(spans), dtype=torch.long).index_add_(0, owner, missed.cpu().long())
    return [SpanScore(lp, n, not w)
            for lp, n, w in zip(sums.tolist(), counts, wrong.tolist(), strict=True)]


def _pick_flat(logits: torch.Tensor, where: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(targets[k])`` under the logits row ``where[k]`` of ``logits`` (positions x
    vocabulary), in float64, and whether each target was not the argmax; computed in float32
    chunks of at most :data:`PICK_ELEMENTS` logits."""
    step = max(1, PICK_ELEMENTS // max(1, logits.shape[-1]))
    picked, missed = [], []
    for k in range(0, len(where), step):
        rows = logits.index_select(0, where[k:k + step]).float()
        tgt = targets[k:k + step]
        lse = torch.logsumexp(rows, dim=-1)
        picked.append((rows.gather(-1, tgt[:, None]).squeeze(-1) - lse).double())
        missed.append(rows.argmax(dim=-1) != tgt)
    return torch.cat(picked), torch.cat(missed)


def _cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding ``rows`` (batch indices, repeats allowed) of ``cache``, which is
    left untouched: the layers are shallow-copied and ``batch_select_indices`` rebinds
    their tensors to new, indexed ones."""
    if not hasattr(cache, "layers"):  # pragma: no cover - a cache class of another shape
        clone = copy.deepcopy(cache)
        clone.batch_select_indices(rows)
        return clone
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    clone.batch_select_indices(rows)
    return clone


def _score_shared(model: torch.nn.Module, spans: Sequence[Span], groups: Sequence[Sequence[int]],
                  device: torch.device, pad_id: int, caps: Capabilities,
                  max_rows: int) -> dict[int, SpanScore]:
    """One pass over the groups' contexts, then continuation passes of at most
    ``max_rows`` rows, each reusing its rows of the context KV cache."""
    contexts = [spans[g[0]].context for g in groups]
    ids, mask = _padded(contexts, pad_id)
    last = [len(c) - 1 for c in contexts]
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "use_cache": True}
    where = last
    if caps.logits_to_keep:
        kept = sorted(set(last))
        kwargs["logits_to_keep"] = torch.tensor(kept, device=device)
        where = [kept.index(p) for p in last]
    out = model(**kwargs)
    cache = caps.cache_of(out)
    first = torch.stack([out.logits[g, where[g]] for g in range(len(groups))])  # predicts cont[0]

    rows = [(g, i) for g, members in enumerate(groups) for i in members if spans[i].n_targets > 1]
    cont_logits: dict[int, torch.Tensor] = {}
    for k in range(0, len(rows), max_rows):
        chunk = rows[k:k + max_rows]
        cont = [spans[i].tokens[spans[i].n_context:-1] for _, i in chunk]
        cont_ids, cont_mask = _padded(cont, pad_id)
        owner = torch.tensor([g for g, _ in chunk], dtype=torch.long)
        full_mask = torch.cat([mask[owner], cont_mask], dim=1)
        positions = torch.tensor([[len(contexts[g]) + j for j in range(cont_ids.shape[1])]
                                  for g, _ in chunk], dtype=torch.long)
        logits = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                       position_ids=positions.to(device),
                       use_cache=True,
                       **{caps.cache_argument: _cache_rows(cache, owner.to(device))}).logits
        cont_logits.update({i: logits[r] for r, (_, i) in enumerate(chunk)})

    scores: dict[int, SpanScore] = {}
    for g, members in enumerate(groups):
        for i in members:
            span = spans[i]
            targets = span.tokens[span.n_context:]
            row_logits = first[g:g + 1]
            if span.n_targets > 1:
                row_logits = torch.cat([row_logits, cont_logits[i][:span.n_targets - 1]])
            picked, greedy = _pick(row_logits, targets)
            scores[i] = SpanScore(float(picked.sum()), span.n_targets, greedy)
    return scores


def score_spans(
    model: torch.nn.Module,
    spans: Sequence[Span],
    *,
    batch_size: int,
    device: torch.device | str,
    pad_id: int | None,
    share_prefix: bool = True,
    min_saved_tokens: int = MIN_SAVED_TOKENS,
    on_batch: Callable[[Batch, list[SpanScore]], None] | None = None,
    max_tokens: int | None = None,
) -> list[SpanScore]:
    """Score every span, batched; results in the order of ``spans``.

    Plain batches hold ``batch_size`` spans, or with ``max_tokens`` as many as fit in that
    many padded positions (never fewer than ``batch_size``; see the module doc).

    Puts the model in eval mode and runs under ``torch.inference_mode``. Spans that
    share their context are scored through one prefix pass and its KV cache when
    ``share_prefix`` and :func:`engine.models.capabilities.probe` finds that the model can
    continue from a KV cache (see the module doc).
    ``on_batch(batch, scores)`` is called after each batch (progress bars, token
    counters). ``pad_id`` may be any id in the vocabulary: pads are masked and never
    scored; ``None`` uses 0.
    """
    device = torch.device(device)
    model.eval()
    caps = probe(model)
    keep = caps.logits_to_keep
    share = share_prefix and caps.kv_cache
    pad = pad_id if pad_id is not None else 0
    results: list[SpanScore | None] = [None] * len(spans)
    with torch.inference_mode():
        for batch in plan_batches(spans, batch_size, share_prefix=share,
                                  min_saved_tokens=min_saved_tokens, max_tokens=max_tokens):
            if batch.shared:
                got = _score_shared(model, spans, batch.groups, device, pad, caps, batch_size)
                scores = [got[i] for i in batch.indices]
            else:
                scores = _score_plain(model, [spans[i] for i in batch.indices], device, pad, keep)
            for i, score in zip(batch.indices, scores, strict=True):
                results[i] = score
            if on_batch is not None:
                on_batch(batch, scores)
    return results  # type: ignore[return-value]
