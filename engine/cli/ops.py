"""Operating a workdir: ``engine status``, ``engine cache ls|prune``, ``engine run
--dry-run/--only/--from``, and what a Ctrl-C prints.

    engine status recipes/quickstart.yaml --set stages.ct-lum.params.steps=10
    engine cache ls recipes/quickstart.yaml        # or: engine cache ls --workdir runs/x
    engine cache prune --workdir runs/x --keep 1 --dry-run

``status`` reads fingerprints only (no model is loaded, nothing is written): per stage
whether its kept version is current, another kept version matches (reused without work),
or it is stale and why, and the list of stages ``engine run`` would run. ``cache ls``
lists every kept version of every stage; ``cache prune`` deletes versions that are not
current (all but the newest ``--keep`` of them) and orphaned checkpoints, holding the
workdir's lock. The layout and semantics: :mod:`engine.run.stage_cache`, :mod:`engine.run.status`,
docs/operations.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
from pathlib import Path
from typing import Any

from rich.console import Console

from engine.cli.common import load_plan
from engine.core.errors import EngineError, RecipeError
from engine.run import stage_cache
from engine.run import status as run_status
from engine.run.lock import WorkdirLock
from engine.training.checkpoint import CheckpointDir

__all__ = ["add_parsers", "add_run_flags", "cmd_cache", "cmd_status", "dry_run",
           "missing_inputs_error", "print_interrupted", "resume_command", "selection"]


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """``engine run``'s selection flags."""
    run.add_argument("--dry-run", action="store_true",
                     help="print what would run and why (as engine status), run and write nothing")
    run.add_argument("--only", action="append", default=[], metavar="STAGE",
                     help="run only this stage (repeatable); the stages it reads must be cached")
    run.add_argument("--from", dest="from_stages", action="append", default=[], metavar="STAGE",
                     help="re-run this stage and everything downstream of it even when cached "
                          "(repeatable); upstream stages come from the cache")


def add_parsers(sub: Any) -> None:
    """Add ``status`` and ``cache`` to ``engine``'s subparsers."""
    status = sub.add_parser("status", help="what is up to date, stale (and why) and what a run would run")
    status.add_argument("recipe", type=Path)
    status.add_argument("--workdir", type=Path, help="output folder (default: runs/<recipe name>)")
    status.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    cache = sub.add_parser("cache", help="list or prune the kept versions of a workdir's stages")
    verbs = cache.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", help="every kept version: fingerprint, current, created, size, wall time")
    prune = verbs.add_parser("prune", help="delete versions that are not current, and orphaned checkpoints")
    prune.add_argument("--keep", type=int, default=0, metavar="N",
                       help="keep the newest N versions besides the current one (default 0)")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    for p in (ls, prune):
        p.add_argument("recipe", type=Path, nargs="?", help="a recipe (its workdir is runs/<name>)")
        p.add_argument("--workdir", type=Path, help="the workdir (instead of, or with, RECIPE)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def _plan_and_workdir(args: argparse.Namespace) -> tuple[Any, Path]:
    plan = load_plan(args.recipe, args.overrides)
    return plan, Path(args.workdir or Path("runs") / plan.recipe.name)


def selection(plan: Any, args: argparse.Namespace) -> run_status.Selection:
    return run_status.Selection.from_args(plan, getattr(args, "only", []) or [],
                                          getattr(args, "from_stages", []) or [])


def _print_status(statuses: list[run_status.StageStatus], workdir: Path, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"workdir": str(workdir), "stages": [vars(s) for s in statuses],
                          "would_run": [s.name for s in statuses if s.action == "run"]}, indent=2))
        return
    print(f"workdir {workdir}")
    for line in run_status.format_status(statuses):
        print(line)


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    plan, workdir = _plan_and_workdir(args)
    _print_status(run_status.plan_status(plan, workdir), workdir, args.json)
    return 0


def dry_run(plan: Any, args: argparse.Namespace, workdir: Path) -> int:
    """``engine run --dry-run``: the status under the run's flags; nothing runs or is written."""
    sel = selection(plan, args)
    statuses = run_status.plan_status(plan, workdir, sel, use_cache=not args.no_cache)
    _print_status(statuses, workdir, False)
    try:
        run_status.check_only_inputs(statuses, sel)
    except run_status.MissingInputs as exc:
        raise missing_inputs_error(exc, args, workdir) from None
    return 0


