"""Turning data sources into training batches, streamed and deterministic.

Two kinds of batches, ``{"input_ids", "attention_mask", "labels"}`` tensors on the CPU
(the training loop moves them), or, packed by document (:mod:`engine.training.packing`, the
default where the model supports it), ``{"input_ids", "position_ids", "labels"}``:

* **packed text** (:func:`packed_batches`): documents are tokenized, joined with EOS
  and cut into ``seq_len`` blocks, so no compute is spent on padding. Several sources
  are mixed block by block in proportion to their ``weight`` (ELO's 9:1
  target:source mix), with a smooth weighted round robin: the proportions hold
  exactly in every window, not only on average.
* **instructions** (:func:`instruction_batches`): prompt/response pairs or chat
  messages, rendered with the tokenizer's chat template when it has one. Prompt
  tokens are labelled ``-100`` so that only the response is learned; batches are
  padded to their longest example. Every record is checked up front
  (:func:`check_instructions`): a prompt of ``seq_len`` tokens or more is an error
  naming its file and line before training starts.

Files are read line by line (:mod:`engine.data`) and shuffled through a bounded
buffer, so corpora larger than memory work. Iteration never ends (each source is
re-read when exhausted); the trainer's ``steps`` decides the length. The same seed
gives the same batches.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data import token_cache
from engine.training.examples import (
    Batch,
    collate,
    document_policy,
    encoded_records,
    eos_id,
    record_problem,
    tokenized_examples,
)
from engine.training.heldout import HeldOut, HeldOutBatches
from engine.training.packing import (
    TrainingBatches,
    check_packing,
    document_batch,
    pack_documents,
    packed_example_batches,
)

T = TypeVar("T")
#: the held-out item indices of source i (:meth:`engine.training.heldout.HeldOut.held`), or None
Held = Callable[[int], frozenset[int]] | None

_TOKENIZE_CHUNK = 64


def training_batches(tokenizer: Any, sources: Sequence[DataSource], *, seq_len: int,
                     batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                     packing: str = "auto", eval_fraction: float = 0.0) -> TrainingBatches:
    """Batches for ``sources``, packed text or masked instructions by their format.

    All sources must share one format. ``packing`` (:mod:`engine.training.packing`) says how
    documents or examples share rows; the training loop settles ``auto`` on the model
    before the first batch. ``rank``/``world_size`` deal batches round robin to
    data-parallel processes. Instruction data is checked whole here
    (:func:`check_instructions`), so a prompt that does not fit ``seq_len`` is an
    error when this is called, not when the bad record's batch comes up: trainers
    call it before loading their model.

    With ``eval_fraction`` > 0 that fraction of each source's documents (examples) is
    held out before packing (:mod:`engine.training.heldout`): the batches never contain them and
    carry the split (``.heldout``), which :func:`engine.training.train` evaluates.
    """
    if not sources:
        raise DataError("no training data given")
    formats = {s.format for s in sources}
    if len(formats) > 1:
        listing = ", ".join(f"{s.path} ({s.format})" for s in sources)
        raise DataError(f"training data mixes formats; give one kind per stage: {listing}")
    fmt = formats.pop()
    split = (HeldOut(tokenizer, sources, fmt=fmt, seq_len=seq_len, batch_size=batch_size, fraction=eval_fraction,
                     seed=seed) if eval_fraction > 0 else None)
    held = split.held if split is not None else None
    if fmt == "text":
        def make(packed: bool) -> Iterator[Batch]:
            return packed_batches(tokenizer, sources, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                  documents=packed, held=held)
    elif fmt == "instructions":
        check_packing(fmt, packing)
        check_instructions(tokenizer, sources, seq_len=seq_len)  # every record, before any step

        def make(packed: bool) -> Iterator[Batch]:
            return instruction_batches(tokenizer, sources, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                       packed=packed, held=held)
    else:
        raise DataError(f"{sources[0].path}: {fmt!r} data cannot be trained on (use text or instructions)")
    if split is not None:
        return HeldOutBatches(fmt, packing, make, rank=rank, world_size=world_size, heldout=split)
    return TrainingBatches(fmt, packing, make, rank=rank, world_size=world_size)


def require_format(sources: Sequence[DataSource], fmt: str, who: str) -> None:
    """DataError unless every source has format ``fmt`` (``who`` names the trainer)."""
    if not sources:
        raise DataError(f"{who} needs training data ('data:' is empty)")
    for src in sources:
        if src.format != fmt:
            raise DataError(f"{src.path}: {who} trains on {fmt!r} data, this file is {src.format!r}")


# --- generic stream helpers -----------------------------------------------------------------


def cycle(make: Callable[[], Iterable[T]], what: str) -> Iterator[T]:
    """Re-open a stream each time it ends; an empty stream is a DataError naming ``what``."""
    while True:
        empty = True
        for item in make():
            empty = False
            yield item
        if empty:
            raise DataError(f"{what}: no usable records")


def shuffled(items: Iterable[T], rng: random.Random, buffer_size: int) -> Iterator[T]:
    """Approximate shuffle with a bounded buffer (memory stays ``buffer_size`` items)."""
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def mix(streams: Sequence[Iterator[T]], weights: Sequence[float]) -> Iterator[T]:
    """Interleave streams in proportion to ``weights`` (smooth weighted round robin).

    With weights 9 and 1, every run of 10 items holds 9 from the first stream.
    """
    if any(w <= 0 for w in weights):
        raise DataError(f"data weights must be positive, got {list(weights)}")
    total = float(sum(weights))
    credit = [0.0] * len(streams)
    while True:
        for i, w in enumerate(weights):
            credit[i] += w
        best = max(range(len(streams)), key=lambda i: credit[i])
        credit[best] -= total
        yield next(streams[best])


def _source_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


# --- packed text ---------------------------------------------------------------------------


def _tokenized_documents(tokenizer: Any, source: DataSource, rng: random.Random,
                         buffer_size: int, skip: frozenset[int] | None = None) -> Iterator[list[int]]:
    """Token ids per document, ``BOS text EOS``, shuffled through a buffer.

    Documents start with BOS when the tokenizer has a BOS distinct from EOS and did not
    add it itself (as models are pretrained and as the evaluators score text), and end
    with EOS, which separates documents in the packed stream.

    The documents come from the token cache (:mod:`engine.data.token_cache`): the source is
    tokenized once, in file order, and every later pass, stage and run reads the ids
    from disk. The buffer shuffles document indices with the same draws as it would
    shuffle the texts, so the order is the one the seed always gave. Indices in
    ``skip`` (held out) are left out before the shuffle."""
    cache = token_cache.documents(tokenizer, source, document_policy(tokenizer))
    order = range(len(cache)) if not skip else [i for i in range(len(cache)) if i not in skip]
    for i in shuffled(order, rng, buffer_size):
        yield cache.document(i)


def pack(documents: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate documents and cut the stream into blocks of exactly ``seq_len`` tokens."""
    buf: list[int] = []
    for ids in documents:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def _document_streams(tokenizer: Any, sources: Sequence[DataSource], seed: int, shuffle_buffer: int,
                      held: Held = None) -> list[Iterator[list[int]]]:
    return [cycle(lambda s=src, r=_source_rng(seed, i), i=i: _tokenized_documents(
        tokenizer, s, r, shuffle_buffer, held(i) if held else None), str(src.path)) for i, src in enumerate(sources)]


