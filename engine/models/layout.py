"""Where a model folder keeps its weights, what a safetensors header says, and how an
adapter folder is recognised.

The names of the files a Hugging Face model folder holds (``model.safetensors``, or an
index and its shards) and of a PEFT adapter folder's files, with the questions every
reader of a folder asks first: which safetensors files hold the weights
(:func:`weight_files`), which tensors a file holds (:func:`read_header`, the header
alone), and is this a LoRA adapter folder rather than a model (:func:`is_adapter_folder`). They sit below every other module of the models layer so that
the loaders (:mod:`engine.models.modelio`), the streaming reader
(:mod:`engine.models.tensorio`) and the adapter reader (:mod:`engine.models.adapters`) all
share one answer without importing each other.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.errors import ModelLoadError

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "INDEX_FILE", "SINGLE_FILE", "ST_DTYPES", "TORCH_TO_ST",
           "TensorInfo", "is_adapter_folder", "read_header", "weight_files"]

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


#: safetensors dtype codes <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (no data is read)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    #: absolute byte offsets of the tensor's data in ``file``
    start: int = 0
    end: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return ST_DTYPES[self.dtype]
        except KeyError:
            raise ModelLoadError(f"{self.file}: tensor {self.name!r} has unsupported dtype "
                                 f"{self.dtype}") from None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, read from its header only."""
    file = Path(file)
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
        size = file.stat().st_size
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"{file}: not a readable safetensors file ({exc})") from None
    data = 8 + length
    infos = {
        name: TensorInfo(name, entry["dtype"], tuple(entry["shape"]), file,
                         data + entry["data_offsets"][0], data + entry["data_offsets"][1])
        for name, entry in header.items() if name != "__metadata__"
    }
    needed = max((i.end for i in infos.values()), default=data)
    if size < needed:
        raise ModelLoadError(f"{file}: truncated: the header promises {needed} bytes, the file "
                             f"has {size} (an interrupted download or copy?)")
    return infos
