"""Prompts shared by the choice and generation items: few-shot examples, plain-text
contexts and the chat template.

A prompt is either plain text (few-shot examples joined by a separator, then BOS + the
text) or a chat conversation rendered by the tokenizer's chat template
(:func:`render_prompt`), whose text is tokenized as is: the template writes BOS itself
when the model wants one, so none is added. Choice items (:mod:`engine.evaluation.choices`)
and generation items (:mod:`engine.evaluation.answers`) are built here the same way, so
the two formats of one task see the same context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from engine.core.errors import DataError, EngineError
from engine.core.inputs import DataSource

__all__ = ["FewShot", "PromptItem", "Shots", "chat_messages", "draw_shots", "encode_prompt",
           "fewshot_indices", "plain_context", "prefix_id", "render_prompt", "use_chat_template"]

#: few-shot examples as ``(prompt, answer)`` pairs
Shots = tuple[tuple[str, str], ...]


class PromptItem(Protocol):
    """What :func:`render_prompt` reads of an item (a choice or a generation item)."""

    where: str
    context: str
    prompt: str
    shots: Shots


@dataclass(frozen=True)
class FewShot:
    """How choice items are read and given few-shot examples (the task-accuracy keys)."""

    num_fewshot: int = 0
    fewshot_seed: int = 0
    fewshot_separator: str = "\n\n"
    max_items: int | None = None


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


def render_prompt(tokenizer: Any, item: PromptItem,
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


def prefix_id(tokenizer: Any) -> int | None:
    """The token :func:`encode_pair` puts before a plain context: BOS, else EOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(tokenizer, "eos_token_id", None)


def encode_prompt(tokenizer: Any, text: str, templated: bool) -> list[int]:
    """A generation prompt's ids: a chat-template text as is (it holds its own special
    tokens), a plain text after BOS (EOS for tokenizers without one), as choice
    contexts are. The text is not stripped: end prompts where the answer starts."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = None if templated else prefix_id(tokenizer)
    return [prefix, *ids] if prefix is not None else ids


def draw_shots(source: DataSource, solved: list[tuple[str, str]], params: Any) -> list[Shots]:
    """Per item, its few-shot examples: ``num_fewshot`` other items of the file as
    ``(prompt, answer)`` pairs, drawn by :func:`fewshot_indices`."""
    k = params.num_fewshot
    if k >= len(solved):
        raise DataError(f"{source.path}: num_fewshot={k} needs at least {k + 1} items, "
                        f"the file has {len(solved)}")
    return [tuple(solved[j] for j in fewshot_indices(i, len(solved), k, params.fewshot_seed))
            for i in range(len(solved))]


def plain_context(shots: Shots, prompt: str, separator: str) -> str:
    """The few-shot examples and the prompt as one plain text, joined by ``separator``."""
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
