"""Row-sliced merging of large tensors: the exact magnitude threshold and the sliced
execution path must give bit-identical results to whole-tensor merging.

The tiny models' tensors are a few thousand elements, so the slice size is lowered
(``execute.CHUNK_ELEMENTS``) to make every matrix go through the sliced path.
"""

from __future__ import annotations

import pytest
import torch
from test_merge_plugins import assert_same_state, in_memory, inputs, run, state

from engine.core.errors import MergeError
from engine.merging import arithmetic, execute
from engine.merging.arithmetic import MagnitudeThreshold, _magnitude_bits, keep_count
from engine.models.tensorio import PlannedTensor, ShardedWriter
from engine_plugins.linear import Linear
from engine_plugins.slack_ties import SlackTies
from engine_plugins.task_arithmetic import TaskArithmetic
from engine_plugins.ties import Ties


def stable_top_k(x: torch.Tensor, density: float) -> torch.Tensor:
    """Reference trim: a stable descending sort of |x|, first ``k`` kept (ties: lowest index)."""
    k = keep_count(density, x.numel())
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view_as(x)


def _random_tensor(gen: torch.Generator, trial: int) -> torch.Tensor:
    n = int(torch.randint(1, 4000, (1,), generator=gen))
    if trial % 3 == 0:  # few distinct magnitudes: many ties at the threshold, zeros
        return torch.randint(-3, 4, (n,), generator=gen).float()
    x = torch.randn(n, generator=gen)
    return x.half().float() if trial % 5 == 0 else x


def test_magnitude_trim_equals_stable_sort_reference():
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        x = _random_tensor(gen, trial)
        density = float(torch.rand(1, generator=gen)) * 0.98 + 0.01
        assert torch.equal(arithmetic.magnitude_trim(x, density), stable_top_k(x, density)), trial


def test_magnitude_threshold_in_pieces_equals_whole_tensor_trim():
    gen = torch.Generator().manual_seed(1)
    for trial in range(150):
        x = _random_tensor(gen, trial)
        n = x.numel()
        density = float(torch.rand(1, generator=gen)) * 0.98 + 0.01
        bits = _magnitude_bits(x)
        cuts = sorted({0, n, *torch.randint(0, n, (4,), generator=gen).tolist()})
        pieces = list(zip(cuts, cuts[1:]))
        sel = MagnitudeThreshold(keep_count(density, n))
        for a, b in pieces:
            sel.count_high(bits[a:b])
        for a, b in pieces:
            sel.count_low(bits[a:b])
        out = torch.cat([torch.where(sel.dropped(bits[a:b]), 0, x[a:b]) for a, b in pieces])
        assert torch.equal(out, stable_top_k(x, density)), trial
        assert int((out != 0).sum()) <= keep_count(density, n)


def test_magnitude_trim_of_half_precision_and_negative_zero():
    x = torch.tensor([-0.0, 0.5, -0.5, 0.25, 0.0, -1.0], dtype=torch.bfloat16)
    out = arithmetic.magnitude_trim(x, 0.5)  # k = 3: -1.0 and the first two 0.5s
    assert out.tolist() == [0.0, 0.5, -0.5, 0.0, 0.0, -1.0]


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 100)


@pytest.mark.parametrize("prefetch", [0, "1MB"])
def test_ties_sliced_merge_is_bitwise_the_whole_tensor_merge(tiny_model_family, make_context,
                                                            small_slices, prefetch):
    fam = tiny_model_family
    params = {"density": {"a": 0.3, "b": 0.5, "c": 0.2}, "weight": {"a": 1.0, "b": 0.7},
              "overrides": [{"match": "embed_tokens", "density": 0.1}], "prefetch": prefetch}
    context = make_context("sliced", stage_kind="merge", plugin="ties")
    out = Ties().run(context, inputs(fam, "a", "b", "c"), Ties.Params.model_validate(params))
    sliced = context.stats.notes["merge"]["merged_in_slices"]
    assert any("embed_tokens" in n for n in sliced) and any("mlp" in n for n in sliced)

    b, ms = state(fam["base"]), [state(fam[m]) for m in ("a", "b", "c")]
    expected = {k: arithmetic.ties(b[k], [m[k] for m in ms], [1.0, 0.7, 1.0],
                                   [0.1] * 3 if "embed_tokens" in k else [0.3, 0.5, 0.2])
                for k in b}
    assert_same_state(out.path, expected)


def test_slack_ties_sliced_counts_and_tensors_equal_whole(tiny_model_family, make_context,
                                                          monkeypatch):
    fam = tiny_model_family
    params = {"density": 0.3, "slack": 0.6, "protect": "b"}
    outs, notes = [], []
    for chunk in (10**9, 100):
        monkeypatch.setattr(execute, "CHUNK_ELEMENTS", chunk)
        context = make_context(f"slack-{chunk}", stage_kind="merge", plugin="slack-ties")
        outs.append(SlackTies().run(context, inputs(fam, "a", "b", "c"),
                                    SlackTies.Params.model_validate(params)))
        notes.append(context.stats.notes)
    assert not notes[0]["merge"]["merged_in_slices"] and notes[1]["merge"]["merged_in_slices"]
    assert notes[0]["slack_ties"] == notes[1]["slack_ties"]
    assert_same_state(outs[1].path, state(outs[0].path))


