"""QLoRA: LoRA on a frozen base held in 4 bits (bitsandbytes NF4/FP4) or 8 bits.

Runs for real on the CPU (bitsandbytes quantises and dequantises there). Expected
values are computed here from the saved files: the merged output must be the
full-precision input plus ``scaling * B @ A`` from the saved adapter, never a
dequantised copy of the 4-bit weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import state
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import ModelLoadError, RecipeError, TrainingError
from engine.models import modelio
from engine.models.quantization import Quantization, parameter_count
from engine.training.loop import KILL_ENV, LOG_FILE, train, training_dtype
from engine.training.lora import LoraParams, apply_lora, save_lora_result
from engine_plugins.ct import CT
from engine_plugins.sft import SFT

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (lingoforge[8bit])")

ROOT = Path(__file__).resolve().parents[2]
FAST = {"steps": 4, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "log_every": 1}
QLORA = {"r": 4, "alpha": 8, "quantize": "4bit"}


def _ct(make_context, model: Path, text: Path, name: str, **lora):
    ctx = make_context(name)
    art = CT().run(ctx, StageInputs(model=ModelArtifact("base", model), data=[DataSource(text)]),
                   CT.Params(**FAST, lora={**QLORA, **lora}))
    return art, ctx


def _delta(adapter: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    return scaling * (b @ a)


def _text_loss(model: torch.nn.Module, tokenizer, text: Path) -> float:
    ids = tokenizer(" ".join(text.read_text().split()[:200]), return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


# --- params and validation -----------------------------------------------------------------------


def test_qlora_params_and_errors(monkeypatch):
    p = LoraParams()
    assert (p.quantize, p.quant_type, p.double_quant, p.base_quantization) == ("none", "nf4", True, None)
    assert LoraParams(quantize="4bit").base_quantization == Quantization(4, "nf4", True)
    assert LoraParams(quantize="4bit", quant_type="fp4", double_quant=False).base_quantization == \
        Quantization(4, "fp4", False)
    assert LoraParams(quantize="8bit").base_quantization.bits == 8
    with pytest.raises(ValidationError, match="quantize"):
        LoraParams(quantize="2bit")
    with pytest.raises(ValidationError, match=r"lora.quant_type only apply with lora.quantize: 4bit"):
        LoraParams(quant_type="fp4")
    # a whole dump (defaults included) validates again: params round-trip
    assert LoraParams.model_validate(LoraParams().model_dump()) == LoraParams()
    with pytest.raises(ValidationError, match=r"lora.double_quant only apply.*'8bit'"):
        LoraParams(quantize="8bit", double_quant=False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if bitsandbytes were not installed
    with pytest.raises(ValidationError, match=r"lora.quantize: 4bit needs bitsandbytes.*lingoforge\[8bit\]"):
        SFT.Params(lora={"quantize": "4bit"})
    SFT.Params(lora={"r": 4})  # plain LoRA does not need it


def test_validate_reports_missing_bitsandbytes(tmp_path, tiny_model, text_file, monkeypatch):
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe

    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: v
        models: {{base: {{path: {tiny_model}}}}}
        stages:
          - {{name: q, stage: adapt-language, plugin: ct, model: base,
              data: {{path: {text_file}}}, params: {{lora: {{r: 4, quantize: 4bit}}}}}}
        """))
    plan_recipe(load_recipe(f, []), tmp_path, str(f))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(RecipeError, match=r"stage 'q' params.lora.*needs bitsandbytes.*lingoforge\[8bit\]"):
        plan_recipe(load_recipe(f, []), tmp_path, str(f))


def test_qlora_refuses_fsdp_and_adapter_inputs(make_context, tiny_model, text_file):
    with pytest.raises(TrainingError, match=r"stage 'f': lora.quantize holds the base in 4 bits.*runtime.fsdp"):
        CT().run(make_context("f", fsdp=True),
                 StageInputs(model=ModelArtifact("base", tiny_model), data=[DataSource(text_file)]),
                 CT.Params(**FAST, lora=QLORA))
    adapter, _ = _ct(make_context, tiny_model, text_file, "a", quantize="none", save="adapter")
    with pytest.raises(ModelLoadError, match=r"adapter folder cannot be loaded with lora.quantize.*save: merged"):
        _ct(make_context, adapter.path, text_file, "on-adapter")
    with pytest.raises(ValidationError, match="frozen_8bit and lora"):
        CT.Params(layers=[0], frozen_8bit=True, lora=QLORA)


