"""Merge plugins end to end on real tiny Llama folders: streaming, sharding, errors.

Each plugin's tests have its name in theirs (``-k task_arithmetic``, ``-k ties``,
``-k slack_ties``); streaming and pre-flight tests are named ``streaming`` and
``preflight``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import state
from pydantic import ValidationError
from safetensors.torch import save_file

from engine.api import ModelArtifact, StageInputs
from engine.core.errors import MergeError
from engine.merging import arithmetic, check_merge_inputs
from engine.models import modelio
from engine.models.tensorio import parse_size, plan_shards, read_tensor_infos
from engine_plugins.dare_ties import DareTies
from engine_plugins.linear import Linear
from engine_plugins.slack_ties import SlackTies
from engine_plugins.task_arithmetic import TaskArithmetic
from engine_plugins.ties import Ties


def art(family: dict[str, Path], name: str) -> ModelArtifact:
    return ModelArtifact(name, family[name])


def inputs(family: dict[str, Path], *models: str, base: str | None = "base") -> StageInputs:
    return StageInputs(base=art(family, base) if base else None,
                       models=[art(family, m) for m in models])


def run(impl, make_context, stage_inputs: StageInputs, name: str = "merged", **params) -> ModelArtifact:
    context = make_context(name, stage_kind="merge", plugin=impl.name)
    return impl.run(context, stage_inputs, impl.Params.model_validate(params))


def in_memory(family: dict[str, Path], models: list[str], fn: Callable, base: str = "base"):
    """The same arithmetic applied to whole state dicts, without streaming."""
    b, ms = state(family[base]), [state(family[m]) for m in models]
    return {k: fn(b[k], [m[k] for m in ms]) for k in b}


def edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
                config: dict | None = None) -> Path:
    """A copy of a model folder with its tensors (and config) changed."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = state(src)
        edit(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def assert_same_state(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = state(folder)
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=0, atol=0, msg=k)


# --- task-arithmetic -------------------------------------------------------------------


def test_task_arithmetic_plugin_equals_in_memory_merge(tiny_model_family, make_context):
    fam = tiny_model_family
    out = run(TaskArithmetic(), make_context, inputs(fam, "a", "b"),
              weight={"a": 0.3, "b": 0.5}, **{"lambda": 0.8})
    expected = in_memory(fam, ["a", "b"], lambda b, ms: arithmetic.task_arithmetic(
        b, ms, [0.3, 0.5], lam=0.8))
    assert_same_state(out.path, expected)
    assert out.meta["merge"]["method"] == "task-arithmetic"
    assert json.loads((out.path / "lingoforge.json").read_text())["merge"]["params"]["lambda"] == 0.8
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out.path / name).is_file()


def test_task_arithmetic_compute_dtype_float64(tiny_model_family, make_context):
    fam = tiny_model_family
    out = run(TaskArithmetic(), make_context, inputs(fam, "a", "b"), compute_dtype="float64",
              weight=0.5)
    b, a_, b_ = (state(fam[m]) for m in ("base", "a", "b"))
    expected = {k: arithmetic.task_arithmetic(b[k].double(), [a_[k].double(), b_[k].double()],
                                              [0.5, 0.5]).float() for k in b}
    assert_same_state(out.path, expected)


def test_task_arithmetic_zero_weights_with_normalize_is_an_error(tiny_model_family, make_context):
    with pytest.raises(MergeError, match=r"sum to zero \(a=1, b=-1\)"):
        run(TaskArithmetic(), make_context, inputs(tiny_model_family, "a", "b"),
            weight={"a": 1.0, "b": -1.0}, normalize=True)


def test_task_arithmetic_needs_a_base(tiny_model_family, make_context):
    with pytest.raises(MergeError, match="needs a base"):
        run(TaskArithmetic(), make_context, inputs(tiny_model_family, "a", "b", base=None))


def test_task_arithmetic_unknown_model_in_weights_is_an_error(tiny_model_family, make_context):
    with pytest.raises(MergeError, match=r"params.weight names model\(s\) \['sft'\]"):
        run(TaskArithmetic(), make_context, inputs(tiny_model_family, "a", "b"), weight={"sft": 2.0})


# --- ties ------------------------------------------------------------------------------


