"""Corpora beyond one text file: parquet files and folders of shards.

A data spec's ``path`` may name a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder
whose shards (files with one of those extensions, or those matching the spec's
``glob``) are read in sorted name order as one corpus. Parquet is read through the
``datasets`` library (its streaming parquet reader, one shard at a time, only the text
column), so a corpus larger than memory works; ``engine validate`` reads parquet
schemas only (:func:`check_parquet`), never rows.

``.txt`` and ``.jsonl`` keep the engine's own line reader (:mod:`engine.data`): it
streams too, reports a bad byte or a bad JSON line with its file and line number, and
counts records (non-empty lines) the way ``records`` ranges need; the ``datasets``
text and json readers do neither and return the same text more slowly.

A data spec's ``hf_dataset`` names a dataset already in the local Hugging Face hub cache
(:func:`resolve_hub_dataset`): the files of its ``split`` are read as a folder's shards;
nothing is downloaded.

A shard that cannot be read (a damaged parquet file, a non-UTF-8 or malformed line) is
an error naming it; with ``skip_broken_shards`` the other shards are still read and the
skipped one is named in a warning on stderr and in the stage's notes (the token cache,
:mod:`engine.data.token_cache`, drops the whole shard, including records read before the
damage).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.files import (
    PARQUET_BATCH,
    check_file,
    detect_format,
    file_texts,
    iter_parquet_batches,
    source_bounds,
)

#: the shard types a corpus folder may hold
SHARD_SUFFIXES = (".txt", ".jsonl", ".parquet")

#: (shard, reason) pairs already said on stderr by this process
_warned: set[tuple[str, str]] = set()


def list_shards(folder: Path, pattern: str | None = None) -> list[Path]:
    """The shard files of ``folder`` in sorted name order: those matching ``pattern``
    (a glob on names relative to the folder, e.g. ``"train-*.parquet"`` or
    ``"**/*.txt"``), else every file with a :data:`SHARD_SUFFIXES` extension directly
    inside it. A folder with no shards, or with shards of two kinds, is a DataError."""
    folder = Path(folder)
    if pattern:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)
    files = [p for p in files if not p.name.startswith(".")]
    if not files:
        wanted = f"matching {pattern!r}" if pattern else "with extension " + ", ".join(SHARD_SUFFIXES)
        raise DataError(f"data folder {folder} holds no shard files {wanted}")
    bad = [p for p in files if p.suffix not in SHARD_SUFFIXES]
    if bad:
        raise DataError(f"{bad[0]}: unsupported shard type {bad[0].suffix!r} in data folder {folder} "
                        f"(shards are {', '.join(SHARD_SUFFIXES)})")
    kinds = sorted({p.suffix for p in files})
    if len(kinds) > 1:
        raise DataError(f"data folder {folder} mixes shard types {kinds}; keep one type per folder "
                        "(or select one with 'glob', e.g. '*.parquet')")
    return files


def resolve_folder(spec: Any, folder: Path) -> DataSource:
    """A data spec whose ``path`` is a folder, as a :class:`DataSource` with its shards
    listed and checked (as :func:`engine.data.check_file` checks a file). A broken
    shard fails here, or with ``skip_broken_shards`` is warned about (and skipped when
    read)."""
    return checked_source(spec, folder, list_shards(folder, getattr(spec, "glob", None)))


def checked_source(spec: Any, folder: Path, shards: list[Path]) -> DataSource:
    """A text :class:`DataSource` over ``shards`` of ``folder``, each checked."""
    if getattr(spec, "records", None) is not None:
        raise DataError(f"{folder}: 'records' selects records of one file and is not supported for a "
                        "folder of shards; choose shards with 'glob' (e.g. 'part-000[0-4]*') or give "
                        "the files as separate data entries")
    good = []
    for shard in shards:  # a skipped shard stays listed: reading skips it again and notes it
        try:
            check_file(shard, spec.text_field, scan_jsonl=not good)  # parse one jsonl shard whole
        except DataError as exc:
            if not spec.skip_broken_shards:
                raise
            warn_skipped(shard, shard_reason(shard, exc))
            continue
        good.append(shard)
    if not good:
        raise DataError(f"data folder {folder}: every shard is broken (see the warnings above)")
    fmt = spec.format
    if fmt == "auto":
        fmt = detect_format(good[0], spec.text_field)
    if fmt != "text":
        raise DataError(f"data folder {folder}: a folder of shards holds text (format 'text'), not "
                        f"{fmt!r}; give {fmt} data as one .jsonl file")
    return DataSource(path=folder, format="text", language=spec.language, weight=spec.weight,
                      text_field=spec.text_field, shards=tuple(shards),
                      skip_broken_shards=spec.skip_broken_shards)


def resolve_hub_dataset(spec: Any) -> DataSource:
    """A data spec's ``hf_dataset`` (and ``hf_config``, ``split``) as the shards of that
    dataset's snapshot in the local Hugging Face hub cache. Nothing is downloaded: a
    dataset not in the cache is a DataError saying how to fetch it beforehand. The
    split's files are found as ``datasets`` finds them (``data/train-00000-of-00002.parquet``,
    ``train/*.jsonl``, ...)."""
    name = spec.hf_dataset
    try:
        from datasets.data_files import get_data_patterns, resolve_pattern
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DataError(f"hf_dataset {name!r}: needs the 'datasets' package "
                        "(pip install 'lingoforge[data]')") from None
    try:
        folder = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError), a bad name, ...
        from huggingface_hub.constants import HF_HUB_CACHE

        raise DataError(f"hf_dataset {name!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}): "
                        f"{type(exc).__name__}. Nothing is downloaded while a recipe runs; fetch it "
                        f"first, e.g. `hf download --repo-type dataset {name}`") from None
    base = folder / spec.hf_config if spec.hf_config else folder
    if not base.is_dir():
        raise DataError(f"hf_dataset {name!r}: no config folder {spec.hf_config!r} in {folder}")
    try:
        patterns = get_data_patterns(str(base))
    except Exception as exc:  # datasets' EmptyDatasetError and kin
        raise DataError(f"hf_dataset {name!r}: no data files found in {base} ({exc})") from None
    if spec.split not in patterns:
        raise DataError(f"hf_dataset {name!r}: no split {spec.split!r}; it has {sorted(patterns)}")
    files = sorted({Path(f) for pat in patterns[spec.split] for f in resolve_pattern(pat, str(base))})
    shards = [f for f in files if f.suffix in SHARD_SUFFIXES]
    if not shards:
        raise DataError(f"hf_dataset {name!r}: split {spec.split!r} has no .parquet, .jsonl or .txt "
                        f"files ({[f.name for f in files][:5]})")
    if len({f.suffix for f in shards}) > 1:
        raise DataError(f"hf_dataset {name!r}: split {spec.split!r} mixes file types")
    return checked_source(spec, base, shards)


# --- broken shards -----------------------------------------------------------------------


def warn_skipped(shard: Path, reason: str) -> None:
    """Say on stderr, once per process, that a broken shard is skipped."""
    key = (str(shard), reason)
    if key in _warned:
        return
    _warned.add(key)
    print(f"warning: skipping broken shard {shard}: {reason}", file=sys.stderr, flush=True)


def source_files(source: DataSource) -> list[Path]:
    """The files a data source reads, in order: its shards, or its one file."""
    return list(source.shards) if source.shards else [source.path]


def file_batches(source: DataSource, file: Path, size: int = PARQUET_BATCH) -> Iterator[list[str]]:
    """Batches of the documents of one file of ``source`` (``records`` applies to a
    single-file source only; :func:`engine.data.resolve_data` refuses it for folders)."""
    records = None if source.shards else source.records
    if file.suffix == ".parquet":
        yield from iter_parquet_batches(file, source.text_field, source_bounds(file, records))
        return
    one = DataSource(path=file, format="text", text_field=source.text_field, records=records)
    it = file_texts(one)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def text_batches(source: DataSource, skipped: list[dict[str, str]] | None = None) -> Iterator[list[str]]:
    """Batches of every document of ``source`` in order, shard by shard; a broken shard
    is an error naming it, or skipped (warned, recorded in ``skipped``) when the source
    allows it. Records of a shard read before its damage are kept here (the token
    cache drops them)."""
    for shard in source_files(source):
        try:
            yield from file_batches(source, shard)
        except DataError as exc:
            if not source.skip_broken_shards or not source.shards:
                raise
            reason = shard_reason(shard, exc)
            warn_skipped(shard, reason)
            if skipped is not None:
                skipped.append({"shard": str(shard), "reason": reason})


def shard_reason(shard: Path, exc: DataError) -> str:
    """The message of ``exc`` without its leading file name."""
    text = str(exc)
    return text[len(str(shard)):].lstrip(": ") if text.startswith(str(shard)) else text
