"""Extend a model's BPE tokenizer with tokens for a new language, and its embeddings to match.

:func:`extend_tokenizer` trains a BPE of ``new_tokens`` merges on the new language's text
with the model's own normalizer and pre-tokenizer (the ``tokenizers`` library), appends
the merges it learned (and the tokens they make) after the old ones, so every text the
old tokenizer handled still gets the same ids, and writes a new model folder: the
embedding (and an untied output head) grows by one row per new token, each initialised
to the mean of the rows of the old tokens the new one replaces (what the old tokenizer
split it into). ``engine extend-tokenizer`` is this function; docs/extend-tokenizer.md
shows the whole route (measure, extend, train with ``train_embeddings: true``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core import outputs
from engine.core.errors import ModelLoadError
from engine.models import modelio

__all__ = ["Extended", "extend_tokenizer", "extended_tokenizer_json"]


@dataclass(frozen=True)
class Extended:
    folder: Path
    old_size: int
    new_size: int
    added: list[str]


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
                     min_frequency: int = 2, overwrite: bool = False) -> Extended:
    """Write ``output_dir``: ``model_dir``'s model with its tokenizer extended by up to
    ``new_tokens`` tokens learned from ``texts``, and its embeddings resized to match.

    The folder is written to a temporary folder beside it and published only when complete
    (:func:`engine.core.outputs.publish`): ``output_dir`` must lie apart from ``model_dir``, and an
    existing one is replaced only with ``overwrite`` and only when lingoforge wrote it."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, output_dir = Path(model_dir), Path(output_dir).absolute()
    outputs.check_disjoint(output_dir, [("model", model_dir)], flag="--output")
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
    old = Tokenizer.from_str(json.dumps(spec))
    new = Tokenizer.from_str(json.dumps(new_spec))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    head_w = None if tied else head.weight.detach().clone()
    size = max(emb.shape[0], new.get_vocab_size(with_added_tokens=True))
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for token in added:
            tid = new.token_to_id(token)
            # the old tokenizer's split of the same piece (BPE on the raw token string)
            parts = [t.id for t in old.model.tokenize(token)] or [0]
            model.get_input_embeddings().weight[tid] = emb[parts].mean(0)
            if head_w is not None:
                model.get_output_embeddings().weight[tid] = head_w[parts].mean(0)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_dir(f".{output_dir.name}.tmp-", output_dir.parent)  # unique per process
    try:
        for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "tokenizer.json").write_text(json.dumps(new_spec, ensure_ascii=False), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(str(tmp))
        meta = {"kind": "extended-tokenizer", "source_model": str(model_dir.resolve()),
                "added_tokens": len(added), "old_vocab_size": int(emb.shape[0]), "vocab_size": size}
        modelio.save_model(model, tokenizer, tmp, meta=meta)
        outputs.settle_modes(tmp)
        outputs.mark_output(tmp, "extended-tokenizer")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outputs.publish(tmp, output_dir, flag="--output", overwrite=overwrite)
    return Extended(output_dir, int(emb.shape[0]), size, added)
