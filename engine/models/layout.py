"""Where a model folder keeps its weights, and how an adapter folder is recognised.

The names of the files a Hugging Face model folder holds (``model.safetensors``, or an
index and its shards) and of a PEFT adapter folder's files, with the two questions every
reader of a folder asks first: which safetensors files hold the weights
(:func:`weight_files`), and is this a LoRA adapter folder rather than a model
(:func:`is_adapter_folder`). They sit below every other module of the models layer so that
the loaders (:mod:`engine.models.modelio`), the streaming reader
(:mod:`engine.models.tensorio`) and the adapter reader (:mod:`engine.models.adapters`) all
share one answer without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.core.errors import ModelLoadError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "INDEX_FILE", "SINGLE_FILE", "is_adapter_folder",
           "weight_files"]

#: a model folder's weights: one file, or an index naming its shards
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: a PEFT adapter folder's files, named as peft's ``save_pretrained`` writes them
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path: Path | str) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no ``config.json`` of its own."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (from the index when sharded)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index}: invalid safetensors index ({exc})") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard(s) named in the index are missing: {missing}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    if is_adapter_folder(path):
        raise ModelLoadError(f"{path}: a LoRA adapter folder ({ADAPTER_CONFIG}), not full model weights; "
                             "load it with load_model (applies it to its base) or train with "
                             "lora.save: merged")
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"{path}: only pickle weights (.bin/.pt) found; lingoforge loads safetensors only. "
            "Convert the model to safetensors with a tool you trust."
        )
    raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")