def test_ties_plugin_streams_shards_that_transformers_loads(tiny_model_family, make_context):
    from transformers import AutoModelForCausalLM

    fam = tiny_model_family
    out = run(Ties(), make_context, inputs(fam, "a", "b", "c"), density={"a": 0.3, "b": 0.5},
              weight={"c": 0.5}, shard_size="64KB")
    shards = sorted(out.path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert not (out.path / "model.safetensors").exists()
    index = json.loads((out.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 64_000 + 4096 for s in shards)  # + header; no tensor > 64KB

    expected = in_memory(fam, ["a", "b", "c"], lambda b, ms: arithmetic.ties(
        b, ms, [1.0, 1.0, 0.5], [0.3, 0.5, 1.0]))
    assert_same_state(out.path, expected)
    model = AutoModelForCausalLM.from_pretrained(str(out.path))
    loaded = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_ties_reads_sharded_inputs(tiny_model_family, make_context):
    fam = tiny_model_family
    sharded = run(TaskArithmetic(), make_context, inputs(fam, "a"), name="sharded-a",
                  shard_size="50KB").path
    assert (sharded / "model.safetensors.index.json").is_file()
    out = run(Ties(), make_context, StageInputs(base=art(fam, "base"), models=[
        ModelArtifact("a", sharded), art(fam, "b")]), density=0.5)
    assert_same_state(out.path, in_memory({**fam, "a": sharded}, ["a", "b"],
                                          lambda b, ms: arithmetic.ties(b, ms, [1, 1], [0.5, 0.5])))
    assert (out.path / "model.safetensors").is_file()  # 2GB default: one shard, no index
    assert not (out.path / "model.safetensors.index.json").exists()


def test_ties_out_dtype_bfloat16(tiny_model_family, make_context):
    out = run(Ties(), make_context, inputs(tiny_model_family, "a", "b"), out_dtype="bfloat16")
    assert {t.dtype for t in state(out.path).values()} == {torch.bfloat16}
    assert json.loads((out.path / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("density", [0, 1.5, -0.1, {"a": 0.0}])
def test_ties_density_out_of_range_is_rejected(density):
    with pytest.raises(ValidationError, match=r"density must be in \(0, 1\]"):
        Ties.Params(density=density)


def test_ties_zero_weight_sum_with_normalize_is_an_error(tiny_model_family, make_context):
    with pytest.raises(MergeError, match="sum to zero"):
        run(Ties(), make_context, inputs(tiny_model_family, "a", "b"), weight={"b": -1.0})


def test_ties_unknown_model_in_density_is_an_error(tiny_model_family, make_context):
    with pytest.raises(MergeError, match=r"params.density names model\(s\) \['z'\]"):
        run(Ties(), make_context, inputs(tiny_model_family, "a", "b"), density={"z": 0.5})


def test_ties_params_take_lambda_by_its_recipe_name():
    p = Ties.Params.model_validate({"lambda": 0.5, "density": {"a": 0.2}})
    assert p.lambda_ == 0.5 and p.normalize is True and p.density == {"a": 0.2}
    assert "lambda" in Ties.Params.model_json_schema()["properties"]
    with pytest.raises(ValidationError):
        Ties.Params.model_validate({"lamda": 0.5})


# --- pre-flight and bad inputs ---------------------------------------------------------


def test_ties_preflight_missing_tensor(tiny_model_family, make_context, tmp_path):
    fam = tiny_model_family
    broken = edited_copy(fam["a"], tmp_path / "a-broken",
                         lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MergeError, match=r"model 'a' lacks tensor\(s\) 'model.layers.1.mlp.up_proj.weight'"):
        run(Ties(), make_context, StageInputs(base=art(fam, "base"), models=[
            ModelArtifact("a", broken), art(fam, "b")]))


def test_ties_preflight_shape_mismatch(tiny_model_family, tmp_path):
    fam = tiny_model_family

    def shrink(t):
        t["model.norm.weight"] = t["model.norm.weight"][:31].clone()

    broken = edited_copy(fam["b"], tmp_path / "b-broken", shrink)
    with pytest.raises(MergeError, match=r"tensor 'model.norm.weight' has shape \[31\] in model 'b' "
                                         r"but \[32\] in base 'base'"):
        check_merge_inputs(art(fam, "base"), [art(fam, "a"), ModelArtifact("b", broken)])


def test_ties_preflight_architecture_mismatch(tiny_model_family, tmp_path):
    fam = tiny_model_family
    other = edited_copy(fam["a"], tmp_path / "a-mistral",
                        config={"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    with pytest.raises(MergeError, match="model 'a' is model_type 'mistral'.*base 'base' is model_type 'llama'"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("a", other)])
    with pytest.raises(MergeError, match="different architectures"):
        Ties().check({"base": [modelio.read_config(fam["base"])],
                      "models": [modelio.read_config(other)]}, Ties.Params())


def test_ties_preflight_extra_tensor(tiny_model_family, tmp_path):
    fam = tiny_model_family

    def add(t):
        t["model.extra.weight"] = torch.zeros(4)

    broken = edited_copy(fam["a"], tmp_path / "a-extra", add)
    with pytest.raises(MergeError, match=r"model 'a' has tensor\(s\) 'model.extra.weight' that base"):
        check_merge_inputs(art(fam, "base"), [ModelArtifact("a", broken)])


def test_ties_nan_input_fails_and_leaves_no_output(tiny_model_family, make_context, tmp_path):
    fam = tiny_model_family
    last = list(read_tensor_infos(fam["base"]))[-1]  # fails after earlier shards were written

    def poison(t):
        t[last] = t[last].clone()
        t[last].view(-1)[3] = float("nan")

    broken = edited_copy(fam["b"], tmp_path / "b-nan", poison)
    context = make_context("nan", stage_kind="merge", plugin="ties")
    with pytest.raises(MergeError, match=f"model 'b' tensor '{last}' contains NaN or inf"):
        Ties().run(context, StageInputs(base=art(fam, "base"), models=[
            art(fam, "a"), ModelArtifact("b", broken)]), Ties.Params(shard_size="32KB"))
    assert list(context.output_dir.iterdir()) == []


# --- slack-ties ------------------------------------------------------------------------


def test_slack_ties_plugin_equals_in_memory_merge_and_reports_counts(tiny_model_family, make_context):
    fam = tiny_model_family
    context = make_context("slack", stage_kind="merge", plugin="slack-ties")
    out = SlackTies().run(context, inputs(fam, "a", "b"), SlackTies.Params(density=0.3, slack=0.75))
    expected = in_memory(fam, ["a", "b"], lambda b, ms: arithmetic.slack_ties(
        b, ms, [1, 1], [0.3, 0.3], protect=1, slack=0.75))
    assert_same_state(out.path, expected)
    note = context.stats.notes["slack_ties"]
    assert note["protected"] == "b"  # the last model by default
    assert note["kept_fraction"] > note["kept_fraction_ties"]
    assert out.meta["merge"]["slack_ties"]["kept"] == note["kept"]


def test_slack_ties_with_zero_slack_writes_what_ties_writes(tiny_model_family, make_context):
    fam = tiny_model_family
    params = {"density": {"a": 0.2, "b": 0.6}, "weight": {"a": 1.5}}
    plain = run(Ties(), make_context, inputs(fam, "a", "b"), name="plain", **params)
    slack = run(SlackTies(), make_context, inputs(fam, "a", "b"), name="slack0",
                slack=0.0, protect="a", **params)
    assert_same_state(slack.path, state(plain.path))


def test_slack_ties_unknown_protected_model_is_an_error(tiny_model_family, make_context):
    with pytest.raises(MergeError, match="params.protect names 'sft'"):
        run(SlackTies(), make_context, inputs(tiny_model_family, "a", "b"), protect="sft")


@pytest.mark.parametrize("slack", [-0.1, 1.1])
def test_slack_ties_slack_out_of_range_is_rejected(slack):
    with pytest.raises(ValidationError, match="slack"):
        SlackTies.Params(slack=slack)


# --- linear, dare-ties, registration, streaming helpers -------------------------------


def test_linear_plugin_averages_without_base(tiny_model_family, make_context):
    fam = tiny_model_family
    out = run(Linear(), make_context, inputs(fam, "a", "b", base=None), weight={"a": 3.0})
    a, b = state(fam["a"]), state(fam["b"])
    assert_same_state(out.path, {k: arithmetic.linear([a[k], b[k]], [3.0, 1.0]) for k in a})


def test_dare_ties_plugin_is_seeded(tiny_model_family, make_context):
    fam = tiny_model_family
    one = run(DareTies(), make_context, inputs(fam, "a", "b"), name="d1", density=0.5, seed=4)
    two = run(DareTies(), make_context, inputs(fam, "a", "b"), name="d2", density=0.5, seed=4)
    assert_same_state(two.path, state(one.path))
    name = "model.layers.0.self_attn.q_proj.weight"
    b, a_, b_ = (state(fam[m])[name] for m in ("base", "a", "b"))
    assert torch.equal(state(one.path)[name], arithmetic.dare_ties(
        b, [a_, b_], [1, 1], [0.5, 0.5], seed=4, tensor_name=name))


def test_merge_plugins_task_arithmetic_ties_slack_ties_are_registered():
    from engine.registry.manager import implementations

    merge = implementations()["merge"]
    assert {"task-arithmetic", "ties", "slack-ties"} <= set(merge)


def test_streaming_shard_plan_and_sizes():
    from engine.models.tensorio import PlannedTensor

    ts = [PlannedTensor(f"t{i}", torch.float32, (10,)) for i in range(5)]  # 40 bytes each
    assert [len(s) for s in plan_shards(ts, 100)] == [2, 2, 1]
    assert [len(s) for s in plan_shards(ts, 10)] == [1, 1, 1, 1, 1]  # too big: one per shard
    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError, match="unreadable size"):
        parse_size("lots")
