"""What the ``engine`` commands share: exit codes, quiet libraries, console escapes and the
recipe file turned into a validated plan.

A module of its own below :mod:`engine.cli.commands` (which wires every command) and the
command modules (:mod:`engine.cli.coverage`, :mod:`engine.cli.merge`, :mod:`engine.cli.ops`),
so that a command module never imports the one that wires it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape as rich_escape

from engine.models.tokenizer.coverage import coverage_warnings
from engine.recipe.plan import Plan
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe

__all__ = ["EXIT_STAGE_FAILED", "EXIT_USER_ERROR", "escape", "load_plan", "print_warnings",
           "quiet_libraries"]

#: a user's error (bad recipe, missing file, full disk): one message, no traceback
EXIT_USER_ERROR = 2
#: a stage failed for a reason the engine did not foresee (a bug, not bad input)
EXIT_STAGE_FAILED = 1


def quiet_libraries() -> None:
    """No hub traffic and no third-party progress bars inside ours.

    transformers reads its verbosity and the hub's progress-bar switch from the environment
    when it is first imported; a command that never needs it (extend-tokenizer, say) so
    does not pay its import (about 1.5 s) to silence it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: its settings are read, set them
        from transformers.utils import logging as hf_logging  # start-up speed: only when imported

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def escape(text: str) -> str:
    """``text`` with rich markup escaped, for a console line that shows it as written."""
    return rich_escape(text)


def load_plan(recipe_path: Path, overrides: list[str], coverage: bool = False) -> Plan:
    """The recipe file with ``--set`` overrides, validated into a plan (``coverage``: with the
    tokenizer coverage warnings)."""
    recipe = load_recipe(recipe_path, overrides)
    plan = plan_recipe(recipe, recipe_path.resolve().parent, str(recipe_path))
    if coverage:  # reads tokenizer files and a bounded sample of the data, no weights
        plan.warnings += coverage_warnings(plan)
    return plan


def print_warnings(console: Console, plan: Any) -> None:
    """The plan's warnings, one ``warning:`` line each (they do not stop the command)."""
    for line in getattr(plan, "warnings", []):
        console.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
