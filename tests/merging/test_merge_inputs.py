"""Merge inputs beyond the happy path: header pre-flight in ``engine validate``, bad
files, per-tensor overrides, vocabulary-aware merging and read-ahead -- all on real
tiny Llama folders. Plugin-specific tests carry the plugin's name (``ties``, ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from test_merge_plugins import art, assert_same_state, edited_copy, in_memory, inputs, run, state

from engine.api import ModelArtifact, StageInputs
from engine.core.errors import MergeError, RecipeError
from engine.merging import arithmetic, check_merge_inputs
from engine.merging.preflight import check_merge_paths
from engine_plugins.task_arithmetic import TaskArithmetic
from engine_plugins.ties import Ties


def validate(tmp_path: Path, models: dict[str, Path], params: dict | None = None,
             plugin: str = "ties") -> None:
    from engine.recipe.spec import parse_recipe
    from engine.recipe.validate import plan_recipe

    names = [n for n in models if n != "base"]
    recipe = parse_recipe({"name": "r", "models": {n: {"path": str(p)} for n, p in models.items()},
                           "stages": [{"name": "merged", "stage": "merge", "plugin": plugin,
                                       "base": "base", "models": names, "params": params or {}}]})
    plan_recipe(recipe, tmp_path, "r.yaml")


# --- pre-flight in engine validate and bad files ---------------------------------------


def test_ties_validate_reads_headers_and_names_missing_tensor(tiny_model_family, tmp_path):
    fam = tiny_model_family
    broken = edited_copy(fam["a"], tmp_path / "a-broken",
                         lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    validate(tmp_path, {"base": fam["base"], "a": fam["a"], "b": fam["b"]})  # fine
    with pytest.raises(RecipeError, match=r"r.yaml: stage 'merged'.*model 'a' lacks tensor\(s\) "
                                          r"'model.layers.2.self_attn.k_proj.weight'"):
        validate(tmp_path, {"base": fam["base"], "a": broken, "b": fam["b"]})


def test_ties_validate_shape_mismatch_and_truncated_shard(tiny_model_family, tmp_path):
    fam = tiny_model_family
    wide = edited_copy(fam["b"], tmp_path / "b-wide", lambda t: t.update(
        {"model.norm.weight": torch.ones(33)}))
    with pytest.raises(RecipeError, match=r"'model.norm.weight' has shape \[33\] in model 'b'"):
        validate(tmp_path, {"base": fam["base"], "a": fam["a"], "b": wide})
    cut = edited_copy(fam["b"], tmp_path / "b-cut")
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(RecipeError, match=r"model 'b'.*truncated"):
        validate(tmp_path, {"base": fam["base"], "b": cut})
    with pytest.raises(MergeError, match=r"model 'b'.*truncated"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("b", cut)])


def test_ties_missing_shard_is_named(tiny_model_family, make_context, tmp_path):
    fam = tiny_model_family
    sharded = run(TaskArithmetic(), make_context, inputs(fam, "a"), name="sh", shard_size="50KB").path
    copy = tmp_path / "sharded"
    shutil.copytree(sharded, copy)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MergeError, match=f"model 'a'.*missing.*{victim.name}"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("a", copy)])


def test_ties_int_and_float_tensor_mismatch(tiny_model_family, tmp_path):
    fam = tiny_model_family
    ints = edited_copy(fam["a"], tmp_path / "a-int", lambda t: t.update(
        {"model.norm.weight": torch.ones(32, dtype=torch.int32)}))
    with pytest.raises(MergeError, match="'model.norm.weight' is I32 in model 'a' but F32 in base"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("a", ints)])


def test_ties_validate_checks_zero_weight_sum_in_an_override(tiny_model_family, tmp_path):
    fam = tiny_model_family
    with pytest.raises(RecipeError, match="sum to zero"):
        validate(tmp_path, {"base": fam["base"], "a": fam["a"], "b": fam["b"]},
                 {"overrides": [{"match": "mlp", "weight": {"a": 1.0, "b": -1.0}}]})


# --- per-tensor overrides -----------------------------------------------------------------


def test_ties_overrides_first_match_wins(tiny_model_family, make_context):
    fam = tiny_model_family
    out = run(Ties(), make_context, inputs(fam, "a", "b"), density=0.2, overrides=[
        {"match": r"embed_tokens|lm_head", "density": 0.9},
        {"match": r"layers\.0\.", "density": 0.5, "weight": {"a": 2.0}},
        {"match": r"embed_tokens", "density": 0.1}])  # shadowed by the first override

    def expected(name: str, b, ms):
        if "embed_tokens" in name or "lm_head" in name:
            return arithmetic.ties(b, ms, [1, 1], [0.9, 0.9])
        if "layers.0." in name:
            return arithmetic.ties(b, ms, [2, 1], [0.5, 0.5])
        return arithmetic.ties(b, ms, [1, 1], [0.2, 0.2])

    base, a, b = (state(fam[m]) for m in ("base", "a", "b"))
    assert_same_state(out.path, {k: expected(k, base[k], [a[k], b[k]]) for k in base})


@pytest.mark.parametrize("override, message", [
    ({"match": "mlp", "density": 1.5}, r"overrides\[0\] \(match 'mlp'\): density"),
    ({"match": "mlp", "out_dtype": "float16"}, "out_dtype cannot be set per tensor"),
    ({"match": "mlp", "densty": 0.5}, r"overrides\[0\].*densty"),
    ({"match": "(", "density": 0.5}, "not a valid regular expression"),
])
def test_ties_bad_override_is_rejected_naming_it(override, message):
    with pytest.raises(ValidationError, match=message):
        Ties.Params(overrides=[override])


# --- vocabulary-aware merging ---------------------------------------------------------------


def _extended(tmp_path: Path, tiny_tokenizer, name: str, new_tokens: list[str], seed: int) -> Path:
    from conftest import build_tiny_llama
    from transformers import PreTrainedTokenizerFast

    src = tmp_path / f"{name}-tok"
    tiny_tokenizer.save_pretrained(str(src))
    tok = PreTrainedTokenizerFast.from_pretrained(str(src))
    tok.add_tokens(new_tokens)
    return build_tiny_llama(tmp_path / name, tokenizer=tok, seed=seed, vocab_size=len(tok))


def test_ties_vocab_extension_keeps_new_rows_and_union_tokenizer(tiny_model_family, tiny_tokenizer,
                                                                 make_context, tmp_path):
    fam = tiny_model_family
    v = len(tiny_tokenizer)
    x = _extended(tmp_path, tiny_tokenizer, "x", ["<lum_a>", "<lum_b>", "<lum_c>"], seed=7)
    y = _extended(tmp_path, tiny_tokenizer, "y", ["<lum_a>"], seed=8)
    context = make_context("vocab", stage_kind="merge", plugin="ties")
    out = Ties().run(context, StageInputs(base=art(fam, "base"), models=[
        art(fam, "a"), ModelArtifact("x", x), ModelArtifact("y", y)]), Ties.Params(density=0.5))
    got, sx, sy = state(out.path), state(x), state(y)
    base, a = state(fam["base"]), state(fam["a"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[name].shape[0] == v + 3
        torch.testing.assert_close(got[name][:v], arithmetic.ties(
            base[name], [a[name], sx[name][:v], sy[name][:v]], [1] * 3, [0.5] * 3), rtol=0, atol=0)
        torch.testing.assert_close(got[name][v], (sx[name][v] + sy[name][v]) / 2)  # both have it
        torch.testing.assert_close(got[name][v + 1:], sx[name][v + 1:], rtol=0, atol=0)  # only x
    assert json.loads((out.path / "config.json").read_text())["vocab_size"] == v + 3
    assert "<lum_c>" in (out.path / "tokenizer.json").read_text()
    note = context.stats.notes["vocab"]
    assert note["extra_rows"] == [
        {"rows": [v, v + 1], "from": ["x", "y"], "rule": "mean of the models that have them"},
        {"rows": [v + 1, v + 3], "from": ["x"], "rule": "mean of the models that have them"}]
    assert json.loads((out.path / "lingoforge.json").read_text())["merge"]["vocab"] == note


def test_ties_base_also_listed_beside_a_larger_vocabulary(tiny_model_family, tiny_tokenizer,
                                                          make_context, tmp_path):
    """Regression: ``models: [base, x]`` with x's vocabulary larger crashed with a
    RuntimeError (the base's name counted once among the vocab sizes, so no vocab plan
    was made). The base's task vector is zero: the merge equals ``models: [x]``."""
    fam = tiny_model_family
    v = len(tiny_tokenizer)
    x = _extended(tmp_path, tiny_tokenizer, "x", ["<lum_a>", "<lum_b>"], seed=7)
    base = art(fam, "base")
    plan = check_merge_inputs(base, [base, ModelArtifact("x", x)])
    assert plan.vocab is not None and plan.vocab.out_size == v + 2
    both_ctx = make_context("both", stage_kind="merge", plugin="ties")
    both = Ties().run(both_ctx, StageInputs(base=base, models=[base, ModelArtifact("x", x)]),
                      Ties.Params(density=0.5))
    alone = Ties().run(make_context("alone", stage_kind="merge", plugin="ties"),
                       StageInputs(base=base, models=[ModelArtifact("x", x)]), Ties.Params(density=0.5))
    assert_same_state(both.path, state(alone.path))
    assert state(both.path)["lm_head.weight"].shape[0] == v + 2
    assert both_ctx.stats.notes["vocab"]["extra_rows"] == [
        {"rows": [v, v + 2], "from": ["x"], "rule": "mean of the models that have them"}]
    checked = check_merge_paths(("base", fam["base"]), [("base", fam["base"]), ("x", x)])
    assert checked is not None and checked.vocab is not None  # engine validate's plan too


