"""Packing several documents into one row without attention across them.

A packed row holds documents end to end. Each token's ``position_ids`` count from 0 at
the start of its document (and again at the start of a row, for a document continued
from the previous row), and the batch carries no 2D ``attention_mask``: transformers
then builds a block-causal mask from the position ids (sdpa, eager and flex attention)
or passes sequence lengths to flash-attention, so a token attends only to earlier
tokens of its own document, as the document would be seen alone. The label of a
document's first token is ``-100``: it would be predicted from the previous document.

Whether a loaded model honours this is found by running it
(:func:`engine.models.capabilities.packing_probe`); :class:`TrainingBatches` settles the
packing of a stage's batches on that answer before the first batch is drawn
(:func:`fit_packing`, called by the training loop).

The ``packing`` values (the trainers' ``packing`` param):

* ``auto``: document packing when the model honours it, else the format's unmasked way
  (said as a slow path in report.json);
* ``documents``: document packing, an error when the model cannot keep documents apart;
* ``stream``: text only, the documents joined with EOS and cut into blocks with an
  all-ones attention mask (documents attend to the ones before them in the block);
* ``padded``: instructions only, one example per row, padded to the longest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from engine.core.errors import DataError, TrainingError
from engine.models.capabilities import packing_probe
from engine.training.examples import IGNORE_INDEX, Batch

if TYPE_CHECKING:
    from engine.run.context import StageContext

Packing = Literal["auto", "documents", "stream", "padded"]
#: the unmasked way of each data format, and the one ``packing`` value only it takes
UNMASKED = {"text": "stream", "instructions": "padded"}


def pack_documents(documents: Iterable[list[int]], seq_len: int, *, keep_partial: bool = False
                   ) -> Iterator[tuple[list[int], list[int]]]:
    """``(ids, position_ids)`` blocks of exactly ``seq_len`` tokens.

    The ids are those of :func:`engine.training.batching.pack` (the same stream, cut at the same
    places); positions restart at 0 at each document and at each block. With
    ``keep_partial`` the last, shorter block comes too (when it has a next-token target:
    two tokens or more), so that no token of a finite set is dropped.
    """
    ids: list[int] = []
    pos: list[int] = []
    for doc in documents:
        i = 0
        while i < len(doc):
            take = min(len(doc) - i, seq_len - len(ids))
            ids.extend(doc[i:i + take])
            pos.extend(range(take))
            i += take
            if len(ids) == seq_len:
                yield ids, pos
                ids, pos = [], []
    if keep_partial and len(ids) > 1:
        yield ids, pos


def document_batch(rows: list[tuple[list[int], list[int]]], labels: list[list[int]] | None = None) -> Batch:
    """A batch of packed rows: ``input_ids``, ``position_ids`` and ``labels`` (no mask).

    ``labels`` default to the ids; either way a token at position 0 (a document's or a
    row's first) gets ``-100``, as nothing of its own document precedes it."""
    ids = torch.tensor([r for r, _ in rows], dtype=torch.long)
    pos = torch.tensor([p for _, p in rows], dtype=torch.long)
    lab = ids.clone() if labels is None else torch.tensor(labels, dtype=torch.long)
    lab[pos == 0] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": pos, "labels": lab}


def packed_example_batches(examples: Iterator[tuple[list[int], list[int]]], *, seq_len: int,
                           batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Whole instruction examples packed into ``seq_len`` rows, in order.

    An example goes into the current row when it fits, else it starts the next row; the
    rest of a row is padding, a document of its own (labels ``-100``) that no example
    attends to. Examples are at most ``seq_len`` tokens (cut when encoded)."""
    pending: tuple[list[int], list[int]] | None = None
    while True:
        rows, labels = [], []
        for _ in range(batch_size):
            ids: list[int] = []
            pos: list[int] = []
            lab: list[int] = []
            while True:
                x, y = pending if pending is not None else next(examples)
                pending = None
                if ids and len(ids) + len(x) > seq_len:
                    pending = (x, y)
                    break
                ids.extend(x)
                pos.extend(range(len(x)))
                lab.extend(y)
                if len(ids) == seq_len:
                    break
            pad = seq_len - len(ids)
            rows.append((ids + [pad_id] * pad, pos + list(range(pad))))
            labels.append(lab + [IGNORE_INDEX] * pad)
        yield document_batch(rows, labels)


def flatten_rows(batch: Batch) -> Batch:
    """One row holding every row of a document-packed batch, for attention that reads
    packed ``position_ids`` only in a single row (flash-attention)."""
    return {name: t.reshape(1, -1) for name, t in batch.items()}


class TrainingBatches(Iterator[Batch]):
    """The endless batches of a stage, packed as settled by :meth:`settle`.

    ``make(packed)`` builds the stream: document-packed when ``packed``, else the
    format's unmasked way. Until :meth:`settle` is called, ``auto`` and ``documents``
    iterate document-packed."""

    def __init__(self, fmt: str, packing: str, make: Callable[[bool], Iterator[Batch]], *,
                 rank: int = 0, world_size: int = 1) -> None:
        check_packing(fmt, packing)
        self.format, self.packing = fmt, packing
        self.packed = packing != UNMASKED[fmt]
        self.flatten = False
        self._make, self._rank, self._world = make, rank, world_size
        self._it: Iterator[Batch] | None = None

    def settle(self, model: torch.nn.Module, context: StageContext | None = None) -> bool:
        """Probe ``model`` and fix the packing; returns whether document packing is used.

        ``auto`` falls back to the unmasked way when the model cannot keep packed
        documents apart, said through ``context.slow_path``; ``documents`` raises
        :class:`TrainingError` then."""
        if not self.packed:  # stream / padded asked for, or settled on already
            return False
        found = packing_probe(model)
        name = type(model).__name__
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if self._it is not None:  # drawn before (a second train() on the same batches)
            if found is None:
                raise TrainingError(f"{name} (attention {impl!r}) cannot keep packed documents apart, "
                                    "and these batches were already drawn document-packed")
            self.flatten = found == "flat"
            return True
        if found is None and self.packing == "documents":
            raise TrainingError(
                f"packing 'documents': {name} (attention {impl!r}) lets packed documents attend to "
                "each other (position ids restarting at each document are not used as a mask); "
                f"use packing: {UNMASKED[self.format]} or auto, or another attention implementation")
        self.packed, self.flatten = found is not None, found == "flat"
        if context is not None:
            context.note("packing", "documents" + (" (one flattened row per micro-batch)" if self.flatten
                                                  else "") if self.packed else UNMASKED[self.format])
            context.slow_path("packing", name, None if self.packed else (
                f"{name} (attention {impl!r}) does not keep documents packed in one row apart; "
                + ("text is packed as a stream, documents attending to the ones before them in a block"
                   if self.format == "text" else "instruction examples are padded, one per row")))
        return self.packed

    def __next__(self) -> Batch:
        if self._it is None:
            it = self._make(self.packed)
            self._it = itertools.islice(it, self._rank, None, self._world) if self._world > 1 else it
        return next(self._it)


def model_inputs(batch: Batch, flat: bool) -> dict[str, Any]:
    """The keyword arguments of a forward on ``batch``: a document-packed batch gets
    ``use_cache=False`` (transformers builds the block mask only without a KV cache)
    and, when ``flat``, its rows flattened into one."""
    if "position_ids" not in batch:
        return batch
    return {**(flatten_rows(batch) if flat else batch), "use_cache": False}


def check_packing(fmt: str, packing: str) -> None:
    """DataError unless ``packing`` is a value that ``fmt`` data takes."""
    allowed = ("auto", "documents", UNMASKED.get(fmt, ""))
    if packing not in allowed:
        raise DataError(f"packing {packing!r} does not apply to {fmt} data; use one of "
                        f"{', '.join(a for a in allowed if a)}")


def fit_packing(batches: Any, model: torch.nn.Module, context: StageContext | None = None) -> bool:
    """Settle the packing of ``batches`` on ``model`` (a no-op for other iterators);
    returns whether micro-batches are to be flattened into one row."""
    if isinstance(batches, TrainingBatches):
        batches.settle(model, context)
        return batches.flatten
    return False
