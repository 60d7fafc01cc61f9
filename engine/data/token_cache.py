"""Tokenize a corpus once; every later stage and run reads the token ids from disk.

An entry holds one text source tokenized by one tokenizer, documents in source order,
each already in training form (``BOS text EOS``, see :class:`DocumentPolicy`):

* ``tokens.bin``: every document's token ids back to back, ``uint16`` when the
  tokenizer's vocabulary fits, else ``uint32``, read as a numpy memmap;
* ``offsets.bin``: ``int64`` document starts (``n + 1`` values, the last one the total);
* ``meta.json``: what the entry was built from and how fast.

Entries live in ``<cache>/tokens/<key>/`` (``<cache>`` is ``$LINGOFORGE_CACHE`` or
``~/.cache/lingoforge``, :func:`engine.world.cache.cache_dir`), or in
``$LINGOFORGE_TOKEN_CACHE``; deleting that folder clears them. The key is a hash of the tokenizer (its serialised vocabulary, merges,
normalisation and special tokens, :func:`tokenizer_fingerprint`), the content (sha256)
of every file read, the text field, the record range, whether broken shards are
skipped, and the BOS/EOS policy. So an entry from another tokenizer is never read;
``meta.json`` is checked again when an entry is opened, and one that does not match
(edited, truncated, another version) is rebuilt, said once.

An entry is written into a temporary folder beside its place and renamed when
complete, under a per-key lock: two processes that need the same entry build it once,
and a killed build leaves nothing that looks finished. The corpus is streamed in
batches of documents and written as it goes, so memory does not grow with its size.

Speed: a fast (Rust) tokenizer encodes each batch with ``encode_batch_fast`` on all
cores. ``engine`` turns the Rust thread pool off for the process
(``TOKENIZERS_PARALLELISM=false``, so forked workers neither warn nor deadlock); the
build switches it on for its own duration and restores the previous value after (the
Rust side reads the variable on every call). A build's throughput, and whether an entry
was reused, go to the stage's notes (``token_cache``) and its progress bar to the
stage's display when a stage context is registered with :func:`reporting_to`.

Long module: the key, the reader and the builder share the per-process state (open
entries, counters, the key lock) and the entry layout; split, each half would import
the other's privates.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import json
import os
import shutil
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.core import outputs
from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.shards import file_batches, shard_reason, source_files, warn_skipped
from engine.world.cache import cache_dir, sha256_file

#: bump when the layout or the meaning of an entry changes: older entries are not read
CACHE_VERSION = 1
#: documents handed to the tokenizer at once
BATCH_DOCUMENTS = 2048

#: what this process did (tests and benchmarks observe reuse through these counters)
stats: dict[str, int] = {"builds": 0, "hits": 0, "rebuilds": 0, "tokens_built": 0}

_context: contextvars.ContextVar[Any] = contextvars.ContextVar("token_cache_context", default=None)
_open: dict[str, TokenDocuments] = {}
_digests: dict[tuple[str, int, int, int], str] = {}
_said: set[str] = set()
_fingerprints: dict[int, tuple[Any, str]] = {}


@dataclass(frozen=True)
class DocumentPolicy:
    """How a tokenized text becomes a training document: ``bos`` is put first unless
    the tokenizer put it there (None: no BOS), ``eos`` is put last unless present."""

    bos: int | None
    eos: int

    def apply(self, ids: list[int]) -> list[int]:
        if self.bos is not None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids if ids and ids[-1] == self.eos else [*ids, self.eos]


def tokens_dir() -> Path:
    """Where entries live: ``$LINGOFORGE_TOKEN_CACHE`` when set (a test suite can give
    the token cache its own folder and keep sharing the built-in world), else
    ``<cache>/tokens``."""
    env = os.environ.get("LINGOFORGE_TOKEN_CACHE")
    if env:
        return Path(env).expanduser().resolve()

    return cache_dir() / "tokens"


@contextmanager
def reporting_to(context: Any) -> Iterator[None]:
    """While active, builds show a progress bar through ``context.progress`` and every
    entry used is recorded in ``context``'s notes under ``token_cache``."""
    token = _context.set(context)
    try:
        yield
    finally:
        _context.reset(token)


# --- keys ------------------------------------------------------------------------------------


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer of a fast tokenizer, or None for a pure-Python one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and hasattr(backend, "encode_batch_fast") else None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: the serialised Rust tokenizer (vocab,
    merges, normaliser, pre-tokeniser, post-processor, added tokens) or, for a Python
    one, its vocabulary; plus its class, special tokens and special-token splitting."""
    h = hashlib.sha256()
    backend = _backend(tokenizer)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"class": type(tokenizer).__name__,
             "special": getattr(tokenizer, "special_tokens_map", {}),
             "split_special": bool(getattr(tokenizer, "split_special_tokens", False))}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _fingerprint(tokenizer: Any) -> str:
    """:func:`tokenizer_fingerprint`, remembered per live tokenizer object."""
    memo = _fingerprints.get(id(tokenizer))
    if memo is not None and memo[0]() is tokenizer:
        return memo[1]
    fp = tokenizer_fingerprint(tokenizer)
    try:
        _fingerprints[id(tokenizer)] = (weakref.ref(tokenizer), fp)
    except TypeError:  # not weak-referenceable: computed each time
        pass
    return fp


def file_digest(path: Path) -> str:
    """sha256 of a file's content; remembered per (path, size, mtime, inode) in this process."""
    st = Path(path).stat()
    memo = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _digests:
        _digests[memo] = sha256_file(Path(path))
    return _digests[memo]