def test_ties_conflicting_tokenizers_fail_naming_models_and_token(tiny_model_family, tiny_tokenizer,
                                                                  tmp_path):
    fam = tiny_model_family
    x = _extended(tmp_path, tiny_tokenizer, "x", ["<lum_a>", "<lum_b>"], seed=7)
    y = _extended(tmp_path, tiny_tokenizer, "y", ["<lum_b>"], seed=8)  # same token, other id
    with pytest.raises(MergeError, match=r"tokenizers conflict: token '<lum_b>' has id \d+ in "
                                         r"model 'y' but id \d+ in model 'x'"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("x", x), ModelArtifact("y", y)])


# --- read-ahead -------------------------------------------------------------------------------


def test_ties_prefetch_is_bit_identical_and_propagates_errors(tiny_model_family, make_context,
                                                              tmp_path):
    fam = tiny_model_family
    ahead = run(Ties(), make_context, inputs(fam, "a", "b", "c"), name="ahead", density=0.3,
                prefetch="1KB")
    plain = run(Ties(), make_context, inputs(fam, "a", "b", "c"), name="plain", density=0.3,
                prefetch=0)
    assert_same_state(ahead.path, state(plain.path))
    assert_same_state(plain.path, in_memory(fam, ["a", "b", "c"], lambda b, ms: arithmetic.ties(
        b, ms, [1] * 3, [0.3] * 3)))
    names = list(state(fam["base"]))

    def poison(t):
        t[names[5]] = t[names[5]].clone().fill_(float("inf"))

    bad = edited_copy(fam["c"], tmp_path / "c-inf", poison)
    context = make_context("bad", stage_kind="merge", plugin="ties")
    with pytest.raises(MergeError, match=f"model 'c' tensor '{names[5]}' contains NaN or inf"):
        Ties().run(context, StageInputs(base=art(fam, "base"), models=[
            art(fam, "a"), ModelArtifact("c", bad)]), Ties.Params(prefetch="64MB"))
    assert list(context.output_dir.iterdir()) == []
