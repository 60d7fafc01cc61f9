"""How well a tokenizer covers a language: measured on a bounded sample of its text.

A byte-level BPE (the built-in world's, GPT-2's, Llama-3's) never emits ``<unk>``: text
in a script it was not trained on comes out as one token per UTF-8 byte, so an unknown
-token rate says nothing. What does say something, measured on whitespace words of the
first documents of a file (at most :data:`MAX_DOCUMENTS` documents and
:data:`MAX_BYTES` bytes, well under a second):

* ``tokens_per_word``: tokens per whitespace-separated word (its "fertility");
* ``bytes_per_token``: UTF-8 bytes of text per token;
* ``byte_share``: share of tokens that are single bytes: a token whose text is one byte,
  or not valid UTF-8 on its own (a piece of a multi-byte character), or a SentencePiece
  byte-fallback piece ``<0xNN>``; ``<unk>`` tokens count here too (``unk_share`` on its
  own) when the tokenizer has one;
* ``long_word_share``: share of words split into :data:`LONG_WORD_TOKENS` or more tokens.

:func:`coverage_warnings` turns these into ``engine validate`` / ``engine run`` warnings
for every training stage's text data, relative to the recipe's best-covered other
language when it has one (thresholds in :data:`THRESHOLDS`, chosen from the numbers in
docs/extend-tokenizer.md). ``LINGOFORGE_NO_COVERAGE=1`` or ``--no-coverage`` skips it.
Only tokenizer files are read, never weights.
"""

from __future__ import annotations

import os
import re
import string
from bisect import bisect_right
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from engine import world
from engine.core.errors import EngineError, ModelLoadError
from engine.core.inputs import DataSource
from engine.core.stages import kind_of
from engine.data.files import detect_format
from engine.data.sources import iter_texts
from engine.models.modelio import load_tokenizer
from engine.recipe.spec import resolve_model_path

__all__ = ["LONG_WORD_TOKENS", "MAX_BYTES", "MAX_DOCUMENTS", "NO_TEXT", "SKIP_ENV", "THRESHOLDS",
           "Coverage", "coverage_warnings", "load_backend", "measure", "measure_file", "no_text",
           "poor_coverage"]

MAX_DOCUMENTS = 2000
MAX_BYTES = 1 << 20
LONG_WORD_TOKENS = 4
SKIP_ENV = "LINGOFORGE_NO_COVERAGE"
GUIDE = "docs/extend-tokenizer.md"

#: when a language counts as poorly covered (any one suffices). On the built-in world the
#: covered languages measure 1.2-1.6 tokens/word and 7-12% single bytes (mostly the full
#: stops); Cyrillic, Greek or German text measures 3.1-7.3 tokens/word, 32-87% single bytes
#: (docs/extend-tokenizer.md has the table).
THRESHOLDS = {
    "byte_share": 0.20,         # more than a fifth of the tokens are single bytes
    "tokens_per_word": 4.0,     # absolute: even agglutinative languages rarely need 4
    "relative_tokens_per_word": 2.5,  # x the reference language's tokens per word
}

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_WORD = re.compile(r"\S+")
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class Coverage:
    """Counts over a sample of documents; the ratios are properties."""

    documents: int
    words: int
    tokens: int
    bytes: int
    byte_tokens: int
    unk_tokens: int
    long_words: int

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def byte_share(self) -> float:
        return self.byte_tokens / self.tokens if self.tokens else 0.0

    @property
    def unk_share(self) -> float:
        return self.unk_tokens / self.tokens if self.tokens else 0.0

    @property
    def long_word_share(self) -> float:
        return self.long_words / self.words if self.words else 0.0

    def to_dict(self) -> dict[str, Any]:
        ratios = {k: round(getattr(self, k), 4) for k in
                  ("tokens_per_word", "bytes_per_token", "byte_share", "unk_share", "long_word_share")}
        return {**asdict(self), **ratios}

    def summary(self) -> str:
        return (f"{self.tokens_per_word:.2f} tokens/word, {self.bytes_per_token:.2f} bytes/token, "
                f"{self.byte_share:.0%} single-byte tokens, {self.long_word_share:.0%} of words in "
                f">= {LONG_WORD_TOKENS} tokens")


