"""Stand-in data for docs/getting-started.md's "your own language" guide.

Writes the built-in world's low-resource language ``lum`` transliterated into Cyrillic
letters, a script the world's tokenizer never saw (as a real model's tokenizer may
never have seen yours): ``FOLDER/train.txt`` and ``FOLDER/test.txt`` (one document a
line), ``FOLDER/task-test.jsonl`` (multiple choice) and ``FOLDER/task-test-gen.jsonl``
(generation, exact match). Replace them with your own files of the same formats.

    python docs/examples/own_language_data.py data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine import world

LETTERS = dict(zip("abcdefghijklmnopqrstuvwxyz", "абцдефгхийклмнопкрстувўхыз", strict=True))


def cyrillic(text: str) -> str:
    """``text`` with every Latin letter written in Cyrillic (case kept)."""
    out = []
    for ch in text:
        low = LETTERS.get(ch.lower())
        out.append(ch if low is None else (low.capitalize() if ch.isupper() else low))
    return "".join(out)


def _convert(value):
    if isinstance(value, str):
        return cyrillic(value)
    if isinstance(value, list):
        return [_convert(v) for v in value]
    if isinstance(value, dict):
        return {k: _convert(v) for k, v in value.items()}
    return value


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("train.txt", "test.txt", "task-test.jsonl", "task-test-gen.jsonl"):
        text = world.data_path(f"lum/{name}").read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            text = "".join(json.dumps(_convert(json.loads(line)), ensure_ascii=False) + "\n"
                           for line in text.splitlines() if line.strip())
        else:
            text = cyrillic(text)
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "data")):
        print(path)
