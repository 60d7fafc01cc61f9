"""Write a model folder whose vocabulary changed: the embedding and head replaced, every
other tensor copied as it was, shard by shard.

Only the two vocabulary tensors are ever held whole (as float32, old and new); every other
tensor passes through one safetensors file at a time, in its own dtype, so peak memory is
the vocabulary tensors plus the largest shard whatever the model's size (docs/scaling.md,
"Tokenizer transfer"). ``config.json`` and ``generation_config.json`` get the new
``vocab_size`` and the special token ids of the new tokenizer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import ModelLoadError
from engine.models.layout import INDEX_FILE, TensorInfo, read_header, weight_files

__all__ = ["VocabTensors", "read_vocab_tensors", "write_model"]

#: tokenizer files carried from the tokenizer's folder (tokenizer.json is written anew)
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class VocabTensors:
    """A model's input embedding and head as stored (names, dtypes) and read (float32)."""

    input_name: str
    output_name: str | None  # None: the head is tied to the input embedding
    input: torch.Tensor
    output: torch.Tensor | None
    dtype: torch.dtype


def _tensor_names(folder: Path) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        infos.update(read_header(file))
    return infos


#: how the input embedding and the head are named across the common architectures
_INPUT_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings")
_HEAD_HINTS = ("lm_head", "embed_out", "output.weight")


def _embedding_names(folder: Path, config: dict[str, Any], infos: dict[str, TensorInfo]
                     ) -> tuple[str, str | None]:
    """The stored names of the input embedding and the untied head (None when tied).

    Read from the safetensors headers (the 2-D tensors with ``vocab_size`` rows, told apart by
    their names), so that no modelling code is imported; where that is ambiguous, from the
    model class built on the meta device."""
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    vocab = [n for n, i in infos.items() if len(i.shape) == 2 and i.shape[0] == rows]
    heads = [n for n in vocab if any(h in n for h in _HEAD_HINTS)]
    inputs = [n for n in vocab if n not in heads and any(h in n for h in _INPUT_HINTS)]
    if len(inputs) == 1 and len(heads) <= 1:
        tied = bool(config.get("tie_word_embeddings", not heads)) or not heads
        return inputs[0], None if tied else heads[0]
    return _names_from_class(folder, config)


def _names_from_class(folder: Path, config: dict[str, Any]) -> tuple[str, str | None]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder}: cannot tell its input embedding from config.json ({exc})") from None
    names = {id(m): n for n, m in model.named_modules()}
    inp = model.get_input_embeddings()
    out = model.get_output_embeddings()
    input_name = f"{names[id(inp)]}.weight"
    output_name = f"{names[id(out)]}.weight" if out is not None else None
    if output_name is not None and (config.get("tie_word_embeddings") or out.weight is inp.weight):
        output_name = None
    return input_name, output_name


def read_vocab_tensors(folder: Path) -> VocabTensors:
    """The input embedding and head of the model in ``folder`` (float32), read alone."""
    from safetensors import safe_open

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a model folder)")
    config = json.loads(config_file.read_text())
    stored = _tensor_names(folder)
    input_name, output_name = _embedding_names(folder, config, stored)
    if input_name not in stored:
        raise ModelLoadError(f"{folder}: no tensor {input_name!r} (the input embedding) in its weights")
    if output_name is not None and output_name not in stored:
        output_name = None  # saved tied: transformers ties it at load

    def read(name: str) -> torch.Tensor:
        with safe_open(str(stored[name].file), framework="pt", device="cpu") as fh:
            return fh.get_tensor(name)

    inp = read(input_name)
    out = read(output_name) if output_name is not None else None
    return VocabTensors(input_name, output_name, inp.float(), None if out is None else out.float(), inp.dtype)


def _special_ids(tokenizer_dir: Path, vocab: dict[str, int]) -> dict[str, int | None]:
    """bos/eos/pad ids from the tokenizer_config's token strings (None: it names none)."""
    conf = tokenizer_dir / "tokenizer_config.json"
    data = json.loads(conf.read_text()) if conf.is_file() else {}
    out: dict[str, int | None] = {}
    for key in _SPECIAL_KEYS:
        token = data.get(key.removesuffix("_id"))
        if isinstance(token, dict):
            token = token.get("content")
        out[key] = vocab.get(token) if isinstance(token, str) else None
    return out


def _retarget(config: dict[str, Any], specials: dict[str, int | None], old_ids: dict[int, int],
              size: int) -> dict[str, Any]:
    """``config`` with the new ``vocab_size`` and special ids: the tokenizer's, else the old
    id's token in the new vocabulary, else none."""
    out = dict(config)
    if "vocab_size" in out:
        out["vocab_size"] = size
    for key in _SPECIAL_KEYS:
        if key not in out:
            continue
        value = specials.get(key)
        if value is None and isinstance(out[key], int):
            value = old_ids.get(out[key])
        if value is None and isinstance(out[key], list):
            mapped = [old_ids.get(v) for v in out[key]]
            value = [v for v in mapped if v is not None] or None  # type: ignore[assignment]
        out[key] = value
    return out


def write_model(source: Path, tmp: Path, tensors: VocabTensors, new_input: torch.Tensor,
                new_output: torch.Tensor | None, spec: dict[str, Any], tokenizer_from: Path,
                old_ids: dict[int, int]) -> int:
    """Write into the (temporary) folder ``tmp``: ``source``'s weights with the vocabulary
    tensors replaced, its config with the new size and special ids, and the new tokenizer
    (``spec``, with the other tokenizer files of ``tokenizer_from``). ``old_ids``: old id ->
    new id of the tokens both vocabularies have (special ids with no tokenizer_config entry).
    Returns the number of parameters written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    replace = {tensors.input_name: new_input}
    if tensors.output_name is not None:
        if new_output is None:
            raise ModelLoadError(f"{source}: the head is not tied, but no head rows were made")
        replace[tensors.output_name] = new_output
    total = count = 0
    for file in weight_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            out: dict[str, torch.Tensor] = {}
            for key in fh.keys():
                t = replace[key].to(tensors.dtype).contiguous() if key in replace else fh.get_tensor(key)
                out[key] = t
                total += t.numel() * t.element_size()
                count += t.numel()
            save_file(out, str(tmp / file.name), metadata=fh.metadata() or {"format": "pt"})
        del out
    if (source / INDEX_FILE).is_file():
        index = json.loads((source / INDEX_FILE).read_text())
        index.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))

    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, tmp / name)
    conf = tmp / "tokenizer_config.json"
    if conf.is_file():  # tokenizer.json is the truth about ids; a stale id table must not override it
        data = json.loads(conf.read_text())
        if data.pop("added_tokens_decoder", None) is not None:
            conf.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    vocab = dict(spec["model"]["vocab"])
    vocab.update({t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []})
    specials = _special_ids(tmp, vocab)
    size = int(new_input.shape[0])
    config = json.loads((source / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(_retarget(config, specials, old_ids, size), indent=2))
    if (source / "generation_config.json").is_file():
        gen = json.loads((source / "generation_config.json").read_text())
        gen = _retarget(gen, specials, old_ids, size)
        gen.pop("vocab_size", None)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return count
