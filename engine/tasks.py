"""What the built-in evaluators score, as reusable plans: documents and choice items.

``perplexity``, ``task-accuracy`` and ``retention`` (which re-scores both on source
language data against a reference model) build their :class:`~engine.evaluation.EvalPlan`
from these functions, so a metric is defined in exactly one place. The definitions
(token-weighted perplexity with sliding windows; lm-evaluation-harness style
multiple-choice log-likelihoods, ``acc`` and ``acc_norm``) are documented in
docs/evaluation.md and in the two plugin modules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from engine.api import DataSource
from engine.data import iter_choices, iter_texts
from engine.errors import DataError
from engine.evaluation import (
    EvalPlan,
    Span,
    SpanScore,
    TokenTotals,
    continuation_span,
    document_spans,
    encode_document,
    encode_pair,
    score_spans,
)

__all__ = [
    "ChoiceItem", "FewShot", "ItemPrediction", "choice_plan", "choose", "fewshot_indices",
    "load_items", "plan_choices", "plan_perplexity", "predict", "read_documents",
    "summarize_choices",
]


def read_documents(sources: list[DataSource], max_documents: int | None,
                   stage: str) -> dict[str, list[str]]:
    """Each text source's documents (the first ``max_documents``); an empty source is a
    :class:`DataError` naming the stage and file, since it would fail every model."""
    texts = {s.label: list(islice(iter_texts(s), max_documents)) for s in sources}
    empty = [str(s.path) for s in sources if not texts[s.label]]
    if empty:
        raise DataError(f"evaluate stage {stage!r}: no documents in {', '.join(empty)}")
    return texts


def plan_perplexity(tokenizer: Any, sources: list[DataSource], texts: dict[str, list[str]],
                    max_length: int, stride: int, *, bits_per_byte: bool = False) -> EvalPlan:
    """Spans for every document of every source, and the per-source aggregation.

    A stride that does not fit the window raises :class:`ValueError`, which the
    driver reports against the model whose window it is.
    """
    spans: list[Span] = []
    owner: list[str] = []
    nbytes: dict[str, int] = {}
    for source in sources:
        label = source.label
        nbytes[label] = 0
        for text in texts[label]:
            doc_spans = document_spans(encode_document(tokenizer, text), max_length, stride)
            if doc_spans:  # a one-token document predicts nothing and adds no bytes
                nbytes[label] += len(text.encode("utf-8"))
            spans.extend(doc_spans)
            owner.extend([label] * len(doc_spans))
        if not nbytes[label]:
            raise DataError(f"{source.path}: no document is two tokens or longer, "
                            "so there is nothing to predict")

    def summarize(scores: list[SpanScore]) -> tuple[dict[str, float], dict[str, int]]:
        totals = {s.label: TokenTotals(nbytes=nbytes[s.label]) for s in sources}
        for label, score in zip(owner, scores, strict=True):
            totals[label].add(score)
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        for label, t in totals.items():
            metrics[f"ppl/{label}"], counts[f"ppl/{label}"] = t.perplexity, t.tokens
            if bits_per_byte:
                metrics[f"bpb/{label}"], counts[f"bpb/{label}"] = t.bits_per_byte, t.nbytes
        return metrics, counts

    return EvalPlan(spans, summarize)


# --- multiple choice ---------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item, with its context already built (few-shot included)."""

    source: str  # the data source's label
    where: str  # "path:line", for error messages
    context: str
    choices: tuple[str, ...]
    label: int


@dataclass
class ItemPrediction:
    """What a model chose for one item, and the per-choice log-likelihoods behind it."""

    logprobs: list[float] = field(default_factory=list)
    pred: int = 0
    pred_norm: int = 0


@dataclass(frozen=True)
class FewShot:
    """How choice items are read and given few-shot examples (the task-accuracy keys)."""

    num_fewshot: int = 0
    fewshot_seed: int = 0
    fewshot_separator: str = "\n\n"
    max_items: int | None = None


