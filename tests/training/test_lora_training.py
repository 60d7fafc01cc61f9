"""LoRA for ``sft`` and ``ct`` (peft): what trains, what is saved, and how an adapter
folder is loaded back. Expected values are computed here from the saved files and
the config, not taken from peft."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import state
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.api import DataSource, LayerSelection, ModelArtifact, StageInputs
from engine.core.errors import ModelLoadError, TrainingError
from engine.models import modelio
from engine.training.lora import LLAMA_PROJECTIONS, LoraParams
from engine_plugins.ct import CT
from engine_plugins.elo import ELO
from engine_plugins.sft import SFT

FAST = {"steps": 3, "batch_size": 2, "seq_len": 48, "lr": 1e-2, "log_every": 3}
LORA = {"r": 4, "alpha": 8}


def _sft(make_context, model: Path, data: Path, name: str, **lora):
    ctx = make_context(name)
    art = SFT().run(ctx, StageInputs(model=ModelArtifact("base", model),
                                     data=[DataSource(data, "instructions")]),
                    SFT.Params(**FAST, lora={**LORA, **lora}))
    return art, ctx


def _delta(adapter: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    """scaling * B @ A of one adapted module, from the adapter's tensors."""
    a = adapter[f"base_model.model.{module}.lora_A.weight"]
    b = adapter[f"base_model.model.{module}.lora_B.weight"]
    return scaling * (b.double() @ a.double())


def _adapted_modules(adapter: dict[str, torch.Tensor]) -> set[str]:
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}


# --- params ------------------------------------------------------------------------------------


def test_lora_params_defaults_and_errors(monkeypatch):
    p = LoraParams()
    assert (p.r, p.alpha, p.dropout, p.use_rslora, p.save) == (16, 32, 0.0, False, "merged")
    assert p.target_modules == list(LLAMA_PROJECTIONS) and p.scaling == 2.0
    assert LoraParams(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / 4)
    assert LoraParams(target_modules="all-linear").target_modules == "all-linear"
    with pytest.raises(ValidationError, match="save"):
        LoraParams(save="pickle")
    with pytest.raises(ValidationError, match="at least one module"):
        LoraParams(target_modules=[])
    with pytest.raises(ValidationError, match="extra"):
        SFT.Params(lora={"rank": 8})
    with pytest.raises(ValidationError, match="extra"):  # ELO trainers take no lora
        ELO.Params(lora={"r": 8})
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ValidationError, match=r"lora needs peft.*install lingoforge\[lora\]"):
        SFT.Params(lora={})
    SFT.Params()  # without lora peft is not needed


