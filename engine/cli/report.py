"""``engine report RUN_DIR`` and the end of ``engine run``: the summary, report.md and charts.

Wired into :mod:`engine.cli.commands` by ``add_parser(sub)`` and ``COMMANDS["report"] =
cmd_report``; ``engine run`` calls :func:`finish_run` once the runner is done. What it
writes comes from :mod:`engine.run.report`, which reads the run folder alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from engine.core.console import RUN_LOG, make_console
from engine.core.errors import EngineError
from engine.run.report.files import make_report
from engine.run.report.summary import summarize
from engine.run.report.tables import stages_table
from engine.run.workdir import check_report_names


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "report", help="rebuild report.md and SVG charts (scores, cost, loss curves) for a run folder")
    parser.add_argument("run_dir", type=Path, help="the --workdir of an `engine run`")
    parser.add_argument("--no-charts", action="store_true", help="only report.md (no report/ folder)")
    return parser


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    """Rebuild the report of a run folder and say what was written."""
    check_report_names(args.run_dir)  # report.md and report/ are replaced only if the engine's
    md, charts, note = make_report(args.run_dir, charts=not args.no_charts)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"[green]wrote[/] {md}", highlight=False)
    for path in charts.values():
        console.print(f"[green]wrote[/] {path}", highlight=False)
    return 0


def finish_run(report: dict[str, Any], workdir: Path, recipe: Path, console: Console) -> None:
    """What ``engine run`` shows and writes at the end: the stage table, the summary (to
    stdout), and report.md with its charts rebuilt in the workdir. A report that cannot
    be written is a warning: the run's outputs are already in place."""
    out = make_console(stderr=False)
    out.print(stages_table(report))
    out.file.flush()
    summary = summarize(report, workdir, recipe=str(recipe)).text()
    sys.stdout.write("\n" + summary)
    sys.stdout.flush()
    log = workdir / RUN_LOG
    if log.is_file():  # the run log ends with what the run's reader saw last
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(summary)
    try:
        md, charts, _ = make_report(workdir, recipe=str(recipe))
    except (EngineError, OSError) as exc:
        console.print(f"[bold yellow]warning:[/] report.md not written: {escape(str(exc))}",
                      highlight=False, soft_wrap=True)
        return
    shown = f" and {len(charts)} charts in {md.parent / 'report'}" if charts else ""
    out.print(f"wrote {md}{shown}; report.json: {workdir / 'report.json'} "
              f"({report['wall_time_s']:.1f}s)", highlight=False)
