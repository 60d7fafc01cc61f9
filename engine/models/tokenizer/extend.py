"""Extend a model's BPE tokenizer with tokens for a new language, and its embeddings to match.

:func:`extend_tokenizer` trains a BPE of ``new_tokens`` merges on the new language's text
with the model's own normalizer and pre-tokenizer (the ``tokenizers`` library), appends
the merges it learned (and the tokens they make) after the old ones, so every text the
old tokenizer handled still gets the same ids, and writes a new model folder: the
embedding (and an untied output head) grows by one row per new token, each initialised
to the mean of the rows of the old tokens the new one replaces (what the old tokenizer
split it into), or by another init method (:mod:`engine.models.tokenizer.inits`).
``engine extend-tokenizer`` is this function; docs/extend-tokenizer.md
shows the whole route (measure, extend, train with ``train_embeddings: true``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core import outputs
from engine.core.errors import ModelLoadError
from engine.models.tokenizer.transplant import change_vocabulary

__all__ = ["Extended", "extend_tokenizer", "extended_tokenizer_json"]


@dataclass(frozen=True)
class Extended:
    folder: Path
    old_size: int
    new_size: int
    added: list[str]
    init: str = "mean"
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    params: int = 0


def extended_tokenizer_json(spec: dict[str, Any], texts: Iterable[str], new_tokens: int,
                            min_frequency: int = 2) -> tuple[dict[str, Any], list[str]]:
    """``tokenizer.json`` (parsed) with up to ``new_tokens`` BPE tokens learned from
    ``texts`` appended; returns it and the added tokens, in id order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if spec.get("model", {}).get("type") != "BPE":
        raise ModelLoadError(f"only BPE tokenizers can be extended here, not "
                             f"{spec.get('model', {}).get('type')!r} (see docs/extend-tokenizer.md)")
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    old_merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
                  for m in spec["model"]["merges"]]
    learner = Tokenizer.from_str(json.dumps({**spec, "added_tokens": [], "post_processor": None}))
    learner.model = models.BPE()
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + new_tokens, min_frequency=min_frequency,
                                  initial_alphabet=alphabet, show_progress=False)
    learner.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    next_id = 1 + max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))])
    added: list[str] = []
    merges = list(old_merges)
    known = set(old_merges)
    for raw in learned["merges"]:
        a, b = raw.split(" ", 1) if isinstance(raw, str) else raw
        for piece in (a, b):  # a character the old vocabulary lacked (not byte-level)
            if piece not in vocab:
                vocab[piece] = next_id
                next_id += 1
                added.append(piece)
        if (a, b) in known or a + b in vocab:
            continue
        merges.append((a, b))
        known.add((a, b))
        vocab[a + b] = next_id
        next_id += 1
        added.append(a + b)
        if len(added) >= new_tokens:
            break
    out = json.loads(json.dumps(spec))
    out["model"]["vocab"] = vocab
    out["model"]["merges"] = [list(m) for m in merges]
    return out, added


def extend_tokenizer(model_dir: Path, texts: Iterable[str], output_dir: Path, *, new_tokens: int = 1000,
                     min_frequency: int = 2, overwrite: bool = False, init: str = "mean",
                     init_params: Mapping[str, Any] | None = None, seed: int = 0,
                     into: bool = False, params_where: str = "--init-param") -> Extended:
    """Write ``output_dir``: ``model_dir``'s model with its tokenizer extended by up to
    ``new_tokens`` tokens learned from ``texts``, and its embeddings resized to match; the
    new rows are made by init method ``init`` (default ``mean``: the mean of the rows of the
    old tokens the new one replaces; :mod:`engine.models.tokenizer.inits`).

    The folder is written to a temporary folder beside it and published only when complete
    (:func:`engine.core.outputs.publish`): ``output_dir`` must lie apart from ``model_dir``, and an
    existing one is replaced only with ``overwrite`` and only when lingoforge wrote it.
    ``into``: write straight into the empty folder ``output_dir``, which the caller publishes
    (a stage's output)."""
    model_dir, output_dir = Path(model_dir), Path(output_dir).absolute()
    outputs.check_disjoint(output_dir, [("model", model_dir)], flag="--output")
    if not into:
        outputs.check_target(output_dir, flag="--output", overwrite=overwrite)
    source = model_dir / "tokenizer.json"
    if not source.is_file():
        raise ModelLoadError(f"{model_dir}: no tokenizer.json (a fast BPE tokenizer is needed)")
    spec = json.loads(source.read_text(encoding="utf-8"))
    texts = list(texts)
    if not texts:
        raise ModelLoadError("extend-tokenizer: the data has no text")
    new_spec, added = extended_tokenizer_json(spec, texts, new_tokens, min_frequency)
    if not added:
        raise ModelLoadError(f"{model_dir}: the text taught no token the tokenizer lacks "
                             "(it covers the language already, or there is too little text)")
    done = change_vocabulary(model_dir, output_dir, new_spec, tokenizer_from=model_dir, texts=texts,
                             init=init, init_params=init_params, seed=seed, extension=True,
                             overwrite=overwrite, kind="extended-tokenizer", into=into,
                             params_where=params_where)
    return Extended(output_dir, done.old_size, done.new_size, added, init, done.notes, done.seconds,
                    done.params)
