"""Several engine runs on one machine: wall time of N quickstarts at once against one alone.

Each quickstart runs in its own ``engine run`` process and workdir, against one
already-built world cache (the world build is not what is measured). The alone run
comes first, then ``--parallel`` runs start together; the figure is the slowest
parallel run's wall time over the alone run's. ``--threads`` is passed to every run as
``runtime.threads`` (``auto``, the default, divides the cores among live runs; ``null``
leaves torch's own setting, one thread per core in every process).

    python benchmarks/speed/bench_shared_machine.py                      # auto, 2 at once
    python benchmarks/speed/bench_shared_machine.py --threads null       # torch's own setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _start(workdir: Path, threads: str, env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    cmd = ["engine", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--workdir", str(workdir),
           "--no-cache", "--set", f"runtime.threads={threads}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True), time.perf_counter()


def _finish(proc: subprocess.Popen, started: float, workdir: Path) -> dict:
    _, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"engine run failed ({proc.returncode}): {err[-2000:]}")
    report = json.loads((workdir / "report.json").read_text())
    return {"wall_s": round(wall, 2),
            "stages": {s["name"]: [s["wall_time_s"], s["threads"]["intra_op"]] for s in report["stages"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--threads", default="auto", help="runtime.threads for every run (auto, null, N)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    env = dict(os.environ)
    env.setdefault("LINGOFORGE_CACHE", str(Path(tempfile.gettempdir()) / "lingoforge-bench-cache"))
    subprocess.run([sys.executable, "-m", "engine.world"], env=env, check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="lf-shared-") as tmp:
        root = Path(tmp)
        alone = _finish(*_start(root / "alone", args.threads, env), root / "alone")
        procs = [(*_start(root / f"p{i}", args.threads, env), root / f"p{i}") for i in range(args.parallel)]
        together = [_finish(*p) for p in procs]
    worst = max(r["wall_s"] for r in together)
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "threads": args.threads, "alone": alone, "parallel": together,
              "slowdown": round(worst / alone["wall_s"], 2)}
    print(f"one quickstart alone: {alone['wall_s']:.1f} s; {args.parallel} at once: "
          + ", ".join(f"{r['wall_s']:.1f} s" for r in together)
          + f"; slowest / alone = {result['slowdown']:.2f}x (threads={args.threads})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