def load_items(source: DataSource, params: Any) -> list[ChoiceItem]:
    """A source's items with few-shot contexts built; errors name file and line.

    ``params`` is anything with the :class:`FewShot` attributes (a plugin's Params).
    """
    records = list(islice(iter_choices(source), params.max_items))
    if not records:
        raise DataError(f"{source.path}: no multiple-choice items")
    for lineno, record in records:
        if any(c == "" for c in record["choices"]):
            raise DataError(f"{source.path}:{lineno}: 'choices' holds an empty string")
    k = params.num_fewshot
    if k >= len(records):
        raise DataError(f"{source.path}: num_fewshot={k} needs at least {k + 1} items, "
                        f"the file has {len(records)}")
    items = []
    for i, (lineno, record) in enumerate(records):
        shots = [records[j][1] for j in fewshot_indices(i, len(records), k, params.fewshot_seed)]
        parts = [s["prompt"] + s["choices"][s["label"]] for s in shots] + [record["prompt"]]
        items.append(ChoiceItem(source.label, f"{source.path}:{lineno}",
                                params.fewshot_separator.join(parts),
                                tuple(record["choices"]), record["label"]))
    return items


def fewshot_indices(item: int, n_items: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices in ``range(n_items)`` other than ``item``, deterministic.

    A string seed is hashed with SHA-512 by :class:`random.Random`, so the draw does
    not depend on ``PYTHONHASHSEED``, the platform or the other items' draws.
    """
    if k == 0:
        return []
    picks = random.Random(f"{seed}:{item}").sample(range(n_items - 1), k)
    return [j + 1 if j >= item else j for j in picks]


def plan_choices(tokenizer: Any, items: list[ChoiceItem],
                 max_length: int) -> tuple[list[Span], list[tuple[int, int]]]:
    """One span per (item, choice), and for each span the (item, choice) it scores."""
    spans: list[Span] = []
    owners: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tokenizer, item.context, choice)
            try:
                spans.append(continuation_span(ctx, cont, max_length))
            except ValueError as exc:
                raise DataError(f"{item.where}: choice {c} cannot be scored: {exc}") from None
            owners.append((i, c))
    return spans, owners


def choose(items: list[ChoiceItem], owners: list[tuple[int, int]],
           scores: list[SpanScore]) -> list[ItemPrediction]:
    """Each item's argmax choice, raw and length-normalised (first choice wins ties)."""
    preds = [ItemPrediction(logprobs=[0.0] * len(item.choices)) for item in items]
    for (i, c), score in zip(owners, scores, strict=True):
        preds[i].logprobs[c] = score.logprob
    for item, p in zip(items, preds, strict=True):
        normed = [lp / len(choice) for lp, choice in zip(p.logprobs, item.choices, strict=True)]
        p.pred = max(range(len(p.logprobs)), key=lambda c: (p.logprobs[c], -c))
        p.pred_norm = max(range(len(normed)), key=lambda c: (normed[c], -c))
    return preds


def summarize_choices(items: list[ChoiceItem],
              preds: list[ItemPrediction]) -> tuple[dict[str, float], dict[str, int]]:
    """``acc/<label>`` and ``acc_norm/<label>`` per source, counts = items."""
    hits: dict[str, list[int]] = {}
    for item, p in zip(items, preds, strict=True):
        h = hits.setdefault(item.source, [0, 0, 0])
        h[0] += p.pred == item.label
        h[1] += p.pred_norm == item.label
        h[2] += 1
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for label, (acc, acc_norm, n) in hits.items():
        metrics[f"acc/{label}"], counts[f"acc/{label}"] = acc / n, n
        metrics[f"acc_norm/{label}"], counts[f"acc_norm/{label}"] = acc_norm / n, n
    return metrics, counts


def predict(model: torch.nn.Module, tokenizer: Any, items: list[ChoiceItem], *,
            max_length: int, batch_size: int = 8, device: torch.device | str = "cpu",
            share_prefix: bool = True, **score_kwargs: Any) -> list[ItemPrediction]:
    """Per-item predictions of one loaded model (for tests, notebooks, sample logs)."""
    spans, owners = plan_choices(tokenizer, items, max_length)
    scores = score_spans(model, spans, batch_size=batch_size, device=device,
                         pad_id=tokenizer.pad_token_id, share_prefix=share_prefix,
                         **score_kwargs)
    return choose(items, owners, scores)


def choice_plan(tokenizer: Any, items: list[ChoiceItem], max_length: int) -> EvalPlan:
    """The plan that scores every choice of every item and reports acc / acc_norm."""
    spans, owners = plan_choices(tokenizer, items, max_length)
    return EvalPlan(spans, lambda scores: summarize_choices(items, choose(items, owners, scores)))
