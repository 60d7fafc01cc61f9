"""Data files: resolving recipe data specs and reading records, streaming.

Formats (see :class:`engine.api.DataSource`):

* ``text``: ``.txt`` (one document per non-empty line), ``.jsonl`` with a text field, a
  ``.parquet`` file with a text column, or a folder of such shards (:mod:`engine.data.shards`);
* ``instructions``: jsonl with ``prompt`` and ``response``, or chat ``messages``
  (a list of ``{role, content}``; the last assistant turn is the response);
* ``choice``: jsonl with ``prompt``, ``choices`` (two or more strings), ``label`` (index);
* ``generation``: jsonl with ``prompt`` and the reference ``answer`` (a string) or
  ``answers`` (a list of accepted strings), scored by greedy generation and exact match.

A data spec's ``records`` keeps a range of a file's records (its non-empty lines, in file
order), written like a Python slice whose ends are record indices or percentages of the
file: ``"0:50%"`` (the first half), ``"50%:"`` (the rest), ``":100"``, ``"96:192"``. It
lets a recipe train on part of a file now and on more of it later without splitting the
file (:func:`parse_record_range`, :func:`record_bounds`).

Files are read line by line, so a corpus larger than memory works. Text must be UTF-8:
lines are decoded one at a time, so a stray byte is reported with its file and line
rather than as a codec error from somewhere inside a read-ahead buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.core.errors import DataError
from engine.core.inputs import DataSource
from engine.data.records import record_bounds

#: how much of a data file ``engine validate`` decodes up front (the rest is checked as read)
UTF8_SNIFF_BYTES = 1 << 20
#: jsonl files up to this size are parsed whole by ``engine validate`` (well under a second)
JSONL_SCAN_BYTES = 8 << 20
#: rows per batch the parquet reader hands over
PARQUET_BATCH = 4096


@lru_cache(maxsize=256)
def _count_records(path: str, size: int, mtime_ns: int) -> int:
    return sum(1 for _ in iter_lines(Path(path)))


def count_records(path: Path) -> int:
    """Non-empty lines of ``path`` (rows of a parquet file): what ``records`` counts;
    cached per file state."""
    if Path(path).suffix == ".parquet":
        return parquet_rows(Path(path))
    st = Path(path).stat()
    return _count_records(str(path), st.st_size, st.st_mtime_ns)


def source_bounds(path: Path, records: str | None) -> tuple[int, int] | None:
    """``[lo, hi)`` of the records ``records`` selects in ``path``, or None for all;
    a range that does not fit the file is a DataError naming the file and the field."""
    if records is None:
        return None
    try:
        return record_bounds(records, count_records(path))
    except ValueError as exc:
        raise DataError(f"{path}: records: {exc}") from None


def detect_format(path: Path, text_field: str = "text") -> str:
    """Guess a file's format from its extension and first record."""
    path = Path(path)
    if path.suffix in (".txt", ".parquet"):
        return "text"
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .txt, .jsonl or "
                        ".parquet, or a folder of them)")
    for lineno, record in iter_jsonl(path):
        if "choices" in record:
            return "choice"
        if "prompt" in record and ("answer" in record or "answers" in record):
            return "generation"
        if "messages" in record or ("prompt" in record and "response" in record):
            return "instructions"
        if text_field in record:
            return "text"
        raise DataError(
            f"{path}:{lineno}: cannot tell the format: expected a {text_field!r} field (text), "
            "'prompt'+'response' or 'messages' (instructions), 'choices' (choice), "
            "or 'prompt'+'answer' or 'answers' (generation)"
        )
    raise DataError(f"{path}: data file is empty")


def check_file(path: Path, text_field: str = "text", *, scan_jsonl: bool = True) -> None:
    """What ``engine validate`` checks of one data file before any stage reads it: not
    empty; a parquet file has the ``text_field`` column (its schema, no rows, is read);
    text is UTF-8 in its first megabyte; a small jsonl file parses throughout (unless
    not ``scan_jsonl``: a folder's later shards)."""
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if path.suffix == ".parquet":
        check_parquet(path, text_field)
        return
    check_utf8_head(path)
    if scan_jsonl and path.suffix == ".jsonl" and path.stat().st_size <= JSONL_SCAN_BYTES:
        for _ in iter_jsonl(path):  # a malformed line is named now, not minutes into a stage
            pass


def check_utf8_head(path: Path, limit: int = UTF8_SNIFF_BYTES) -> None:
    """Decode the first ``limit`` bytes as UTF-8, so that a Latin-1 or UTF-16 file fails
    at validation, naming its line, rather than minutes into a stage."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(limit)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < limit)
    except UnicodeDecodeError as exc:
        lineno = head.count(b"\n", 0, exc.start) + 1
        col = exc.start - (head.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{head[exc.start]:02x} at "
                        f"column {col}); convert the file to UTF-8") from None


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) for each non-empty line, decoded as UTF-8 line by
    line, so that invalid bytes are named with their file and line."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                f"column {exc.start + 1}); convert the file to UTF-8") from None
            if line:
                yield lineno, line


def iter_records(path: Path, records: str | None = None) -> Iterator[tuple[int, str]]:
    """:func:`iter_lines`, restricted to the record range ``records`` (None: all)."""
    bounds = source_bounds(path, records)
    lines = iter_lines(path)
    if bounds is None:
        yield from lines
        return
    lo, hi = bounds
    for index, item in enumerate(lines):
        if index >= hi:
            break
        if index >= lo:
            yield item


def iter_jsonl(path: Path, records: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line in the range ``records``; bad JSON
    names file and line."""
    for lineno, line in iter_records(path, records):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, record