# --- training on the 4-bit base ------------------------------------------------------------------


def test_frozen_base_is_linear4bit_while_training(make_context, tiny_model, tiny_tokenizer, text_file):
    """The same steps ct takes, one by one: every targeted projection is a LoRA layer over a
    bitsandbytes Linear4bit holding packed NF4 weights; only the adapters require grad;
    the loss goes down; the head and embeddings stay in float32."""
    from engine.training.batching import training_batches

    lora = LoraParams(**QLORA, save="adapter")
    ctx = make_context("steps")
    model = ctx.load_model(tiny_model, load_in_8bit=False, dtype=training_dtype(ctx),
                           quantize=lora.base_quantization)
    model = apply_lora(model, lora, seed=0)
    base = model.get_base_model()
    projections = [m for n, m in base.named_modules() if n.endswith("_proj") and hasattr(m, "base_layer")]
    assert len(projections) == 7 * 4
    for module in projections:
        assert isinstance(module.base_layer, bnb.nn.Linear4bit)
        w = module.base_layer.weight
        assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4" and w.quant_state.nested
        assert not w.requires_grad and w.numel() * 2 == torch.Size(w.quant_state.shape).numel()
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    before = _text_loss(model, tiny_tokenizer, text_file)
    params = CT.Params(**{**FAST, "steps": 10, "lr": 3e-2})
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=16, batch_size=2, seed=0)
    result = train(ctx, model, batches, params)
    after = _text_loss(result.model, tiny_tokenizer, text_file)
    assert after < before - 0.05, (before, after)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in projections)  # still 4-bit after

    art = save_lora_result(ctx, result.model, tiny_tokenizer, lora, base=tiny_model, meta={"kind": "ct"})
    base_params = sum(t.numel() for t in state(tiny_model).values())
    assert ctx.stats.forward_params == base_params + ctx.stats.trainable_params  # 4-bit counted unpacked
    assert parameter_count(result.model) == ctx.stats.forward_params
    note = ctx.stats.notes["quantized_base"]
    assert (note["bits"], note["quant_type"], note["quantized_modules"]) == (4, "nf4", 28)
    assert note["model_mb"] < note["full_precision_model_mb"]
    meta = modelio.read_meta(art.path)
    assert meta["quantized_base"] == {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                      "compute_dtype": "float32"}
    assert meta["lora"]["quantize"] == "4bit" and meta["base_model"] == str(tiny_model.resolve())


def test_qlora_merged_is_full_precision_base_plus_delta(make_context, tiny_model, text_file):
    """Merged output = the input's float32 weights + scaling * B @ A of the adapter an
    identical run saved, to 1e-6; everything else is the input bit for bit. A merge into
    the (dequantised) 4-bit weights would be off by the NF4 rounding (up to 4e-2 here)."""
    adapter_art, _ = _ct(make_context, tiny_model, text_file, "a", save="adapter")
    merged_art, ctx = _ct(make_context, tiny_model, text_file, "m", save="merged")
    assert ctx.stats.notes["quantized_base"]["bits"] == 4
    config = json.loads((merged_art.path / "config.json").read_text())
    assert "quantization_config" not in config
    adapter = load_file(str(adapter_art.path / "adapter_model.safetensors"))
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in adapter}
    assert len(modules) == 7 * 4
    base, merged = state(tiny_model), state(merged_art.path)
    assert base.keys() == merged.keys()
    for key in base:
        assert merged[key].dtype == torch.float32, key
        module = key.removesuffix(".weight")
        if module in modules:
            expected = base[key].double() + _delta(adapter, module, 8 / 4)
            assert torch.allclose(merged[key].double(), expected, atol=1e-6), key
            assert not torch.equal(merged[key], base[key]), key
        else:
            assert torch.equal(merged[key], base[key]), key

    # an ordinary full-precision model folder, and the adapter folder loads as the same model
    loaded = modelio.load_model(merged_art.path, device="cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    from_adapter = modelio.load_model(adapter_art.path, device="cpu")
    assert type(from_adapter).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[1, 5, 9, 30, 7, 2, 11]])
    with torch.no_grad():
        m, a = loaded(input_ids=ids).logits, from_adapter(input_ids=ids).logits
        b = modelio.load_model(tiny_model, device="cpu")(input_ids=ids).logits
    assert torch.allclose(m, a, atol=1e-5) and not torch.allclose(m, b, atol=1e-3)


