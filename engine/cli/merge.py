"""``engine merge``: a one-stage merge recipe from the command line.

    engine merge --method ties --base B --model A --model C --out O -p density=0.2

builds the recipe a user would otherwise write by hand (models named after their
folders, or ``--model NAME=PATH``; a model may be a PEFT LoRA adapter folder, merged as
its delta on ``--base``), validates it exactly as ``engine validate`` does
(params, architectures, safetensors headers), then runs it through the runner as a
one-stage recipe (:func:`engine.run.runner.run_stage`): into a hidden temporary folder beside
``--out`` that is renamed into place only when complete, with the stage's fingerprint and
report record saved inside it (``.lingoforge-stage.json``, as in every stage folder of
``engine run``). ``--out`` must lie apart from every input (not one of them, not their
parent, not inside one). An existing ``--out`` is refused unless ``--overwrite``, and even
then it is replaced only when the engine wrote it and it holds nothing else
(:mod:`engine.core.outputs`; checked again under a lock just before the rename, so of two merges
racing to one ``--out`` without ``--overwrite`` the second is refused); a failed merge
leaves it as it was. The same model given twice is refused unless both are named
(``--model a=PATH --model b=PATH``): its task vector would silently count twice. With ``--overwrite``, an ``--out`` that already holds this very merge
(same models, files, method, params and device) is a cache hit and is left as it is
(``--no-cache`` merges again). No report.json is written beside ``--out``: its parent is
the user's folder, not a workdir.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from engine.cli.common import EXIT_USER_ERROR, quiet_libraries
from engine.core import outputs
from engine.core.console import make_console
from engine.core.errors import EngineError, RecipeError
from engine.recipe.spec import parse_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import StageFailed, run_stage

__all__ = ["add_parser", "build_recipe", "cmd_merge", "speak"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``merge`` command to ``engine``'s subparsers."""
    p = subparsers.add_parser("merge", help="merge model folders with one method (no recipe file)")
    p.add_argument("--method", required=True, help="merge plugin: ties, dare-ties, task-arithmetic, "
                                                   "slack-ties, linear, or a third-party one")
    p.add_argument("--base", metavar="[NAME=]PATH",
                   help="base model folder (task-vector methods need one); NAME defaults to the "
                        "folder's name")
    p.add_argument("--model", dest="models", action="append", required=True, metavar="[NAME=]PATH",
                   help="model folder, or PEFT LoRA adapter folder (needs --base), to merge "
                        "(repeatable); NAME defaults to the folder's name")
    p.add_argument("--out", required=True, type=Path, help="output model folder")
    p.add_argument("-p", "--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, VALUE read as YAML: -p density=0.2 "
                        "-p 'weight={a: 1.0, b: 0.5}' (repeatable)")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs (default: cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (unless it already holds this same merge: "
                        "same models, files, method, params and device; then it is kept, cached)")
    p.add_argument("--no-cache", action="store_true",
                   help="with --overwrite, merge again even when --out already holds this merge")
    return p


def _named(arg: str, taken: set[str]) -> tuple[str, Path]:
    name, sep, path = arg.partition("=")
    if not sep or "/" in name:
        name, path = "", arg
    name = name or _SAFE.sub("-", Path(path).resolve().name).strip("-.") or "model"
    unique, i = name, 2
    while unique in taken:
        unique, i = f"{name}-{i}", i + 1
    taken.add(unique)
    return unique, Path(path).expanduser().resolve()


def _explicit(arg: str) -> bool:
    """Whether a ``--model``/``--base`` argument names its model (``NAME=PATH``)."""
    name, sep, _ = arg.partition("=")
    return bool(sep and name and "/" not in name)


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"-p {pair!r}: write KEY=VALUE, e.g. -p density=0.2")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise RecipeError(f"-p {pair!r}: value is not valid YAML ({exc})") from None
    return out


def _check_folder(flag: str, arg: str) -> None:
    """``--base``/``--model`` must name an existing folder (said in the command's terms)."""
    _, sep, raw = arg.partition("=")
    raw = raw if sep and "/" not in arg.partition("=")[0] else arg
    path = Path(raw).expanduser().resolve()
    where = f"{flag} {raw}" + (f" ({path})" if str(path) != raw else "")
    if not path.exists():
        raise RecipeError(f"{where}: no such folder")
    if not path.is_dir():
        raise RecipeError(f"{where}: is a file, not a model folder")


