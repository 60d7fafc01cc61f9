"""The ``engine`` command line.

Errors a user can cause print one short message naming the file, stage or field
and exit with status 2; a stage that fails for a reason the engine did not foresee
(a bug, not bad input) exits with status 1. ``engine validate`` prints every problem
it finds, one ``error:`` line each. A full disk is a user error too: the message names
the file being written. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from engine import __version__
from engine.cli import api_reference
from engine.cli import coverage as cli_coverage
from engine.cli import merge as cli_merge
from engine.cli import ops as cli_ops
from engine.cli import report as cli_report
from engine.cli import vocab as cli_vocab
from engine.cli.common import (
    EXIT_STAGE_FAILED,
    EXIT_USER_ERROR,
    escape,
    load_plan,
    print_warnings,
    quiet_libraries,
)
from engine.core.console import make_console
from engine.core.errors import EngineError
from engine.recipe.schema import json_schema, markdown
from engine.registry.info import plugins_info
from engine.run.runner import Runner, StageFailed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engine",
        description="lingoforge: adapt multilingual LLMs to languages by training less and merging more.",
    )
    parser.add_argument("--version", action="version", version=f"lingoforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("--workdir", type=Path, help="output folder (default: runs/<recipe name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value, e.g. stages.ct-lum.params.steps=10 (repeatable)")
    run.add_argument("--no-cache", action="store_true", help="re-run stages even if their output is current")
    cli_ops.add_run_flags(run)
    cli_coverage.add_skip_flag(run)

    validate = sub.add_parser("validate", help="check a recipe without loading weights")
    validate.add_argument("recipe", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    cli_coverage.add_skip_flag(validate)

    plugins = sub.add_parser("plugins", help="list loaded plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")

    cli_merge.add_parser(sub)
    cli_report.add_parser(sub)
    cli_ops.add_parsers(sub)
    cli_coverage.add_parsers(sub)
    cli_vocab.add_parsers(sub)

    schema = sub.add_parser("schema", help="print the recipe JSON schema (plugin params included)")
    schema.add_argument("--markdown", action="store_true", help="print the recipe reference instead")
    schema.add_argument("--api", action="store_true",
                        help="print the plugin API reference (docs/api-reference.md) instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = make_console()
    try:
        return COMMANDS[args.command](args, console)
    except KeyboardInterrupt as exc:  # what was kept, and the command that resumes
        cli_ops.print_interrupted(console, args, getattr(exc, "kept", None))
        return 130
    except EngineError as exc:
        if args.debug:
            console.print_exception()

        cause = exc.__cause__
        disk_full = _disk_full(cause, getattr(args, "output_dir", None))
        message = str(exc)
        if disk_full is not None:
            message = f"{message.split(':', 1)[0]}: {disk_full}"
        for line in message.splitlines() or [""]:
            _error_line(console, line)
        unforeseen = (isinstance(exc, StageFailed) and disk_full is None
                      and not isinstance(cause, EngineError))
        if unforeseen and not args.debug:
            console.print("[dim](run with --debug for the traceback)[/]")
        return EXIT_STAGE_FAILED if unforeseen else EXIT_USER_ERROR
    except OSError as exc:
        disk_full = _disk_full(exc, getattr(args, "output_dir", None))
        if disk_full is None:
            raise
        if args.debug:
            console.print_exception()
        _error_line(console, disk_full)
        return EXIT_USER_ERROR


def _error_line(console: Console, line: str) -> None:
    """One ``error:`` line, never wrapped (a message is one line a user can grep)."""
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


#: how out-of-space errors read when they come through a library that wraps them
#: (safetensors raises its own error type carrying the OS message)
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _disk_full(exc: BaseException | None, output_dir: Path | None = None) -> str | None:
    """The message for an out-of-space error (ENOSPC, EDQUOT), naming the file being
    written (or the output folder when the error does not say); else None."""
    if exc is None:
        return None
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = exc.strerror or "no space left"
        where = exc.filename
    elif any(text in str(exc) for text in _DISK_FULL_TEXT):
        reason, where = "No space left on device", None
    else:
        return None
    where = where or (f"into {output_dir}" if output_dir is not None else "the output")
    return (f"disk full while writing {where} ({reason}); free space or choose another "
            "--workdir (the unfinished output was removed)")


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    plan = load_plan(args.recipe, args.overrides, coverage=not getattr(args, "no_coverage", False))
    print_warnings(console, plan)
    console.print(f"[green]ok[/] {args.recipe}: {len(plan.stages)} stages in order: "
                  + " -> ".join(s.name for s in plan.stages), highlight=False, soft_wrap=True)
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    quiet_libraries()

    plan = load_plan(args.recipe, args.overrides, coverage=not getattr(args, "no_coverage", False))
    print_warnings(console, plan)
    workdir = args.workdir or Path("runs") / plan.recipe.name
    args.output_dir = workdir  # named by a disk-full message and by a Ctrl-C's resume command
    selection = cli_ops.selection(plan, args)
    if args.dry_run:
        return cli_ops.dry_run(plan, args, workdir)
    console.print(f"[bold]lingoforge[/] running [cyan]{plan.recipe.name}[/] "
                  f"({len(plan.stages)} stages) into {workdir}", highlight=False)
    try:
        report = Runner(plan, workdir, console=console, use_cache=not args.no_cache,
                        selection=selection).run()
    except cli_ops.run_status.MissingInputs as exc:
        raise cli_ops.missing_inputs_error(exc, args, workdir) from None
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel run: the main process reports
        return 0
    cli_report.finish_run(report, workdir, args.recipe, console)  # summary, report.md, charts
    return 0


def cmd_plugins(args: argparse.Namespace, console: Console) -> int:
    """Each plugin and what it registers, one line per implementation with its description;
    an implementation whose optional dependency is missing says which extra installs it
    (``--json``: the same fields, :func:`engine.registry.info.plugins_info`)."""
    info = plugins_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="plugins")
    for col in ("plugin", "distribution", "registers"):
        table.add_column(col, overflow="fold")
    for row in info:
        lines = []
        for kind, items in row["registers"].items():
            for item in items:
                line = f"{kind} [bold]{escape(item['name'])}[/]"
                if item.get("description"):
                    line += f": {escape(item['description'])}"
                if item.get("needs"):
                    line += f"\n  [yellow]{escape(item['needs'])}[/]"
                if item.get("clash"):  # a name another plugin also registers
                    line += f"\n  [yellow]{escape(item['clash'])}[/]"
                lines.append(line)
        regs = "\n".join(lines)
        if row.get("broken"):
            regs = f"[red]broken: {escape(row['broken'])}[/]"
        elif row.get("skipped"):
            regs = f"[yellow]not loaded: {escape(row['skipped'])}[/]"
        table.add_row(row["name"], f"{row['distribution']} {row['version']}", regs)
    make_console(stderr=False).print(table)
    return 0


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    if args.api:
        sys.stdout.write(api_reference.markdown())
        return 0
    sys.stdout.write(markdown() if args.markdown else json.dumps(json_schema(), indent=2) + "\n")
    return 0


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins, "schema": cmd_schema,
            "merge": cli_merge.cmd_merge, "report": cli_report.cmd_report,
            "status": cli_ops.cmd_status, "cache": cli_ops.cmd_cache}
COMMANDS.update(cli_coverage.COMMANDS)
COMMANDS.update(cli_vocab.COMMANDS)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
