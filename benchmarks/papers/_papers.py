"""Shared pieces of the paper reproductions (``benchmarks/papers/repro_*.py``): run a recipe
over seeds with ``engine run`` in a fresh process each, read the report, and print
mean and spread.

A seed is applied to every stage of the recipe whose ``params`` set ``seed`` (training
stages, DARE's random drop): ``--set stages.<name>.params.seed=<seed>``. The base
model (the built-in world) is the same for every seed; what varies is data order,
initialisation of new weights and random drops. Each seed runs in its own workdir, so
the stage cache never carries results from one seed to another.

``LINGOFORGE_PAPERS_IN_PROCESS=1`` runs every ``engine run`` inside the script's own
process instead (the project's tests do, to pay the imports once); the runs' results are
the same, but ``_wall_s_outside`` then leaves out the start-up a user's command pays.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def recipe_stages(recipe: Path) -> list[dict[str, Any]]:
    return yaml.safe_load(recipe.read_text())["stages"]


def seed_sets(recipe: Path, seed: int) -> list[str]:
    """``--set`` overrides giving every seeded stage of ``recipe`` the seed ``seed``."""
    return [f"stages.{s['name']}.params.seed={seed}" for s in recipe_stages(recipe)
            if isinstance(s.get("params"), dict) and "seed" in s["params"]]


def run_recipe(recipe: Path, workdir: Path, sets: Sequence[str] = (), *, quiet: bool = True,
               timeout: float = 3600) -> dict[str, Any]:
    """``engine run recipe --workdir workdir --set ...`` in a fresh process; returns the
    run's report.json. Raises with the tail of the output when the run fails."""
    args = ["run", str(recipe), "--workdir", str(workdir)]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    if os.environ.get("LINGOFORGE_PAPERS_IN_PROCESS") == "1":
        rc, out = _run_in_process(args)
    else:
        env = dict(os.environ, COLUMNS="160")
        proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env=env)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    if rc:
        raise RuntimeError(f"engine run {recipe.name} failed (rc {rc}):\n{out[-4000:]}")
    if not quiet:
        print(out[-3000:], file=sys.stderr)
    report = json.loads((workdir / "report.json").read_text())
    report["_wall_s_outside"] = time.perf_counter() - t0
    return report


def _run_in_process(args: list[str]) -> tuple[int, str]:
    """``engine ARGS`` in this process (see the module doc); (exit code, what it printed)."""
    import contextlib
    import io

    from engine.cli.commands import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(args)
    return rc, buf.getvalue()


def stage(report: dict[str, Any], name: str) -> dict[str, Any]:
    for s in report["stages"]:
        if s["name"] == name:
            return s
    raise KeyError(f"no stage {name!r} in the report of {report.get('recipe')}")


def metric(report: dict[str, Any], eval_stage: str, model: str, key: str) -> float:
    """One evaluation figure, e.g. ``metric(r, "task", "merge-ta", "acc/lum")``."""
    return stage(report, eval_stage)["metrics"][model][key]


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt(values: Iterable[float], digits: int = 3) -> str:
    """``mean ± sd`` of ``values`` (sample standard deviation over seeds)."""
    m, s = mean_sd(list(values))
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_name()}, {cores} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` -> [0, 1, 2]."""
    if "-" in text and "," not in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def seed_arguments(description: str, out_name: str) -> Any:
    """The options every seed script takes: --seeds, --workdir, --set (repeatable), --out."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--seeds", default="0-2", help="e.g. 0-2 or 0,3,5 (default 0-2)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="extra recipe override for every seed, e.g. to shorten a trial run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / out_name)
    return ap


def run_seeds(recipe: Path, args: Any, prefix: str) -> dict[int, dict[str, Any]]:
    """Run ``recipe`` once per seed of ``args.seeds`` (each in ``<workdir>/seed<N>``, with
    ``args.set`` applied after the seed); reports by seed."""
    import tempfile

    work = args.workdir or Path(tempfile.mkdtemp(prefix=prefix))
    reports = {}
    for seed in parse_seeds(args.seeds):
        t0 = time.perf_counter()
        reports[seed] = run_recipe(recipe, work / f"seed{seed}", [*seed_sets(recipe, seed), *args.set])
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return reports
