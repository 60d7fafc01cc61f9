"""Held-out evaluation loss during training, and the best checkpoint (``keep_best``).

With a trainer's ``eval_fraction`` > 0, :func:`engine.training.batching.training_batches` splits
each source's documents (text) or examples (instructions) before anything is packed:
:func:`held_out_indices` draws ``floor(n * eval_fraction)`` of a source's ``n`` items,
deterministically from the seed and the source's position, and the training stream
skips them, so no held-out item is ever in a training batch. :class:`HeldOut` builds
the held-out items into a fixed, finite list of batches, packed the way the training
batches were settled (document packing, stream or padded), the last partial row kept.

:class:`Evaluator` is what :func:`engine.training.train` runs every ``eval_every``
steps and at the last step: the mean token loss over every held-out target token
(the training loss's convention), computed with ``model.eval()`` and
``torch.no_grad()`` through the same (accelerate-prepared, maybe autocast) forward,
train mode restored after; it neither draws random numbers nor touches the
parameters, so the training itself is unchanged by it. Every process evaluates the
whole held-out set (no collective is skipped by any rank). With ``keep_best`` a CPU
copy of the trainable tensors at the step of the lowest eval loss is kept (frozen
tensors do not change), saved in checkpoints, and loaded back into the model before
the stage saves it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import DataError, TrainingError
from engine.core.inputs import DataSource
from engine.data import token_cache
from engine.data.files import iter_jsonl
from engine.training.examples import (
    IGNORE_INDEX,
    Batch,
    collate,
    document_policy,
    eos_id,
    tokenized_examples,
)
from engine.training.packing import TrainingBatches, document_batch, model_inputs, pack_documents

if TYPE_CHECKING:
    from engine.run.context import StageContext
    from engine.training.params import TrainerParams



def held_out_indices(n: int, fraction: float, seed: int, source_index: int) -> frozenset[int]:
    """Indices of the ``floor(n * fraction)`` items of source ``source_index`` held out."""
    k = int(n * fraction + 1e-9)
    if k <= 0:
        return frozenset()
    return frozenset(random.Random(f"lingoforge-heldout:{seed}:{source_index}").sample(range(n), k))


class HeldOut:
    """The held-out part of a stage's data: which items of each source, and their batches."""

    def __init__(self, tokenizer: Any, sources: Sequence[DataSource], *, fmt: str, seq_len: int,
                 batch_size: int, fraction: float, seed: int) -> None:
        self.tokenizer, self.sources, self.format = tokenizer, list(sources), fmt
        self.seq_len, self.batch_size, self.fraction, self.seed = seq_len, batch_size, fraction, seed
        self._held: dict[int, frozenset[int]] = {}
        self.counts: dict[int, int] = {}

    def _documents(self, i: int) -> Any:
        return token_cache.documents(self.tokenizer, self.sources[i], document_policy(self.tokenizer))

    def held(self, i: int) -> frozenset[int]:
        """The held-out item indices of source ``i`` (documents in token-cache order, or
        instruction records in file order)."""
        if i not in self._held:
            if self.format == "text":
                n = len(self._documents(i))
            else:
                src = self.sources[i]
                n = sum(1 for _ in iter_jsonl(src.path, src.records))
            self.counts[i] = n
            self._held[i] = held_out_indices(n, self.fraction, self.seed, i)
        return self._held[i]

    def items(self, stage: str) -> list[Any]:
        """Every held-out item, sources in order: token ids (text) or (ids, labels)."""
        items: list[Any] = []
        for i, src in enumerate(self.sources):
            held = self.held(i)
            if self.format == "text":
                docs = self._documents(i)
                items += [docs.document(j) for j in sorted(held)]
            else:
                items += [ex for j, ex in enumerate(tokenized_examples(self.tokenizer, src, self.seq_len)) if j in held]
        if not items:
            total = sum(self.counts.values())
            what = "documents" if self.format == "text" else "examples"
            raise DataError(f"stage {stage!r}: params.eval_fraction {self.fraction:g} holds out none of the "
                            f"{total} {what} of {', '.join(str(s.path) for s in self.sources)} (each source "
                            f"keeps floor(n * eval_fraction)); raise eval_fraction to at least "
                            f"{1 / max(1, max(self.counts.values())):.3g} or give more data")
        return items

    def batches(self, packed: bool, stage: str) -> list[Batch]:
        """The held-out batches, packed as the training batches are (``packed``: by document)."""
        items = self.items(stage)
        if self.format == "text":
            rows = _text_rows(items, self.seq_len)
            if packed:
                return [document_batch(chunk) for chunk in _chunked(rows, self.batch_size)]
            out = []
            for chunk in _chunked(rows, self.batch_size):
                ids = torch.tensor([r for r, _ in chunk], dtype=torch.long)
                out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
            return out
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_id(self.tokenizer)
        if not packed:
            return [collate(chunk, pad) for chunk in _chunks(items, self.batch_size)]
        rows, labels = _example_rows(items, self.seq_len, pad)
        return [document_batch(list(r), list(lab)) for r, lab in
                zip(_chunks(rows, self.batch_size), _chunks(labels, self.batch_size))]


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _text_rows(docs: Iterable[list[int]], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """``(ids, position_ids)`` rows as :func:`engine.training.packing.pack_documents` cuts them,
    plus the last partial row (held-out tokens are not dropped)."""
    return list(pack_documents(docs, seq_len, keep_partial=True))


def _chunked(rows: list[tuple[list[int], list[int]]], size: int) -> list[list[tuple[list[int], list[int]]]]:
    """Batches of ``size`` rows; a short last row goes into a batch of its own."""
    if not rows:
        return []
    full = [r for r in rows if len(r[0]) == len(rows[0][0])]
    out = [list(c) for c in _chunks(full, size)]
    return out + [[r] for r in rows[len(full):]]


def _example_rows(examples: list[tuple[list[int], list[int]]], seq_len: int,
                  pad_id: int) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """Whole examples packed greedily into padded ``seq_len`` rows, as
    :func:`engine.training.packing.packed_example_batches` does, but finite."""
    rows: list[tuple[list[int], list[int]]] = []
    labels: list[list[int]] = []
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []

    def close() -> None:
        pad = seq_len - len(ids)
        rows.append((ids + [pad_id] * pad, pos + list(range(pad))))
        labels.append(lab + [IGNORE_INDEX] * pad)

    for x, y in examples:
        if ids and len(ids) + len(x) > seq_len:
            close()
            ids, pos, lab = [], [], []
        ids, pos, lab = ids + x, pos + list(range(len(x))), lab + y
    if ids:
        close()
    return rows, labels


class HeldOutBatches(TrainingBatches):
    """:class:`~engine.training.packing.TrainingBatches` that skip a held-out split, which they carry."""

    def __init__(self, *args: Any, heldout: HeldOut, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heldout = heldout


# --- evaluation in the loop ---------------------------------------------------------------


class Evaluator:
    """Held-out loss at chosen steps, the best step so far and (``keep_best``) its weights."""

    def __init__(self, inputs: list[dict[str, Any]], targets: int, params: TrainerParams, info: dict[str, Any]):
        self.inputs, self.targets, self.params, self.info = inputs, targets, params, info
        self.interval = params.eval_interval
        self.rows: dict[int, float] = {}  # step -> eval loss, for the log lines
        self.last: tuple[int, float] | None = None
        self.best_step: int | None = None
        self.best_loss = float("inf")
        self.best: dict[str, torch.Tensor] | None = None

    @classmethod
    def build(cls, context: StageContext, params: TrainerParams, batches: Any,
              eval_batches: Iterable[Batch] | None, flat: bool, sharded: bool = False) -> Evaluator | None:
        """The stage's evaluator (None when nothing is held out and no batches are given)."""
        stage = context.stage_name
        if params.keep_best and sharded:
            raise TrainingError(f"stage {stage!r}: params.keep_best is not supported with runtime.fsdp on "
                                "several processes (the best weights would be one shard's); remove keep_best")
        if eval_batches is not None:
            held, info = list(eval_batches), {"source": "given by the trainer"}
        elif params.eval_fraction > 0:
            if not isinstance(batches, HeldOutBatches):
                raise TrainingError(f"stage {stage!r}: params.eval_fraction is set, but this trainer's batches "
                                    "carry no held-out split (build them with training_batches(..., "
                                    "eval_fraction=...)) and it gave no eval_batches")
            held = batches.heldout.batches(batches.packed, stage)
            split = batches.heldout
            info = {"fraction": params.eval_fraction,
                    "held_out": sum(len(split.held(i)) for i in range(len(split.sources))),
                    "of": sum(split.counts.values()), "unit": "documents" if split.format == "text" else "examples"}
        else:
            return None
        if params.eval_batches:
            held = held[:params.eval_batches]
        targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in held)
        if not targets:
            raise DataError(f"stage {stage!r}: the held-out batches have no target token to evaluate "
                            "(params.eval_fraction / eval_batches)")
        info.update(batches=len(held), target_tokens=targets)
        return cls([model_inputs(b, flat) for b in held], targets, params, info)

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.params.steps

    def evaluate(self, model: torch.nn.Module, step: int, device: torch.device,
                 named: list[tuple[str, torch.nn.Parameter]]) -> float:
        """Mean token loss over the held-out set at ``step``; updates the best step."""
        was_training = model.training
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=device)
        try:
            with torch.no_grad():
                for batch in self.inputs:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    labels = batch.pop("labels")
                    logits = model(**batch).logits
                    total += torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                        ignore_index=IGNORE_INDEX, reduction="sum").double()
        finally:
            model.train(was_training)
        loss = float(total) / self.targets
        self.rows[step] = loss
        self.last = (step, loss)
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
            if self.params.keep_best:
                self.best = {n: p.detach().to("cpu", copy=True) for n, p in named}
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_eval_loss": self.best_loss if self.best_step is not None else None,
                "last": list(self.last) if self.last else None}

    def restore(self, state: dict[str, Any] | None, best: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` and best tensors."""
        if not state:
            return
        if state.get("best_step") is not None:
            self.best_step, self.best_loss = int(state["best_step"]), float(state["best_eval_loss"])
        self.last = tuple(state["last"]) if state.get("last") else None  # type: ignore[assignment]
        if self.params.keep_best and self.best_step is not None:
            if best is None:
                raise TrainingError("the checkpoint has no best-step weights (keep_best); delete it to start over")
            self.best = best

    def finish(self, context: StageContext, named: list[tuple[str, torch.nn.Parameter]], last_step: int) -> None:
        """With ``keep_best``, load the best step's trainable tensors; note the outcome."""
        saved = last_step
        if self.params.keep_best and self.best is not None and self.best_step != last_step:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(self.best[name].to(device=p.device, dtype=p.dtype))
            saved = int(self.best_step or last_step)
        note: dict[str, Any] = {"eval_loss": self.last[1] if self.last else None, "step": last_step,
                                "best_step": self.best_step, "best_eval_loss": self.best_loss,
                                "every": self.interval, **self.info}
        if self.params.keep_best:
            note["saved_step"] = saved
            note["saved_model"] = (f"the saved model is from step {saved} (lowest eval_loss), not the last "
                                   f"step {last_step}" if saved != last_step else
                                   f"the saved model is from step {saved}, the last step (lowest eval_loss)")
        context.note("eval", note)
