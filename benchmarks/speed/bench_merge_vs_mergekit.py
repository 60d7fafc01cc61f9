"""Benchmark: lingoforge's streaming TIES merge against mergekit, side by side.

A base and three fine-tunes of a ~250M-parameter Llama (hidden 1024, 14 layers,
vocab 32000; fp32, about 1 GB each, synthetic: random init plus small per-model
perturbations) are merged with TIES at density 0.2 by

* ``engine merge`` (``python -m engine.cli.merge``), with and without read-ahead, and
* ``mergekit-yaml`` from its own virtual environment (``--lazy-unpickle``; 0.1.5's
  ``--low-cpu-memory`` only moves results to an accelerator, so it is not used on CPU),

and optionally other lingoforge methods on the same inputs (``--also breadcrumbs``,
``--also breadcrumbs:gamma=0.05``: same density, compared with lingoforge's TIES), each
in a subprocess of its own, with the inputs evicted from the page cache first
(``posix_fadvise(DONTNEED)``), so every tool starts cold. Wall time and peak resident
memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a fresh wrapper per tool) are
recorded, the outputs are compared tensor by tensor (fp32 allclose), and the input
throughput (GB read per second) is put next to a plain cold sequential read of the
same files. Run it on a shared machine under ``flock``::

    flock /tmp/lingoforge-bench.lock python benchmarks/speed/bench_merge_vs_mergekit.py \\
        --mergekit /work/mergekit-venv/bin/mergekit-yaml --workdir /tmp/lf-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mergekit_oracle import build_family, compare, llama_config  # noqa: E402

from engine.models import modelio  # noqa: E402
from engine.models.tensorio import read_tensor_infos  # noqa: E402

#: model shapes (hidden, layers, intermediate, vocab): about 141M and 245M parameters
SIZES = {"150m": (768, 12, 2304, 32000), "250m": (1024, 14, 2816, 32000)}


def evict(folders: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for folder in folders:
        for f in folder.iterdir():
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd) if os.access(f, os.W_OK) else None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def plain_read(files: list[Path]) -> float:
    """Seconds to read ``files`` sequentially in 8 MiB blocks (the disk's plain speed)."""
    started = time.perf_counter()
    buf = bytearray(8 << 20)
    for f in files:
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - started


def explain_mismatches(out_a: Path, out_b: Path, inputs: list[Path], density: float,
                       rtol: float = 1e-5, atol: float = 1e-6) -> dict[str, Any]:
    """Check that every element where two TIES outputs differ is an exact magnitude tie at
    some model's trim threshold (more entries equal to the k-th largest |delta| than
    places left, so which of them is kept is a convention). Returns the counts."""
    import torch

    from engine.merging.arithmetic import keep_count
    from engine.models.tensorio import ModelReader

    readers = [ModelReader(f, f.name) for f in [out_a, out_b, *inputs]]
    mismatched = explained = ambiguous_tensors = 0
    try:
        ra, rb, base, *models = readers
        for name in ra.infos:
            x, y = ra.get(name).float(), rb.get(name).float()
            bad = ~torch.isclose(x, y, rtol=rtol, atol=atol)
            tied = torch.zeros_like(bad)
            b = base.get(name).float()
            for m in models:
                d = (m.get(name).float() - b).abs().view(-1)
                k = keep_count(density, d.numel())
                if k >= d.numel():
                    continue
                t = torch.kthvalue(d, d.numel() - k + 1).values
                if int((d == t).sum()) > k - int((d > t).sum()):
                    ambiguous_tensors += 1
                    tied.view(-1).logical_or_(d == t)
            mismatched += int(bad.sum())
            explained += int((bad & tied).sum())
    finally:
        for r in readers:
            r.close()
    return {"mismatched": mismatched, "at_ambiguous_ties": explained,
            "tensor_models_with_ambiguous_ties": ambiguous_tensors}


def measured(cmd: list[str], child_json: bool = False,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh wrapper; its wall time and its peak RSS (children only),
    with ``child_json`` also the JSON object the command printed last."""
    probe = ("import resource,subprocess,sys,time,json;t=time.perf_counter();"
             "r=subprocess.run(sys.argv[1:]).returncode;"
             "print(json.dumps({'rc':r,'wall_s':time.perf_counter()-t,"
             "'peak_rss_mb':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True,
                         text=True, env=env)
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result['rc']}): {out.stderr[-2000:]}")
    if child_json:
        result.update(json.loads(lines[-2]))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", help="mergekit-yaml executable (its own venv)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lf-bench"))
    ap.add_argument("--size", choices=sorted(SIZES), default="250m",
                    help="model shape preset (hidden, layers, intermediate, vocab); "
                         "--hidden/--layers/--intermediate/--vocab override its fields")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--cache", default="cold", choices=["cold", "warm", "cold,warm"],
                    help="cold: inputs evicted from the page cache before each run; warm: "
                         "read once into it first; cold,warm: both, alternating")
    ap.add_argument("--profile", action="store_true",
                    help="also time lingoforge's TIES merge in-process (no interpreter start-up, "
                         "no runner) warm, once per round, and once instrumented per part")
    ap.add_argument("--baseline-src", type=Path,
                    help="with --profile: also time the in-process merge of an earlier lingoforge "
                         "(a folder holding its engine/ and .pypath/engine_plugins) in each "
                         "round, and check its output is bitwise this one's")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--reps", type=int, default=1,
                    help="rounds of every tool (order rotated); wall time: the median "
                         "(lower middle), peak RSS: the largest")
    ap.add_argument("--also", action="append", default=[], metavar="METHOD[:K=V,...]",
                    help="another lingoforge merge method to measure on the same inputs, with "
                         "density and any extra params (repeatable), e.g. breadcrumbs:gamma=0.01")
    ap.add_argument("--skip-mergekit", action="store_true",
                    help="measure lingoforge's methods only (no mergekit run, no comparison)")
    ap.add_argument("--keep", action="store_true", help="keep the ~4 GB of models afterwards")
    ap.add_argument("--reuse-models", action="store_true",
                    help="reuse the models a run with --keep left in --workdir (same shape)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    for field, value in zip(("hidden", "layers", "intermediate", "vocab"), SIZES[args.size]):
        if getattr(args, field) is None:
            setattr(args, field, value)
    if not args.mergekit and not args.skip_mergekit:
        ap.error("--mergekit is required unless --skip-mergekit")
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    need = 4 * 4 * (2 * args.vocab * args.hidden + args.layers * (
        4 * args.hidden**2 + 3 * args.hidden * args.intermediate)) * 2
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")
    cfg = llama_config(args.hidden, args.layers, args.vocab, args.intermediate)
    results: dict[str, Any] = {"config": cfg, "density": args.density, "cpus": os.cpu_count()}
    try:
        t = time.perf_counter()
        folders = [root / "models" / n for n in ("base", "ft0", "ft1", "ft2")]
        if args.reuse_models and all(
                (f / "config.json").is_file() and json.loads((f / "config.json").read_text()) == cfg
                and modelio.weight_files(f) for f in folders):
            base, *models = folders  # written by an earlier run with --keep (same seed)
        else:
            base, *models = build_family(root / "models", cfg, 3, shard_size=500 * 10**6)
            results["build_s"] = time.perf_counter() - t
        folders = [base, *models]
        files = [f for d in folders for f in modelio.weight_files(d)]
        size = sum(f.stat().st_size for f in files)
        results["input_gb"] = size / 1e9
        results["params_per_model"] = sum(i.numel for i in read_tensor_infos(base).values())

        evict(folders)
        read_s = plain_read(files)
        results["plain_read"] = {"s": read_s, "gb_per_s": size / 1e9 / read_s}

        lf_cmd = [sys.executable, "-m", "engine.cli.merge", "--method", "ties", "--base", str(base),
                  *[a for m in models for a in ("--model", str(m))], "-p", f"density={args.density}",
                  "--overwrite", "--no-cache"]  # every round merges (engine merge caches)
        runs = {
            "lingoforge": lf_cmd + ["--out", str(root / "lf")],
            "lingoforge_prefetch": lf_cmd + ["--out", str(root / "lf0"), "-p", "prefetch=64MB"],
        }
        for spec in args.also:
            method, _, extra = spec.partition(":")
            cmd = [a if a != "ties" else method for a in lf_cmd]
            cmd += ["--out", str(root / f"lf-{method}")]
            for kv in filter(None, extra.split(",")):
                cmd += ["-p", kv]
            runs[f"lingoforge_{method}"] = cmd
        if not args.skip_mergekit:
            mk_cfg = root / "mergekit.yaml"
            import yaml
            mk_cfg.write_text(yaml.safe_dump({
                "merge_method": "ties", "base_model": str(base), "dtype": "float32",
                "out_dtype": "float32", "parameters": {"normalize": True},
                "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": args.density}}
                           for m in models]}))
            runs["mergekit"] = [args.mergekit, str(mk_cfg), str(root / "mk"), "--lazy-unpickle",
                                "--quiet", "--no-copy-tokenizer"]
        in_proc = [sys.executable, str(Path(__file__).resolve()), "--in-process",
                   "--density", str(args.density), "--out", str(root / "lf-inproc"),
                   *[str(f) for f in folders]]
        # --reps rounds, the order of the tools rotating each round: the first process
        # after the models are written runs measurably slower, whichever tool it is.
        # Each round also times a read of the inputs from the page cache (after a first
        # read put them there) and, with --profile, the merge in-process (warm).
        modes = args.cache.split(",")
        labels = list(runs)
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {
            label: {mode: [] for mode in modes} for label in labels}
        cached_reads: list[float] = []
        in_process: list[dict[str, Any]] = []
        baseline: list[dict[str, Any]] = []
        baseline_env = baseline_cmd = None
        if args.baseline_src is not None:
            src = args.baseline_src.resolve()
            baseline_env = {**os.environ, "PYTHONPATH": f"{src}:{src / '.pypath'}"}
            baseline_cmd = [a if a != str(root / "lf-inproc") else str(root / "lf-baseline")
                            for a in in_proc]
        for rep in range(args.reps):
            plain_read(files)
            cached_reads.append(plain_read(files))
            print("page-cache read", rep, f"{cached_reads[-1]:.3f} s", flush=True)
            for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
                for mode in modes if rep % 2 == 0 else modes[::-1]:
                    if mode == "cold":
                        evict(folders)
                    else:
                        plain_read(files)
                    r = measured(runs[label])
                    samples[label][mode].append(r)
                    print(label, mode, rep, json.dumps(r), flush=True)
            if args.profile:
                for which in ("this", "baseline")[:: 1 if rep % 2 == 0 else -1]:
                    if which == "baseline" and args.baseline_src is None:
                        continue
                    plain_read(files)
                    if which == "this":
                        r = measured(in_proc, child_json=True)
                        in_process.append(r)
                    else:
                        r = measured(baseline_cmd, child_json=True, env=baseline_env)
                        baseline.append(r)
                    print(f"lingoforge in-process (warm, {which})", rep, json.dumps(r), flush=True)
        results["page_cache_read"] = {**_stats(cached_reads, "s"),
                                      "gb_per_s": size / 1e9 / statistics.median(cached_reads)}
        page_s = results["page_cache_read"]["s"]
        for label in labels:
            results[label] = {}
            for mode, rs in samples[label].items():
                entry = {**_stats([r["wall_s"] for r in rs], "wall_s"),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "runs": rs}
                entry["input_gb_per_s"] = size / 1e9 / entry["wall_s"]
                entry["x_page_cache_read"] = entry["wall_s"] / page_s
                results[label][mode] = entry
        if args.profile:
            plain_read(files)
            profiled = measured([*in_proc, "--parts"], child_json=True)
            merge_s = [r["merge_s"] for r in in_process]
            results["lingoforge_in_process_warm"] = {
                **_stats(merge_s, "merge_s"),
                "x_page_cache_read": statistics.median(merge_s) / page_s,
                "setup_s": statistics.median(r["setup_s"] for r in in_process),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in in_process), "runs": in_process,
                "profile": {**profiled, "parts_x_page_cache_read": {
                    part: t / page_s for part, t in profiled["parts_s"].items()}}}
            same, _ = compare(root / "lf", root / "lf-inproc", rtol=0, atol=0)
            results["lingoforge_in_process_warm"]["bitwise_equal_to_engine_merge"] = same
            if baseline:
                merge_b = [r["merge_s"] for r in baseline]
                same, _ = compare(root / "lf-inproc", root / "lf-baseline", rtol=0, atol=0)
                results["baseline_in_process_warm"] = {
                    "src": str(args.baseline_src), **_stats(merge_b, "merge_s"),
                    "x_page_cache_read": statistics.median(merge_b) / page_s,
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in baseline), "runs": baseline,
                    "bitwise_equal_to_this": same,
                    "this_over_baseline": statistics.median(merge_s) / statistics.median(merge_b)}
        mode = modes[0]
        lf = results["lingoforge"][mode]
        results["vs_lingoforge_ties"] = {
            label: {"peak_rss": results[label][mode]["peak_rss_mb"] / lf["peak_rss_mb"],
                    "wall": results[label][mode]["wall_s"] / lf["wall_s"], "cache": mode}
            for label in labels if label.startswith("lingoforge_")}
        ok0, _ = compare(root / "lf", root / "lf0", rtol=0, atol=0)
        results["prefetch_changes_nothing"] = ok0
        if args.skip_mergekit:
            return _report(results, args.json)
        ok, diff = compare(root / "lf", root / "mk")
        results["equal_to_mergekit"] = {"allclose_fp32": ok, "max_abs_diff": diff.max_abs,
                                        "worst": diff.worst, "tensors": diff.tensors,
                                        "mismatched_elements": diff.mismatched,
                                        "elements": diff.elements}
        if not ok:
            results["equal_to_mergekit"]["explained"] = explain_mismatches(
                root / "lf", root / "mk", folders, args.density)
        results["ratios"] = {}
        for mode in modes:
            lf, mk = results["lingoforge"][mode], results["mergekit"][mode]
            results["ratios"][mode] = {"wall": lf["wall_s"] / mk["wall_s"],
                                       "peak_rss": lf["peak_rss_mb"] / mk["peak_rss_mb"]}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return _report(results, args.json)


def _stats(values: list[float], key: str) -> dict[str, Any]:
    """Median (the middle value, or the mean of the two middle ones), min and max."""
    return {key: statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _in_process(argv: list[str]) -> int:
    """``--in-process [--parts] --density D --out OUT BASE MODEL...``: TIES through
    :meth:`MergeMethod.tensor_merge` and :func:`merge_folders` in this process (what
    ``engine merge`` runs, without the interpreter start-up, the imports, the recipe
    checks and the runner); prints the merge's seconds and, with ``--parts``, the
    exclusive seconds of each part (instrumented, so that run is not the timed one).
    ``setup_s``: from here to the merge's start (plan and checks; the module's own
    imports, torch among them, came before and are not counted)."""
    started = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-process", action="store_true")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--density", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("folders", type=Path, nargs="+")
    args = ap.parse_args(argv)
    # imported here: only the in-process run needs them (start-up speed of the others)
    import torch

    from engine.core.artifacts import ModelArtifact
    from engine.merging.execute import merge_folders
    from engine.merging.preflight import check_merge_inputs
    from engine_plugins.ties import Ties

    base, *models = [ModelArtifact(f.name, f) for f in args.folders]
    plan = check_merge_inputs(base, models)
    method = Ties()
    layers = json.loads((args.folders[0] / "config.json").read_text())["num_hidden_layers"]
    merge, _ = method.tensor_merge(method.Params(density=args.density), plan.names, layers)
    parts = _instrument() if args.parts else None
    if args.out.exists():
        shutil.rmtree(args.out)
    t = time.perf_counter()
    merge_folders(plan, merge, args.out, task_vectors=True)
    merge_s = time.perf_counter() - t
    out: dict[str, Any] = {"merge_s": merge_s, "setup_s": t - started,
                           "torch_threads": torch.get_num_threads()}
    if parts is not None:
        out["parts_s"] = {**parts, "other": merge_s - sum(parts.values())}
    print(json.dumps(out))
    return 0


def _instrument() -> dict[str, float]:
    """Wrap the parts of the streaming TIES merge in timers; returns the dict they fill
    with exclusive seconds per part (a part's time excludes timed parts it calls)."""
    # imported here: only the profiling run needs them (start-up speed of the others)
    from engine.merging import arithmetic, streaming
    from engine.models import tensorio
    from engine_plugins import ties as ties_plugin

    totals: dict[str, float] = {}
    stack: list[float] = []

    def wrap(owner: Any, attr: str, part: str) -> None:
        fn = getattr(owner, attr)
        totals.setdefault(part, 0.0)

        def timed(*a: Any, **k: Any) -> Any:
            stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                elapsed = time.perf_counter() - t
                totals[part] += elapsed - stack.pop()
                if stack:
                    stack[-1] += elapsed
        setattr(owner, attr, timed)

    wrap(tensorio.ModelReader, "_read", "read (preadv from the page cache)")
    wrap(streaming, "_check_finite", "NaN/inf check of the inputs")
    wrap(streaming, "_into", "task vectors (model - base)")
    wrap(streaming, "_trim_whole", "trim (whole tensors)")
    wrap(streaming, "_count_bracket", "trim (row slices: counting passes)")
    wrap(streaming, "_count_slice", "trim (row slices: counting passes)")
    wrap(streaming, "_trim_slice", "trim (row slices: zeroing)")
    wrap(arithmetic, "_elect_sign_bits", "sign election")
    wrap(ties_plugin, "ties_combine", "disjoint mean (ties_combine without the election)")
    wrap(streaming, "_output", "output cast and finite check")
    wrap(tensorio.ShardedWriter, "_append", "write")
    return totals


def _report(results: dict[str, Any], path: Path | None) -> int:
    print(json.dumps(results, indent=2))
    if path:
        path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if "--in-process" in sys.argv[1:]:
        raise SystemExit(_in_process(sys.argv[1:]))
    raise SystemExit(main())
