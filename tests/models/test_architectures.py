"""ELO and elo-align on every supported decoder family, with tiny random models built
in-process (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3), and a clear error
for an architecture the arch layer does not know."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import TrainingError
from engine.models import arch
from engine_plugins.elo import ELO
from engine_plugins.elo_align import ELOAlign

FAST = {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "log_every": 2}
COMMON = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128}
CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8}),
}


def _build(kind: str, out: Path, tokenizer) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra = CONFIGS[kind]
    config = getattr(transformers, cls_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **COMMON, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_elo_and_elo_align_on_architecture(kind, tmp_path, tiny_tokenizer, make_context, text_file):
    assert kind in arch.SUPPORTED_MODEL_TYPES
    base = _build(kind, tmp_path / kind, tiny_tokenizer)
    assert json.loads((base / "config.json").read_text())["model_type"] == kind
    data = [DataSource(text_file, "text")]

    ctx = make_context(f"elo-{kind}")
    sub = ELO().run(ctx, StageInputs(model=ModelArtifact("base", base), data=data), ELO.Params(**FAST))
    sub_cfg = json.loads((sub.path / "config.json").read_text())
    assert sub_cfg["num_hidden_layers"] == 2 and sub_cfg["model_type"] == kind
    if "layer_types" in sub_cfg:  # sliding/full pattern of layers 0 and 3 kept
        full_types = json.loads((base / "config.json").read_text())["layer_types"]
        assert sub_cfg["layer_types"] == [full_types[0], full_types[3]]
    assert ctx.stats.forward_params < sum(t.numel() for t in load_file(str(base / "model.safetensors")).values())

    actx = make_context(f"align-{kind}", stage_kind="align")
    aligned = ELOAlign().run(actx, StageInputs(model=sub, base=ModelArtifact("base", base), data=data),
                             ELOAlign.Params(**FAST))
    before, trained = load_file(str(base / "model.safetensors")), load_file(str(sub.path / "model.safetensors"))
    after = load_file(str(aligned.path / "model.safetensors"))
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # aligned: everything trains
    reinsert_only = ELOAlign().run(make_context(f"re-{kind}", stage_kind="align"),
                                   StageInputs(model=sub, base=ModelArtifact("base", base)),
                                   ELOAlign.Params(steps=0))
    re = load_file(str(reinsert_only.path / "model.safetensors"))
    for key, tensor in re.items():
        layer = arch.layer_of_key(key)
        if layer in (0, 3):
            assert torch.equal(tensor, trained[arch.rename_layer_key(key, {0: 0, 3: 1})]), key
        else:
            assert torch.equal(tensor, before[key]), key


def test_elo_unknown_architecture_is_a_clear_error(tmp_path, tiny_tokenizer, make_context, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(str(folder))
    with pytest.raises(TrainingError, match=r"does not support model_type 'gpt2'; supported: llama, mistral"):
        ELO().run(make_context("elo-gpt2"), StageInputs(model=ModelArtifact("g", folder),
                                                        data=[DataSource(text_file, "text")]),
                  ELO.Params(**FAST))
    with pytest.raises(ValueError, match="elo: layer-wise training does not support model_type 'gpt2'"):
        ELO().check({"model": [json.loads((folder / "config.json").read_text())]}, ELO.Params())


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_elo_train_embeddings_round_trip_tied_and_untied(kind, tmp_path, tiny_tokenizer, make_context, text_file):
    """Gemma ties the head to the embedding (one tensor trains and is put back), Llama
    does not (two); either way the middle layers of the aligned model stay the base's."""
    base = _build(kind, tmp_path / kind, tiny_tokenizer)
    tied = json.loads((base / "config.json").read_text()).get("tie_word_embeddings", False)
    assert tied == (kind == "gemma")
    data = [DataSource(text_file, "text")]
    sub = ELO().run(make_context(f"elo-emb-{kind}"), StageInputs(model=ModelArtifact("base", base), data=data),
                    ELO.Params(**FAST, train_embeddings=True))
    non_layer = [t for t in json.loads((sub.path / "lingoforge.json").read_text())["trained_tensors"]
                 if arch.layer_of_key(t) is None]
    assert non_layer == (["model.embed_tokens.weight"] if tied else ["model.embed_tokens.weight", "lm_head.weight"])

    aligned = ELOAlign().run(make_context(f"re-emb-{kind}", stage_kind="align"),
                             StageInputs(model=sub, base=ModelArtifact("base", base)), ELOAlign.Params(steps=0))
    before, trained = load_file(str(base / "model.safetensors")), load_file(str(sub.path / "model.safetensors"))
    after = load_file(str(aligned.path / "model.safetensors"))
    assert not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    for key, tensor in after.items():
        if arch.layer_of_key(key) in (1, 2) or key == "model.norm.weight":
            assert torch.equal(tensor, before[key]), key
        else:
            assert torch.equal(tensor, trained[arch.rename_layer_key(key, {0: 0, 3: 1})]), key
    if tied:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(aligned.path))
        assert torch.equal(model.lm_head.weight, trained["model.embed_tokens.weight"])
