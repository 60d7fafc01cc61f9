"""What the built-in evaluators score, as reusable plans: documents, choice and
generation items.

``perplexity``, ``task-accuracy`` and ``retention`` (which re-scores both on source
language data against a reference model) build their plans
(:class:`~engine.evaluation.EvalPlan`, :class:`~engine.evaluation.generation.GenerationPlan`) from
these functions, so a metric is defined in exactly one place. The definitions
(token-weighted perplexity with sliding windows; lm-evaluation-harness style
multiple-choice log-likelihoods, ``acc`` and ``acc_norm``; greedy generation scored by
``exact_match``) are documented in docs/evaluation.md and in the plugin modules.

Prompts (both item kinds) are either plain text (few-shot examples joined by a
separator, then BOS + the text) or a chat conversation rendered by the tokenizer's chat
template (:func:`render_prompt`), whose text is tokenized as is: the template writes
BOS itself when the model wants one, so none is added.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import DataError, EngineError
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

if TYPE_CHECKING:
    from engine.evaluation.answers import AnswerItem

__all__ = [
    "ChoiceItem", "FewShot", "ItemPrediction", "chat_messages", "choice_plan", "choose",
    "encode_prompt", "fewshot_indices", "load_items", "plan_choices", "plan_perplexity", "predict",
    "ratio_stderr", "read_documents", "render_prompt", "summarize_choices",
    "use_chat_template",
]
#: generation names that lived here before engine.evaluation.answers; still importable, with a warning
_MOVED = ("AnswerItem", "AnswerMatch", "generate_answers", "generation_plan", "load_answer_items",
          "plan_generation", "summarize_exact_match")

Shots = tuple[tuple[str, str], ...]


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
                    max_length: int, stride: int, *, bits_per_byte: bool = False) -> EvalPlan:
    """Spans for every document of every source, and the per-source aggregation.

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

    return EvalPlan(spans, summarize)


# --- prompts: plain text or the chat template -------------------------------------------


def use_chat_template(tokenizer: Any, setting: bool | None) -> bool:
    """Whether prompts go through the tokenizer's chat template.

    ``None`` (auto) applies it when the tokenizer has one; ``True`` requires one
    (:class:`EngineError` otherwise, reported against the model); ``False`` never.
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting and not has:
        raise EngineError("chat_template is true but the tokenizer has no chat template "
                          "(use null to apply it only where there is one)")
    return has if setting is None else setting


def chat_messages(shots: Shots, prompt: str) -> list[dict[str, str]]:
    """The conversation a chat model sees: each few-shot example as a user turn (its
    prompt) and an assistant turn (its answer, stripped of surrounding whitespace),
    then the item's prompt as the last user turn."""
    messages = []
    for shot_prompt, answer in shots:
        messages.append({"role": "user", "content": shot_prompt})
        messages.append({"role": "assistant", "content": answer.strip()})
    messages.append({"role": "user", "content": prompt})
    return messages


def render_prompt(tokenizer: Any, item: ChoiceItem | AnswerItem,
                  chat_template: bool | None) -> tuple[str, bool]:
    """The text fed to the model before an item's answer, and whether the chat
    template made it.

    Without the template it is the item's plain ``context`` (few-shot examples and the
    prompt joined by the separator). With it, :func:`chat_messages` rendered by
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)``:
    the text ends where the assistant's answer starts.
    """
    if not use_chat_template(tokenizer, chat_template):
        return item.context, False
    text = tokenizer.apply_chat_template(chat_messages(item.shots, item.prompt),
                                         add_generation_prompt=True, tokenize=False)
    if not isinstance(text, str):  # pragma: no cover - a tokenizer returning ids anyway
        raise EngineError(f"{item.where}: the chat template did not render to text")
    return text, True


def _prefix_id(tokenizer: Any) -> int | None:
    """The token :func:`encode_pair` puts before a plain context: BOS, else EOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def encode_prompt(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """A generation prompt's ids: a chat-template text as is (it holds its own special
    tokens), a plain text after BOS (EOS for tokenizers without one), as choice
    contexts are. The text is not stripped: end prompts where the answer starts."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = None if templated else _prefix_id(tokenizer)
    return [prefix, *ids] if prefix is not None else ids


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
    solved = [(r["prompt"], r["choices"][r["label"]]) for _, r in records]
    items = []
    for (lineno, record), shots in zip(records, _draw_shots(source, solved, params), strict=True):
        items.append(ChoiceItem(source.label, f"{source.path}:{lineno}",
                                _plain_context(shots, record["prompt"], params.fewshot_separator),
                                tuple(record["choices"]), record["label"], record["prompt"], shots))
    return items


def _draw_shots(source: DataSource, solved: list[tuple[str, str]], params: Any) -> list[Shots]:
    """Per item, its few-shot examples: ``num_fewshot`` other items of the file as
    ``(prompt, answer)`` pairs, drawn by :func:`fewshot_indices`."""
    k = params.num_fewshot
    if k >= len(solved):
        raise DataError(f"{source.path}: num_fewshot={k} needs at least {k + 1} items, "
                        f"the file has {len(solved)}")
    return [tuple(solved[j] for j in fewshot_indices(i, len(solved), k, params.fewshot_seed))
            for i in range(len(solved))]


def _plain_context(shots: Shots, prompt: str, separator: str) -> str:
    return separator.join([p + a for p, a in shots] + [prompt])


def fewshot_indices(item: int, n_items: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices in ``range(n_items)`` other than ``item``, deterministic.

    A string seed is hashed with SHA-512 by :class:`random.Random`, so the draw does
    not depend on ``PYTHONHASHSEED``, the platform or the other items' draws.
    """
    if k == 0:
        return []
    picks = random.Random(f"{seed}:{item}").sample(range(n_items - 1), k)
    return [j + 1 if j >= item else j for j in picks]


def plan_choices(tokenizer: Any, items: list[ChoiceItem], max_length: int, *,
                 chat_template: bool | None = False
                 ) -> tuple[list[Span], list[tuple[int, int]]]:
    """One span per (item, choice), and for each span the (item, choice) it scores.

    ``chat_template`` is as in :func:`use_chat_template`; a templated context gets no
    added BOS (the template writes it)."""
    spans: list[Span] = []
    owners: list[tuple[int, int]] = []
    prefix = _prefix_id(tokenizer)
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


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import warnings

        from engine.evaluation import answers

        warnings.warn(f"engine.evaluation.choices.{name} moved: import it from engine.api.evaluation",
                      DeprecationWarning, stacklevel=2)
        return getattr(answers, name)
    raise AttributeError(f"module 'engine.evaluation.choices' has no attribute {name!r}")
