"""``engine report RUN_DIR``: write report.md and PNG charts for a run folder.

Kept out of :mod:`engine.cli` so the command (and matplotlib, imported only when
charts are drawn) costs nothing to the other commands. Wired in by
``add_parser(sub)`` and ``COMMANDS["report"] = cmd_report``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "report", help="write report.md and charts (scores, cost, loss curves) for a run folder")
    parser.add_argument("run_dir", type=Path, help="the --workdir of an `engine run`")
    parser.add_argument("--no-charts", action="store_true",
                        help="only report.md (charts need matplotlib: lingoforge[report])")
    return parser


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Write the report; a missing matplotlib is a warning, not an error (exit 0)."""
    from engine.report_files import make_report

    md, charts, note = make_report(args.run_dir, charts=not args.no_charts)
    if note:
        console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    console.print(f"[green]wrote[/] {md}", highlight=False)
    for path in charts.values():
        console.print(f"[green]wrote[/] {path}", highlight=False)
    return 0
