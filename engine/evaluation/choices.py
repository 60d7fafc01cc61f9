"""What the built-in evaluators score, as reusable plans: documents, choice and
generation items.

``perplexity``, ``task-accuracy`` and ``retention`` (which re-scores both on source
language data against a reference model) build their plans
(:class:`~engine.evaluation.EvalPlan`, :class:`~engine.evaluation.generation.GenerationPlan`) from
these functions, so a metric is defined in exactly one place. The definitions
(token-weighted perplexity with sliding windows; lm-evaluation-harness style
multiple-choice log-likelihoods, ``acc`` and ``acc_norm``; greedy generation scored by
``exact_match``) are documented in docs/evaluation.md and in the plugin modules.

Prompts (both item kinds) are built by :mod:`engine.evaluation.prompts`: plain text or the
tokenizer's chat template; generation items are :mod:`engine.evaluation.answers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.files import iter_choices
from engine.data.sources import iter_texts
from engine.evaluation.driver import (
    EvalPlan,
    ModelScores,
    Span,
    SpanScore,
    TokenTotals,
    binomial_stderr,
    continuation_span,
    document_spans,
    encode_document,
    encode_pair,
    score_spans,
)
from engine.evaluation.prompts import Shots, draw_shots, plain_context, prefix_id, render_prompt

__all__ = [
    "ChoiceItem", "ItemPrediction", "choice_plan", "choose", "load_items", "plan_choices",
    "plan_perplexity", "predict", "ratio_stderr", "read_documents", "summarize_choices",
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


def ratio_stderr(numerators: list[float], denominators: list[int | float]) -> float | None:
    """Standard error of ``sum(numerators) / sum(denominators)`` with the documents as
    the independent units (the linearised ratio estimator:
    ``sqrt(n / (n - 1) * sum((x_i - R y_i)^2)) / sum(y_i)``); None for fewer than two."""
    n = len(numerators)
    total = float(sum(denominators))
    if n < 2 or total <= 0:
        return None
    ratio = sum(numerators) / total
    resid = sum((x - ratio * y) ** 2 for x, y in zip(numerators, denominators, strict=True))
    return math.sqrt(n / (n - 1) * resid) / total


def plan_perplexity(tokenizer: Any, sources: list[DataSource], texts: dict[str, list[str]],
                    max_length: int, stride: int, *, bits_per_byte: bool = False,
                    max_tokens: int | None = None) -> EvalPlan:
    """Spans for every document of every source, and the per-source aggregation;
    ``max_tokens`` is the plan's (:class:`EvalPlan`), the padded positions a plain batch
    of short documents may fill.

    Standard errors treat documents as the sampled units: the per-document log-loss
    ratio estimator's error (:func:`ratio_stderr`) of the token-weighted mean NLL ``L``,
    mapped to perplexity by the delta method (``se(ppl) = ppl * se(L)``); ``bpb``'s the
    same with bytes as the weights, divided by ``ln 2``.

    A stride that does not fit the window raises :class:`ValueError`, which the
    driver reports against the model whose window it is.
    """
    spans: list[Span] = []
    owner: list[tuple[str, int]] = []  # per span: its source and document
    nbytes: dict[str, int] = {}
    doc_bytes: dict[str, list[int]] = {}
    for source in sources:
        label = source.label
        nbytes[label] = 0
        doc_bytes[label] = []
        for text in texts[label]:
            doc_spans = document_spans(encode_document(tokenizer, text), max_length, stride)
            if doc_spans:  # a one-token document predicts nothing and adds no bytes
                nbytes[label] += len(text.encode("utf-8"))
                doc_bytes[label].append(len(text.encode("utf-8")))
            spans.extend(doc_spans)
            owner.extend([(label, len(doc_bytes[label]) - 1)] * len(doc_spans))
        if not nbytes[label]:
            raise DataError(f"{source.path}: no document is two tokens or longer, "
                            "so there is nothing to predict")

    def summarize(scores: list[SpanScore]) -> ModelScores:
        totals = {s.label: TokenTotals(nbytes=nbytes[s.label]) for s in sources}
        docs = {label: [[0.0, 0] for _ in sizes] for label, sizes in doc_bytes.items()}
        for (label, doc), score in zip(owner, scores, strict=True):
            totals[label].add(score)
            docs[label][doc][0] -= score.logprob
            docs[label][doc][1] += score.n_targets
        out = ModelScores({}, {})
        for label, t in totals.items():
            nll = [d[0] for d in docs[label]]
            key = f"ppl/{label}"
            out.metrics[key], out.counts[key] = t.perplexity, t.tokens
            se = ratio_stderr(nll, [d[1] for d in docs[label]])
            if se is not None:  # delta method: d exp(L) = exp(L) dL
                out.stderr[key] = t.perplexity * se
            if bits_per_byte:
                key = f"bpb/{label}"
                out.metrics[key], out.counts[key] = t.bits_per_byte, t.nbytes
                se = ratio_stderr(nll, doc_bytes[label])
                if se is not None:
                    out.stderr[key] = se / math.log(2)
        return out

    return EvalPlan(spans, summarize, max_tokens=max_tokens)


# --- multiple choice ---------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item, with its plain-text context already built.

    ``context`` is the few-shot examples and the prompt joined as plain text;
    ``prompt`` and ``shots`` (``(prompt, correct choice)`` pairs) are the same parts
    kept apart for the chat template (:func:`render_prompt`).
    """

    source: str  # the data source's label
    where: str  # "path:line", for error messages
    context: str
    choices: tuple[str, ...]
    label: int
    prompt: str = ""
    shots: Shots = ()