def _base_command(args: argparse.Namespace, workdir: Path) -> list[str]:
    cmd = ["engine", "run", str(args.recipe), "--workdir", str(workdir)]
    for item in args.overrides:
        cmd += ["--set", item]
    return cmd


def missing_inputs_error(exc: run_status.MissingInputs, args: argparse.Namespace,
                         workdir: Path) -> RecipeError:
    """The ``--only`` refusal, ending with the command that produces the missing inputs."""
    cmd = _base_command(args, workdir)
    for name in exc.produce or exc.inputs:
        cmd += ["--only", name]
    return RecipeError(f"{exc}\nproduce it first: {shlex.join(cmd)}")


def resume_command(args: argparse.Namespace, workdir: Path, kept: dict[str, Any] | None) -> str:
    """The command that continues an interrupted run: the same recipe, workdir, ``--set`` and
    ``--only``; ``--from``/``--no-cache`` become ``--from`` the forced stages not finished
    yet, so what this run finished is reused."""
    cmd = _base_command(args, workdir)
    for name in getattr(args, "only", []) or []:
        cmd += ["--only", name]
    forced = list(getattr(args, "from_stages", []) or [])
    if forced or getattr(args, "no_cache", False):
        done = {f["name"] for f in (kept or {}).get("finished", [])}
        try:
            plan = load_plan(args.recipe, args.overrides)
            sel = selection(plan, args)
            order = [s for s in plan.stages if args.no_cache or s.name in sel.forced]
        except EngineError:
            order = []
        left = {s.name for s in order if s.name not in done}
        for s in order:
            refs = {r for v in s.spec.references().values() for r in v}
            if s.name in left and not refs & left:
                cmd += ["--from", s.name]
    return shlex.join(cmd)


def print_interrupted(console: Console, args: argparse.Namespace, kept: dict[str, Any] | None) -> None:
    """What a Ctrl-C kept, and the command that resumes."""
    console.print("[red]interrupted[/]", highlight=False)
    if getattr(args, "command", None) != "run":
        return
    workdir = Path(kept["workdir"]) if kept else getattr(args, "output_dir", None)
    for item in (kept or {}).get("finished", []):
        how = "reused from the cache" if item.get("cache") == "hit" else "finished"
        console.print(f"kept: {item['name']} ({how}) in {item['output']}", highlight=False, soft_wrap=True)
    active = (kept or {}).get("interrupted")
    if active is not None:
        name, root = active["stage"], active.get("checkpoint_dir")
        steps = CheckpointDir(Path(root)).steps() if root else []
        total = f" of {active['steps']}" if active.get("steps") else ""
        if steps:
            console.print(f"kept: {name} checkpoint at step {steps[-1]}{total} in "
                          f"{Path(root) / f'step-{steps[-1]}'}; the next run resumes from it",
                          highlight=False, soft_wrap=True)
        elif active.get("checkpoint_every") is not None:
            console.print(f"not kept: {name} had no checkpoint yet (checkpoint_every "
                          f"{active['checkpoint_every']}); the next run starts it over",
                          highlight=False, soft_wrap=True)
        else:
            console.print(f"not kept: {name} (its partial output was removed); the next run "
                          "redoes it", highlight=False, soft_wrap=True)
    if workdir is not None:
        console.print(f"resume with: {resume_command(args, Path(workdir), kept)}",
                      highlight=False, soft_wrap=True, markup=False)


# --- engine cache ----------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _workdir_and_stages(args: argparse.Namespace) -> tuple[Path, list[str], Any]:
    plan = None
    if args.recipe is not None:
        plan, workdir = _plan_and_workdir(args)
    elif args.workdir is not None:
        workdir = Path(args.workdir)
    else:
        raise RecipeError(f"engine cache {args.verb}: name a RECIPE or --workdir")
    if not workdir.is_dir():
        raise RecipeError(f"workdir {workdir} does not exist")
    names = [s.name for s in plan.stages] if plan is not None else []
    root = workdir / stage_cache.STAGES_DIR
    names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in names) \
        if root.is_dir() else []
    names += sorted(p.name for p in workdir.iterdir() if p.name not in names and not p.is_symlink()
                    and stage_cache.read_marker(p) is not None)
    return workdir, names, plan


