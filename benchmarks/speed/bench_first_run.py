"""A new user's first run: ``engine run recipes/quickstart.yaml`` from an empty cache.

Each round runs the command as a fresh process with ``LINGOFORGE_CACHE`` pointing at a new
empty folder (so the world's data is generated and the shipped model copied in, as after
a fresh install) and a new workdir, and records the whole command's wall time and peak RSS
(``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper per round), the time before the first
stage (imports, the world, planning: wall minus the stages' own times), and each stage's
wall time from report.json. Medians and ranges over ``--rounds``.

The target for a first run is 90 s on 2 cores. Run it alone, under the shared lock::

    flock /tmp/lingoforge-heavy.lock python benchmarks/speed/bench_first_run.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402


def child(recipe: str) -> None:
    """One first run, as a subprocess of this wrapper (its peak RSS is the run's)."""
    with tempfile.TemporaryDirectory(prefix="lf-first-run-") as tmp:
        env = {**os.environ, "LINGOFORGE_CACHE": str(Path(tmp) / "cache")}
        work = Path(tmp) / "work"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "engine", "run", recipe, "--workdir", str(work)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"engine run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        report = json.loads((work / "report.json").read_text())
        stages = {s["name"]: round(float(s.get("wall_time_s") or 0.0), 2) for s in report["stages"]}
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({"wall_s": round(wall, 2), "stages_s": round(sum(stages.values()), 2),
                          "before_stages_s": round(wall - sum(stages.values()), 2), "peak_rss_mb": round(peak),
                          "stages": stages}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--json", type=Path, help="write the rounds and medians here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.recipe)
        return
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        proc = subprocess.run([sys.executable, __file__, "--child", "--recipe", args.recipe],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        rounds.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rounds[-1]
        print(f"round {i + 1}: {r['wall_s']:.1f} s ({r['before_stages_s']:.1f} s before the stages), "
              f"peak RSS {r['peak_rss_mb']} MB", flush=True)

    def med(key: str) -> str:
        vals = [r[key] for r in rounds]
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    print(f"\n{args.recipe}, first run from an empty cache, {len(rounds)} rounds; {h.machine()}")
    print(f"  whole command s: {med('wall_s')}; before the first stage s: {med('before_stages_s')}; "
          f"peak RSS MB: {med('peak_rss_mb')}")
    for name in rounds[0]["stages"]:
        vals = [r["stages"][name] for r in rounds]
        print(f"  {name:18s} {statistics.median(vals):7.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": h.machine(), "recipe": args.recipe, "rounds": rounds},
                                        indent=1))


if __name__ == "__main__":
    main()
