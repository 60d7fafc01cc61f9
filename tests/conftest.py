"""Shared fixtures: tiny models and tokenizers built in-process (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.context import Runtime, StageContext


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs torch single-threaded: the models and tensors here are tiny, so
    intra-op threads only add overhead (and stall on shared cores), and one thread gives
    one reduction order, so results that tests compare bitwise stay reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_TEXT = [
    "the cat sits on the mat and the dog runs in the park",
    "a small model learns words from a small corpus of text",
    "lum vela dora sen kato lumi vel ados kira nen",
    "question what color is the sky answer blue",
] * 4


def build_tokenizer(out_dir: Path, texts: list[str] | None = None):
    """A small byte-level BPE tokenizer with bos/eos/pad tokens, saved to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts or TINY_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_llama(out_dir: Path, *, num_layers: int = 4, hidden: int = 32, seed: int = 0,
                     tokenizer=None, vocab_size: int | None = None) -> Path:
    """A randomly initialised Llama saved as an HF folder (safetensors + tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or build_tokenizer(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 4-layer hidden-32 Llama folder. Treat it as read-only."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A base and three models of the same shape with different weights (merge inputs)."""
    root = tmp_path_factory.mktemp("family")
    return {
        name: build_tiny_llama(root / name, tokenizer=tiny_tokenizer, seed=seed)
        for seed, name in enumerate(["base", "a", "b", "c"])
    }


@pytest.fixture
def text_file(tmp_path) -> Path:
    f = tmp_path / "text.txt"
    f.write_text("\n".join(TINY_TEXT) + "\n")
    return f


@pytest.fixture
def instructions_file(tmp_path) -> Path:
    f = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"question what is {i} plus one answer", "response": f" {i + 1}"} for i in range(12)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@pytest.fixture
def choice_file(tmp_path) -> Path:
    f = tmp_path / "choice.jsonl"
    rows = [{"prompt": "question what color is the sky answer", "choices": [" blue", " cat", " mat"],
             "label": 0},
            {"prompt": "the cat sits on the", "choices": [" mat", " sky"], "label": 0}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


@pytest.fixture
def make_context(tmp_path):
    """Build a StageContext writing into a fresh folder (no runner needed)."""

    def make(stage_name: str = "stage", stage_kind: str = "adapt-language", plugin: str = "test",
             **runtime) -> StageContext:
        out = tmp_path / f"out-{stage_name}"
        out.mkdir(parents=True, exist_ok=True)
        return StageContext(run_name="test", stage_name=stage_name, stage_kind=stage_kind,
                            plugin=plugin, workdir=tmp_path, output_dir=out,
                            runtime=Runtime(device="cpu", **runtime))

    return make


@pytest.fixture
def test_plugin():
    """Register tests/engine_test_plugin.py for one test, then unregister it."""
    import engine_test_plugin

    from engine.plugin_manager import pm

    pm.register(engine_test_plugin, name="engine-test-plugin")
    try:
        yield engine_test_plugin
    finally:
        pm.unregister(name="engine-test-plugin")
