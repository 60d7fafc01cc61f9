"""Check lingoforge's merges against mergekit (the reference implementation).

mergekit is LGPL and never imported here: it runs as the ``mergekit-yaml`` command of
its own virtual environment, on model folders this script writes, and the two outputs
are compared tensor by tensor:

* linear, task arithmetic, TIES (per-model weights and densities), TIES with a
  per-tensor density override (mergekit: a ``filter`` condition), Model Breadcrumbs
  (per-model weights, densities and gammas) and Breadcrumbs-TIES: allclose in fp32;
* DARE-TIES, whose masks are random in both tools: statistics agree -- the kept
  fraction of each tensor is ``density`` within 3 standard deviations in both, and
  kept entries are rescaled by ``1/density`` (lingoforge, exactly) and by the L1 norm
  ratio (mergekit 0.1.5), which must agree within 5%.

Usage::

    python benchmarks/mergekit_oracle.py --mergekit /work/mergekit-venv/bin/mergekit-yaml

exits 0 when everything agrees, 1 otherwise, and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.merging.tensorio import ModelReader, PlannedTensor, ShardedWriter, read_tensor_infos

__all__ = ["build_family", "compare", "llama_config", "run_lingoforge", "run_mergekit"]


def llama_config(hidden: int, layers: int, vocab: int, intermediate: int) -> dict[str, Any]:
    """A minimal Llama config.json both tools (and transformers) accept."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def llama_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama checkpoint (Hugging Face naming)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def build_family(root: Path, cfg: dict[str, Any], n_models: int, *, seed: int = 0,
                 noise: float = 0.02, shard_size: int = 2 * 10**9) -> list[Path]:
    """Write a base and ``n_models`` fine-tunes (base + small per-model perturbations,
    a different scale each), fp32, streamed tensor by tensor. Returns [base, *models]."""
    folders = [root / "base", *(root / f"ft{i}" for i in range(n_models))]
    shapes = llama_shapes(cfg)
    planned = [PlannedTensor(n, torch.float32, s) for n, s in shapes]
    writers = []
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        (f / "config.json").write_text(json.dumps(cfg, indent=2))
        writers.append(ShardedWriter(f, planned, max_shard_bytes=shard_size))
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        base = (torch.ones(shape) if name.endswith("norm.weight")
                else torch.randn(shape, generator=g) * 0.02)
        writers[0].write(name, base)
        for k, w in enumerate(writers[1:]):
            w.write(name, base + torch.randn(shape, generator=g) * noise * (1 + 0.5 * k))
        del base
    for w in writers:
        w.close()
    return folders


def run_lingoforge(method: str, base: Path | None, models: list[Path], out: Path,
                   params: dict[str, Any], *, python: str = sys.executable) -> None:
    """``engine merge`` in a subprocess (as a user runs it)."""
    cmd = [python, "-m", "engine.cli_merge", "--method", method, "--out", str(out), "--overwrite"]
    if base is not None:
        cmd += ["--base", str(base)]
    for m in models:
        cmd += ["--model", str(m)]
    for k, v in params.items():
        cmd += ["-p", f"{k}={json.dumps(v)}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run_mergekit(mergekit_yaml: str, config: dict[str, Any], out: Path, *extra: str) -> None:
    cfg_file = out.parent / f"{out.name}.mergekit.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    subprocess.run([mergekit_yaml, str(cfg_file), str(out), "--quiet", "--no-copy-tokenizer",
                    *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass
class Diff:
    tensors: int
    max_abs: float
    worst: str
    mismatched: int = 0  # elements outside the tolerance
    elements: int = 0


def compare(a: Path, b: Path, *, rtol: float = 1e-5, atol: float = 1e-6) -> tuple[bool, Diff]:
    """Tensor-by-tensor allclose of two model folders (same names required)."""
    ia, ib = read_tensor_infos(a), read_tensor_infos(b)
    if set(ia) != set(ib):
        raise AssertionError(f"tensor names differ: {sorted(set(ia) ^ set(ib))[:5]}")
    ok, worst, max_abs, bad, total = True, "", 0.0, 0, 0
    with ModelReader(a, "lingoforge", ia) as ra, ModelReader(b, "mergekit", ib) as rb:
        for name in ia:
            x, y = ra.get(name).float(), rb.get(name).float()
            d = float((x - y).abs().max()) if x.numel() else 0.0
            if d > max_abs:
                max_abs, worst = d, name
            close = torch.isclose(x, y, rtol=rtol, atol=atol)
            bad += int((~close).sum())
            total += close.numel()
            ok &= bool(close.all())
    return ok, Diff(len(ia), max_abs, worst, bad, total)


def _mk_models(models: list[Path], per_model: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": str(m), "parameters": p} for m, p in zip(models, per_model)]


def exact_cases(base: Path, models: list[Path]) -> list[tuple[str, str, dict, dict, Path | None]]:
    """(label, lingoforge method, lingoforge params, mergekit config, base or None)."""
    names = [m.name for m in models]
    w = [0.6, 0.3, 0.8][: len(models)]
    d = [0.2, 0.5, 0.35][: len(models)]
    g = [0.01, 0.05, 0.02][: len(models)]  # breadcrumbs: outlier fractions
    mk_base = {"base_model": str(base), "dtype": "float32", "out_dtype": "float32"}
    return [
        ("linear", "linear", {"weight": dict(zip(names, w))},
         {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
          "models": _mk_models(models, [{"weight": x} for x in w])}, None),
        ("task-arithmetic", "task-arithmetic", {"weight": dict(zip(names, w)), "lambda": 0.8},
         {"merge_method": "task_arithmetic", **mk_base, "parameters": {"lambda": 0.8},
          "models": _mk_models(models, [{"weight": x} for x in w])}, base),
        ("ties", "ties", {"weight": dict(zip(names, w)), "density": dict(zip(names, d))},
         {"merge_method": "ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": x, "density": y} for x, y in zip(w, d)])}, base),
        ("ties+override", "ties", {"density": 0.2, "overrides": [
            {"match": "embed_tokens|lm_head", "density": 0.9}, {"match": "self_attn", "density": 0.5}]},
         {"merge_method": "ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": 1.0, "density": [
              {"filter": "embed_tokens", "value": 0.9}, {"filter": "lm_head", "value": 0.9},
              {"filter": "self_attn", "value": 0.5}, {"value": 0.2}]}] * len(models))}, base),
        ("breadcrumbs", "breadcrumbs", {"weight": dict(zip(names, w)), "density": dict(zip(names, d)),
                                        "gamma": dict(zip(names, g)), "lambda": 0.9},
         {"merge_method": "breadcrumbs", **mk_base, "parameters": {"lambda": 0.9},
          "models": _mk_models(models, [{"weight": x, "density": y, "gamma": z}
                                        for x, y, z in zip(w, d, g)])}, base),
        ("breadcrumbs-ties", "breadcrumbs-ties",
         {"weight": dict(zip(names, w)), "density": 0.3, "gamma": 0.02, "normalize": True},
         {"merge_method": "breadcrumbs_ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": x, "density": 0.3, "gamma": 0.02}
                                        for x in w])}, base),
    ]