def load_backend(folder: Path) -> Any:
    """The ``tokenizers.Tokenizer`` of a model folder: its tokenizer.json when there is
    one (no transformers import, milliseconds), else transformers' fast tokenizer's."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelLoadError(f"{folder / 'tokenizer.json'}: cannot be read: {exc}") from None
    tok = load_tokenizer(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"{folder}: the tokenizer is not a fast (Rust) tokenizer; "
                             "coverage is measured only with one")
    return backend


def measure(tokenizer: Any, documents: list[str]) -> Coverage:
    """Coverage of ``documents`` by a ``tokenizers.Tokenizer`` (or a transformers fast
    tokenizer, whose backend is used)."""
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    encodings = tokenizer.encode_batch(documents, add_special_tokens=False)
    unk = _unk_id(tokenizer)
    byte_ids: dict[int, bool] = {}
    words = tokens = byte_tokens = unk_tokens = long_words = 0
    for doc, enc in zip(documents, encodings):
        ends = [m.end() for m in _WORD.finditer(doc)]
        per_word = [0] * len(ends)
        for tid, (_, end) in zip(enc.ids, enc.offsets):
            tokens += 1
            if tid not in byte_ids:
                byte_ids[tid] = _is_byte_token(tokenizer, tid, unk)
            byte_tokens += byte_ids[tid]
            unk_tokens += tid == unk
            index = bisect_right(ends, max(end - 1, 0))
            if index < len(ends):
                per_word[index] += 1
        words += len(ends)
        long_words += sum(n >= LONG_WORD_TOKENS for n in per_word)
    size = sum(len(d.encode("utf-8")) for d in documents)
    return Coverage(len(documents), words, tokens, size, byte_tokens, unk_tokens, long_words)


def _unk_id(tokenizer: Any) -> int | None:
    token = getattr(tokenizer.model, "unk_token", None)
    return tokenizer.token_to_id(token) if token else None


def _is_byte_token(tokenizer: Any, tid: int, unk: int | None) -> bool:
    if tid == unk:
        return True
    piece = tokenizer.id_to_token(tid) or ""
    if _BYTE_PIECE.match(piece):
        return True
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if "\ufffd" in text and "\ufffd" not in piece:
        return True  # not valid UTF-8 on its own: a piece of a character
    raw = text.encode("utf-8")
    # a lone letter or digit is a word spelled out; a lone full stop or space is just that
    return len(raw) == 1 and not (text.isspace() or text in _PUNCTUATION)


def sample(source: Any, max_documents: int = MAX_DOCUMENTS, max_bytes: int = MAX_BYTES) -> list[str]:
    """The first documents of a text :class:`~engine.core.inputs.DataSource`, bounded."""
    docs: list[str] = []
    size = 0
    for text in islice(iter_texts(source), max_documents):
        docs.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return docs


def measure_file(tokenizer: Any, path: Path, **bounds: int) -> Coverage:
    """Coverage of a text file (``.txt`` one document a line, or ``.jsonl`` ``text``)."""
    path = Path(path)
    if path.suffix == ".jsonl" and detect_format(path) != "text":
        raise ModelLoadError(f"{path}: coverage is measured on text data (a 'text' field)")
    return measure(tokenizer, sample(DataSource(path=path), **bounds))


#: what :func:`poor_coverage` says of a file without a word of text (nothing was measured)
NO_TEXT = "holds no text (no words to measure the tokenizer's coverage on)"


def no_text(cov: Coverage) -> bool:
    """Whether the measured sample had no word at all (an empty file, blank lines only,
    empty ``text`` fields): its zero ratios mean nothing, and nothing would train on it."""
    return cov.words == 0


def poor_coverage(cov: Coverage, reference: Coverage | None = None) -> list[str]:
    """Why ``cov`` counts as poor coverage (empty: it does not); a sample with no text
    gets :data:`NO_TEXT` alone."""
    if no_text(cov):
        return [NO_TEXT]
    why = []
    if cov.byte_share > THRESHOLDS["byte_share"]:
        why.append(f"{cov.byte_share:.0%} of its tokens are single bytes (over "
                   f"{THRESHOLDS['byte_share']:.0%})")
    if reference is not None and reference.tokens_per_word > 0:
        ratio = cov.tokens_per_word / reference.tokens_per_word
        if ratio > THRESHOLDS["relative_tokens_per_word"]:
            why.append(f"{ratio:.1f}x the tokens per word of the reference")
    if cov.tokens_per_word > THRESHOLDS["tokens_per_word"]:
        why.append(f"{cov.tokens_per_word:.1f} tokens per word (over {THRESHOLDS['tokens_per_word']:g})")
    return why


@lru_cache(maxsize=64)
def _cached(folder: str, path: str, records: str | None, text_field: str, stamp: tuple) -> Coverage:
    source = DataSource(path=Path(path), records=records, text_field=text_field)
    return measure(_backend(folder, stamp[0]), sample(source))


@lru_cache(maxsize=8)
def _backend(folder: str, _stamp: int) -> Any:
    return load_backend(Path(folder))


def _stage_tokenizer(plan: Any, name: str, seen: set[str] | None = None) -> Path | None:
    """The folder whose tokenizer a model reference trains with: a recipe model's, or,
    for an earlier stage's output, its own input's (stages keep the tokenizer)."""
    spec = plan.recipe.models.get(name)
    if spec is not None:
        if spec.builtin is not None:
            folder = world.world_dir() / "models" / spec.builtin
            return folder if (folder / "tokenizer.json").is_file() else None  # never built here
        return resolve_model_path(spec, plan.recipe_dir)
    seen = seen or set()
    stage = next((s for s in plan.stages if s.name == name), None)
    if stage is None or name in seen or stage.spec.model is None:
        return None
    return _stage_tokenizer(plan, stage.spec.model, seen | {name})


def coverage_warnings(plan: Any) -> list[str]:
    """One warning per training stage's text data file whose language the stage's tokenizer
    covers poorly (see :data:`THRESHOLDS`); nothing when ``LINGOFORGE_NO_COVERAGE`` is set."""
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return []
    measured: list[tuple[Any, Any, Path, Coverage]] = []
    for stage in plan.stages:
        if not kind_of(stage.spec.stage).trains or stage.spec.model is None:
            continue
        folder = _stage_tokenizer(plan, stage.spec.model)
        if folder is None or not folder.is_dir():
            continue
        for source in stage.data:
            if source.format != "text" or source.shards or source.path.suffix == ".parquet":
                continue
            try:
                stat = (folder / "tokenizer.json").stat().st_mtime_ns if (folder / "tokenizer.json").is_file() else 0
                cov = _cached(str(folder), str(source.path), source.records, source.text_field,
                              (stat, source.path.stat().st_mtime_ns))
            except (EngineError, OSError):  # unreadable here: the stage itself reports it
                continue
            measured.append((stage, source, folder, cov))
    lines = []
    for stage, source, folder, cov in measured:
        if no_text(cov):
            lines.append(f"stage {stage.name!r}: data {source.path} {NO_TEXT}")
            continue
        others = [(s, c) for st, s, f, c in measured
                  if f == folder and s.label != source.label and not no_text(c)]
        ref = min(others, key=lambda sc: sc[1].tokens_per_word, default=None)
        why = poor_coverage(cov, ref[1] if ref else None)
        if not why:
            continue
        against = ""
        if ref is not None:
            against = (f"; {cov.tokens_per_word / ref[1].tokens_per_word:.1f}x the tokens per word of your "
                       f"{ref[0].label} data ({ref[0].path.name}: {ref[1].tokens_per_word:.2f})")
        lines.append(f"stage {stage.name!r}: the tokenizer of {folder.name} covers {source.label!r} "
                     f"({source.path}) poorly: {cov.summary()}{against}. Extend the tokenizer and train "
                     f"with train_embeddings: true ({GUIDE}); skip this check with --no-coverage")
    return lines