def cmd_cache(args: argparse.Namespace, console: Console) -> int:
    workdir, names, plan = _workdir_and_stages(args)
    if args.verb == "ls":
        rows = [{"stage": n, "fingerprint": v.fingerprint, "current": v.current, "created": v.created,
                 "size_bytes": v.size(), "wall_time_s": v.wall_time_s, "path": str(v.folder)}
                for n in names for v in stage_cache.versions(workdir, n)]
        if args.json:
            print(json.dumps({"workdir": str(workdir), "versions": rows}, indent=2))
            return 0
        print(f"workdir {workdir}: {len(rows)} kept version(s), "
              f"{_size(sum(r['size_bytes'] for r in rows))}")
        width = max((len(r["stage"]) for r in rows), default=5)
        for r in rows:
            wall = f"{r['wall_time_s']:.1f}s" if r["wall_time_s"] is not None else "-"
            print(f"{r['stage']:<{width}}  {r['fingerprint']}  {'current' if r['current'] else '       '}  "
                  f"{r['created']}  {_size(r['size_bytes']):>9}  {wall:>8}")
        return 0
    return _prune(args, workdir, names, plan)


def _tree_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _prune(args: argparse.Namespace, workdir: Path, names: list[str], plan: Any) -> int:
    """Delete kept versions that are neither current nor (with a recipe) what the recipe
    would reuse, and checkpoints of finished or abandoned stages. Under the workdir lock
    (not for ``--dry-run``, which deletes nothing); each folder is first renamed aside
    (:func:`engine.run.stage_cache.discard`), so a killed prune never leaves a half-deleted
    version that looks complete. Only what the engine wrote is deleted."""
    if args.keep < 0:
        raise RecipeError(f"--keep {args.keep}: give 0 or more")
    lock = contextlib.nullcontext() if args.dry_run else WorkdirLock(workdir)
    with lock:
        if not args.dry_run:
            stage_cache.remove_stale_temporaries(workdir)  # what a killed run or prune left
        doomed, kept = _doomed(args, workdir, names, plan)
        freed = 0
        for what, folder in doomed:
            size = _tree_size(folder)
            freed += size
            print(f"{'would remove' if args.dry_run else 'removed'} {what} ({_size(size)}): {folder}")
            if not args.dry_run:
                stage_cache.discard(folder)
        if not args.dry_run:
            for parent in {f.parent for _, f in doomed}:
                try:
                    parent.rmdir()  # an emptied stage or checkpoint folder
                except OSError:
                    pass
    for line in kept:
        print(line)
    print(f"{'would free' if args.dry_run else 'freed'} {freed} bytes ({_size(freed)}) in {workdir}")
    return 0


def _doomed(args: argparse.Namespace, workdir: Path, names: list[str],
            plan: Any) -> tuple[list[tuple[str, Path]], list[str]]:
    """What a prune deletes (label, folder), and lines saying what it keeps and why."""
    wanted: dict[str, str] = {}
    recipe_file = None
    if plan is not None:
        fps = run_status.fingerprints(plan, run_status.model_fingerprints(plan))
        wanted = {s.name: fps[s.name] for s in plan.stages}
        recipe_file = str(Path(plan.source).resolve())
    doomed: list[tuple[str, Path]] = []
    kept: list[str] = []
    for name in names:
        old = []
        for v in stage_cache.versions(workdir, name):
            if v.current:
                continue
            if wanted.get(name) == v.fingerprint:
                kept.append(f"kept {name} version {v.fingerprint}: the recipe would reuse it (available)")
                continue
            made_by = v.marker.get("recipe")
            if recipe_file is not None and made_by and made_by != recipe_file:
                kept.append(f"kept {name} version {v.fingerprint}: made by another recipe file "
                            f"({made_by}); prune it with that recipe or with --workdir")
                continue
            old.append(v)
        for v in old[: max(0, len(old) - args.keep)]:  # oldest first
            doomed.append((f"{name} version {v.fingerprint}", v.folder))
    ckpts = workdir / stage_cache.CHECKPOINTS_DIR
    for folder in sorted(ckpts.glob("*/*")) if ckpts.is_dir() else []:
        stage, fp = folder.parent.name, folder.name
        if not stage_cache.is_checkpoint_folder(folder):
            kept.append(f"left {folder}: not a checkpoint folder lingoforge wrote")
            continue
        finished = stage_cache.version_dir(workdir, stage, fp).is_dir()
        if finished or (plan is not None and wanted.get(stage) != fp):
            doomed.append((f"{stage} checkpoints {fp}", folder))
    return doomed, kept
