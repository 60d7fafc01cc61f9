"""engine.recipe.estimate: the activation formula against autograd's saved tensors, parameter
counts against real models, and the validate warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.recipe import estimate
from engine.recipe.estimate import GiB, Shape, TrainSetup
from engine.testing import saved_activation_bytes

#: the formula counts the big tensors; the rest (rsqrt scalars, int64 ids, rotary tables)
#: stays under this share of the total
TOLERANCE = 0.02


def _model(h=128, i=352, layers=3, heads=4, kv=2, vocab=512, tied=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def saved_bytes(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter tensors a forward pass hands autograd to keep."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model.train()
    return saved_activation_bytes(model, input_ids=ids, labels=ids)[0]


@pytest.mark.parametrize("kw", [{}, {"kv": 4}, {"heads": 8, "h": 64, "i": 200}])
@pytest.mark.parametrize("first_trained", [0, 2])
def test_activation_formula_matches_autograd(kw, first_trained):
    model = _model(**kw)
    shape = Shape.from_config(model.config.to_dict())
    n = shape.layers
    if first_trained:  # CT with a layer selection: embeddings and lower layers frozen
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers[first_trained:]:
            layer.requires_grad_(True)
    batch, seq = 2, 64
    measured = saved_bytes(model, batch, seq)
    setup = TrainSetup(micro_batch=batch, seq_len=seq, model_layers=n,
                       trained_layers=tuple(range(first_trained, n)), train_embeddings=not first_trained)
    predicted = estimate.estimate_training(shape, setup).parts["activations"]
    assert predicted == pytest.approx(measured, rel=TOLERANCE)


def test_checkpointing_keeps_one_hidden_state_per_layer():
    model = _model(layers=4)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    shape = Shape.from_config(model.config.to_dict())
    batch, seq = 2, 64
    measured = saved_bytes(model, batch, seq)
    held = batch * seq * (shape.layers * shape.hidden + estimate.head_activation_elements(shape)) * 4
    assert held == pytest.approx(measured, rel=TOLERANCE)
    setup = TrainSetup(micro_batch=batch, seq_len=seq, model_layers=4, trained_layers=(0, 1, 2, 3))
    full = estimate.estimate_training(shape, setup).parts["activations"]
    with_gc = estimate.estimate_training(shape, TrainSetup(**{**setup.__dict__, "checkpointing": True}))
    # the estimate adds one layer rebuilt at a time in the backward pass
    assert with_gc.parts["activations"] == pytest.approx(
        held + batch * seq * estimate.layer_activation_elements(shape) * 4)
    assert with_gc.parts["activations"] < 0.5 * full


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_match_real_models(tied):
    model = _model(tied=tied)
    shape = Shape.from_config(model.config.to_dict())
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_llama_8b_shape():
    shape = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
    assert shape.params == 8_030_261_248  # Llama-3.1-8B's published parameter count
    full = TrainSetup(micro_batch=1, seq_len=2048, model_layers=32, trained_layers=tuple(range(32)),
                      mixed_precision=True)
    est = estimate.estimate_training(shape, full)
    assert est.parts["weights"] == shape.params * 4 and est.parts["optimizer"] == shape.params * 8
    levers, total = estimate.fitting_levers(shape, full, 80 * GiB * estimate.HEADROOM)
    assert levers[-1].startswith("runtime.dtype") and total < 72 * GiB


def _recipe(tmp_path: Path, tiny_model: Path, text_file: Path, memory_gb: float) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "name": "big", "runtime": {"device": "cpu", "memory_gb": memory_gb},
        "models": {"base": {"path": str(tiny_model)}},
        "stages": [{"name": "ct", "stage": "adapt-language", "plugin": "ct", "model": "base",
                    "data": {"path": str(text_file)}, "params": {"steps": 2, "batch_size": 4, "seq_len": 64}}]}))
    return path


def test_validate_warns_with_numbers_and_lever(tiny_model, text_file, tmp_path, capsys):
    from engine.cli.commands import main
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe

    config = json.loads((tiny_model / "config.json").read_text())
    shape = Shape.from_config(config)
    setup = TrainSetup(micro_batch=4, seq_len=64, model_layers=shape.layers,
                       trained_layers=tuple(range(shape.layers)))
    need = estimate.estimate_training(shape, setup).total
    with_gc = estimate.estimate_training(shape, TrainSetup(**{**setup.__dict__, "checkpointing": True})).total
    memory_gb = (need + with_gc) / 2 / estimate.HEADROOM / GiB  # between the two
    path = _recipe(tmp_path, tiny_model, text_file, memory_gb)
    plan = plan_recipe(load_recipe(path, []), tmp_path, str(path))
    assert len(plan.warnings) == 1
    line = plan.warnings[0]
    assert f"stage 'ct': estimated peak memory {need / GiB:.1f} GiB" in line
    assert "it would fit with params.gradient_checkpointing: true (estimate" in line
    assert f"runtime.memory_gb {memory_gb:g} GiB" in line
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "gradient_checkpointing" in err and "ok" in err
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "estimated peak memory" in err
    roomy = _recipe(tmp_path, tiny_model, text_file, 1000.0)
    assert plan_recipe(load_recipe(roomy, []), tmp_path, str(roomy)).warnings == []


def test_device_memory_defaults_to_ram_on_cpu():
    from engine.run.runtime import Runtime

    found = estimate.device_memory(Runtime(device="cpu"))
    assert found is not None and found[0] > GiB and "RAM" in found[1]
    assert estimate.device_memory(Runtime(device="cpu", memory_gb=80))[0] == 80 * GiB


def test_scaling_doc_is_what_the_estimate_computes():
    import sys

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "benchmarks" / "speed"))
    import scaling_doc

    current = (root / "docs" / "scaling.md").read_text()
    assert current == scaling_doc.markdown(), "regenerate: python benchmarks/speed/scaling_doc.py > docs/scaling.md"
    full = estimate.estimate_training(scaling_doc.LLAMA_8B, scaling_doc.ROWS[0].setup)
    assert f"| {full.total / GiB:.1f} | no |" in current  # the default full CT does not fit 80 GB


def test_a_qlora_base_is_counted_at_its_quantised_size():
    from engine.registry.manager import implementations

    shape = Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
    ct = implementations()["adapt-language"]["ct"].impl

    def weights(**lora):
        params = ct.Params(steps=10, batch_size=1, seq_len=2048, lora={"r": 16, **lora})
        setup, _ = estimate.training_setup("ct", params, None, shape)
        return estimate.estimate_training(shape, setup).parts["weights"], setup

    plain, _ = weights()
    q4, setup = weights(quantize="4bit")
    adapters = 32 * shape.lora_layer_params(16) * 4
    # the decoder layers at 0.5 byte + double-quantised block scales; embeddings and head as loaded
    assert setup.base_bytes == pytest.approx(0.516)
    assert q4 == pytest.approx(32 * shape.layer_params * 0.516 + shape.embed_params * 4 + adapters)
    assert weights(quantize="8bit")[0] == pytest.approx(32 * shape.layer_params + shape.embed_params * 4
                                                        + adapters)
    assert plain / q4 > 4  # 32.3 GB against 8.0 GB of weights for an 8B model in float32
