"""Data files: resolving recipe data specs and reading records, streaming.

Formats (see :class:`engine.api.DataSource`):

* ``text``: ``.txt`` (one document per non-empty line) or ``.jsonl`` with a text field;
* ``instructions``: jsonl with ``prompt`` and ``response``, or chat ``messages``
  (a list of ``{role, content}``; the last assistant turn is the response);
* ``choice``: jsonl with ``prompt``, ``choices`` (two or more strings), ``label`` (index);
* ``generation``: jsonl with ``prompt`` and the reference ``answer`` (a string) or
  ``answers`` (a list of accepted strings), scored by greedy generation and exact match.

Files are read line by line, so a corpus larger than memory works. Text must be UTF-8:
lines are decoded one at a time, so a stray byte is reported with its file and line
rather than as a codec error from somewhere inside a read-ahead buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.api import DataSource
from engine.errors import DataError

#: how much of a data file ``engine validate`` decodes up front (the rest is checked as read)
UTF8_SNIFF_BYTES = 1 << 20
#: jsonl files up to this size are parsed whole by ``engine validate`` (well under a second)
JSONL_SCAN_BYTES = 8 << 20


def detect_format(path: Path, text_field: str = "text") -> str:
    """Guess a file's format from its extension and first record."""
    path = Path(path)
    if path.suffix == ".txt":
        return "text"
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: unsupported data file type {path.suffix!r} (use .txt or .jsonl)")
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


def resolve_data(spec: Any, recipe_dir: Path) -> DataSource:
    """A recipe :class:`~engine.recipe.DataSpec` as a checked :class:`DataSource`."""
    if spec.builtin is not None:
        from engine import world

        path = world.data_path(spec.builtin)
    else:
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = (Path(recipe_dir) / path).resolve()
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    check_utf8_head(path)
    if path.suffix == ".jsonl" and path.stat().st_size <= JSONL_SCAN_BYTES:
        for _ in iter_jsonl(path):  # a malformed line is named now, not minutes into a stage
            pass
    fmt = spec.format
    if fmt == "auto":
        fmt = detect_format(path, spec.text_field)
    return DataSource(path=path, format=fmt, language=spec.language, weight=spec.weight,
                      text_field=spec.text_field)


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


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line; bad JSON names file and line."""
    for lineno, line in iter_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, record


def iter_texts(source: DataSource) -> Iterator[str]:
    """The documents of a text source, streamed."""
    if source.path.suffix == ".txt":
        for _, line in iter_lines(source.path):
            yield line
        return
    for lineno, record in iter_jsonl(source.path):
        value = record.get(source.text_field)
        if not isinstance(value, str):
            raise DataError(f"{source.path}:{lineno}: field {source.text_field!r} missing or not a string")
        if value.strip():
            yield value


def iter_instructions(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, record) with either ``prompt``/``response`` or ``messages``, checked."""
    for lineno, record in iter_jsonl(source.path):
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
    for lineno, record in iter_jsonl(source.path):
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
    for lineno, record in iter_jsonl(source.path):
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