def packed_blocks(tokenizer: Any, sources: Sequence[DataSource], *, seq_len: int, seed: int = 0,
                  shuffle_buffer: int = 1024, held: Held = None) -> Iterator[tuple[int, list[int]]]:
    """Endless ``(source index, block)`` pairs, sources mixed by weight."""
    streams = [zip(itertools.repeat(i), pack(docs, seq_len))
               for i, docs in enumerate(_document_streams(tokenizer, sources, seed, shuffle_buffer, held))]
    return mix(streams, [s.weight for s in sources])


def packed_batches(tokenizer: Any, sources: Sequence[DataSource], *, seq_len: int, batch_size: int,
                   seed: int = 0, shuffle_buffer: int = 1024, documents: bool = False,
                   held: Held = None) -> Iterator[Batch]:
    """Endless batches of packed ``seq_len`` blocks (labels = inputs; the model shifts).

    With ``documents`` the same blocks carry ``position_ids`` restarting at each
    document, no attention mask, and ``-100`` labels at document starts
    (:mod:`engine.training.packing`); without, an all-ones attention mask. ``held(i)``: the
    held-out document indices of source ``i``, never trained on."""
    if documents:
        streams = [pack_documents(docs, seq_len)
                   for docs in _document_streams(tokenizer, sources, seed, shuffle_buffer, held)]
        rows_of = mix(streams, [s.weight for s in sources])
        while True:
            yield document_batch(list(itertools.islice(rows_of, batch_size)))
    blocks = packed_blocks(tokenizer, sources, seq_len=seq_len, seed=seed, shuffle_buffer=shuffle_buffer, held=held)
    while True:
        rows = [block for _, block in itertools.islice(blocks, batch_size)]
        ids = torch.tensor(rows, dtype=torch.long)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --- instructions ------------------------------------------------------------------------------


def check_instructions(tokenizer: Any, sources: Sequence[DataSource], *, seq_len: int,
                       max_listed: int = 5) -> int:
    """Tokenize every instruction record once and fail on any that cannot be trained on.

    The :class:`DataError` names each bad record as ``file:line`` (the first
    ``max_listed``, and how many there are in all), so that one long prompt deep in a
    file stops the stage at its start, not hours into training. Returns the number
    of records checked.
    """
    problems: list[str] = []
    total_bad = checked = 0
    for source in sources:
        for _, lineno, prompt, response in encoded_records(tokenizer, source):
            checked += 1
            problem = record_problem(prompt, response, seq_len)
            if problem is not None:
                total_bad += 1
                if len(problems) < max_listed:
                    problems.append(f"{source.path}:{lineno}: {problem}")
    if total_bad:
        more = f"\n  ... and {total_bad - len(problems)} more" if total_bad > len(problems) else ""
        raise DataError(
            f"{total_bad} of {checked} instruction record(s) cannot be trained on with seq_len {seq_len}:\n  "
            + "\n  ".join(problems) + more
            + "\nFix or drop those records (or raise seq_len for long prompts).")
    return checked


def instruction_batches(tokenizer: Any, sources: Sequence[DataSource], *, seq_len: int,
                        batch_size: int, seed: int = 0, shuffle_buffer: int = 1024,
                        packed: bool = False, held: Held = None) -> Iterator[Batch]:
    """Endless batches of instruction examples, sources mixed by weight: padded, one
    example per row, or with ``packed`` whole examples packed into ``seq_len`` rows
    without attention across them (:func:`engine.training.packing.packed_example_batches`)."""
    streams = []
    for i, src in enumerate(sources):
        rng = _source_rng(seed, i)
        streams.append(cycle(
            lambda s=src, r=rng, i=i: shuffled(tokenized_examples(tokenizer, s, seq_len, held(i) if held else None), r,
                                               shuffle_buffer), str(src.path)))
    examples = mix(streams, [s.weight for s in sources])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    if packed:
        yield from packed_example_batches(examples, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id)
    while True:
        yield collate(list(itertools.islice(examples, batch_size)), pad_id)