def file_texts(source: DataSource) -> Iterator[str]:
    """The documents of a single ``.txt`` or ``.jsonl`` text source, streamed (a folder of
    shards or a parquet file is read by :func:`engine.data.sources.iter_texts`)."""
    if source.path.suffix == ".txt":
        for _, line in iter_records(source.path, source.records):
            yield line
        return
    for lineno, record in iter_jsonl(source.path, source.records):
        value = record.get(source.text_field)
        if not isinstance(value, str):
            raise DataError(f"{source.path}:{lineno}: field {source.text_field!r} missing or not a string")
        if value.strip():
            yield value


def iter_instructions(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) with either ``prompt``/``response`` or ``messages``, checked."""
    for lineno, record in iter_jsonl(source.path, source.records):
        if "messages" in record:
            msgs = record["messages"]
            if (not isinstance(msgs, list) or not msgs
                    or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)):
                raise DataError(f"{source.path}:{lineno}: 'messages' must be a list of {{role, content}}")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{source.path}:{lineno}: the last message must be the assistant's")
        elif not (isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
            raise DataError(f"{source.path}:{lineno}: expected string 'prompt' and 'response'")
        yield lineno, record


def iter_choices(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of multiple-choice items, checked."""
    for lineno, record in iter_jsonl(source.path, source.records):
        choices = record.get("choices")
        label = record.get("label")
        if not isinstance(record.get("prompt"), str):
            raise DataError(f"{source.path}:{lineno}: 'prompt' missing or not a string")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{source.path}:{lineno}: 'choices' must be a list of strings")
        if len(choices) < 2:
            raise DataError(f"{source.path}:{lineno}: 'choices' needs at least two entries")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise DataError(f"{source.path}:{lineno}: 'label' must be an index into 'choices' (0..{len(choices) - 1})")
        yield lineno, record


def iter_answers(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) of generation items, checked: a string ``prompt`` and either a
    string ``answer`` or ``answers``, a non-empty list of strings. Records are yielded
    as read; whether an answer is empty after normalisation is the evaluator's check."""
    for lineno, record in iter_jsonl(source.path, source.records):
        where = f"{source.path}:{lineno}"
        if not isinstance(record.get("prompt"), str):
            raise DataError(f"{where}: 'prompt' missing or not a string")
        has_one, has_many = "answer" in record, "answers" in record
        if has_one and has_many:
            raise DataError(f"{where}: give 'answer' or 'answers', not both")
        if has_one:
            if not isinstance(record["answer"], str):
                raise DataError(f"{where}: 'answer' must be a string")
        elif has_many:
            answers = record["answers"]
            if (not isinstance(answers, list) or not answers
                    or not all(isinstance(a, str) for a in answers)):
                raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
        else:
            raise DataError(f"{where}: 'answer' missing (or give 'answers', a list)")
        yield lineno, record


# --- parquet --------------------------------------------------------------------------------


def parquet_columns(path: Path) -> list[str]:
    """The column names of a parquet file, read from its footer (no rows are read)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def check_parquet(path: Path, text_field: str) -> None:
    """DataError naming the file and its columns unless it has ``text_field``."""
    columns = parquet_columns(path)
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (the data spec's text_field); the file has "
                        f"columns {columns}; set text_field to the column holding the text")


def parquet_rows(path: Path) -> int:
    """Rows of a parquet file, from its footer (what ``records`` counts for parquet)."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None


def iter_parquet_batches(path: Path, text_field: str,
                         bounds: tuple[int, int] | None = None) -> Iterator[list[str]]:
    """Non-empty texts of ``path``'s ``text_field`` column in batches, streamed through
    ``datasets``; ``bounds`` keeps rows ``[lo, hi)``. Any read error is a DataError
    naming the file."""
    check_parquet(path, text_field)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the 'datasets' package "
                        "(pip install 'lingoforge[data]')") from None
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    row = 0
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True,
                                   columns=[text_field])
        for batch in ds.iter(batch_size=PARQUET_BATCH):
            texts = batch[text_field]
            first, row = row, row + len(texts)
            if bounds is not None:
                lo, hi = bounds
                if row <= lo:
                    continue
                texts = texts[max(lo - first, 0): hi - first]
            out = []
            for i, t in enumerate(texts):
                if t is None:
                    continue
                if not isinstance(t, str):
                    raise DataError(f"{path}: row {first + i}: column {text_field!r} holds "
                                    f"{type(t).__name__}, not text")
                if t.strip():
                    out.append(t)
            if out:
                yield out
            if bounds is not None and row >= bounds[1]:
                return
    except DataError:
        raise
    except Exception as exc:  # pyarrow / datasets errors: name the shard
        raise DataError(f"{path}: cannot read parquet ({type(exc).__name__}: {exc})") from None
