"""ct's train_only: only the embedding and head learn, or only the rows a tokenizer change
made; every other weight (and every other row) stays the input's, bit for bit, and the
stage's parameter count says how many learned."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import TrainingError
from engine.models.tokenizer.extend import extend_tokenizer
from engine_plugins.ct import CT

FAST = {"steps": 3, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "log_every": 3, "weight_decay": 0.1}
TEXT = ["кошка сидит на ковре и собака бежит", "лум вела дора сен като луми вел", "the cat sits on the mat"] * 8
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def extended(tiny_model, tmp_path_factory):
    return extend_tokenizer(tiny_model, TEXT, tmp_path_factory.mktemp("ext") / "m", new_tokens=30)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(TEXT) + "\n", encoding="utf-8")
    return [DataSource(path=path, format="text")]


def _run(make_context, name, model, data, **params):
    ctx = make_context(name)
    art = CT().run(ctx, StageInputs(model=ModelArtifact("m", model), data=data), CT.Params(**FAST, **params))
    return ctx, load_file(art.path / "model.safetensors")


def test_new_rows_only_moves_the_new_rows(make_context, extended, text):
    before = load_file(extended.folder / "model.safetensors")
    ctx, after = _run(make_context, "rows", extended.folder, text, train_only="new-rows")
    old = extended.old_size
    for name, t in before.items():
        if name in (EMB, HEAD):
            assert torch.equal(after[name][:old], t[:old]), name  # no decay, no update of old rows
            assert not torch.equal(after[name][old:], t[old:]), name
        else:
            assert torch.equal(after[name], t), name
    hidden = before[EMB].shape[1]
    assert ctx.stats.trainable_params == len(extended.added) * hidden * 2
    assert ctx.stats.notes["train_only"]["rows"] == len(extended.added)


def test_embeddings_moves_every_row_and_nothing_else(make_context, extended, text):
    before = load_file(extended.folder / "model.safetensors")
    ctx, after = _run(make_context, "emb", extended.folder, text, train_only="embeddings")
    for name, t in before.items():
        assert torch.equal(after[name], t) is (name not in (EMB, HEAD)), name
    assert not torch.equal(after[EMB][:10], before[EMB][:10])  # old rows learn too
    assert ctx.stats.trainable_params == before[EMB].numel() + before[HEAD].numel()


def test_new_rows_needs_a_model_that_records_them(make_context, tiny_model, text):
    with pytest.raises(TrainingError, match="lingoforge.json records none"):
        _run(make_context, "none", tiny_model, text, train_only="new-rows")


def test_train_only_does_not_combine_with_layers_or_lora():
    for extra in ({"layers": [0]}, {"lora": {"r": 4}}):
        with pytest.raises(ValidationError, match="train_only trains the embedding and head alone"):
            CT.Params(**FAST, train_only="embeddings", **extra)
    with pytest.raises(ValidationError):
        CT.Params(**FAST, train_only="rows")
