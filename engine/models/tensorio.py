"""Streaming safetensors I/O: read one tensor at a time, write shards as tensors come.

Reading uses positional reads (``os.preadv``) at the byte offsets the header gives,
straight into a fresh tensor: no memory map, so the pages of the input files never
count towards the process's resident memory, and reads are safe from several threads. Writing does not buffer a shard: the layout of every shard (which tensor
goes where, its dtype, shape and byte offsets) is planned up front from the
headers, each shard's header is written when the shard is opened, and each tensor's
bytes are appended as soon as it is merged. Peak memory is therefore a few tensors,
never a shard and never a model.

The safetensors layout written here: an 8-byte little-endian header length, a JSON
header (``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``) padded with
spaces to a multiple of 8 bytes, then the tensors' little-endian bytes back to back.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from engine.core.errors import MergeError, ModelLoadError
from engine.models.layout import (
    INDEX_FILE,
    SINGLE_FILE,
    TORCH_TO_ST,
    TensorInfo,
    read_header,
    weight_files,
)


def read_tensor_infos(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (single file or index + shards), from headers only.

    Tensors are returned in storage order (shard by shard), the order that reads them
    sequentially.
    """
    folder = Path(folder)
    infos: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        for name, info in read_header(file).items():
            if name in infos:
                raise ModelLoadError(f"{folder}: tensor {name!r} is stored twice "
                                     f"({infos[name].file.name} and {file.name})")
            infos[name] = info
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            if name not in infos or infos[name].file.name != shard:
                raise ModelLoadError(f"{index}: tensor {name!r} is not in shard {shard}")
    return infos


class ModelReader:
    """Read-only access to one model folder's tensors, one tensor at a time.

    ``label`` (the recipe name of the model) is used in error messages.
    """

    def __init__(self, folder: Path, label: str, infos: dict[str, TensorInfo] | None = None) -> None:
        self.folder = Path(folder)
        self.label = label
        self.infos = infos if infos is not None else read_tensor_infos(self.folder)
        self._fds: dict[Path, int] = {}

    def get(self, name: str) -> torch.Tensor:
        """A CPU copy of tensor ``name`` in its stored dtype (thread-safe)."""
        info = self._info(name)
        return self._read(info, info.shape, info.start)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of tensor ``name``: one
        contiguous byte range of the file, so a huge tensor can be read in slices."""
        info = self._info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise MergeError(f"model {self.label!r} tensor {name!r} {list(info.shape)}: "
                             f"no rows {start}:{stop}")
        row_bytes = (info.end - info.start) // info.shape[0]
        return self._read(info, (stop - start, *info.shape[1:]), info.start + start * row_bytes)

    def _info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise MergeError(f"model {self.label!r} has no tensor {name!r}")
        return info

    def _read(self, info: TensorInfo, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        out = torch.empty(shape, dtype=info.torch_dtype)
        if out.numel():
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise MergeError(f"model {self.label!r}: {info.file} ended while reading "
                                     f"tensor {info.name!r} (file truncated?)")
                done += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- writing ---------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``2GB`` (decimal, as Hugging Face counts), ``512MiB`` or an int."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"unreadable size {size!r}; write e.g. '2GB', '500MB' or '512MiB'")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it goes and what it will look like."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a tensor
    bigger than that gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes planned tensors into safetensors shards as they are produced.

    Tensors must be written in the planned order with the planned dtype and shape;
    ``close()`` finishes the last shard and writes the index when there is more
    than one shard. ``abort()`` (called on error in a ``with`` block) deletes every
    file the writer created.
    """

    def __init__(self, out_dir: Path, tensors: Iterable[PlannedTensor], *,
                 max_shard_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.files = [self.out_dir / n for n in shard_file_names(len(self.shards))]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._rows = 0  # rows of the current tensor written by write_rows
        self._shard = -1
        self._fh: Any = None
        self._created: list[Path] = []
        self._written: list[Path] | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)

    def _open_shard(self, i: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for t in self.shards[i]:
            header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._created.append(self.files[i])
        self._fh = self.files[i].open("wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (moved to the CPU, cast by the caller)."""
        planned = self._expect(name, tensor)
        if tuple(tensor.shape) != planned.shape or self._rows:
            raise RuntimeError(f"expected tensor {planned.name!r} {list(planned.shape)}, got "
                               f"{list(tensor.shape)}")
        self._append(tensor)
        self._pos += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (first dimension) of the next planned tensor; it counts
        as written once all its rows are."""
        planned = self._expect(name, rows)
        if (not planned.shape or tuple(rows.shape[1:]) != planned.shape[1:]
                or self._rows + rows.shape[0] > planned.shape[0]):
            raise RuntimeError(f"rows {list(rows.shape)} do not continue tensor {name!r} "
                               f"{list(planned.shape)} at row {self._rows}")
        self._append(rows)
        self._rows += rows.shape[0]
        if self._rows == planned.shape[0]:
            self._rows = 0
            self._pos += 1

    def _expect(self, name: str, tensor: torch.Tensor) -> PlannedTensor:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {name!r} was not planned (all planned tensors written)")
        shard, planned = self._queue[self._pos]
        if name != planned.name or tensor.dtype != planned.dtype:
            raise RuntimeError(f"expected tensor {planned.name!r} {planned.dtype}, got {name!r} "
                               f"{tensor.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        return planned

    def _append(self, tensor: torch.Tensor) -> None:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))

    def close(self) -> list[Path]:
        """Finish writing; return the files written (shards, then the index if any)."""
        if self._written is not None:
            return self._written
        if self._pos != len(self._queue):
            missing = [t.name for _, t in self._queue[self._pos:self._pos + 3]]
            raise RuntimeError(f"{len(self._queue) - self._pos} planned tensors were not written, "
                               f"e.g. {missing}")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        written = list(self.files)
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: f.name for f, shard in zip(self.files, self.shards)
                               for t in shard},
            }
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            self._created.append(self.out_dir / INDEX_FILE)
            written.append(self.out_dir / INDEX_FILE)
        self._written = written
        return written

    def abort(self) -> None:
        """Close and delete everything written so far."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for f in self._created:
            f.unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