@dataclass
class ItemPrediction:
    """What a model chose for one item, and the per-choice log-likelihoods behind it."""

    logprobs: list[float] = field(default_factory=list)
    pred: int = 0
    pred_norm: int = 0


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
    solved = [(r["prompt"], r["choices"][r["label"]]) for _, r in records]
    items = []
    for (lineno, record), shots in zip(records, draw_shots(source, solved, params), strict=True):
        items.append(ChoiceItem(source.label, f"{source.path}:{lineno}",
                                plain_context(shots, record["prompt"], params.fewshot_separator),
                                tuple(record["choices"]), record["label"], record["prompt"], shots))
    return items


def plan_choices(tokenizer: Any, items: list[ChoiceItem], max_length: int, *,
                 chat_template: bool | None = False
                 ) -> tuple[list[Span], list[tuple[int, int]]]:
    """One span per (item, choice), and for each span the (item, choice) it scores.

    ``chat_template`` is as in :func:`use_chat_template`; a templated context gets no
    added BOS (the template writes it)."""
    spans: list[Span] = []
    owners: list[tuple[int, int]] = []
    prefix = prefix_id(tokenizer)
    for i, item in enumerate(items):
        context, templated = render_prompt(tokenizer, item, chat_template)
        for c, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tokenizer, context, choice)
            if templated and prefix is not None:
                ctx = ctx[1:]  # the prefix encode_pair added: the template has its own
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


def summarize_choices(items: list[ChoiceItem], preds: list[ItemPrediction]) -> ModelScores:
    """``acc/<label>`` and ``acc_norm/<label>`` per source, counts = items; binomial
    standard errors; chance = the mean over items of 1 / number of choices."""
    hits: dict[str, list[float]] = {}
    for item, p in zip(items, preds, strict=True):
        h = hits.setdefault(item.source, [0, 0, 0, 0.0])
        h[0] += p.pred == item.label
        h[1] += p.pred_norm == item.label
        h[2] += 1
        h[3] += 1 / len(item.choices)
    out = ModelScores({}, {})
    for label, (acc, acc_norm, n, guess) in hits.items():
        for kind, value in (("acc", acc), ("acc_norm", acc_norm)):
            key = f"{kind}/{label}"
            out.metrics[key], out.counts[key] = value / n, int(n)
            out.stderr[key] = binomial_stderr(value / n, int(n))
            out.chance[key] = guess / n
    return out


def predict(model: torch.nn.Module, tokenizer: Any, items: list[ChoiceItem], *,
            max_length: int, batch_size: int = 8, device: torch.device | str = "cpu",
            share_prefix: bool = True, chat_template: bool | None = False,
            **score_kwargs: Any) -> list[ItemPrediction]:
    """Per-item predictions of one loaded model (for tests, notebooks, sample logs)."""
    spans, owners = plan_choices(tokenizer, items, max_length, chat_template=chat_template)
    scores = score_spans(model, spans, batch_size=batch_size, device=device,
                         pad_id=tokenizer.pad_token_id, share_prefix=share_prefix,
                         **score_kwargs)
    return choose(items, owners, scores)


def choice_plan(tokenizer: Any, items: list[ChoiceItem], max_length: int, *,
                chat_template: bool | None = False) -> EvalPlan:
    """The plan that scores every choice of every item and reports acc / acc_norm."""
    spans, owners = plan_choices(tokenizer, items, max_length, chat_template=chat_template)
    return EvalPlan(spans, lambda scores: summarize_choices(items, choose(items, owners, scores)))