def test_validate_reports_missing_peft(tmp_path, tiny_model, instructions_file, monkeypatch):
    from engine.core.errors import RecipeError
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe

    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: v
        models: {{base: {{path: {tiny_model}}}}}
        stages:
          - {{name: tuned, stage: adapt-language, plugin: sft, model: base,
              data: {{path: {instructions_file}}}, params: {{lora: {{r: 4}}}}}}
        """))
    plan_recipe(load_recipe(f, []), tmp_path, str(f))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(RecipeError, match=r"stage 'tuned' params.lora.*install lingoforge\[lora\]"):
        plan_recipe(load_recipe(f, []), tmp_path, str(f))


# --- sft with lora -------------------------------------------------------------------------------


def test_sft_lora_adapter_is_a_standard_peft_folder(make_context, tiny_model, instructions_file):
    art, ctx = _sft(make_context, tiny_model, instructions_file, "sft-adapter", save="adapter")
    files = {p.name for p in art.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "lingoforge.json"} <= files
    assert not files & {"config.json", "model.safetensors", "adapter_model.bin"}
    cfg = json.loads((art.path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8)
    assert sorted(cfg["target_modules"]) == sorted(LLAMA_PROJECTIONS)
    assert cfg["base_model_name_or_path"] == str(tiny_model.resolve())
    meta = modelio.read_meta(art.path)
    assert meta["base_model"] == str(tiny_model.resolve()) and meta["trained_by"] == "sft"
    assert meta["kind"] == "lora-adapter" and meta["lora"]["save"] == "adapter"

    # trainable parameters: r * (in + out) for each projection of each layer, from the config
    c = json.loads((tiny_model / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = 4 * ((h + h) + (h + kv) + (h + kv) + (h + h) + (h + inter) * 2 + (inter + h))
    expected = per_layer * c["num_hidden_layers"]
    adapter = load_file(str(art.path / "adapter_model.safetensors"))
    assert sum(t.numel() for t in adapter.values()) == expected
    assert ctx.stats.trainable_params == expected
    base_params = sum(t.numel() for t in state(tiny_model).values())
    assert ctx.stats.forward_params == base_params + expected
    assert all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if ".lora_B." in k)  # B moved off zero


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_merged_equals_base_plus_scaled_BA(make_context, tiny_model, instructions_file, use_rslora):
    """The merged output is W + s * B @ A with s = alpha/r (alpha/sqrt(r) with rsLoRA),
    B and A read from an adapter trained with the same seed and data."""
    adapter_art, _ = _sft(make_context, tiny_model, instructions_file, "a", save="adapter", use_rslora=use_rslora)
    merged_art, _ = _sft(make_context, tiny_model, instructions_file, "m", save="merged", use_rslora=use_rslora)
    scaling = 8 / (4 ** 0.5 if use_rslora else 4)
    adapter = load_file(str(adapter_art.path / "adapter_model.safetensors"))
    base, merged = state(tiny_model), state(merged_art.path)
    assert base.keys() == merged.keys()
    modules = _adapted_modules(adapter)
    assert len(modules) == 7 * 4
    for key in base:
        module = key.removesuffix(".weight")
        if module in modules:
            expected = base[key].double() + _delta(adapter, module, scaling)
            assert torch.allclose(merged[key].double(), expected, atol=1e-6), key
            assert not torch.equal(merged[key], base[key]), key
        else:
            assert torch.equal(merged[key], base[key]), key  # norms, embeddings, head untouched
    assert modelio.read_meta(merged_art.path)["lora"]["use_rslora"] is use_rslora


def test_adapter_folder_loads_as_its_merged_model(make_context, tiny_model, instructions_file, tmp_path):
    adapter_art, _ = _sft(make_context, tiny_model, instructions_file, "a", save="adapter")
    merged_art, _ = _sft(make_context, tiny_model, instructions_file, "m", save="merged")
    assert modelio.is_adapter_folder(adapter_art.path) and not modelio.is_adapter_folder(merged_art.path)
    assert modelio.read_config(adapter_art.path) == modelio.read_config(tiny_model)
    assert modelio.check_model_folder(adapter_art.path)["num_hidden_layers"] == 4
    with pytest.raises(ModelLoadError, match="LoRA adapter folder"):
        modelio.weight_files(adapter_art.path)

    ctx = make_context("eval")
    from_adapter = ctx.load_model(adapter_art)
    from_merged = ctx.load_model(merged_art)
    assert type(from_adapter).__name__ == "LlamaForCausalLM"  # merged and unwrapped, no peft layers
    ids = torch.tensor([[1, 5, 9, 30, 7, 2, 11]])
    with torch.no_grad():
        a, m = from_adapter(input_ids=ids).logits, from_merged(input_ids=ids).logits
        b = ctx.load_model(tiny_model)(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-5) and not torch.allclose(a, b, atol=1e-3)

    bare = tmp_path / "bare-adapter"  # a PEFT folder as peft writes it, nothing of ours
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter_art.path / name, bare / name)
    assert modelio.adapter_base(bare) == tiny_model.resolve()
    assert len(ctx.load_tokenizer(bare)) == len(ctx.load_tokenizer(tiny_model))  # the base's
    with torch.no_grad():
        assert torch.allclose(ctx.load_model(bare)(input_ids=ids).logits, m, atol=1e-5)


def test_adapter_folder_errors(make_context, tiny_model, instructions_file, tmp_path):
    art, _ = _sft(make_context, tiny_model, instructions_file, "a", save="adapter")
    moved = tmp_path / "moved"
    shutil.copytree(art.path, moved)
    modelio.write_meta(moved, {**modelio.read_meta(moved), "base_model": str(tmp_path / "gone")})
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/remote"}))
    for call in (modelio.check_model_folder, modelio.read_config, modelio.load_model):
        with pytest.raises(ModelLoadError, match=r"base model of this LoRA adapter was not found "
                                                 r"\(tried '.*gone', 'org/remote'"):
            call(moved)
    modelio.write_meta(moved, {**modelio.read_meta(moved), "base_model": str(tiny_model)})
    modelio.check_model_folder(moved)  # fixed by pointing at the base again
    (moved / "adapter_model.safetensors").rename(moved / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle adapter weights"):
        modelio.load_model(moved)


def test_lora_unknown_target_module_is_a_training_error(make_context, tiny_model, instructions_file):
    with pytest.raises(TrainingError, match="lora.*target_modules"):
        _sft(make_context, tiny_model, instructions_file, "bad", target_modules=["no_such_proj"])


# --- ct with lora --------------------------------------------------------------------------------


def test_ct_lora_on_chosen_layers_only(make_context, tiny_model, text_file):
    params = {**FAST, "seq_len": 16}
    sel = LayerSelection(name="sel", indices=[0, 3], num_layers=4)
    ctx = make_context("ct-lora")
    art = CT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model), layers=sel,
                                    data=[DataSource(text_file)]),
                   CT.Params(**params, lora={**LORA, "save": "adapter", "target_modules": ["q_proj", "v_proj"]}))
    adapter = load_file(str(art.path / "adapter_model.safetensors"))
    assert _adapted_modules(adapter) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 3) for m in ("q_proj", "v_proj")}
    assert ctx.stats.trainable_params == sum(t.numel() for t in adapter.values()) == 2 * 4 * (64 + 48)
    assert modelio.read_meta(art.path)["trained_layers"] == [0, 3]

    merged = CT().run(make_context("ct-lora-m"), StageInputs(model=ModelArtifact("base", tiny_model),
                                                             data=[DataSource(text_file)]),
                      CT.Params(**params, layers=[0, -1], lora=LORA))
    base, out = state(tiny_model), state(merged.path)
    changed = {k for k in base if not torch.equal(base[k], out[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in (0, 3) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


# --- through the runner --------------------------------------------------------------------------


def test_recipe_sft_lora_adapter_then_evaluate(tmp_path, tiny_model, instructions_file, text_file):
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe
    from engine.run.runner import Runner

    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: lora
        models: {{base: {{path: {tiny_model}}}}}
        runtime: {{device: cpu}}
        stages:
          - name: tuned
            stage: adapt-language
            plugin: sft
            model: base
            data: {{path: {instructions_file}}}
            params: {{steps: 2, batch_size: 2, seq_len: 48, lr: 1.0e-2, lora: {{r: 4, save: adapter}}}}
          - name: scores
            stage: evaluate
            plugin: perplexity
            models: [base, tuned]
            data: {{path: {text_file}}}
            params: {{max_length: 32}}
        """))
    work = tmp_path / "work"
    report = Runner(plan_recipe(load_recipe(f, []), tmp_path, str(f)), work).run()
    assert modelio.is_adapter_folder(work / "tuned")
    tuned = report["stages"][0]
    base_params = sum(t.numel() for t in state(tiny_model).values())
    assert tuned["forward_params"] - tuned["trainable_params"] == base_params  # only the adapter trains
    metrics = json.loads((work / "scores" / "metrics.json").read_text())
    assert "_errors" not in metrics
    base_ppl = next(v for k, v in metrics["base"].items() if k.startswith("ppl/"))
    tuned_ppl = next(v for k, v in metrics["tuned"].items() if k.startswith("ppl/"))
    assert base_ppl != tuned_ppl  # the adapter was applied
