"""Run a guide's example as a user would: its files and commands, taken from the markdown.

A fenced ``yaml`` block whose first line is ``# NAME.yaml...`` is a file the guide asks
the user to write; each line of a ``bash`` block starting with ``python`` or ``engine``
is a command, run in a scratch folder (``engine`` in-process, through
``engine.cli.main``; ``python docs/examples/...`` with the repository's script)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(doc: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of ``docs/<doc>``, in order."""
    return _BLOCK.findall((ROOT / "docs" / doc).read_text(encoding="utf-8"))


def files(doc: str) -> dict[str, str]:
    """The yaml files the guide has the user write, by name."""
    out = {}
    for lang, text in blocks(doc):
        first = text.splitlines()[0] if text else ""
        m = re.match(r"#\s*(\S+\.yaml)\b", first)
        if lang == "yaml" and m:
            out[m.group(1)] = text
    return out


def commands(doc: str) -> list[list[str]]:
    """The commands of the guide's bash blocks (comments dropped), split like a shell."""
    out = []
    for lang, text in blocks(doc):
        if lang != "bash":
            continue
        for line in text.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("python ", "engine ")):
                out.append(shlex.split(line))
    return out


def run(argv: list[str], cwd: Path, extra: list[str] | None = None) -> int:
    """One command of the guide in ``cwd``; ``extra`` arguments are appended (``--set``)."""
    if argv[0] == "python":
        script = [str(ROOT / a) if a.startswith("docs/") else a for a in argv[1:]]
        done = subprocess.run([sys.executable, *script], cwd=cwd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return 0
    import os

    from engine.cli.commands import main

    before = Path.cwd()
    os.chdir(cwd)
    try:
        return main([*argv[1:], *(extra or [])])
    finally:
        os.chdir(before)
