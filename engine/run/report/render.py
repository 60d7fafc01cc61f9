"""The summary's building blocks, rendered as plain text (the terminal, logs) or Markdown.

Plain text keeps to :data:`WIDTH` columns: prose is wrapped, tables are aligned with
two spaces between columns (a table is as wide as its longest names).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from engine.run.report.intervals import Interval, is_accuracy
from engine.run.report.metrics import format_number

WIDTH = 100


@dataclass
class Heading:
    text: str
    level: int = 1


@dataclass
class Note:
    text: str


@dataclass
class Bullets:
    items: list[str]
    #: items are commands (Markdown: code spans, text: not wrapped)
    code: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    #: one of ``l``/``r`` per column
    align: str = ""
    widths: list[int] = field(default_factory=list)


Block = Heading | Note | Bullets | Table


def _wrap(text: str, indent: str, first: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_on_hyphens=False) or [first.rstrip()]


def _text_table(t: Table, indent: str) -> list[str]:
    cols = list(zip(t.header, *t.rows, strict=False))
    widths = [max(len(c) for c in col) for col in cols]
    align = t.align.ljust(len(widths), "l")

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return (indent + "  ".join(out)).rstrip()

    return [line(t.header), *(line(r) for r in t.rows)]


def _code_lines(item: str, indent: str) -> list[str]:
    """A command and what it does (``"cmd    what"``) on one line, or, when that passes
    :data:`WIDTH` (long paths), the command alone with its description below it."""
    line = f"{indent}  {item}"
    command, _, what = item.partition("    ")
    if len(line) <= WIDTH or not what.strip():
        return [line]
    return [f"{indent}  {command.strip()}", *_wrap(what.strip(), indent + "    ", indent + "    ")]


def text(blocks: list[Block]) -> str:
    """The blocks as plain text."""
    lines: list[str] = []
    indent = ""
    for b in blocks:
        if isinstance(b, Heading):
            if lines:
                lines.append("")
            lines.append(b.text)
            indent = "  " * (b.level - 1)
        elif isinstance(b, Note):
            lines += _wrap(b.text, indent, indent)
        elif isinstance(b, Bullets):
            for item in b.items:
                lines += (_code_lines(item, indent) if b.code else _wrap(item, indent + "  ", indent + "- "))
        else:
            lines += _text_table(b, indent)
    return "\n".join(lines) + "\n"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("*", "\\*")


def _md_command(item: str) -> str:
    command, _, what = item.partition("    ")
    return f"- `{command.strip()}`" + (f": {what.strip()}" if what.strip() else "")


def markdown(blocks: list[Block], top: int = 2) -> str:
    """The blocks as Markdown; level 1 headings become ``#`` * ``top``."""
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * (top + b.level - 1) + " " + b.text, ""]
        elif isinstance(b, Note):
            lines += [b.text, ""]
        elif isinstance(b, Bullets):
            lines += [_md_command(i) if b.code else f"- {i}" for i in b.items] + [""]
        else:
            align = b.align.ljust(len(b.header), "l")
            lines += ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                      "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
                      *("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows), ""]
    return "\n".join(lines)


# --- numbers in words ------------------------------------------------------------------------


def number(v: float, metric: str) -> str:
    """An accuracy with 3 decimals, a perplexity with 2 (thousands separated when large)."""
    if is_accuracy(metric):
        return f"{v:.3f}"
    return f"{v:.2f}" if abs(v) < 1000 else format_number(float(v))


def signed(v: float, metric: str) -> str:
    """A difference with its sign."""
    return f"{v:+.2f}" if is_accuracy(metric) or abs(v) < 1000 else f"{v:+,.0f}"


def interval_text(iv: Interval | None, metric: str) -> str:
    """``[low, high]`` of a difference, or ``no interval``."""
    if iv is None:
        return "no interval"
    if is_accuracy(metric):
        return f"[{iv.low:+.3f}, {iv.high:+.3f}]"
    return f"[{signed(iv.low, metric)}, {signed(iv.high, metric)}]"
