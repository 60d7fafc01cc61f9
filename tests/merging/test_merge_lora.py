"""PEFT LoRA adapter folders as merge inputs (engine/merging/lora.py), on real adapters that
PEFT writes for a tiny Llama: a merge of adapters equals the same merge of the full models
PEFT's ``merge_and_unload`` writes; mixed inputs; rsLoRA and rank/alpha patterns; errors;
the runner, ``engine merge`` and ``engine validate``."""

from __future__ import annotations

import json
import shutil
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_plugins import art, edited_copy, run, state

from engine.api import ModelArtifact, StageInputs
from engine.core.errors import MergeError, RecipeError
from engine.merging import check_merge_inputs, read_adapter
from engine.merging.lora import LoraReader
from engine.models import modelio
from engine_plugins.linear import Linear
from engine_plugins.task_arithmetic import TaskArithmetic
from engine_plugins.ties import Ties

peft = pytest.importorskip("peft")

Q = "model.layers.0.self_attn.q_proj.weight"
A_CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
             modules_to_save=["lm_head"])
B_CFG = dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
             rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
RS_CFG = dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "gate_proj"],
              rank_pattern={"v_proj": 2})


def make_adapter(base: Path, root: Path, name: str, seed: int, **lora) -> tuple[Path, Path, dict]:
    """Save a real PEFT adapter (random non-zero factors) trained on ``base`` to
    ``root/name``, and the full model ``merge_and_unload`` gives to ``root/name-full``.
    Returns both folders and PEFT's own scaling per module."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname or "modules_to_save" in pname:  # PEFT starts B at zero
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        scalings = {n.removeprefix("base_model.model."): m.scaling["default"]
                    for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
        adapter = root / name
        pm.save_pretrained(str(adapter))
        full = root / f"{name}-full"
        pm.merge_and_unload().save_pretrained(str(full))
    modelio.copy_tokenizer_files(base, full)
    return adapter, full, scalings


@pytest.fixture(scope="module")
def lora(tiny_model_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = tiny_model_family["base"]
    out: dict[str, Path] = {"base": base, "a": tiny_model_family["a"]}
    for name, seed, cfg in (("la", 1, A_CFG), ("lb", 2, B_CFG), ("rs", 3, RS_CFG)):
        adapter, full, scalings = make_adapter(base, root, name, seed, **cfg)
        out[name], out[f"{name}-full"] = adapter, full
        (root / f"{name}.scalings.json").write_text(json.dumps(scalings))
    return out


def scalings(lora: dict[str, Path], name: str) -> dict[str, float]:
    return json.loads((lora[name].parent / f"{name}.scalings.json").read_text())


def assert_close_states(a: Path, b: Path, atol: float = 1e-6) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


def adapter_copy(src: Path, dst: Path, edit=None, config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(str(dst / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# --- what PEFT writes, and how it is read ------------------------------------------------


def test_lora_reads_real_peft_names_and_scalings(lora):
    ad = read_adapter(lora["la"])
    assert Q in ad.deltas and "model.embed_tokens.weight" in ad.deltas
    assert ad.deltas["model.embed_tokens.weight"].transpose  # lora_embedding_A/B
    assert "lm_head.weight" in ad.replaced  # modules_to_save
    assert "model.embed_tokens.weight" in ad.replaced  # PEFT's copy of the targeted embedding
    for name in ("la", "lb", "rs"):
        ad = read_adapter(lora[name])
        peft_scaling = scalings(lora, name)
        assert {d.module for d in ad.deltas.values()} == set(peft_scaling)
        for d in ad.deltas.values():
            assert d.scaling == pytest.approx(peft_scaling[d.module], rel=1e-12), d.module
    rs = read_adapter(lora["rs"])
    assert rs.deltas[Q].scaling == pytest.approx(4 / 8 ** 0.5)
    assert rs.deltas["model.layers.0.self_attn.v_proj.weight"].scaling == pytest.approx(4 / 2 ** 0.5)
    lb = read_adapter(lora["lb"])
    assert lb.deltas["model.layers.1.self_attn.q_proj.weight"].scaling == pytest.approx(3 / 4)
    assert lb.deltas["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(16 / 4)
    assert lb.deltas["model.layers.0.self_attn.k_proj.weight"].scaling == pytest.approx(16 / 2)


def test_lora_reader_is_the_merged_model_and_reads_rows(lora):
    plan = check_merge_inputs(art(lora, "base"), [ModelArtifact("rs", lora["rs"]),
                                                  ModelArtifact("la", lora["la"])])
    assert [m.adapter is not None for m in plan.models] == [True, True]
    for m, full in zip(plan.models, (lora["rs-full"], lora["la-full"])):
        expected = state(full)
        with LoraReader(m.adapter, m.name, plan.base) as reader:
            for name in (Q, "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
                got = reader.get(name)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, expected[name], rtol=0, atol=0, msg=name)
                torch.testing.assert_close(reader.get_rows(name, 3, 17), got[3:17], rtol=0,
                                           atol=1e-7, msg=name)
    # the rule by hand: delta = alpha / sqrt(r) * B @ A for rsLoRA
    raw = load_file(str(lora["rs"] / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = (raw[f"{pre}.lora_B.weight"] @ raw[f"{pre}.lora_A.weight"]) * (4 / 8 ** 0.5)
    torch.testing.assert_close(state(lora["rs-full"])[Q] - state(lora["base"])[Q], delta,
                               rtol=0, atol=1e-6)


def test_lora_names_with_an_adapter_name_read_the_same(lora, tmp_path):
    """``state_dict()``-style names keep the adapter name (``lora_A.default.weight``,
    ``lora_embedding_A.default``, ``lm_head.modules_to_save.default.weight``)."""
    def rename(t):
        for k in list(t):
            new = (k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                   .replace("lm_head.weight", "lm_head.modules_to_save.default.weight"))
            if k.endswith(("lora_embedding_A", "lora_embedding_B")):
                new = k + ".default"
            t[new] = t.pop(k)

    named = adapter_copy(lora["la"], tmp_path / "named", rename)
    assert any(".default." in k for k in load_file(str(named / "adapter_model.safetensors")))
    plain, renamed = read_adapter(lora["la"]), read_adapter(named)
    assert plain.deltas.keys() == renamed.deltas.keys()
    assert plain.replaced.keys() == renamed.replaced.keys()
    base = check_merge_inputs(art(lora, "base"), [ModelArtifact("n", named)])
    with LoraReader(renamed, "n", base.base) as reader:
        expected = state(lora["la-full"])
        for name in (Q, "model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(reader.get(name), expected[name], rtol=0, atol=0)

    two = adapter_copy(lora["la"], tmp_path / "two", lambda t: t.update(
        {k.replace(".lora_A.", ".lora_A.other."): v.clone() for k, v in list(t.items())
         if ".lora_A." in k}
        | {k.replace(".lora_A.", ".lora_A.default."): t.pop(k) for k in list(t) if ".lora_A." in k}))
    with pytest.raises(MergeError, match=r"holds several adapters \(\['default', 'other'\]\)"):
        read_adapter(two)


# --- merges equal the merges of merge_and_unload's full models ------------------------------


@pytest.mark.parametrize("slices", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("impl,params", [(TaskArithmetic(), {"weight": {"x": 1.0, "y": 0.5}}),
                                         (Ties(), {"density": 0.3, "weight": {"x": 1.0, "y": 0.7}})])
def test_lora_merge_equals_merge_of_merged_full_models(lora, make_context, impl, params, slices,
                                                       monkeypatch):
    if slices:  # every matrix in row slices: the adapter reader's get_rows is used
        from engine.merging import execute
        monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 100)
    adapters = StageInputs(base=art(lora, "base"), models=[ModelArtifact("x", lora["la"]),
                                                           ModelArtifact("y", lora["lb"])])
    fulls = StageInputs(base=art(lora, "base"), models=[ModelArtifact("x", lora["la-full"]),
                                                        ModelArtifact("y", lora["lb-full"])])
    got = run(impl, make_context, adapters, name="from-adapters", **params)
    want = run(impl, make_context, fulls, name="from-fulls", **params)
    assert_close_states(got.path, want.path)
    assert json.loads((got.path / "config.json").read_text()) == json.loads(
        (want.path / "config.json").read_text())
    assert (got.path / "tokenizer.json").is_file()


def test_lora_mixed_with_a_full_model_and_rslora(lora, make_context):
    mixed = StageInputs(base=art(lora, "base"), models=[ModelArtifact("rs", lora["rs"]),
                                                        art(lora, "a")])
    fulls = StageInputs(base=art(lora, "base"), models=[ModelArtifact("rs", lora["rs-full"]),
                                                        art(lora, "a")])
    got = run(Ties(), make_context, mixed, name="mixed", density=0.5)
    want = run(Ties(), make_context, fulls, name="mixed-full", density=0.5)
    assert_close_states(got.path, want.path)


def test_lora_delta_survives_a_bfloat16_base(lora, make_context, tmp_path):
    """The adapted tensor is formed in float32, so the task vector on a bfloat16 base is
    the LoRA delta to float32 precision (a bfloat16 full model would round most of it away)."""
    bf16 = edited_copy(lora["base"], tmp_path / "base-bf16",
                       lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}),
                       config={"dtype": "bfloat16"})
    ad = adapter_copy(lora["la"], tmp_path / "la", config={"base_model_name_or_path": str(bf16)})
    out = run(TaskArithmetic(), make_context, StageInputs(
        base=ModelArtifact("base", bf16), models=[ModelArtifact("la", ad)]), name="bf16",
        out_dtype="float32").path
    delta = state(lora["la-full"])[Q] - state(lora["base"])[Q]
    got = state(out)[Q] - state(bf16)[Q].float()
    torch.testing.assert_close(got, delta, rtol=0, atol=1e-6)
    assert (delta - (state(lora["la-full"])[Q].bfloat16().float() - state(bf16)[Q].float())
            ).abs().max() > 1e-4  # what a bfloat16 merged model would have lost


def test_lora_linear_with_a_base_averages_the_adapted_models(lora, make_context):
    one = StageInputs(base=art(lora, "base"), models=[ModelArtifact("la", lora["la"])])
    got = run(Linear(), make_context, one, name="linear")
    assert_close_states(got.path, lora["la-full"])


# --- errors -------------------------------------------------------------------------------


def test_lora_refuses_pickles_foreign_shapes_and_non_lora(lora, tmp_path):
    base = art(lora, "base")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora["la"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(MergeError, match=r"model 'p'.*adapter_model.bin.*never loads pickles"):
        check_merge_inputs(base, [ModelArtifact("p", pickled)])

    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    wrong = adapter_copy(lora["la"], tmp_path / "wrong",
                         lambda t: t.update({key: torch.ones(24, 4)}))
    with pytest.raises(MergeError, match=r"model 'w' \(LoRA adapter .*wrong\).*v_proj.lora_B.weight"
                                         r" give tensor 'model.layers.1.self_attn.v_proj.weight' a "
                                         r"delta of shape \[24, 32\] but it has shape \[16, 32\]"):
        check_merge_inputs(base, [ModelArtifact("w", wrong)])

    ia3 = adapter_copy(lora["la"], tmp_path / "ia3", config={"peft_type": "IA3"})
    with pytest.raises(MergeError, match=r"peft_type is 'IA3'; only LoRA"):
        check_merge_inputs(base, [ModelArtifact("ia3", ia3)])
    dora = adapter_copy(lora["la"], tmp_path / "dora", config={"use_dora": True})
    with pytest.raises(MergeError, match=r"DoRA"):
        check_merge_inputs(base, [ModelArtifact("dora", dora)])
    rank = adapter_copy(lora["la"], tmp_path / "rank", config={"r": 8})
    with pytest.raises(MergeError, match=r"rank 4 .* gives it r=8"):
        check_merge_inputs(base, [ModelArtifact("rank", rank)])
    other = adapter_copy(lora["la"], tmp_path / "other",
                         config={"base_model_name_or_path": str(lora["a"])})
    with pytest.raises(MergeError, match=r"was trained on .*base_model_name_or_path in "
                                         r"adapter_config.json\) but the merge base 'base' is"):
        check_merge_inputs(base, [ModelArtifact("o", other)])
    recorded = adapter_copy(lora["la"], tmp_path / "recorded")
    (recorded / "lingoforge.json").write_text(json.dumps({"base_model": str(lora["a"])}))
    with pytest.raises(MergeError, match=r"base_model in lingoforge.json"):
        check_merge_inputs(base, [ModelArtifact("r", recorded)])
    moved = adapter_copy(lora["la"], tmp_path / "moved",
                         config={"base_model_name_or_path": "org/hub-model"})  # not checked
    assert check_merge_inputs(base, [ModelArtifact("m", moved)]).models[0].adapter is not None


def test_lora_needs_a_base_and_cannot_be_one(lora, make_context, tmp_path):
    with pytest.raises(MergeError, match=r"model 'la' .* is a LoRA adapter.*needs a base"):
        check_merge_inputs(None, [ModelArtifact("la", lora["la"]), art(lora, "a")])
    with pytest.raises(MergeError, match=r"needs a base"):
        run(Linear(), make_context, StageInputs(base=None, models=[
            art(lora, "a"), ModelArtifact("la", lora["la"])]), name="nobase")
    with pytest.raises(MergeError, match=r"cannot be the merge base"):
        check_merge_inputs(ModelArtifact("la", lora["la"]), [art(lora, "a")])


def test_lora_nan_factor_is_named_and_leaves_no_output(lora, make_context, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    nan = adapter_copy(lora["la"], tmp_path / "nan",
                       lambda t: t.update({key: torch.full_like(t[key], float("nan"))}))
    with pytest.raises(MergeError, match=rf"model 'nan' tensor '{Q}' contains NaN"):
        run(TaskArithmetic(), make_context, StageInputs(base=art(lora, "base"), models=[
            ModelArtifact("nan", nan)]), name="nan")


# --- recipes: runner, engine merge, engine validate -------------------------------------------


def recipe_text(lora: dict[str, Path], adapter: Path, plugin: str = "ties", base: bool = True) -> str:
    return textwrap.dedent(f"""
        name: lora-merge
        models:
          base: {{path: {lora['base']}}}
          mn: {{path: {adapter}}}
          en: {{path: {lora['lb']}}}
        stages:
          - name: merged
            stage: merge
            plugin: {plugin}
            {'base: base' if base else ''}
            models: [mn, en]
            params: {{density: 0.5}}
        """)


def test_lora_recipe_runs_and_validates(lora, tmp_path):
    from engine.cli.commands import main
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe
    from engine.run.runner import Runner

    f = tmp_path / "r.yaml"
    f.write_text(recipe_text(lora, lora["la"]))
    assert main(["validate", str(f)]) == 0
    Runner(plan_recipe(load_recipe(f), tmp_path, str(f)), tmp_path / "work").run()
    fulls = StageInputs(base=art(lora, "base"), models=[ModelArtifact("mn", lora["la-full"]),
                                                        ModelArtifact("en", lora["lb-full"])])
    from engine.run.context import StageContext
    from engine.run.runtime import Runtime

    out = tmp_path / "want"
    out.mkdir()
    ctx = StageContext(run_name="t", stage_name="want", stage_kind="merge", plugin="ties",
                       workdir=tmp_path, output_dir=out, runtime=Runtime(device="cpu"))
    Ties().run(ctx, fulls, Ties.Params.model_validate({"density": 0.5}))
    assert_close_states(tmp_path / "work" / "merged", out)

    wrong = adapter_copy(lora["la"], tmp_path / "wrong", lambda t: t.update(
        {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(4, 32)}))
    f.write_text(recipe_text(lora, wrong))
    with pytest.raises(RecipeError, match=r"stage 'merged'.*model 'mn'.*down_proj.*shape \[32, 32\]"):
        plan_recipe(load_recipe(f), tmp_path, str(f))
    f.write_text(recipe_text(lora, lora["la"], plugin="linear", base=False))
    with pytest.raises(RecipeError, match=r"models: 'mn' is a LoRA adapter folder.*needs a 'base'"):
        plan_recipe(load_recipe(f), tmp_path, str(f))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora["la"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"x")
    f.write_text(recipe_text(lora, pickled))
    with pytest.raises(RecipeError, match=r"models.mn: .*never loads pickles"):
        plan_recipe(load_recipe(f), tmp_path, str(f))


def test_lora_adapter_as_merge_base_or_without_its_own_base_elsewhere(lora, tmp_path, text_file):
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe

    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: adapter-base
        models:
          mn: {{path: {lora['la']}}}
          a: {{path: {lora['a']}}}
        stages:
          - name: merged
            stage: merge
            plugin: ties
            base: mn
            models: [a]
        """))
    with pytest.raises(RecipeError, match=r"stage 'merged': base: 'mn' is a LoRA adapter folder "
                                          r"and cannot be a merge's base"):
        plan_recipe(load_recipe(f), tmp_path, str(f))
    lost = adapter_copy(lora["la"], tmp_path / "lost",
                        config={"base_model_name_or_path": "/nonexistent/base"})
    f.write_text(textwrap.dedent(f"""
        name: eval-adapter
        models:
          mn: {{path: {lost}}}
        stages:
          - name: scores
            stage: evaluate
            plugin: perplexity
            models: [mn]
            data: {{path: {text_file}}}
        """))
    with pytest.raises(RecipeError, match=r"stage 'scores': models: 'mn': "):
        plan_recipe(load_recipe(f), tmp_path, str(f))


