"""Check lingoforge's merges against mergekit (the reference implementation).

mergekit is LGPL and never imported here: it runs as the ``mergekit-yaml`` command of
its own virtual environment, on model folders this script writes, and the two outputs
are compared tensor by tensor:

* linear, task arithmetic, TIES (per-model weights and densities), TIES with a
  per-tensor density override (mergekit: a ``filter`` condition), Model Breadcrumbs
  (per-model weights, densities and gammas) and Breadcrumbs-TIES: allclose in fp32;
* SLERP (also with a per-tensor ``t``, and with layer gradients of ``t`` per filter), TIES
  with per-model weight and density gradients, Model Stock (per tensor and ``filter_wise``) and
  passthrough layer stacking (slices of three models, one scaled, a different layer
  count): allclose in fp32, and the same ``num_hidden_layers``;
* DELLA and DELLA-linear, random in both tools: in each tool, the kept fraction of the
  smallest and the largest fifth of every row's magnitudes is the expected MagPrune keep
  probability within 3 standard deviations, and the rescale factor is the expected L1
  ratio within 2% (and the two tools' within 2% of each other);
* DARE-TIES, whose masks are random in both tools: statistics agree -- the kept
  fraction of each tensor is ``density`` within 3 standard deviations in both, and
  kept entries are rescaled by ``1/density`` (lingoforge, exactly) and by the L1 norm
  ratio (mergekit 0.1.5), which must agree within 5%.

Usage::

    python benchmarks/speed/mergekit_oracle.py --mergekit /work/mergekit-venv/bin/mergekit-yaml

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

from engine.models.tensorio import ModelReader, PlannedTensor, ShardedWriter, read_tensor_infos

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
    cmd = [python, "-m", "engine.cli.merge", "--method", method, "--out", str(out), "--overwrite"]
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


def exact_cases(base: Path, models: list[Path]
                ) -> list[tuple[str, str, dict, dict, Path | None, list[Path] | None]]:
    """(label, lingoforge method, lingoforge params, mergekit config, base or None, the
    models lingoforge merges when not all of them)."""
    names = [m.name for m in models]
    w = [0.6, 0.3, 0.8][: len(models)]
    d = [0.2, 0.5, 0.35][: len(models)]
    g = [0.01, 0.05, 0.02][: len(models)]  # breadcrumbs: outlier fractions
    mk_base = {"base_model": str(base), "dtype": "float32", "out_dtype": "float32"}
    return [
        ("linear", "linear", {"weight": dict(zip(names, w))},
         {"merge_method": "linear", "dtype": "float32", "out_dtype": "float32",
          "models": _mk_models(models, [{"weight": x} for x in w])}, None, None),
        ("task-arithmetic", "task-arithmetic", {"weight": dict(zip(names, w)), "lambda": 0.8},
         {"merge_method": "task_arithmetic", **mk_base, "parameters": {"lambda": 0.8},
          "models": _mk_models(models, [{"weight": x} for x in w])}, base, None),
        ("ties", "ties", {"weight": dict(zip(names, w)), "density": dict(zip(names, d))},
         {"merge_method": "ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": x, "density": y} for x, y in zip(w, d)])}, base, None),
        ("ties+override", "ties", {"density": 0.2, "overrides": [
            {"match": "embed_tokens|lm_head", "density": 0.9}, {"match": "self_attn", "density": 0.5}]},
         {"merge_method": "ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": 1.0, "density": [
              {"filter": "embed_tokens", "value": 0.9}, {"filter": "lm_head", "value": 0.9},
              {"filter": "self_attn", "value": 0.5}, {"value": 0.2}]}] * len(models))}, base, None),
        ("breadcrumbs", "breadcrumbs", {"weight": dict(zip(names, w)), "density": dict(zip(names, d)),
                                        "gamma": dict(zip(names, g)), "lambda": 0.9},
         {"merge_method": "breadcrumbs", **mk_base, "parameters": {"lambda": 0.9},
          "models": _mk_models(models, [{"weight": x, "density": y, "gamma": z}
                                        for x, y, z in zip(w, d, g)])}, base, None),
        ("breadcrumbs-ties", "breadcrumbs-ties",
         {"weight": dict(zip(names, w)), "density": 0.3, "gamma": 0.02, "normalize": True},
         {"merge_method": "breadcrumbs_ties", **mk_base, "parameters": {"normalize": True},
          "models": _mk_models(models, [{"weight": x, "density": 0.3, "gamma": 0.02}
                                        for x in w])}, base, None),
        ("slerp", "slerp", {"t": 0.3},
         {"merge_method": "slerp", "base_model": str(models[0]), "dtype": "float32",
          "out_dtype": "float32", "parameters": {"t": 0.3},
          "models": [{"model": str(m)} for m in models[:2]]}, None, models[:2]),
        ("slerp+override", "slerp", {"t": 0.3, "overrides": [{"match": "self_attn", "t": 0.8}]},
         {"merge_method": "slerp", "base_model": str(models[0]), "dtype": "float32",
          "out_dtype": "float32", "parameters": {"t": [{"filter": "self_attn", "value": 0.8},
                                                       {"value": 0.3}]},
          "models": [{"model": str(m)} for m in models[:2]]}, None, models[:2]),
        ("slerp layer gradients", "slerp",
         {"t": 0.5, "overrides": [{"match": "self_attn", "t": [0, 0.5, 0.3, 0.7, 1]},
                                  {"match": "mlp", "t": [1, 0.5, 0.7, 0.3, 0]}]},
         {"merge_method": "slerp", "base_model": str(models[0]), "dtype": "float32",
          "out_dtype": "float32", "parameters": {"t": [
              {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
          "models": [{"model": str(m)} for m in models[:2]]}, None, models[:2]),
        ("ties weight gradient", "ties",
         {"density": [0.2, 0.9], "weight": {names[0]: [1.0, 0.2], names[1]: [0.3, 1.0]}},
         {"merge_method": "ties", **mk_base, "models": _mk_models(models[:2], [
             {"weight": [1.0, 0.2], "density": [0.2, 0.9]},
             {"weight": [0.3, 1.0], "density": [0.2, 0.9]}])}, base, models[:2]),
        ("model-stock", "model-stock", {},
         {"merge_method": "model_stock", **mk_base, "models": [{"model": str(m)} for m in models]},
         base, None),
        ("model-stock filter_wise", "model-stock", {"filter_wise": True},
         {"merge_method": "model_stock", **mk_base, "parameters": {"filter_wise": True},
          "models": [{"model": str(m)} for m in models]}, base, None),
        ("passthrough", "passthrough",
         {"slices": [{"model": names[0], "layers": [0, 2]},
                     {"model": names[1], "layers": [1, 2], "scale": {"o_proj|down_proj": 0.0}},
                     {"model": names[2], "layers": [0, 1]}]},
         {"merge_method": "passthrough", "dtype": "float32", "out_dtype": "float32", "slices": [
             {"sources": [{"model": str(models[0]), "layer_range": [0, 2]}]},
             {"sources": [{"model": str(models[1]), "layer_range": [1, 2], "parameters": {
                 "scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                           {"value": 1.0}]}}]},
             {"sources": [{"model": str(models[2]), "layer_range": [0, 1]}]}]}, None, None),
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


def della_stats(base: Path, model: Path, merged: Path, density: float,
                epsilon: float) -> dict[str, float]:
    """MagPrune's statistics of a one-model DELLA merge over all matrices: the kept
    fraction of the smallest and the largest fifth of each row's magnitudes (ranks as
    fractions of the row) against the expected keep probability ``density - epsilon +
    2 epsilon rank``, and the rescale factor against ``sum|tau| / sum p|tau|``.

    ``model.embed_tokens.weight`` is left out: in mergekit 0.1.5's output its kept
    fraction *falls* with magnitude (0.445 for the smallest fifth of each row, 0.339 for
    the largest, measured on this family), so mergekit does not rank that tensor as it
    ranks the others (its vocabulary path handles embeddings apart); lingoforge treats
    it like every matrix."""
    kept = {"low": 0.0, "high": 0.0}
    want = {"low": 0.0, "high": 0.0}
    var = {"low": 0.0, "high": 0.0}
    count = {"low": 0, "high": 0}
    ratios, expected = [], []
    with ModelReader(base, "base") as rb, ModelReader(model, "m") as rm, \
            ModelReader(merged, "out") as ro:
        for name, info in rb.infos.items():
            if len(info.shape) != 2 or "embed_tokens" in name:
                continue  # mergekit 0.1.5 does not MagPrune embed_tokens by rank (see docstring)
            b = rb.get(name)
            tau, out = rm.get(name) - b, ro.get(name) - b
            n = tau.shape[1]
            rank = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).float() / (n - 1)
            prob = density - epsilon + 2 * epsilon * rank
            mask = out != 0
            for part, sel in (("low", rank < 0.2), ("high", rank >= 0.8)):
                kept[part] += float(mask[sel].sum())
                want[part] += float(prob[sel].sum())
                var[part] += float((prob[sel] * (1 - prob[sel])).sum())
                count[part] += int(sel.sum())
            ratios.append(float((out[mask] / tau[mask]).mean()))
            expected.append(float(tau.abs().sum() / (prob * tau.abs()).sum()))
    res: dict[str, float] = {}
    for part in kept:
        res[f"kept_{part}"] = kept[part] / count[part]
        res[f"expected_{part}"] = want[part] / count[part]
        res[f"sd_{part}"] = math.sqrt(var[part]) / count[part]
    res["rescale"] = sum(ratios) / len(ratios)
    res["expected_rescale"] = sum(expected) / len(expected)
    return res


def _della_ok(st: dict[str, float]) -> bool:
    return (all(abs(st[f"kept_{p}"] - st[f"expected_{p}"]) < 3 * st[f"sd_{p}"]
                for p in ("low", "high"))
            and abs(st["rescale"] / st["expected_rescale"] - 1) < 0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="path of the mergekit-yaml executable")
    ap.add_argument("--workdir", type=Path, help="where models go (default: a temp folder)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lf-oracle-") as tmp:
        root = args.workdir or Path(tmp)
        cfg = llama_config(hidden=128, layers=4, vocab=256, intermediate=320)  # 4: gradients interpolate
        base, *models = build_family(root / "models", cfg, 3)
        results: list[dict[str, Any]] = []
        for label, method, params, mk, b, lf_models in exact_cases(base, models):
            slug = label.replace(" ", "-")
            lf_out, mk_out = root / f"lf-{slug}", root / f"mk-{slug}"
            run_lingoforge(method, b, lf_models or models, lf_out, params)
            run_mergekit(args.mergekit, mk, mk_out)
            ok, diff = compare(lf_out, mk_out)
            layers = [json.loads((o / "config.json").read_text())["num_hidden_layers"]
                      for o in (lf_out, mk_out)]
            results.append({"case": label, "ok": ok and layers[0] == layers[1],
                            "tensors": diff.tensors, "max_abs_diff": diff.max_abs,
                            "worst": diff.worst, "num_hidden_layers": layers})
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
        density, epsilon = 0.5, 0.2
        for method, mk_method in (("della", "della"), ("della-linear", "della_linear")):
            lf_out, mk_out = root / f"lf-{method}", root / f"mk-{method}"
            run_lingoforge(method, base, models[:1], lf_out, {"density": density, "epsilon": epsilon})
            run_mergekit(args.mergekit, {"merge_method": mk_method, "base_model": str(base),
                                         "dtype": "float32", "out_dtype": "float32",
                                         "models": _mk_models(models[:1], [{
                                             "weight": 1.0, "density": density,
                                             "epsilon": epsilon}])},
                         mk_out, "--random-seed", "0")
            lf = della_stats(base, models[0], lf_out, density, epsilon)
            mkst = della_stats(base, models[0], mk_out, density, epsilon)
            ok = (_della_ok(lf) and _della_ok(mkst)
                  and abs(lf["rescale"] / mkst["rescale"] - 1) < 0.02)
            results.append({"case": f"{method} (statistics)", "ok": ok, "lingoforge": lf,
                            "mergekit": mkst})
    for r in results:
        print(("OK  " if r["ok"] else "FAIL") + " " + json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
