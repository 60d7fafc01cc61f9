"""``task-accuracy``: multiple-choice accuracy by log-likelihood, per choice data source.

Each item (``{"prompt", "choices", "label"}``) is scored the way
lm-evaluation-harness scores multiple-choice tasks: the context is the prompt
(preceded by few-shot examples when asked), each choice is a continuation of it,
and ``LL_i = sum log p(choice_i tokens | context)``. Then::

    acc      = mean over items of [argmax_i LL_i == label]
    acc_norm = mean over items of [argmax_i LL_i / len(choice_i) == label]

``len`` counts the *characters* of the choice as written in the file (leading space
included), as the harness does: dividing by characters rather than tokens removes
the bias towards short answers without depending on the tokenizer, so ``acc_norm``
stays comparable between models with different vocabularies. Ties go to the first
choice. Choices are appended to the context as written (no delimiter is inserted),
so a file whose prompts end in ``"Answer:"`` writes its choices as ``" blue"``.

Few-shot (``num_fewshot = k``): item ``i``'s context is ``k`` other items of the same
file, each written as its prompt followed by its correct choice, then item ``i``'s
prompt, joined by ``fewshot_separator``. The examples are drawn with
``random.Random(f"{fewshot_seed}:{i}")`` from the items other than ``i``: the same
for every model and run, and an item never sees its own answer.

Every choice of every item is one span (context + choice), all spans are batched
together and sorted by length. Metrics per model: ``acc/<label>`` and
``acc_norm/<label>``; counts: the number of items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from pydantic import Field

from engine.api import (
    DataSource,
    MetricsArtifact,
    PluginParams,
    StageContext,
    StageInputs,
    hookimpl,
)
from engine.data import iter_choices
from engine.errors import DataError
from engine.evaluation import (
    EvalPlan,
    Span,
    SpanScore,
    continuation_span,
    encode_pair,
    evaluate_models,
    score_spans,
    select_sources,
)


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


class TaskAccuracy:
    """Multiple-choice accuracy (acc, acc_norm) by log-likelihood of each choice."""

    name = "task-accuracy"

    class Params(PluginParams):
        batch_size: int = Field(8, ge=1, description="Sequences (item x choice) per forward pass.")
        num_fewshot: int = Field(0, ge=0, description="Solved examples from the same file put "
                                                      "before each item's prompt.")
        fewshot_seed: int = Field(0, description="Seed of the deterministic few-shot draw.")
        fewshot_separator: str = Field("\n\n", description="Text between few-shot examples "
                                                           "and before the item's prompt.")
        max_items: int | None = Field(None, ge=1, description="Score only the first N items "
                                                              "of each source.")
        max_length: int | None = Field(
            None, ge=2, description="Longest input in tokens; longer contexts lose their start. "
                                    "Default: the model's context.")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, "choice")
        items = [item for source in sources for item in load_items(source, params)]

        def build_plan(tokenizer: Any, max_length: int) -> EvalPlan:
            spans, owners = plan_choices(tokenizer, items, max_length)
            return EvalPlan(spans, lambda scores: summarize(items, choose(items, owners, scores)))

        return evaluate_models(context, inputs.models, build_plan,
                               batch_size=params.batch_size, max_length=params.max_length)


def load_items(source: DataSource, params: TaskAccuracy.Params) -> list[ChoiceItem]:
    """A source's items with few-shot contexts built; errors name file and line."""
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


def summarize(items: list[ChoiceItem],
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
            max_length: int, batch_size: int = 8,
            device: torch.device | str = "cpu") -> list[ItemPrediction]:
    """Per-item predictions of one loaded model (for tests, notebooks, sample logs)."""
    spans, owners = plan_choices(tokenizer, items, max_length)
    scores = score_spans(model, spans, batch_size=batch_size, device=device,
                         pad_id=tokenizer.pad_token_id)
    return choose(items, owners, scores)


@hookimpl
def register_evaluators(register: Any) -> None:
    register(TaskAccuracy())
