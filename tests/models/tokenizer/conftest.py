"""Tiny models with different tokenizers (built in-process): what a tokenizer change takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.testing import TINY_TEXT, build_tiny_llama, build_tokenizer

#: text in a script the tiny tokenizer never saw (it spells it one byte per token)
OTHER_TEXT = [
    "кошка сидит на ковре и собака бежит в парке",
    "маленькая модель учит слова из маленького корпуса",
    "лум вела дора сен като луми вел адос кира нен",
    "вопрос какого цвета небо ответ синий",
] * 6


def build_tied_llama(out_dir: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny Llama whose head is tied to its input embedding."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    """``model``: a tiny untied Llama on TINY_TEXT's tokenizer; ``donor``: another (seed 1)
    whose tokenizer was learned on TINY_TEXT and OTHER_TEXT; ``tied``: a tied one. Read-only."""
    root = tmp_path_factory.mktemp("vocab-models")
    donor_tok = build_tokenizer(root / "donor-tok", texts=TINY_TEXT + OTHER_TEXT)
    return {"model": build_tiny_llama(root / "model", hidden=64),
            "donor": build_tiny_llama(root / "donor", hidden=48, seed=1, tokenizer=donor_tok),
            "tied": build_tied_llama(root / "tied")}


@pytest.fixture
def other_text(tmp_path) -> Path:
    path = tmp_path / "data" / "other.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(OTHER_TEXT + TINY_TEXT) + "\n", encoding="utf-8")
    return path
