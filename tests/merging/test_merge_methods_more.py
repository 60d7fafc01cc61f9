"""slerp, model-stock, della, della-linear and passthrough: each formula on small tensors
computed by hand, the errors for params that cannot work, and merges of the tiny family
(the conformance suite checks each of them too: slerp on two models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import merge_impl, run_merge_method, state

from engine.core.errors import MergeError
from engine_plugins.della import magprune_
from engine_plugins.model_stock import model_stock_ratio
from engine_plugins.slerp import slerp

_impl, _merge = merge_impl, run_merge_method


# --- slerp ------------------------------------------------------------------------------------

def test_slerp_of_orthogonal_unit_vectors_follows_the_circle():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = slerp(1 / 3, v0, v1)  # θ = π/2: the point at angle π/6
    torch.testing.assert_close(got, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert float(got.norm()) == pytest.approx(1.0)


def test_slerp_keeps_unnormalised_magnitudes_and_falls_back_to_lerp_when_parallel():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    # coefficients sin((1-t)θ)/sin θ and sin(tθ)/sin θ act on the raw vectors
    torch.testing.assert_close(slerp(0.5, v0, v1), torch.tensor([2.0, 4.0]) * math.sin(math.pi / 4))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])  # parallel: linear
    torch.testing.assert_close(slerp(0.25, a, b), torch.tensor([1.25, 2.5]))
    assert torch.equal(slerp(0.0, v0, v1), v0) and torch.equal(slerp(1.0, v0, v1), v1)


def test_slerp_refuses_other_than_two_models(tiny_model_family):
    impl = _impl("slerp")
    p = impl.Params.model_validate({"t": 0.5})
    with pytest.raises(MergeError, match=r"exactly two models .*got 3: \['a', 'b', 'c'\]"):
        impl._variants(p, ["a", "b", "c"])
    with pytest.raises(MergeError, match="got 1"):
        impl._variants(p, ["a"])
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        impl.Params.model_validate({"t": 1.5})


def test_slerp_merge_of_the_family_equals_the_formula_per_tensor(tiny_model_family, tmp_path):
    fam = tiny_model_family
    art, context = _merge(tmp_path, "slerp", {"t": 0.4, "overrides": [{"match": "mlp", "t": 0.9}]},
                          None, {"a": fam["a"], "b": fam["b"]})
    got, a, b = state(art.path), state(fam["a"]), state(fam["b"])
    for name, value in got.items():
        t = 0.9 if "mlp" in name else 0.4
        torch.testing.assert_close(value, slerp(t, a[name], b[name]).to(value.dtype))
    again, _ = _merge(tmp_path, "slerp", {"t": 0.4, "overrides": [{"match": "mlp", "t": 0.9}]},
                      None, {"a": fam["a"], "b": fam["b"]}, stage="again")
    assert all(torch.equal(v, state(again.path)[k]) for k, v in got.items())
    same, _ = _merge(tmp_path, "slerp", {"t": 0.4}, None, {"a": fam["a"], "b2": fam["a"]},
                     stage="same")
    for k, v in state(same.path).items():
        torch.testing.assert_close(v, a[k])
    assert context.stats.notes["merge"]["tensors"] == len(a)


# --- model stock --------------------------------------------------------------------------------

def test_model_stock_ratio_by_hand():
    # two task vectors at 60°: cos = 0.5, N = 2 -> t = 2·0.5 / (1 + 0.5) = 2/3
    d = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert float(model_stock_ratio(d, False)) == pytest.approx(2 / 3)
    # orthogonal: t = 0 (the base); identical: t = 1 (their average)
    assert float(model_stock_ratio(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), False)) == 0.0
    assert float(model_stock_ratio(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), False)) == pytest.approx(1.0)
    # filter_wise: one ratio per row
    rows = torch.stack([torch.tensor([[1.0, 0.0], [1.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 2.0]])])
    torch.testing.assert_close(model_stock_ratio(rows, True), torch.tensor([[0.0], [1.0]]))
    # antipodal pair: 1 + (N-1) cos = 0, no finite ratio: keep the base
    assert float(model_stock_ratio(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), False)) == 0.0


def test_model_stock_merge_is_the_base_plus_t_times_the_mean_delta(tiny_model_family, tmp_path):
    fam = tiny_model_family
    art, _ = _merge(tmp_path, "model-stock", {}, fam["base"], {m: fam[m] for m in "abc"})
    base, got = state(fam["base"]), state(art.path)
    models = [state(fam[m]) for m in "abc"]
    name = "model.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([m[name] - base[name] for m in models])
    t = float(model_stock_ratio(deltas, False))
    torch.testing.assert_close(got[name], base[name] + t * deltas.mean(0))
    with pytest.raises(MergeError, match="at least two models"):
        _impl("model-stock")._variants(_impl("model-stock").Params(), ["a"])


# --- della ----------------------------------------------------------------------------------

def test_magprune_keep_probability_grows_with_rank_and_rescale_keeps_l1():
    g = torch.Generator().manual_seed(0)
    delta = torch.arange(1, 101, dtype=torch.float32).repeat(2000, 1)  # rank = column index
    kept = magprune_(delta.clone(), 0.5, 0.3, g, rescale=False) != 0
    frac = kept.float().mean(0)
    # keep probability 0.2 + 0.6 · rank / 99: 0.2 for the smallest, 0.8 for the largest
    assert float(frac[:10].mean()) == pytest.approx(0.2 + 0.6 * 4.5 / 99, abs=0.015)
    assert float(frac[-10:].mean()) == pytest.approx(0.2 + 0.6 * 94.5 / 99, abs=0.015)
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    y = magprune_(x.clone(), 0.4, 0.1, torch.Generator().manual_seed(2))
    assert float(y.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)
    ratio = y[y != 0] / x[y != 0]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    assert torch.equal(magprune_(x.clone(), 1.0, 0.1, g), x)  # density 1 keeps everything


def test_della_is_seeded_per_tensor_and_model_and_refuses_bad_epsilon(tiny_model_family, tmp_path):
    fam = tiny_model_family
    params = {"density": 0.5, "epsilon": 0.1, "seed": 3}
    one, _ = _merge(tmp_path, "della", params, fam["base"], {m: fam[m] for m in "ab"}, "one")
    two, _ = _merge(tmp_path, "della", params, fam["base"], {m: fam[m] for m in "ab"}, "two")
    assert all(torch.equal(v, state(two.path)[k]) for k, v in state(one.path).items())
    impl = _impl("della")
    with pytest.raises(MergeError, match=r"model 'b'.*\(here 0\.55 to 1\.05\)"):
        impl._variants(impl.Params.model_validate({"density": {"a": 0.5, "b": 0.8},
                                                   "epsilon": 0.25}), ["a", "b"])
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 0.5\)"):
        impl.Params.model_validate({"epsilon": 0.6})
    # della-linear with one model, normalize off, weight 2: the pruned delta times 2
    lin = _impl("della-linear")
    art, _ = _merge(tmp_path, "della-linear", {"density": 0.5, "weight": 2.0, "seed": 3},
                    fam["base"], {"a": fam["a"]}, "lin")
    base, a, got = state(fam["base"]), state(fam["a"]), state(art.path)
    name = "model.layers.1.self_attn.q_proj.weight"
    from engine.merging.arithmetic import seed_for

    want = magprune_(a[name] - base[name], 0.5, 0.15,
                     torch.Generator().manual_seed(seed_for(3, name, 0)))
    torch.testing.assert_close(got[name], base[name] + 2 * want)
    assert lin.Params().normalize is False and impl.Params().normalize is True


# --- passthrough ----------------------------------------------------------------------------

def test_passthrough_stacks_layers_renames_and_updates_config(tiny_model_family, tmp_path):
    fam = tiny_model_family
    slices = [{"model": "a", "layers": [0, 3]}, {"model": "b", "layers": [1, 4]},
              {"model": "a", "layers": [3, 4], "scale": {"o_proj|down_proj": 0.0}}]
    art, context = _merge(tmp_path, "passthrough", {"slices": slices}, None,
                          {"a": fam["a"], "b": fam["b"]})
    config = json.loads((art.path / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    got, a, b = state(art.path), state(fam["a"]), state(fam["b"])
    origin = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3), (a, 3)]
    for out, (src, layer) in enumerate(origin):
        for k in [k for k in a if k.startswith("model.layers.0.")]:
            rest = k.removeprefix("model.layers.0.")
            want = src[f"model.layers.{layer}.{rest}"]
            if out == 6 and ("o_proj" in rest or "down_proj" in rest):
                want = torch.zeros_like(want)
            assert torch.equal(got[f"model.layers.{out}.{rest}"], want), (out, rest)
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])  # the last slice's model
    assert not any(k.startswith("model.layers.7.") for k in got)
    meta = json.loads((art.path / "lingoforge.json").read_text())
    assert meta["merge"]["layers"] == ["a:0", "a:1", "a:2", "b:1", "b:2", "b:3", "a:3"]
    assert context.stats.notes["merge"]["tensors"] == len(got)
    from engine.models.modelio import load_model

    load_model(art.path)  # transformers loads the deeper model


def test_passthrough_errors_name_the_slice_model_and_range(tiny_model_family, tmp_path):
    fam = tiny_model_family
    models = {"a": fam["a"], "b": fam["b"]}
    with pytest.raises(MergeError, match=r"slices\[1\]: layers \[2, 6\) of model 'b' are out of "
                                         r"range: it has 4 layers"):
        _merge(tmp_path, "passthrough", {"slices": [{"model": "a", "layers": [0, 2]},
                                                    {"model": "b", "layers": [2, 6]}]}, None, models)
    with pytest.raises(MergeError, match=r"slices\[0\]: model 'x' is not one of this stage's "
                                         r"models \['a', 'b'\]"):
        _merge(tmp_path, "passthrough", {"slices": [{"model": "x", "layers": [0, 2]}]}, None, models)
    with pytest.raises(MergeError, match=r"model\(s\) \['b'\] are in the stage's models but no "
                                         "slice"):
        _merge(tmp_path, "passthrough", {"slices": [{"model": "a", "layers": [0, 2]}]}, None, models)
    with pytest.raises(ValueError, match="start < stop"):
        _impl("passthrough").Params.model_validate({"slices": [{"model": "a", "layers": [2, 2]}]})
