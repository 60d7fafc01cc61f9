"""Training examples as token ids: what batching and the held-out batches share.

A batch is a dict of CPU tensors (:data:`Batch`); a label of :data:`IGNORE_INDEX` is not
learned. An instruction record becomes ``(prompt ids, response ids)``
(:func:`encode_instruction`) and an example ``(ids, labels)`` with the prompt masked
(:func:`tokenized_examples`); :func:`collate` pads examples into a batch. A training
document is ``BOS text EOS`` (:func:`document_policy`). :mod:`engine.training.batching`
streams these into endless training batches; :mod:`engine.training.heldout` builds the
held-out batches from the same pieces, so the two can never disagree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.files import iter_instructions
from engine.data.token_cache import DocumentPolicy

__all__ = ["IGNORE_INDEX", "Batch", "collate", "document_policy", "encode_instruction",
           "encode_instructions", "encoded_records", "eos_id", "record_problem", "tokenized_examples"]

Batch = dict[str, torch.Tensor]
IGNORE_INDEX = -100


def eos_id(tokenizer: Any) -> int:
    """The tokenizer's EOS id: it separates packed documents and ends every response."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; it is needed to separate documents and "
                        "to end responses")
    return int(eos)


def document_policy(tokenizer: Any) -> DocumentPolicy:
    """BOS (when the tokenizer has one distinct from EOS) and EOS of a training document."""
    eos = eos_id(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    return DocumentPolicy(bos=int(bos) if bos is not None and bos != eos else None, eos=eos)


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def _split(prompt: list[int], full: list[int]) -> tuple[list[int], list[int]]:
    common = 0
    for a, b in zip(prompt, full):
        if a != b:
            break
        common += 1
    return full[:common], full[common:]


def encode_instruction(tokenizer: Any, record: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) for one instruction record.

    With a chat template the conversation is rendered whole and the prompt is the
    rendering of every turn before the last plus the generation prompt; the
    response is what the full rendering adds after it. Without a template the
    prompt text (or the earlier turns as ``role: content`` lines) is followed by the
    response and EOS.
    """
    messages = _messages(record)
    if getattr(tokenizer, "chat_template", None):
        full = _template_ids(tokenizer, messages)
        prompt = _template_ids(tokenizer, messages[:-1], add_generation_prompt=True) if len(messages) > 1 else []
        return _split(prompt, full)
    if "messages" in record:
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "
    else:
        prompt_text = record["prompt"]
    prompt_ids = list(tokenizer(prompt_text)["input_ids"])
    response_ids = list(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    return prompt_ids, [*response_ids, eos_id(tokenizer)]


def encode_instructions(tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_instruction` of every record, the same ids: with a chat template the
    conversations are rendered and tokenized as one batch per call (a call per record
    cost about 0.2 ms of the tokenizer's own overhead, most of an SFT stage's start on
    small data)."""
    if not records:
        return []
    if not getattr(tokenizer, "chat_template", None):
        return [encode_instruction(tokenizer, r) for r in records]
    conversations = [_messages(r) for r in records]
    fulls = _batch_template_ids(tokenizer, conversations)
    asked = [i for i, c in enumerate(conversations) if len(c) > 1]
    prompts: list[list[int]] = [[] for _ in records]
    for i, ids in zip(asked, _batch_template_ids(tokenizer, [conversations[i][:-1] for i in asked],
                                                 add_generation_prompt=True), strict=True):
        prompts[i] = ids
    return [_split(p, f) for p, f in zip(prompts, fulls, strict=True)]


def _batch_template_ids(tokenizer: Any, conversations: list[list[dict[str, str]]],
                        **kwargs: Any) -> list[list[int]]:
    if not conversations:
        return []
    out = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False, **kwargs)
    out = out["input_ids"] if isinstance(out, dict) else out
    return [list(ids) for ids in out]


def encoded_records(tokenizer: Any, source: DataSource,
                    chunk: int = 256) -> Iterator[tuple[int, int, list[int], list[int]]]:
    """``(index, line number, prompt ids, response ids)`` of every record of ``source``,
    encoded a chunk of records at a time (:func:`encode_instructions`); memory stays a chunk."""
    records = enumerate(iter_instructions(source))
    while True:
        block = list(itertools.islice(records, chunk))
        if not block:
            return
        encoded = encode_instructions(tokenizer, [record for _, (_, record) in block])
        for (index, (lineno, _)), (prompt, response) in zip(block, encoded, strict=True):
            yield index, lineno, prompt, response


def record_problem(prompt: list[int], response: list[int], seq_len: int) -> str | None:
    """Why a tokenized record cannot be trained on at ``seq_len``, or None.

    The rule: the prompt must leave room for at least one response token in the
    ``seq_len`` window (a longer response is cut, a longer prompt would train nothing).
    """
    if len(prompt) >= seq_len:
        return (f"the prompt is {len(prompt)} tokens but seq_len is {seq_len}; "
                "no response token would be trained (raise seq_len or shorten the prompt)")
    if not response:
        return "the response is empty after tokenization"
    return None


def tokenized_examples(tokenizer: Any, source: DataSource, seq_len: int,
              skip: frozenset[int] | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, labels) per record, prompt masked, cut to ``seq_len``; records whose
    index is in ``skip`` (held out) are left out."""
    for index, lineno, prompt, response in encoded_records(tokenizer, source):
        if skip and index in skip:
            continue
        problem = record_problem(prompt, response, seq_len)
        if problem is not None:  # checked up front by training_batches; kept for direct callers
            raise DataError(f"{source.path}:{lineno}: {problem}")
        ids = (prompt + response)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
        yield ids, labels


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad examples to the longest; padding is masked from attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