def test_task_arithmetic_and_linear_sliced_equal_in_memory(tiny_model_family, make_context,
                                                           small_slices):
    fam = tiny_model_family
    out = run(TaskArithmetic(), make_context, inputs(fam, "a", "b"), weight={"a": 0.3, "b": 0.5},
              **{"lambda": 0.8})
    assert_same_state(out.path, in_memory(fam, ["a", "b"], lambda b, ms: arithmetic.task_arithmetic(
        b, ms, [0.3, 0.5], lam=0.8)))
    out = run(Linear(), make_context, inputs(fam, "a", "b", base="base"), name="lin",
              weight={"a": 2.0, "b": 1.0})
    assert_same_state(out.path, in_memory(fam, ["a", "b"], lambda _b, ms: arithmetic.linear(
        ms, [2.0, 1.0])))


def test_sliced_merge_names_a_nan_in_a_large_tensor(tiny_model_family, make_context, tmp_path,
                                                    small_slices):
    from test_merge_plugins import edited_copy

    fam = dict(tiny_model_family)

    def poison(t):
        t["model.embed_tokens.weight"][-1, -1] = float("nan")

    fam["bad"] = edited_copy(fam["b"], tmp_path / "bad", poison)
    with pytest.raises(MergeError, match=r"'bad' tensor 'model.embed_tokens.weight' contains NaN"):
        run(Ties(), make_context, inputs(fam, "a", "bad"), density=0.5)


def test_writer_rows_must_continue_the_planned_tensor(tmp_path):
    planned = [PlannedTensor("w", torch.float32, (4, 3)), PlannedTensor("v", torch.float32, (2,))]
    writer = ShardedWriter(tmp_path, planned, max_shard_bytes=10**6)
    writer.write_rows("w", torch.zeros(3, 3))
    with pytest.raises(RuntimeError, match="do not continue"):
        writer.write_rows("w", torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"expected tensor 'w'"):
        writer.write("w", torch.zeros(4, 3))  # a whole tensor in the middle of its rows
    writer.write_rows("w", torch.ones(1, 3))
    writer.write("v", torch.ones(2))
    writer.close()
    from safetensors.torch import load_file
    got = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(got["w"], torch.cat([torch.zeros(3, 3), torch.ones(1, 3)]))


def test_docs_positionwise_plugin_example_runs_and_equals_ties(tiny_model_family, make_context,
                                                               small_slices):
    """The plugin example of docs/merging.md, executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "merging.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class MyTies" in b)
    namespace: dict = {}
    exec(compile(block, "docs/merging.md", "exec"), namespace)
    impl = namespace["MyTies"]()
    fam, params = tiny_model_family, {"density": 0.4, "weight": {"a": 0.5}}
    got = run(impl, make_context, inputs(fam, "a", "b"), name="doc", **params)
    want = run(Ties(), make_context, inputs(fam, "a", "b"), name="ties", **params)
    assert_same_state(got.path, state(want.path))


@pytest.mark.parametrize("chunk", [10**9, 100], ids=["whole", "sliced"])
def test_overflow_in_the_output_dtype_is_named_and_nothing_is_left(tiny_model_family, make_context,
                                                                   tmp_path, monkeypatch, chunk):
    from test_merge_plugins import edited_copy

    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", chunk)
    fam = dict(tiny_model_family)

    def huge(t):
        t["model.embed_tokens.weight"][0, 0] = 1e6  # finite in float32, inf in float16

    fam["big"] = edited_copy(fam["b"], tmp_path / "big", huge)
    context = make_context(f"overflow-{chunk}", stage_kind="merge", plugin="task-arithmetic")
    with pytest.raises(MergeError, match=r"'model.embed_tokens.weight' is not finite in torch.float16"):
        TaskArithmetic().run(context, inputs(fam, "a", "big"),
                             TaskArithmetic.Params.model_validate({"out_dtype": "float16"}))
    assert not any(context.output_dir.glob("*.safetensors"))
    assert not (context.output_dir / "config.json").exists()


def test_large_tensors_merged_whole_are_said_and_recorded(tiny_model_family, tiny_tokenizer,
                                                          make_context, tmp_path, small_slices):
    """No silent fallback from row slices to whole tensors: a compute_dtype other than
    float32 and a vocabulary that differs (embedding and head, the largest tensors) are
    named in notes ``slow_paths``; a sliced merge records nothing."""
    from test_merge_inputs import _extended
    from test_merge_plugins import art

    from engine.api import ModelArtifact, StageInputs

    fam = tiny_model_family
    sliced = make_context("all-sliced", stage_kind="merge", plugin="ties")
    Ties().run(sliced, inputs(fam, "a", "b"), Ties.Params(density=0.5))
    assert "slow_paths" not in sliced.stats.notes

    f64 = make_context("f64", stage_kind="merge", plugin="ties")
    Ties().run(f64, inputs(fam, "a", "b"), Ties.Params(density=0.5, compute_dtype="float64"))
    detail = f64.stats.notes["slow_paths"]["merge: whole tensors"]
    assert "compute_dtype is float64" in detail and f64.stats.notes["merge"]["merged_in_slices"] == []

    x = _extended(tmp_path, tiny_tokenizer, "x", ["<lum_a>"], seed=7)
    vocab = make_context("vocab", stage_kind="merge", plugin="ties")
    Ties().run(vocab, StageInputs(base=art(fam, "base"), models=[art(fam, "a"), ModelArtifact("x", x)]),
               Ties.Params(density=0.5))
    detail = vocab.stats.notes["slow_paths"]["merge: whole tensors"]
    assert detail.startswith("2 tensor(s)") and "vocabulary sizes differ" in detail
    assert "lm_head.weight" in detail and "model.embed_tokens.weight" in detail
    assert vocab.stats.notes["merge"]["merged_in_slices"]  # every other matrix still sliced