def test_lora_cli_merge_with_adapter_models(lora, tmp_path):
    from engine.cli.merge import main

    out = tmp_path / "merged"
    assert main(["--method", "task-arithmetic", "--base", str(lora["base"]), "--model",
                 f"mn={lora['la']}", "--model", str(lora["rs"]), "--out", str(out)]) == 0
    want = tmp_path / "want"
    assert main(["--method", "task-arithmetic", "--base", str(lora["base"]), "--model",
                 f"mn={lora['la-full']}", "--model", f"rs={lora['rs-full']}", "--out",
                 str(want)]) == 0
    assert_close_states(out, want)
    assert json.loads((out / "lingoforge.json").read_text())["merge"]["models"] == ["mn", "rs"]
    assert main(["--method", "linear", "--model", str(lora["la"]), "--model",
                 str(lora["a"]), "--out", str(tmp_path / "nobase")]) == 2


# --- one adapters module (engine/models/adapters.py) ----------------------------------------------


def test_adapter_folder_knowledge_lives_in_engine_adapters_under_the_old_names_too():
    from engine.api import models as api_models
    from engine.merging import lora as merging_lora
    from engine.models import adapters
    from engine.recipe import model_checks as validate_models

    for name in ("is_adapter_folder", "read_adapter_config", "check_adapter_folder", "adapter_base",
                 "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ADAPTER_BASE_KEY"):
        assert getattr(modelio, name) is getattr(adapters, name), name
    for name in ("is_adapter_folder", "read_adapter", "read_settings", "trained_on", "LoraAdapter",
                 "LoraDelta", "LoraSettings", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"):
        assert getattr(merging_lora, name) is getattr(adapters, name), name
    assert api_models.is_adapter_folder is adapters.is_adapter_folder
    assert validate_models.read_adapter is adapters.read_adapter
    assert callable(merging_lora.open_reader)


def test_adapter_delta_is_scaling_b_a_and_its_rows(lora):
    from engine.models.adapters import delta, delta_rows, trained_on

    ad = read_adapter(lora["rs"])
    raw = load_file(str(lora["rs"] / "adapter_model.safetensors"))
    d = ad.deltas[Q]
    expected = raw[d.b.name] @ raw[d.a.name] * (4 / 8 ** 0.5)
    torch.testing.assert_close(delta(d, raw.__getitem__, torch.float32), expected, rtol=0, atol=0)
    torch.testing.assert_close(delta_rows(d, raw.__getitem__, torch.float32, 2, 5), expected[2:5],
                               rtol=0, atol=1e-7)
    emb = read_adapter(lora["la"]).deltas["model.embed_tokens.weight"]
    raw_la = load_file(str(lora["la"] / "adapter_model.safetensors"))
    assert delta(emb, raw_la.__getitem__, torch.float32).shape == emb.shape  # transposed
    named = trained_on(ad)
    assert named is not None and named[0].resolve() == lora["base"].resolve()
    assert modelio.adapter_base(lora["rs"]).resolve() == lora["base"].resolve()
