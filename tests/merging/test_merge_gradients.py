"""Layer gradients: a merge param written as a list of numbers, spread over the layers
(mergekit's convention), resolved by MergeMethod before the arithmetic sees it."""

from __future__ import annotations

import pytest
import torch
from helpers import merge_impl, run_merge_method, state

from engine.core.errors import MergeError
from engine.merging.gradients import interpolate, layer_index, layer_position, value_at
from engine.merging.params import resolve_per_model
from engine_plugins.slerp import slerp

LAYERS = 4  # the tiny family's decoder layers


_impl, _merge = merge_impl, run_merge_method


def test_anchors_are_spread_evenly_and_interpolated_as_mergekit_does():
    anchors = [0.0, 0.5, 0.3, 0.7, 1.0]
    # four gaps over [0, 1]: 0.375 is halfway between anchors 1 and 2
    assert interpolate(anchors, 0.375) == pytest.approx(0.4)
    assert [interpolate(anchors, layer_position(i, 5)) for i in range(5)] == anchors
    assert interpolate([2.0, 4.0], 1.0) == 4.0 and interpolate([3.0], 0.7) == 3.0
    assert layer_position(0, 1) == 1.0  # a one-layer model sits at the end, as in mergekit
    assert value_at({"a": [0.0, 1.0], "b": 0.25}, 0.5) == {"a": 0.5, "b": 0.25}
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None and layer_index("lm_head.weight") is None


def test_slerp_t_gradient_follows_the_layers_and_the_rest_takes_the_first_anchor(
        tiny_model_family, tmp_path):
    fam = tiny_model_family
    params = {"t": [0.0, 1.0], "overrides": [{"match": "mlp", "t": [1.0, 0.2, 0.6]}]}
    art, _ = _merge(tmp_path, "slerp", params, None, {"a": fam["a"], "b": fam["b"]})
    got, a, b = state(art.path), state(fam["a"]), state(fam["b"])
    checked = 0
    for name, value in got.items():
        layer = layer_index(name)
        anchors = [1.0, 0.2, 0.6] if "mlp" in name else [0.0, 1.0]
        t = anchors[0] if layer is None else interpolate(anchors, layer / (LAYERS - 1))
        torch.testing.assert_close(value, slerp(t, a[name], b[name]).to(value.dtype), msg=name)
        checked += layer is not None
    assert checked > LAYERS  # every layer's tensors, not only the embeddings
    # the first layer's attention is model a exactly, the last layer's is model b
    q0, q3 = "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    assert torch.equal(got[q0], a[q0]) and torch.allclose(got[q3], b[q3])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])


def test_a_per_model_weight_gradient_moves_from_one_model_to_the_other(tiny_model_family, tmp_path):
    fam = tiny_model_family
    art, _ = _merge(tmp_path, "linear", {"weight": {"a": [1.0, 0.0], "b": [0.0, 1.0]}}, None,
                    {"a": fam["a"], "b": fam["b"]})
    got, a, b = state(art.path), state(fam["a"]), state(fam["b"])
    for name, value in got.items():
        layer = layer_index(name)
        x = 0.0 if layer is None else layer / (LAYERS - 1)
        want = (1 - x) * a[name].double() + x * b[name].double()  # linear normalises: sum is 1
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_anchors_and_layer_sums_are_named(tiny_model_family):
    ties = _impl("ties")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\].*got 0\.0 for model 'a'"):
        ties.Params.model_validate({"density": {"a": [0.5, 0.0]}})
    with pytest.raises(ValueError, match=r"overrides\[0\].*t must be in \[0, 1\]"):
        _impl("slerp").Params.model_validate({"t": 0.5, "overrides": [{"match": "mlp", "t": [0, 3]}]})
    # with normalize on, the weights at the middle of the layers sum to zero
    p = ties.Params.model_validate({"weight": {"a": [1.0, 0.0, 2.0], "b": 0.0}})
    with pytest.raises(MergeError, match=r"params at layer 1: params.weight sum to zero"):
        ties._variants(p, ["a", "b"], 3)
    with pytest.raises(MergeError, match=r"gradient position 0.5: params.weight sum to zero"):
        ties._variants(p, ["a", "b"])  # layer count unknown (engine validate): each anchor
    # a merge function that predates MergeMethod cannot spread a gradient: a clear error
    with pytest.raises(MergeError, match=r"params.weight is a layer gradient"):
        resolve_per_model([1.0, 0.0], ["a", "b"], "weight")


def test_a_gradient_merge_is_reproducible_and_a_constant_gradient_equals_the_number(
        tiny_model_family, tmp_path):
    fam = tiny_model_family
    models = {"a": fam["a"], "b": fam["b"]}
    flat, _ = _merge(tmp_path, "ties", {"density": 0.5}, fam["base"], models, stage="flat")
    same, _ = _merge(tmp_path, "ties", {"density": [0.5, 0.5, 0.5]}, fam["base"], models, stage="same")
    assert all(torch.equal(v, state(same.path)[k]) for k, v in state(flat.path).items())


def test_engine_validate_checks_a_gradient_at_the_layers_config_json_declares():
    from engine.api import InputConfigs

    ties = _impl("ties")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 8,
           "hidden_size": 32, "vocab_size": 64}
    configs = InputConfigs({"base": [cfg], "models": [cfg, cfg]}, names={"models": ["a", "b"]})
    # 1 - 7x reaches 0 at x = 1/7: layer 1 of 8; [1, 0, 2] is 0 only at x = 0.5, between layers
    bad = ties.Params.model_validate({"weight": {"a": [1.0, -6.0], "b": 0.0}})
    with pytest.raises(MergeError, match=r"at layer 1: params.weight sum to zero"):
        ties.check(configs, bad)
    ties.check(configs, ties.Params.model_validate({"weight": {"a": [1.0, 0.0, 2.0], "b": 0.0}}))