def build_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe mapping ``engine merge`` runs (stage name ``merged``)."""
    taken: set[str] = {"merged"}
    models: dict[str, dict[str, str]] = {}
    stage: dict[str, Any] = {"name": "merged", "stage": "merge", "plugin": args.method,
                             "params": _params(args.params), "runtime": {"device": args.device}}
    if args.base:
        name, path = _named(args.base, taken)
        models[name] = {"path": str(path)}
        stage["base"] = name
    stage["models"] = []
    seen: dict[Path, str] = {}  # (the base given as a model too adds a zero task vector: allowed)
    for arg in args.models:
        name, path = _named(arg, taken)
        if path in seen and not (_explicit(arg) and _explicit(seen[path].split(" ", 1)[1])):
            # its task vector would count twice, silently; naming both says it is meant
            raise RecipeError(f"--model {arg}: {path} is already given as {seen[path]}; each model "
                              "is merged once (weight it with -p 'weight={NAME: 2.0}' instead, or "
                              "name both, --model a=PATH --model b=PATH, to merge it twice on purpose)")
        seen[path] = f"--model {arg}"
        models[name] = {"path": str(path)}
        stage["models"].append(name)
    return {"name": "engine-merge", "models": models, "stages": [stage]}


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    """Validate and run the merge; 0 on success (errors raise :class:`EngineError`)."""
    out = Path(args.out).expanduser().absolute()
    flags = _flags(args)
    try:
        if args.base:
            _check_folder("--base", args.base)
        for arg in args.models:
            _check_folder("--model", arg)
        recipe_map = build_recipe(args)
        inputs = [(f"{flags.get(name, '--model')} {name}", Path(spec["path"]))
                  for name, spec in recipe_map["models"].items()]
        outputs.check_disjoint(out, inputs, flag="--out")
        outputs.check_target(out, flag="--out", overwrite=args.overwrite)
        recipe = parse_recipe(recipe_map, "engine merge")
        plan = plan_recipe(recipe, Path.cwd(), "engine merge")
        stage = plan.stages[0]
        started = time.perf_counter()
        try:
            record = run_stage(plan, out, console=console, overwrite=args.overwrite, flag="--out",
                               use_cache=not getattr(args, "no_cache", False), announce=False)
        except StageFailed as exc:  # the error as the merge raised it: there is no stage to name
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise cause from cause.__cause__
    except EngineError as exc:  # in the command's terms: no recipe keys, no stage 'merged'
        exc.args = (speak(str(exc), flags), *exc.args[1:])
        raise
    count = len(stage.spec.models or [])
    if record.get("cache") == "hit":
        console.print(f"[cyan]cached[/] {out} already holds this merge of {count} model(s) with "
                      f"{stage.spec.plugin} (same models, files and params); nothing written",
                      highlight=False)
        return 0
    notes = record.get("notes", {}).get("merge", {})
    console.print(f"[green]merged[/] {count} model(s) with {stage.spec.plugin} into "
                  f"{out}: {notes.get('tensors', '?')} tensors, {notes.get('shards', '?')} shard(s), "
                  f"{time.perf_counter() - started:.1f}s", highlight=False)
    return 0


def _flags(args: argparse.Namespace) -> dict[str, str]:
    """Recipe model name -> how the command line gave it (``--base NAME``, ``--model NAME``)."""
    taken: set[str] = {"merged"}
    flags = {}
    if args.base:
        flags[_named(args.base, taken)[0]] = "--base"
    for arg in args.models:
        flags[_named(arg, taken)[0]] = "--model"
    return flags


#: recipe words of a synthesized merge recipe -> the command's own (applied in order)
_WORDS = [
    (re.compile(r"\(recipe key 'base'(, engine merge --base)?\)"), "(--base)"),
    (re.compile(r"recipe key 'base'(, engine merge --base)?"), "--base"),
    (re.compile(r"\(recipe key 'models'\)"), "(--model)"),
    (re.compile(r"recipe key 'models'"), "--model"),
    (re.compile(r"no merge plugin named '([^']+)'"), r"--method \1: no merge method of that name"),
    (re.compile(r"stage 'merged' \(merge\): "), ""),
    (re.compile(r"stage 'merged' params\.([A-Za-z0-9_-]+)"), r"-p \1"),
    (re.compile(r"stage 'merged' runtime\.device"), "--device"),
    (re.compile(r"stage 'merged': "), ""),
    (re.compile(r"stage 'merged'"), "the merge"),
    (re.compile(r"(?<![\w.-])params\.([A-Za-z0-9_-]+)"), r"-p \1"),
    (re.compile(r"\bstage's models\b"), "--model folders"),
]


def speak(message: str, flags: dict[str, str]) -> str:
    """An error about the synthesized recipe, in ``engine merge``'s terms: ``--base``,
    ``--model NAME``, ``-p KEY`` and ``--device`` instead of recipe keys, model entries and
    the stage ``merged`` the user never wrote."""
    for pattern, repl in _WORDS:
        message = pattern.sub(repl, message)

    def model(match: re.Match[str]) -> str:
        name = match.group(2)
        flag = flags.get(name)
        return f"{flag} {name}" if flag else match.group(0)

    message = re.sub(r"models\.([A-Za-z0-9._-]+):",
                     lambda m: f"{flags[m.group(1)]} {m.group(1)}:" if m.group(1) in flags else m.group(0),
                     message)
    return re.sub(r"\b(base|model) '([^']+)'", model, message)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.cli.merge ...`` (the same as ``engine merge ...``), for
    benchmarks that run the merge in a subprocess of its own."""
    import sys

    parser = argparse.ArgumentParser(prog="engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["merge", *(sys.argv[1:] if argv is None else argv)])
    console = make_console()
    quiet_libraries()
    try:
        return cmd_merge(args, console)
    except EngineError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
