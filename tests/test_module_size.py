"""Small modules with one job each: no module of the engine or the built-in plugins is
over 400 lines unless its docstring says why (a line starting ``Long module:``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 400


def test_no_module_over_400_lines_without_a_stated_reason():
    long = []
    for path in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "plugins").glob("*.py")]):
        lines = path.read_text().count("\n")
        if lines <= LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not any(line.startswith("Long module:") for line in doc.splitlines()):
            long.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not long, (f"over {LIMIT} lines with no 'Long module:' reason in the docstring: "
                      + ", ".join(long))
