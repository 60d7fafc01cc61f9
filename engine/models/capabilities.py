"""What a loaded model can do, found by trying it, never by reading argument names.

Evaluation has two fast paths that depend on the model class:

* **KV-cache reuse** (shared-prefix scoring, cached generation): a forward returns a
  key/value cache and a later forward continues from it. transformers has renamed the
  keyword that takes the cache back (``past_key_values`` up to 5.23, ``cache`` from
  5.24, with the old name kept as a deprecated alias for a while), and the output
  attribute with it; checking for one keyword name silently switched the fast path off
  when the name moved.
* **``logits_to_keep``**: only the positions that are scored are projected onto the
  vocabulary.

:func:`probe` runs a four-token forward, continues the last token from the cache under
each keyword the model might take, and keeps the first one whose logits match the
uncached forward; ``logits_to_keep`` is kept only when it returns one position that
equals the full forward's last. The probe costs two tiny forwards per model object and
its result is remembered for that object. Whatever the probe could not confirm is
listed in :attr:`Capabilities.missing`, which the evaluators print once and record in
report.json, so a slow path is never taken silently.

Training has one more: **document packing** (:func:`packing_probe`). Several documents
packed in one row with ``position_ids`` restarting at each document and no 2D
``attention_mask`` must not see each other. transformers builds a block-causal mask from
such ``position_ids`` for its sdpa, eager and flex masks (``find_packed_sequence_indices``
in ``masking_utils``, only when ``attention_mask`` and the KV cache are None); its
flash-attention path reads them only for a single flattened row (batch size 1). Other
model classes or registered attention functions may ignore them. The probe packs two
tiny documents and compares each one's logits with its logits alone, first in two rows,
then flattened into one row.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CACHE_KEYWORDS", "Capabilities", "packing_probe", "probe"]

#: keywords a causal LM's ``forward`` has taken its KV cache under, newest first
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")

_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, Capabilities] = weakref.WeakKeyDictionary()
_PACKING: weakref.WeakKeyDictionary[torch.nn.Module, str | None] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Capabilities:
    """The fast paths a model supports, as found by :func:`probe`.

    ``cache_argument`` is the ``forward`` keyword that takes a KV cache back and
    ``cache_output`` the output attribute that holds it (both None when reuse is not
    possible); ``logits_to_keep`` whether the model projects only the asked positions.
    """

    cache_argument: str | None
    cache_output: str | None
    logits_to_keep: bool

    @property
    def kv_cache(self) -> bool:
        return self.cache_argument is not None

    def cache_of(self, output: Any) -> Any:
        """The KV cache a forward returned (requires :attr:`kv_cache`)."""
        if self.cache_output is None:
            raise RuntimeError("this model returns no reusable KV cache")
        return getattr(output, self.cache_output)

    @property
    def missing(self) -> tuple[str, ...]:
        """Human-readable names of the fast paths this model lacks."""
        out = []
        if not self.kv_cache:
            out.append("kv-cache reuse (shared-prefix scoring and cached generation re-run "
                       "whole sequences)")
        if not self.logits_to_keep:
            out.append("logits_to_keep (every position is projected onto the vocabulary)")
        return tuple(out)

    def as_dict(self) -> dict[str, Any]:
        return {"kv_cache": self.cache_argument, "logits_to_keep": self.logits_to_keep}


def _takes(model: torch.nn.Module, name: str) -> bool | None:
    """True/False when the signature says, None when it takes ``**kwargs`` (try it)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return None
    if name in params:
        return True
    return None if any(p.kind is p.VAR_KEYWORD for p in params.values()) else False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    scale = float(b.abs().max()) + 1.0
    tol = 1e-3 if b.dtype == torch.float32 and a.dtype == torch.float32 else 5e-2
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol * scale


def _probe_input(model: torch.nn.Module) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 4)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.tensor([[3, 5, 7, 11]], dtype=torch.long) % vocab).to(device)


