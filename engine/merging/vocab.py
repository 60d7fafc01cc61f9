"""Vocabulary-aware merging: inputs whose embedding matrices have different row counts.

Language-adapted models often extend the base tokenizer with new tokens (and grow
``embed_tokens`` / ``lm_head`` to match). Truncating to the smallest vocabulary would
silently throw the new language away, so lingoforge merges such inputs by one rule:

* tokenizers must **extend one another**: every input's token -> id map is contained
  in the largest one's (same token, same id). Anything else -- a token with two ids, or
  two tokens on one id -- is an error naming both models and the token;
* a *vocabulary tensor* is one whose first dimension is the model's ``vocab_size``
  (config.json) while the other dimensions agree across inputs;
* rows ``[0, V_common)`` (``V_common``: the smallest vocabulary of all inputs, base
  included) are merged by the method like any other tensor;
* each row beyond ``V_common`` is the **plain mean of the merged models that have it**
  (taken as is from the only model that has it); a row only the base has is copied
  from the base. Task vectors are not formed for those rows: there is no common base
  row to subtract;
* the output's ``vocab_size`` is the largest input's, and its tokenizer files are
  that input's (the union, since the tokenizers extend one another).

Models whose tokenizers do not extend one another (a model given another tokenizer, or
models from different families) are not merged row by row: the error names the two models
and the command that gives one the other's tokenizer first (``engine transplant-tokenizer
MODEL --tokenizer OTHER``, :mod:`engine.models.tokenizer.transplant`: shared tokens keep
their rows, the others are initialised), after which they merge as usual; a merge's
``params.tokenizer`` does that transplant itself (:mod:`engine.run.transplant`;
docs/extend-tokenizer.md, "Merging across tokenizers").

Where rows came from is recorded in the stage notes (report.json) and lingoforge.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import MergeError

__all__ = ["TokenIds", "VocabPlan", "check_tokenizers", "plan_vocab", "tail_rows", "token_ids",
           "transplant_hint"]


class TokenIds(dict):
    """token -> id of one model's tokenizer, and the folder it was read from."""

    folder: Path | None = None


def token_ids(folder: Path) -> TokenIds | None:
    """token -> id from ``tokenizer.json`` (model vocab and added tokens); None if absent."""
    f = Path(folder) / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{f}: invalid JSON ({exc})") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids: dict[str, int] = (dict(vocab) if isinstance(vocab, dict)
                           else {entry[0]: i for i, entry in enumerate(vocab)})  # Unigram: list
    for tok in data.get("added_tokens") or []:
        ids[tok["content"]] = int(tok["id"])
    out = TokenIds(ids)
    out.folder = Path(folder)
    return out


def transplant_hint(name: str, ids: dict[str, int], other: str, other_ids: dict[str, int]) -> str:
    """What to run so that model ``name`` takes model ``other``'s tokenizer."""
    src = getattr(ids, "folder", None) or f"<{name}'s folder>"
    dst = getattr(other_ids, "folder", None) or f"<{other}'s folder>"
    out = f"<{name}-on-{other}>"
    return (f"give model {name!r} the tokenizer of model {other!r} first: engine transplant-tokenizer "
            f"{src} --tokenizer {dst} --output {out} (shared tokens keep their rows; add --init omp "
            "or focus to choose how the others start), then merge that folder instead; or let the "
            f"merge do it: params tokenizer: {{model: {other}, init: omp}} "
            "(docs/extend-tokenizer.md, 'Merging across tokenizers')")


def check_tokenizers(tokenizers: Sequence[tuple[str, dict[str, int] | None]]) -> str | None:
    """Check that the tokenizers extend one another; return the name of the largest
    (whose files the output takes), or None when no input has a tokenizer.json."""
    known = [(n, ids) for n, ids in tokenizers if ids is not None]
    if not known:
        return None
    big_name, big = max(known, key=lambda item: len(item[1]))
    by_id = {i: t for t, i in big.items()}
    for name, ids in known:
        if ids is big:
            continue
        for tok, i in ids.items():
            theirs = big.get(tok)
            if theirs == i:
                continue
            hint = transplant_hint(name, ids, big_name, big)
            if theirs is not None:
                raise MergeError(f"tokenizers conflict: token {tok!r} has id {i} in model {name!r} "
                                 f"but id {theirs} in model {big_name!r}; models whose tokenizers "
                                 f"do not extend one another cannot be merged: {hint}")
            other = by_id.get(i)
            raise MergeError(f"tokenizers conflict: id {i} is token {tok!r} in model {name!r} "
                             + (f"but {other!r} in model {big_name!r}" if other is not None
                                else f"and model {big_name!r} lacks that token")
                             + "; models whose tokenizers do not extend one another cannot be merged: "
                             + hint)
    return big_name


@dataclass
class VocabPlan:
    """How rows of vocabulary tensors are merged when vocab sizes differ."""

    sizes: dict[str, int]          # input name -> vocab_size (base included)
    base: str | None               # the base's name, if any
    out_size: int
    common: int
    tensors: set[str]              # names of the vocabulary tensors
    tokenizer_from: str | None

    def segments(self, models: Sequence[str]) -> list[tuple[int, int, list[str]]]:
        """Row ranges beyond ``common`` and the merged models they are averaged from
        (an empty list means: copied from the base)."""
        cuts = sorted({s for s in self.sizes.values() if s > self.common})
        out, start = [], self.common
        for end in cuts:
            have = [m for m in models if self.sizes[m] >= end]
            out.append((start, end, have))
            start = end
        return out

    def report(self, models: Sequence[str]) -> dict[str, Any]:
        return {
            "vocab_size": self.out_size, "merged_rows": [0, self.common],
            "extra_rows": [{"rows": [a, b], "from": have or [self.base],
                            "rule": "mean of the models that have them" if have else "base"}
                           for a, b, have in self.segments(models)],
            "tensors": sorted(self.tensors), "tokenizer_from": self.tokenizer_from,
        }


def plan_vocab(sizes: dict[str, int], base: str | None, tensors: set[str],
               tokenizer_from: str | None) -> VocabPlan | None:
    """A plan when the inputs' vocab sizes differ, else None (nothing special to do)."""
    if len(set(sizes.values())) <= 1:
        return None
    return VocabPlan(sizes, base, max(sizes.values()), min(sizes.values()), tensors, tokenizer_from)


def tail_rows(plan: VocabPlan, models: Sequence[str], raws: dict[str, torch.Tensor],
              dtype: torch.dtype) -> list[tuple[int, int, torch.Tensor]]:
    """The rows beyond ``plan.common`` of one vocabulary tensor, by the documented rule.

    ``raws`` maps input name (base included) to that input's full tensor.
    """
    out = []
    for a, b, have in plan.segments(models):
        if have:
            rows = torch.stack([raws[m][a:b].to(dtype) for m in have]).mean(dim=0)
        else:
            rows = raws[plan.base][a:b].to(dtype)  # type: ignore[index]
        out.append((a, b, rows))
    return out
