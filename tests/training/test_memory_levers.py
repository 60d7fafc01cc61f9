"""Memory levers on real tiny Llamas: activation checkpointing (full model, LoRA, the ELO
sub-model), bf16 autocast on the CPU, the attention kernel, and paged 8-bit AdamW."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

from engine.api import DataSource
from engine.core.errors import RecipeError, TrainingError
from engine.models import attention
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.training import levers
from engine.training.batching import training_batches
from engine.training.loop import TrainerParams, train

STEPS = 3


def _params(**overrides) -> TrainerParams:
    return TrainerParams(**{"steps": STEPS, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "log_every": 1,
                            "max_grad_norm": 0.0, "checkpoint_every": 0, **overrides})


def _batches(tokenizer, text_file, params):
    return training_batches(tokenizer, [DataSource(text_file)], seq_len=params.seq_len,
                            batch_size=params.micro_batch_size, seed=params.seed)


def _saved_tensors(model, batch) -> int:
    """How many tensors autograd saves for the backward of one forward pass."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return count


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_both(make_context, build, tokenizer, text_file, **overrides):
    """Train a fresh model from ``build()`` without and with checkpointing."""
    runs = {}
    for ckpt in (False, True):
        params = _params(gradient_checkpointing=ckpt, **overrides)
        model = build()
        before = _trained(model)
        ctx = make_context(f"ckpt-{ckpt}")
        result = train(ctx, model, _batches(tokenizer, text_file, params), params)
        runs[ckpt] = (before, result)
    return runs