def _find_cache(model: torch.nn.Module, ids: torch.Tensor, full: torch.Tensor) -> tuple[str, str] | None:
    for name in CACHE_KEYWORDS:
        if _takes(model, name) is False:
            continue
        try:
            prefix = model(input_ids=ids[:, :-1], use_cache=True)
            attr = next((a for a in CACHE_KEYWORDS if getattr(prefix, a, None) is not None), None)
            if attr is None:
                return None  # the model returns no cache at all
            step = model(input_ids=ids[:, -1:], use_cache=True, **{name: getattr(prefix, attr)})
        except (TypeError, ValueError, RuntimeError, AttributeError):
            continue
        if _close(step.logits[0, -1], full[0, -1]):
            return name, attr
    return None


def _finds_kept(model: torch.nn.Module, ids: torch.Tensor, full: torch.Tensor) -> bool:
    if _takes(model, "logits_to_keep") is False:
        return False
    try:
        kept = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    except (TypeError, ValueError, RuntimeError):
        return False
    return kept.shape[1] == 1 and _close(kept[0, -1], full[0, -1])


def _remembered(table: weakref.WeakKeyDictionary, model: torch.nn.Module,
                find: Callable[[torch.nn.Module], Any]) -> Any:
    """``find(model)`` run once per model, in eval mode without autograd (the model's
    training mode is restored), its answer kept in ``table``."""
    try:
        return table[model]
    except (KeyError, TypeError):
        pass
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            found = find(model)
    finally:
        model.train(was_training)
    try:
        table[model] = found
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return found


def _find_capabilities(model: torch.nn.Module) -> Capabilities:
    ids = _probe_input(model)
    full = model(input_ids=ids, use_cache=False).logits
    found = _find_cache(model, ids, full)
    return Capabilities(cache_argument=found[0] if found else None,
                        cache_output=found[1] if found else None,
                        logits_to_keep=_finds_kept(model, ids, full))


def probe(model: torch.nn.Module) -> Capabilities:
    """The fast paths ``model`` supports, found by running it (remembered per model)."""
    return _remembered(_PROBED, model, _find_capabilities)


def _packing_rows(model: torch.nn.Module, docs: list[torch.Tensor], rows: list[list[int]]) -> bool:
    """Whether each document in ``rows`` (document indices packed left to right) gives
    the logits it gives alone, with reset ``position_ids`` and no attention mask."""
    alone = [model(input_ids=d[None], use_cache=False).logits[0] for d in docs]
    ids = torch.stack([torch.cat([docs[i] for i in row]) for row in rows])
    pos = torch.stack([torch.cat([torch.arange(len(docs[i]), device=ids.device) for i in row])
                       for row in rows])
    try:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    except (TypeError, ValueError, RuntimeError):
        return False
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            if not _close(logits[r, start:start + len(docs[i])], alone[i]):
                return False
            start += len(docs[i])
    return True


def packing_probe(model: torch.nn.Module) -> str | None:
    """How ``model`` keeps packed documents apart, found by running it (remembered per model).

    ``"rows"``: documents packed in the rows of a batch, with ``position_ids`` restarting
    at each document and no ``attention_mask``, each give the logits they give alone
    (transformers' sdpa, eager and flex attention). ``"flat"``: that holds only when the
    batch is flattened into a single row (flash-attention). None: packed documents
    attend to each other; packing must fall back to masks or cross-document streams.
    """
    return _remembered(_PACKING, model, _find_packing)


def _find_packing(model: torch.nn.Module) -> str | None:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 4)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    docs = [(torch.tensor(d, dtype=torch.long) % vocab).to(device)
            for d in ([3, 5, 7, 11, 13], [17, 19, 23])]
    return ("rows" if _packing_rows(model, docs, [[0, 1], [1, 0]])
            else "flat" if _packing_rows(model, docs, [[0, 1, 1, 0]]) else None)