def entry_key(tokenizer_fp: str, source: DataSource, policy: DocumentPolicy) -> tuple[str, dict[str, Any]]:
    """(key, what it is made of) for ``source`` read with a tokenizer and policy."""
    parts = {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fp,
        "files": [file_digest(f) for f in source_files(source)],
        "text_field": source.text_field,
        "records": source.records,
        "skip_broken_shards": bool(source.skip_broken_shards and source.shards),
        "bos": policy.bos,
        "eos": policy.eos,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


# --- reading ---------------------------------------------------------------------------------


class TokenDocuments:
    """An opened entry: ``len()`` documents, ``document(i)`` the ids of one."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        n_tokens = int(meta["tokens"])
        dtype = np.dtype(meta["dtype"])
        self.tokens = (np.memmap(folder / "tokens.bin", dtype=dtype, mode="r", shape=(n_tokens,))
                       if n_tokens else np.zeros(0, dtype=dtype))
        self.offsets = np.memmap(folder / "offsets.bin", dtype=np.int64, mode="r")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> list[int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]].tolist()


def entry_problem(folder: Path, key: str, parts: dict[str, Any]) -> str | None:
    """Why the entry in ``folder`` cannot serve ``key`` (None when it can)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return "its meta.json is missing or unreadable"
    if meta.get("version") != CACHE_VERSION:
        return f"it was written by cache version {meta.get('version')}, this is {CACHE_VERSION}"
    if meta.get("parts", {}).get("tokenizer") != parts["tokenizer"]:
        return "it was built by another tokenizer"
    if meta.get("key") != key or meta.get("parts") != parts:
        return "it was built from other data or settings"
    try:
        size = (folder / "tokens.bin").stat().st_size
        n_offsets = (folder / "offsets.bin").stat().st_size // 8
    except OSError:
        return "a data file of it is missing"
    if size != int(meta["tokens"]) * np.dtype(meta["dtype"]).itemsize or n_offsets != meta["documents"] + 1:
        return "its files do not have the sizes meta.json records (truncated or edited)"
    return None


def _say(message: str, *, once: bool = True) -> None:
    if once and message in _said:
        return
    _said.add(message)
    context = _context.get()
    if context is not None:
        context.log(message)
    else:
        print(message, file=sys.stderr, flush=True)


def documents(tokenizer: Any, source: DataSource, policy: DocumentPolicy) -> TokenDocuments:
    """The tokenized documents of ``source``, from the cache or built into it now."""
    fp = _fingerprint(tokenizer)
    key, parts = entry_key(fp, source, policy)
    cached = _open.get(key)
    if cached is not None and cached.folder.is_dir():
        stats["hits"] += 1
        _record(source, cached, reused=True)
        return cached
    root = tokens_dir()
    final = root / key
    reused = True
    with _key_lock(root, key):  # a process building this key now finishes before we look
        problem = entry_problem(final, key, parts) if final.is_dir() else None
        if final.is_dir() and problem is None:
            entry = TokenDocuments(final, json.loads((final / "meta.json").read_text()))
            stats["hits"] += 1
        else:
            if problem is not None:
                stats["rebuilds"] += 1
                _say(f"token cache: {final} is not reused ({problem}); rebuilding it")
            entry = _build(tokenizer, source, policy, key, parts, final, replace=problem is not None)
            reused = False
    _open[key] = entry
    _record(source, entry, reused=reused)
    return entry


def _record(source: DataSource, entry: TokenDocuments, *, reused: bool) -> None:
    for item in entry.meta.get("skipped_shards", []):
        warn_skipped(Path(item["shard"]), item["reason"])
    context = _context.get()
    if context is None:
        return
    notes = context.stats.notes.setdefault("token_cache", {})
    label = str(source.path)
    if label in notes:
        return
    m = entry.meta
    notes[label] = {"entry": entry.folder.name, "reused": reused, "documents": m["documents"],
                    "tokens": m["tokens"], "dtype": m["dtype"],
                    "build_seconds": m["build_seconds"], "tokens_per_s": m["tokens_per_s"]}
    if m.get("skipped_shards"):
        notes[label]["skipped_shards"] = m["skipped_shards"]


@contextmanager
def _key_lock(root: Path, key: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the rename alone keeps builds safe
        yield
        return
    with open(root / f".{key}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --- building --------------------------------------------------------------------------------


@contextmanager
def parallel_tokenizers() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=true`` for the duration, the previous value (or its
    absence) restored afterwards; the Rust tokenizer reads it on every batch call."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _encoder(tokenizer: Any) -> Any:
    """``texts -> list of id lists``, as ``tokenizer(texts)["input_ids"]`` gives them."""
    backend = _backend(tokenizer)
    if backend is None:
        return lambda texts: tokenizer(texts)["input_ids"]
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(backend.to_str())  # a copy: settings of the caller's stay as they are
    own.no_truncation()
    own.no_padding()
    own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return lambda texts: [e.ids for e in own.encode_batch_fast(texts, add_special_tokens=True)]


def _ahead(batches: Iterator[list[str]], encode: Any) -> Iterator[tuple[list[str], list[list[int]]]]:
    """(texts, ids) per batch, the next batch encoded in a thread meanwhile (the Rust
    tokenizer releases the GIL), so reading and writing overlap with encoding."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="token-cache") as pool:
        pending = None
        for texts in batches:
            job = (texts, pool.submit(encode, texts))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job
        if pending is not None:
            yield pending[0], pending[1].result()


def _vocab_size(tokenizer: Any) -> int:
    backend = _backend(tokenizer)
    return int(backend.get_vocab_size(with_added_tokens=True)) if backend is not None else len(tokenizer)


def _build(tokenizer: Any, source: DataSource, policy: DocumentPolicy, key: str,
           parts: dict[str, Any], final: Path, *, replace: bool) -> TokenDocuments:
    root = final.parent
    for stale in root.glob(f".{key}.tmp-*"):  # we hold the key's lock: these are from killed builds
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(outputs.temp_dir(f".{key}.tmp-", root))
    dtype = np.dtype(np.uint16 if _vocab_size(tokenizer) <= 1 << 16 else np.uint32)
    encode = _encoder(tokenizer)
    files = source_files(source)
    # the bar counts MB of text; a parquet file's size is compressed, so its bar has no end
    total_mb = None if any(f.suffix == ".parquet" for f in files) else sum(f.stat().st_size for f in files) / 1e6
    skipped: list[dict[str, str]] = []
    n_docs = n_tokens = 0
    t0 = time.perf_counter()
    context = _context.get()
    bar_cm = context.progress(total_mb, f"tokenizing {source.path.name}", unit="MB") if context else None
    bar = bar_cm.__enter__() if bar_cm else None
    try:
        with open(tmp / "tokens.bin", "wb") as tok_fh, open(tmp / "offsets.bin", "wb") as off_fh, \
                parallel_tokenizers():
            off_fh.write(np.zeros(1, dtype=np.int64).tobytes())
            for shard in files:
                mark = (tok_fh.tell(), off_fh.tell(), n_docs, n_tokens)
                try:
                    for texts, encoded in _ahead(file_batches(source, shard, BATCH_DOCUMENTS), encode):
                        ids = [policy.apply(x) for x in encoded]
                        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
                        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                                           count=int(lengths.sum()))
                        tok_fh.write(flat.tobytes())
                        off_fh.write((np.cumsum(lengths) + n_tokens).tobytes())
                        n_docs += len(ids)
                        n_tokens += int(lengths.sum())
                        if bar is not None:
                            rate = n_tokens / max(time.perf_counter() - t0, 1e-9)
                            bar.advance(sum(map(len, texts)) / 1e6, tokens=n_tokens, tok_s=f"{rate:,.0f}")
                except DataError as exc:
                    if not (source.skip_broken_shards and source.shards):
                        raise
                    reason = shard_reason(shard, exc)
                    warn_skipped(shard, reason)
                    skipped.append({"shard": str(shard), "reason": reason})
                    for fh, pos in ((tok_fh, mark[0]), (off_fh, mark[1])):  # drop the shard whole
                        fh.seek(pos)
                        fh.truncate()
                    n_docs, n_tokens = mark[2], mark[3]
        seconds = time.perf_counter() - t0
        meta = {"version": CACHE_VERSION, "key": key, "parts": parts, "dtype": dtype.name,
                "documents": n_docs, "tokens": n_tokens, "source": str(source.path),
                "files": [str(f) for f in files], "skipped_shards": skipped,
                "build_seconds": round(seconds, 3),
                "tokens_per_s": round(n_tokens / seconds) if seconds > 0 else None,
                "built_by_pid": os.getpid()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists() and replace:
            shutil.rmtree(final)
        if final.exists():  # cannot happen under the lock, but never clobber a finished entry
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar_cm is not None:
            bar_cm.__exit__(None, None, None)
    stats["builds"] += 1
    stats["tokens_built"] += n_tokens
    _say(f"token cache: {source.path.name}: {n_docs:,} documents, {n_tokens:,} tokens in {seconds:.1f} s "
         f"({meta['tokens_per_s'] or 0:,} tokens/s), kept in {final}", once=False)
    return TokenDocuments(final, json.loads((final / "meta.json").read_text()))
