"""What the engine refuses to load, checked before any weight or code is touched.

Two rules live here so that every path that opens a model folder (``engine validate``,
:func:`engine.models.modelio.load_model`, the merge pre-flight through
:func:`engine.models.modelio.check_model_folder`) applies the same ones:

* a safetensors file must be *well formed*: its header parses, every tensor's byte range
  matches its dtype and shape, and the file is exactly as long as the header says. A
  truncated download or a hand-edited header is named here, with the file and tensor,
  instead of surfacing as a deserializer error halfway through a stage;
* a model folder whose ``config.json`` or ``tokenizer_config.json`` names custom code
  (``auto_map``) is refused unless the recipe turns ``runtime.trust_remote_code`` on.
  Without it transformers would quietly ignore the custom code and build its own class,
  which is not the model the folder's author shipped; with it the code runs. Either
  silently is wrong, so the user has to choose.

Only headers and small JSON files are read: the checks are cheap enough to run on every
load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from engine.core.errors import ModelLoadError, WeightFileError

#: a safetensors header longer than this is not a real header (the format's own cap)
MAX_HEADER_BYTES = 100_000_000

#: bytes per element of every safetensors dtype code
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

#: files of a model folder that may name custom code in an ``auto_map`` entry
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json")


def check_safetensors_file(file: Path) -> None:
    """Raise :class:`WeightFileError` unless ``file`` is a complete, consistent safetensors file.

    Checks the header (length, JSON object, one entry per tensor with a known dtype, a
    shape of non-negative integers, and ``data_offsets`` whose span is exactly
    ``numel * itemsize``) and that the file holds every byte the header promises and no
    more. Tensor data is never read.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{file}: not a safetensors file ({size} bytes, shorter "
                                     "than the 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise WeightFileError(f"{file}: truncated or not safetensors: the header length "
                                     f"field says {length} bytes, the file has {size}")
            raw = fh.read(length)
    except OSError as exc:
        raise WeightFileError(f"{file}: unreadable ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{file}: safetensors header is not a JSON object")
    data_start = 8 + length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _check_entry(file, name, entry))
    if data_start + end > size:
        raise WeightFileError(f"{file}: truncated: the header promises {data_start + end} bytes, "
                             f"the file has {size} (an interrupted download or copy?)")
    if data_start + end < size:
        raise WeightFileError(f"{file}: {size - data_start - end} bytes beyond the last tensor "
                             "the header describes (a damaged or hand-edited file?)")


def _check_entry(file: Path, name: str, entry: Any) -> int:
    """Check one header entry; return the end offset of its data."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise WeightFileError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise WeightFileError(f"{where}: unknown dtype {dtype!r}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WeightFileError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise WeightFileError(f"{where}: data_offsets {offsets!r} are not [start, end] with "
                             "0 <= start <= end")
    numel = 1
    for d in shape:
        numel *= d
    need = numel * DTYPE_BYTES[dtype]
    have = offsets[1] - offsets[0]
    if need != have:
        raise WeightFileError(f"{where}: header claims shape {shape} {dtype} ({need} bytes) but "
                             f"its data_offsets span {have} bytes")
    return offsets[1]


def remote_code_entries(folder: Path) -> dict[str, Any]:
    """``{file name: auto_map}`` for every file of ``folder`` that names custom code."""
    found: dict[str, Any] = {}
    for name in CODE_NAMING_FILES:
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # unreadable files are reported by whoever reads them for real
        if isinstance(data, dict) and data.get("auto_map"):
            found[name] = data["auto_map"]
    return found


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder that ships model code unless ``trust_remote_code`` is on."""
    if trust_remote_code:
        return
    entries = remote_code_entries(folder)
    if not entries:
        return
    name, auto_map = next(iter(entries.items()))
    shown = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) \
        else repr(auto_map)
    raise ModelLoadError(f"{Path(folder) / name}: auto_map names custom model code ({shown}); "
                         "lingoforge runs no code from model folders unless the recipe sets "
                         "runtime.trust_remote_code: true")