def dare_stats(base: Path, model: Path, merged: Path, density: float) -> dict[str, float]:
    """Kept fraction and mean rescale factor of a one-model DARE merge, over all matrices."""
    kept = total = 0
    ratios = []
    with ModelReader(base, "base") as rb, ModelReader(model, "m") as rm, \
            ModelReader(merged, "out") as ro:
        for name, info in rb.infos.items():
            if len(info.shape) < 2:
                continue
            b, tau = rb.get(name), rm.get(name) - rb.get(name)
            out = ro.get(name) - b
            mask = out != 0
            kept += int(mask.sum())
            total += mask.numel()
            ratios.append(float((out[mask] / tau[mask]).mean()))
    return {"kept": kept / total, "rescale": sum(ratios) / len(ratios), "n": total,
            "expected_rescale": 1 / density}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-yaml executable")
    ap.add_argument("--workdir", type=Path, help="where models go (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lf-oracle-") as tmp:
        root = args.workdir or Path(tmp)
        cfg = llama_config(hidden=128, layers=2, vocab=256, intermediate=320)
        base, *models = build_family(root / "models", cfg, 3)
        results: list[dict[str, Any]] = []
        for label, method, params, mk, b in exact_cases(base, models):
            lf_out, mk_out = root / f"lf-{label}", root / f"mk-{label}"
            run_lingoforge(method, b, models, lf_out, params)
            run_mergekit(args.mergekit, mk, mk_out)
            ok, diff = compare(lf_out, mk_out)
            results.append({"case": label, "ok": ok, "tensors": diff.tensors,
                            "max_abs_diff": diff.max_abs, "worst": diff.worst})
        density = 0.3
        lf_out, mk_out = root / "lf-dare", root / "mk-dare"
        run_lingoforge("dare-ties", base, models[:1], lf_out, {"density": density})
        run_mergekit(args.mergekit, {"merge_method": "dare_ties", "base_model": str(base),
                                     "dtype": "float32", "out_dtype": "float32",
                                     "parameters": {"normalize": True},
                                     "models": _mk_models(models[:1], [{"weight": 1.0,
                                                                        "density": density}])},
                     mk_out, "--random-seed", "0")
        lf, mkst = dare_stats(base, models[0], lf_out, density), dare_stats(base, models[0], mk_out, density)
        sd = math.sqrt(density * (1 - density) / lf["n"])
        ok = (abs(lf["kept"] - density) < 3 * sd and abs(mkst["kept"] - density) < 3 * sd
              and abs(lf["rescale"] - 1 / density) < 1e-4 * (1 / density)
              and abs(mkst["rescale"] / lf["rescale"] - 1) < 0.05)
        results.append({"case": "dare-ties (statistics)", "ok": ok, "lingoforge": lf,
                        "mergekit": mkst, "kept_3sd": 3 * sd})
    for r in results:
        print(("OK  " if r["ok"] else "FAIL") + " " + json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