def _check_same_and_all_trained(runs) -> None:
    (before, plain), (_, ckpt) = runs[False], runs[True]
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-5)
    after_plain, after_ckpt = _trained(plain.model), _trained(ckpt.model)
    assert after_plain.keys() == after_ckpt.keys() == before.keys()
    for name in before:
        assert not torch.equal(after_ckpt[name], before[name]), f"{name} got no gradient"
        torch.testing.assert_close(after_ckpt[name], after_plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not levers.checkpointing_status(ckpt.model)  # handed back as it came


# --- activation checkpointing ------------------------------------------------------------


def test_checkpointing_holds_fewer_activations_same_loss(make_context, tiny_model, tiny_tokenizer):
    ctx = make_context("load")
    model = ctx.load_model(tiny_model, dtype=torch.float32).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain_saved = _saved_tensors(model, batch)
    plain_loss = model(**batch).loss.item()
    levers.enable_checkpointing(model, "stage 'load'")
    assert levers.checkpointing_status(model)
    assert not model.config.use_cache
    ckpt_saved = _saved_tensors(model, batch)
    assert model(**batch).loss.item() == pytest.approx(plain_loss, abs=1e-6)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
    embeds = model.get_input_embeddings()(ids)
    assert not embeds.requires_grad or model.get_input_embeddings().weight.requires_grad
    levers.disable_checkpointing(model)
    assert not levers.checkpointing_status(model) and model.config.use_cache


def test_checkpointing_full_model_same_loss_and_trains(make_context, tiny_model, tiny_tokenizer, text_file):
    ctx = make_context("loader")
    runs = _train_both(make_context, lambda: ctx.load_model(tiny_model, dtype=torch.float32),
                       tiny_tokenizer, text_file)
    _check_same_and_all_trained(runs)
    # the same result, so toggling it reuses a cached stage output
    assert _params(gradient_checkpointing=True).result_key() == _params().result_key()


def test_checkpointing_lora_same_loss_and_trains(make_context, tiny_model, tiny_tokenizer, text_file):
    pytest.importorskip("peft")
    from engine.training.lora import LoraParams, apply_lora

    ctx = make_context("loader")
    lora = LoraParams(r=4, alpha=8)

    def build():
        model = apply_lora(ctx.load_model(tiny_model, dtype=torch.float32), lora, seed=0)
        with torch.no_grad():  # B starts at zero: make A's gradient non-zero from step one
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        return model

    runs = _train_both(make_context, build, tiny_tokenizer, text_file)
    assert all("lora_" in n for n in runs[True][0])  # only adapters train; the embedding is frozen
    _check_same_and_all_trained(runs)


def test_checkpointing_elo_submodel_same_loss_and_trains(make_context, tiny_model, tiny_tokenizer, text_file):
    from engine_plugins.elo import prepare_submodel

    def build():
        return prepare_submodel(tiny_model, [0, -1])[0]

    runs = _train_both(make_context, build, tiny_tokenizer, text_file)
    names = list(runs[True][0])
    assert names and all(n.startswith("model.layers.") for n in names)  # embeddings, head frozen
    _check_same_and_all_trained(runs)


def test_checkpointing_refused_by_a_model_that_cannot(make_context):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(TrainingError, match=r"stage 'odd'.*gradient_checkpointing.*Plain"):
        train(make_context("odd"), Plain(), iter([]), _params(gradient_checkpointing=True))


# --- mixed precision on the CPU ----------------------------------------------------------


@pytest.mark.skipif(levers.cpu_autocast_problem() is not None, reason="torch has no CPU bf16 autocast here")
def test_bf16_autocast_step_on_cpu_close_to_fp32(make_context, tiny_model, tiny_tokenizer, text_file):
    results, head_dtypes = {}, {}
    for mp in ("no", "bf16"):
        params = _params(mixed_precision=mp, steps=2)
        ctx = make_context(f"mp-{mp}", device="cpu")
        model = ctx.load_model(tiny_model, dtype=torch.float32)
        seen = []
        model.lm_head.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        results[mp] = train(ctx, model, _batches(tiny_tokenizer, text_file, params), params)
        head_dtypes[mp] = set(seen)
    # autocast really ran in the training steps (probes before them run in float32)
    assert head_dtypes["no"] == {torch.float32} and torch.bfloat16 in head_dtypes["bf16"]
    assert results["bf16"].losses != results["no"].losses
    assert results["bf16"].losses == pytest.approx(results["no"].losses, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in results["bf16"].model.parameters())  # fp32 master weights


def test_fp16_on_cpu_is_a_clear_error(make_context, tiny_model):
    ctx = make_context("fp16", device="cpu")
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    with pytest.raises(TrainingError, match="mixed_precision 'fp16' needs a CUDA device"):
        train(ctx, model, iter([]), _params(mixed_precision="fp16"))


# --- attention -----------------------------------------------------------------------------


def test_runtime_attention_chooses_the_kernel(make_context, tiny_model, monkeypatch):
    for setting, expected in (("auto", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager")):
        ctx = make_context(f"attn-{setting}", device="cpu", attention=setting)
        model = ctx.load_model(tiny_model, dtype=torch.float32)
        assert model.config._attn_implementation == expected
        assert ctx.stats.notes["attention"] == {tiny_model.name: expected}
        assert (f"attention: {tiny_model.name}" in ctx.stats.notes.get("slow_paths", {})) == (expected == "eager")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert attention.resolve_attention("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert attention.resolve_attention("auto", cuda, torch.float32) is None  # sdpa (transformers' pick)
    assert attention.resolve_attention("auto", cpu, torch.bfloat16) is None
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert attention.resolve_attention("auto", cuda, torch.bfloat16) is None


def test_elo_submodel_takes_the_attention_kernel(tiny_model):
    from engine_plugins.elo import prepare_submodel

    assert prepare_submodel(tiny_model, [0, -1])[0].config._attn_implementation == "sdpa"
    assert prepare_submodel(tiny_model, [0, -1], attention="eager")[0].config._attn_implementation == "eager"


def _recipe(tmp_path, tiny_model, text_file, runtime: str):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: attn
        models:
          base: {{path: {tiny_model}}}
        runtime: {runtime}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
            params: {{steps: 1}}
        """))
    return f


def test_validate_refuses_flash_attention_it_cannot_run(tmp_path, tiny_model, text_file, monkeypatch):
    recipe = _recipe(tmp_path, tiny_model, text_file, "{device: cpu, attention: flash_attention_2}")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    with pytest.raises(RecipeError, match=r"stage 'ct': runtime.attention: 'flash_attention_2' needs the "
                                          r"flash-attn package"):
        plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    with pytest.raises(RecipeError, match=r"runtime.attention: 'flash_attention_2' runs on CUDA only"):
        plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    ok = _recipe(tmp_path, tiny_model, text_file, "{device: cpu, attention: sdpa}")
    assert plan_recipe(load_recipe(ok, []), ok.parent, str(ok)).stages


# --- paged 8-bit AdamW ---------------------------------------------------------------------


def test_paged_adamw_8bit_trains_a_step_on_cpu(make_context, tiny_model, tiny_tokenizer, text_file):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.optim import PagedAdamW8bit

    params = _params(optimizer="paged-adamw-8bit", steps=1)
    ctx = make_context("paged", device="cpu")
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    before = _trained(model)
    seen = []
    original = PagedAdamW8bit.step

    def step(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore", UserWarning)  # bitsandbytes: "not supported on CPU"
        mp.setattr(PagedAdamW8bit, "step", step)
        result = train(ctx, model, _batches(tiny_tokenizer, text_file, params), params)
    assert len(seen) == 1 and all(torch.isfinite(torch.tensor(result.losses)))
    # bitsandbytes keeps tensors under 4096 elements (norms) in 32 bits, the rest in 8
    big = [s for p, s in seen[0].state.items() if p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 for s in big)
    after = _trained(result.model)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    assert "optimizer: paged-adamw-8bit" in ctx.stats.notes["slow_paths"]


# --- FSDP (the 2-process run is tests/training/test_distributed.py) ---------------------------------


def test_fsdp_refuses_what_it_cannot_shard(make_context, tiny_model):
    pytest.importorskip("peft")
    from engine.run.distributed import shard_model
    from engine.training.lora import LoraParams, apply_lora

    model = make_context("l").load_model(tiny_model, dtype=torch.float32)
    lora = apply_lora(model, LoraParams(r=2), seed=0)
    with pytest.raises(TrainingError, match=r"stage 'x': runtime.fsdp: PeftModel.*runtime.fsdp: false"):
        shard_model(lora, "stage 'x'")
