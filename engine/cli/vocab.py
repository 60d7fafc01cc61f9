"""``engine transplant-tokenizer``: give a model another tokenizer (a donor model's, or one
learned on target text), rows of shared tokens copied, the others made by an init method
(:mod:`engine.models.tokenizer.transplant`; docs/extend-tokenizer.md, "Transplant").

    engine transplant-tokenizer builtin:tiny-base --vocab-size 2048 --data lum.txt --data en.txt \\
        --init omp --output models/base-lum
    engine transplant-tokenizer models/sft --tokenizer models/base-lum --output models/sft-lum
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from engine.cli.common import escape, quiet_libraries
from engine.cli.coverage import _model_folder, add_init_flags, format_notes
from engine.core import outputs
from engine.core.errors import DataError, RecipeError
from engine.core.inputs import DataSource
from engine.data.files import detect_format
from engine.data.sources import iter_texts
from engine.models.tokenizer import coverage
from engine.models.tokenizer.inits import get_init, parse_init_params
from engine.models.tokenizer.transplant import transplant_tokenizer

__all__ = ["COMMANDS", "add_parsers", "cmd_transplant_tokenizer", "read_texts"]

#: the largest vocabulary --vocab-size learns
MAX_VOCAB = 1_000_000


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("transplant-tokenizer",
                       help="give a model another tokenizer; shared tokens keep their rows, new ones are initialised")
    p.add_argument("model", help="model folder (or builtin:tiny-base)")
    p.add_argument("--tokenizer", help="the tokenizer to take: a model or tokenizer folder with a "
                                       "tokenizer.json (or builtin:NAME)")
    p.add_argument("--vocab-size", type=int, help="instead of --tokenizer: learn a BPE of this many tokens "
                                                  "on --data with the model's own pre-tokenizer")
    p.add_argument("--data", type=Path, action="append", default=[], metavar="FILE",
                   help="text in the target language(s) (.txt or .jsonl with 'text'; repeatable): what "
                        "--vocab-size learns on and what omp/focus learn their auxiliary vectors on")
    p.add_argument("--min-frequency", type=int, default=2, help="with --vocab-size: a token occurs at least this often")
    p.add_argument("--output", type=Path, required=True,
                   help="the new model folder (apart from the model, the tokenizer and the data)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it is an earlier output of lingoforge")
    p.add_argument("--allow-disjoint", action="store_true",
                   help="go on when --tokenizer shares no token with the model's (every row is then made "
                        "by the init method; refused by default)")
    add_init_flags(p)


def read_texts(paths: list[Path], command: str) -> list[str]:
    """Every document of the text files ``paths`` (a missing file or non-text JSONL is an error)."""
    texts: list[str] = []
    for path in paths:
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if path.suffix == ".jsonl" and detect_format(path) != "text":
            raise DataError(f"{path}: {command} reads text data (.txt, or .jsonl with 'text')")
        texts.extend(iter_texts(DataSource(path=path)))
    return texts


def cmd_transplant_tokenizer(args: argparse.Namespace, console: Console) -> int:
    quiet_libraries()
    if (args.tokenizer is None) == (args.vocab_size is None):
        raise RecipeError("engine transplant-tokenizer: give --tokenizer DIR or --vocab-size N (with --data)")
    if args.vocab_size is not None and not 1 <= args.vocab_size <= MAX_VOCAB:
        raise RecipeError(f"engine transplant-tokenizer: --vocab-size must be at least 1 and at most "
                          f"{MAX_VOCAB}, not {args.vocab_size}")
    if args.vocab_size is not None and not args.data:
        raise RecipeError("engine transplant-tokenizer: --vocab-size learns the tokenizer on --data; give --data FILE")
    if args.min_frequency < 0:
        raise RecipeError(f"engine transplant-tokenizer: --min-frequency must be 0 or more, not {args.min_frequency}")
    folder = _model_folder(args.model)
    donor = _model_folder(args.tokenizer) if args.tokenizer else None
    out = Path(args.output).expanduser().absolute()
    outputs.check_disjoint(out, [("MODEL", folder), *([("--tokenizer", donor)] if donor else []),
                                 *(("--data", p) for p in args.data)], flag="--output")
    outputs.check_target(out, flag="--output", overwrite=args.overwrite)
    texts = read_texts(args.data, "transplant-tokenizer")
    init_params = parse_init_params(args.init_params)
    get_init(args.init)  # an unknown method or a missing package, before any work
    before = [coverage.measure_file(coverage.load_backend(folder), p) for p in args.data]
    result = transplant_tokenizer(folder, out, tokenizer=donor, vocab_size=args.vocab_size, texts=texts,
                                  init=args.init, init_params=init_params, seed=args.seed,
                                  min_frequency=args.min_frequency, overwrite=args.overwrite,
                                  allow_disjoint=args.allow_disjoint)
    console.print(f"[green]ok[/] {result.folder}: vocabulary {result.old_size} -> {result.new_size}; "
                  f"{result.shared} tokens shared (rows copied), {len(result.added)} rows by "
                  f"{result.init} in {result.seconds:.1f}s", highlight=False, soft_wrap=True)
    if result.notes:
        console.print(f"  init: {escape(format_notes(result.notes))}", highlight=False, soft_wrap=True)
    after_tok = coverage.load_backend(result.folder)
    for path, old in zip(args.data, before):
        new = coverage.measure_file(after_tok, path)
        console.print(f"  {path.name}: {old.tokens_per_word:.2f} -> {new.tokens_per_word:.2f} tokens/word",
                      highlight=False, soft_wrap=True)
    console.print("  train the new rows with ct's train_only: new-rows (docs/extend-tokenizer.md)",
                  highlight=False)
    sys.stdout.flush()
    return 0


COMMANDS = {"transplant-tokenizer": cmd_transplant_tokenizer}
