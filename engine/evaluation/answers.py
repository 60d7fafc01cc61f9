"""Generation items scored by greedy generation and exact match (``task-accuracy`` on
``generation`` data). Prompts are built exactly as for choice items
(:func:`engine.evaluation.prompts.render_prompt`), so the two formats of one task see the same
context."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch

from engine.core.errors import DataError, EngineError
from engine.core.inputs import DataSource
from engine.data.files import iter_answers
from engine.evaluation.driver import Generation, GenerationPlan, StopRule, generate_greedy
from engine.evaluation.prompts import Shots, draw_shots, encode_prompt, plain_context, render_prompt

__all__ = ["AnswerItem", "AnswerMatch", "generate_answers", "generation_plan", "load_answer_items",
           "plan_generation", "summarize_exact_match"]

# --- generation (exact match) -------------------------------------------------------


@dataclass(frozen=True)
class AnswerItem:
    """One generation item: a prompt and the answers that count as correct.

    ``context``, ``prompt`` and ``shots`` are as in :class:`ChoiceItem` (a few-shot
    example's answer is its first accepted answer).
    """

    source: str  # the data source's label
    where: str  # "path:line", for error messages
    context: str
    answers: tuple[str, ...]
    prompt: str = ""
    shots: Shots = ()


@dataclass(frozen=True)
class AnswerMatch:
    """How a generated text is compared with the answers (exact match after
    normalisation, the same normalisation applied to both sides)."""

    ignore_case: bool = False
    ignore_punctuation: bool = False

    def normalize(self, text: str) -> str:
        """Strip surrounding whitespace; with ``ignore_punctuation`` drop every Unicode
        punctuation character (categories ``P*``) first; with ``ignore_case``
        compare case-folded (``str.casefold``: also ``ß`` = ``ss``)."""
        if self.ignore_punctuation:
            text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
        text = text.strip()
        return text.casefold() if self.ignore_case else text

    def matches(self, output: str, answers: tuple[str, ...]) -> bool:
        got = self.normalize(output)
        return any(got == self.normalize(a) for a in answers)


def load_answer_items(source: DataSource, params: Any, match: AnswerMatch) -> list[AnswerItem]:
    """A generation source's items with few-shot contexts built; errors name file and
    line. ``params`` has the :class:`FewShot` attributes. An answer that normalises to
    nothing (``""``, blanks, only punctuation under ``ignore_punctuation``) is an error:
    it would match an empty output."""
    records = list(islice(iter_answers(source), params.max_items))
    if not records:
        raise DataError(f"{source.path}: no generation items")
    answers: list[tuple[str, ...]] = []
    for lineno, record in records:
        got = (record["answer"],) if "answer" in record else tuple(record["answers"])
        for a in got:
            if not match.normalize(a):
                field_name = "answer" if "answer" in record else "answers"
                raise DataError(f"{source.path}:{lineno}: {field_name!r} holds {a!r}, which is "
                                "empty after normalisation")
        answers.append(got)
    solved = [(r["prompt"], a[0]) for (_, r), a in zip(records, answers, strict=True)]
    items = []
    for (lineno, record), accepted, shots in zip(records, answers, draw_shots(source, solved, params),
                                                strict=True):
        items.append(AnswerItem(source.label, f"{source.path}:{lineno}",
                                plain_context(shots, record["prompt"], params.fewshot_separator),
                                accepted, record["prompt"], shots))
    return items


def plan_generation(tokenizer: Any, items: list[AnswerItem], max_length: int, rule: StopRule, *,
                    chat_template: bool | None = None) -> list[tuple[int, ...]]:
    """Each item's prompt ids. A prompt longer than ``max_length - max_new_tokens``
    keeps its end (its start is dropped), so prompt and answer fit the window; a
    ``max_new_tokens`` that leaves no room raises :class:`EngineError` (reported
    against the model whose window it is)."""
    room = max_length - rule.max_new_tokens
    if room < 1:
        raise EngineError(f"max_new_tokens={rule.max_new_tokens} leaves no room for a prompt in "
                          f"a window of {max_length} tokens; lower it")
    prompts = []
    for item in items:
        text, templated = render_prompt(tokenizer, item, chat_template)
        prompts.append(tuple(encode_prompt(tokenizer, text, templated)[-room:]))
    return prompts


def summarize_exact_match(items: list[AnswerItem], gens: list[Generation],
                          match: AnswerMatch) -> tuple[dict[str, float], dict[str, int]]:
    """``exact_match/<label>`` per source (the share of items whose output matches one
    of their answers), counts = items."""
    hits: dict[str, list[int]] = {}
    for item, gen in zip(items, gens, strict=True):
        h = hits.setdefault(item.source, [0, 0])
        h[0] += match.matches(gen.text, item.answers)
        h[1] += 1
    metrics = {f"exact_match/{label}": hit / n for label, (hit, n) in hits.items()}
    counts = {f"exact_match/{label}": n for label, (_, n) in hits.items()}
    return metrics, counts


def generation_plan(tokenizer: Any, items: list[AnswerItem], max_length: int, rule: StopRule,
                    match: AnswerMatch, *, chat_template: bool | None = None) -> GenerationPlan:
    """The plan that completes every item's prompt greedily and reports exact_match."""
    prompts = plan_generation(tokenizer, items, max_length, rule, chat_template=chat_template)
    return GenerationPlan(prompts, rule, lambda gens: summarize_exact_match(items, gens, match))


def generate_answers(model: torch.nn.Module, tokenizer: Any, items: list[AnswerItem], *,
                     max_length: int, rule: StopRule, batch_size: int = 8,
                     device: torch.device | str = "cpu",
                     chat_template: bool | None = None) -> list[Generation]:
    """Per-item generations of one loaded model (for tests, notebooks, sample logs)."""
    prompts = plan_generation(tokenizer, items, max_length, rule, chat_template=chat_template)
    return generate_greedy(model, tokenizer, prompts, rule, batch_size=batch_size, device=device)
