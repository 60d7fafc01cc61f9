"""``engine coverage`` and ``engine extend-tokenizer``: how well a tokenizer covers a
language's text (:mod:`engine.models.tokenizer.coverage`), and extending it (:mod:`engine.models.tokenizer.extend`).
The ``--no-coverage`` flag of ``engine validate`` / ``engine run`` is added here too."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from engine import world
from engine.cli.common import escape, load_plan, quiet_libraries
from engine.core import outputs
from engine.core.console import make_console
from engine.core.errors import DataError, RecipeError
from engine.core.inputs import DataSource
from engine.core.stages import kind_of
from engine.data.files import detect_format
from engine.data.sources import iter_texts
from engine.models.tokenizer import coverage
from engine.models.tokenizer.extend import extend_tokenizer
from engine.models.tokenizer.inits import get_init, parse_init_params

BUILTIN = "builtin:"
#: the most tokens one extension adds (the BPE trainer allocates for the whole request up front)
MAX_NEW_TOKENS = 1_000_000


def add_skip_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-coverage", action="store_true",
                        help="skip the tokenizer coverage warnings (or set LINGOFORGE_NO_COVERAGE=1)")


def add_parsers(sub: Any) -> None:
    cov = sub.add_parser("coverage", help="how well a tokenizer covers a recipe's (or a file's) text")
    cov.add_argument("recipe", type=Path, nargs="?", help="measure every training stage's text data")
    cov.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    cov.add_argument("--tokenizer", help="a model folder (or builtin:tiny-base) instead of a recipe")
    cov.add_argument("--data", type=Path, action="append", default=[], metavar="FILE",
                     help="a text file (.txt, or .jsonl with 'text') to measure (repeatable); "
                          "the first is the reference the others are compared with when --reference is not given")
    cov.add_argument("--reference", type=Path, help="text in a language the tokenizer covers well")
    cov.add_argument("--json", action="store_true", help="machine-readable output")
    ext = sub.add_parser("extend-tokenizer", help="add tokens for a new language and resize the embeddings")
    ext.add_argument("model", help="model folder (or builtin:tiny-base)")
    ext.add_argument("--data", type=Path, action="append", required=True, metavar="FILE",
                     help="text in the new language (.txt or .jsonl with 'text'; repeatable)")
    ext.add_argument("--tokens", type=int, default=1000, help="how many tokens to add at most (default 1000)")
    ext.add_argument("--min-frequency", type=int, default=2, help="a new token occurs at least this often")
    ext.add_argument("--output", type=Path, required=True,
                     help="the new model folder (apart from the model and the data)")
    ext.add_argument("--overwrite", action="store_true",
                     help="replace --output if it is an earlier output of lingoforge (a folder "
                          "lingoforge did not write is never replaced)")
    add_init_flags(ext)


def add_init_flags(parser: argparse.ArgumentParser) -> None:
    """``--init``, ``--init-param`` and ``--seed``: how the rows of new tokens are made."""
    parser.add_argument("--init", default="mean", metavar="METHOD",
                        help="how the rows of new tokens are made: mean (default), omp, focus, random, "
                             "or a plugin's method (docs/extend-tokenizer.md)")
    parser.add_argument("--init-param", dest="init_params", action="append", default=[],
                        metavar="KEY=VALUE", help="an option of the init method (repeatable), e.g. k=8")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init method (default 0)")


def _model_folder(name: str) -> Path:
    if name.startswith(BUILTIN):
        return world.model_path(name[len(BUILTIN):])
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"{folder}: no such model folder")
    return folder


def _rows_for_files(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not args.data:
        raise RecipeError("engine coverage: give a RECIPE, or --tokenizer DIR and --data FILE")
    folder = _model_folder(args.tokenizer)
    tok = coverage.load_backend(folder)
    for path in [*args.data, *([args.reference] if args.reference else [])]:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
    ref_path = args.reference or (args.data[0] if len(args.data) > 1 else None)
    ref = coverage.measure_file(tok, ref_path) if ref_path else None
    rows = []
    for path in args.data:
        cov = coverage.measure_file(tok, path)
        own_ref = None if path == ref_path else ref
        rows.append({"stage": "", "data": str(path), "language": path.stem, "tokenizer": str(folder),
                     **cov.to_dict(), "poor": coverage.poor_coverage(cov, own_ref)})
    return rows


def _rows_for_recipe(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    plan = load_plan(args.recipe, args.overrides)
    rows = []
    for stage in plan.stages:
        if not kind_of(stage.spec.stage).trains or stage.spec.model is None:
            continue
        folder = coverage._stage_tokenizer(plan, stage.spec.model)
        if folder is None:
            continue
        tok = coverage.load_backend(folder)
        for source in stage.data:
            if source.format != "text":
                continue
            cov = coverage.measure(tok, coverage.sample(source))
            rows.append({"stage": stage.name, "data": str(source.path), "language": source.label,
                         "tokenizer": str(folder), **cov.to_dict()})
    warnings = coverage.coverage_warnings(plan)
    return rows, warnings


def cmd_coverage(args: argparse.Namespace, console: Console) -> int:
    if args.recipe is not None:
        rows, warnings = _rows_for_recipe(args)
    else:
        if not args.tokenizer:
            raise RecipeError("engine coverage: give a RECIPE, or --tokenizer DIR and --data FILE")
        rows = _rows_for_files(args)
        warnings = [f"{r['data']}: {'; '.join(r['poor'])}" for r in rows if r["poor"]]
    if args.json:
        print(json.dumps({"rows": rows, "warnings": warnings}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="tokenizer coverage")
    for col in ("stage", "data", "tokens/word", "bytes/token", "single-byte", ">= 4 tokens", "documents"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["stage"] or "-", escape(Path(r["data"]).name), f"{r['tokens_per_word']:.2f}",
                      f"{r['bytes_per_token']:.2f}", f"{r['byte_share']:.1%}", f"{r['long_word_share']:.1%}",
                      str(r["documents"]))
    make_console(stderr=False).print(table)
    for line in warnings:
        console.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if not warnings:
        console.print("[green]ok[/] no poorly covered text", highlight=False)
    return 0


def cmd_extend_tokenizer(args: argparse.Namespace, console: Console) -> int:
    quiet_libraries()

    if not 1 <= args.tokens <= MAX_NEW_TOKENS:
        raise RecipeError(f"engine extend-tokenizer: --tokens must be at least 1 and at most "
                          f"{MAX_NEW_TOKENS}, not {args.tokens}")
    if args.min_frequency < 0:
        raise RecipeError(f"engine extend-tokenizer: --min-frequency must be 0 or more, not "
                          f"{args.min_frequency}")
    folder = _model_folder(args.model)
    for path in args.data:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
    out = Path(args.output).expanduser().absolute()
    outputs.check_disjoint(out, [("MODEL", folder), *(("--data", p) for p in args.data)],
                           flag="--output")
    outputs.check_target(out, flag="--output", overwrite=args.overwrite)
    texts: list[str] = []
    for path in args.data:
        if path.suffix == ".jsonl" and detect_format(path) != "text":
            raise DataError(f"{path}: extend-tokenizer reads text data (.txt, or .jsonl with 'text')")
        texts.extend(iter_texts(DataSource(path=path)))
    before = [coverage.measure_file(coverage.load_backend(folder), p) for p in args.data]
    init_params = parse_init_params(args.init_params)
    get_init(args.init)  # an unknown method or a missing package, before any work
    result = extend_tokenizer(folder, texts, out, new_tokens=args.tokens,
                              min_frequency=args.min_frequency, overwrite=args.overwrite,
                              init=args.init, init_params=init_params, seed=args.seed)
    after_tok = coverage.load_backend(result.folder)
    console.print(f"[green]ok[/] {result.folder}: {len(result.added)} tokens added, vocabulary "
                  f"{result.old_size} -> {result.new_size}, rows by {result.init} in "
                  f"{result.seconds:.1f}s", highlight=False, soft_wrap=True)
    if result.notes:
        console.print(f"  init: {escape(format_notes(result.notes))}", highlight=False, soft_wrap=True)
    for path, old in zip(args.data, before):
        new = coverage.measure_file(after_tok, path)
        console.print(f"  {path.name}: {old.tokens_per_word:.2f} -> {new.tokens_per_word:.2f} tokens/word, "
                      f"single-byte {old.byte_share:.0%} -> {new.byte_share:.0%}", highlight=False,
                      soft_wrap=True)
    console.print("  train it with train_embeddings: true (docs/extend-tokenizer.md)", highlight=False)
    sys.stdout.flush()
    return 0


def format_notes(notes: dict[str, Any]) -> str:
    """An init method's notes on one line: ``key value, ...``."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in notes.items())


COMMANDS = {"coverage": cmd_coverage, "extend-tokenizer": cmd_extend_tokenizer}