def test_quantized_base_changes_what_the_adapter_learns(make_context, tiny_model, text_file):
    """Same seed and data: the adapter trained on the 4-bit base differs from the one trained
    on the float32 base (the forward pass really ran on quantised weights), and FP4 without
    double quantisation differs from NF4."""
    runs = {}
    for name, lora in {"fp32": {"quantize": "none"}, "nf4": {},
                       "fp4": {"quant_type": "fp4", "double_quant": False}}.items():
        art, ctx = _ct(make_context, tiny_model, text_file, name, save="adapter", **lora)
        runs[name] = load_file(str(art.path / "adapter_model.safetensors"))
        if name == "fp4":
            assert modelio.read_meta(art.path)["quantized_base"]["quant_type"] == "fp4"
            assert ctx.stats.notes["quantized_base"]["double_quant"] is False
    for other in ("nf4", "fp4"):
        assert runs[other].keys() == runs["fp32"].keys()
        assert any(not torch.equal(runs[other][k], runs["fp32"][k]) for k in runs[other] if ".lora_B." in k)
    assert any(not torch.equal(runs["nf4"][k], runs["fp4"][k]) for k in runs["nf4"] if ".lora_B." in k)


def test_qlora_8bit_base_trains_and_merges(make_context, tiny_model, text_file):
    art, ctx = _ct(make_context, tiny_model, text_file, "q8", quantize="8bit", save="merged",
                   target_modules=["q_proj", "v_proj"])
    note = ctx.stats.notes["quantized_base"]
    assert note["bits"] == 8 and note["quantized_modules"] == 7 * 4
    base, merged = state(tiny_model), state(art.path)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(4) for m in ("q_proj", "v_proj")}
    assert modelio.read_meta(art.path)["quantized_base"]["bits"] == 8


def test_sft_qlora_adapter_loads_as_model(make_context, tiny_model, instructions_file):
    ctx = make_context("sft-q")
    art = SFT().run(ctx, StageInputs(model=ModelArtifact("base", tiny_model),
                                     data=[DataSource(instructions_file, "instructions")]),
                    SFT.Params(steps=3, batch_size=2, seq_len=48, lr=1e-2, lora={**QLORA, "save": "adapter"}))
    assert modelio.is_adapter_folder(art.path)
    assert modelio.read_meta(art.path)["quantized_base"]["bits"] == 4
    assert ctx.stats.notes["quantized_base"]["quantized_modules"] == 28
    adapter = load_file(str(art.path / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if ".lora_B." in k)
    loaded = modelio.load_model(art.path, device="cpu")  # full-precision base + adapter, merged
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())


# --- checkpoint and resume -----------------------------------------------------------------------


def test_qlora_killed_stage_resumes_bitwise(tmp_path, tiny_model, text_file):
    """Killed after step 5 (checkpoint at step 4) and run again, a QLoRA stage resumes on a
    freshly quantised base and writes the adapter an uninterrupted run writes, bitwise."""
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe
    from engine.run.runner import CHECKPOINTS_DIR, Runner

    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: resume
        models: {{base: {{path: {tiny_model}}}}}
        runtime: {{device: cpu}}
        stages:
          - name: trained
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
            params: {{steps: 8, batch_size: 4, seq_len: 16, lr: 3.0e-3, log_every: 1, checkpoint_every: 2,
                      lora: {{r: 4, alpha: 8, dropout: 0.1, quantize: 4bit, save: adapter}}}}
        """))

    def run(workdir: Path) -> dict:
        return Runner(plan_recipe(load_recipe(recipe, []), tmp_path, str(recipe)), workdir).run()

    killed = tmp_path / "killed"
    env = {**os.environ, KILL_ENV: "5", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    [ckpt] = list((killed / CHECKPOINTS_DIR / "trained").glob("*/step-*"))
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # no 4-bit weights in it

    report = run(killed)
    assert report["stages"][0]["notes"]["resumed_from_step"] == 4
    assert report["stages"][0]["notes"]["quantized_base"]["bits"] == 4
    clean = tmp_path / "clean"
    run(clean)
    a = load_file(str(killed / "trained" / "adapter_model.safetensors"))
    b = load_file(str(clean / "trained" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [[json.loads(x)["loss"] for x in (r / "trained" / LOG_FILE).read_text().splitlines()]
              for r in (killed, clean)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
