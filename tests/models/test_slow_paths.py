"""No silent fallbacks: each slower or degraded path is found by asking the library (or
by trying the model), said once in the stage output and recorded in report.json under
the stage's notes ``slow_paths``. Real tiny models and tokenizers throughout; the one
wrapper module drops a keyword a real model would use."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from rich.console import Console

from engine.api import DataSource, ModelArtifact
from engine.models.slow_paths import (
    attention_path,
    auto_dtype_path,
    auto_precision_path,
    loss_scaling_path,
    tokenizer_path,
)
from engine.training.batching import training_batches
from engine.training.loop import TrainerParams, train


def _quiet(ctx):
    ctx.console = Console(file=io.StringIO(), width=300, force_terminal=False)
    return ctx


def _said(ctx) -> str:
    return ctx.console.file.getvalue()


def _eager_copy(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose config asks transformers for eager attention."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["attn_implementation"] = "eager"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _python_tokenizer_copy(src: Path, dst: Path) -> Path:
    """A copy of a model folder whose tokenizer is a pure-Python one (ByT5's byte tokenizer
    has no fast implementation; its 384 ids fit the tiny model's vocabulary or not, the
    tokenizer is only loaded here)."""
    from transformers import ByT5Tokenizer

    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    ByT5Tokenizer().save_pretrained(str(dst))
    return dst


# --- tokenizer: fast or pure Python --------------------------------------------------------


def test_fast_tokenizer_records_nothing(make_context, tiny_model):
    ctx = _quiet(make_context("fast"))
    tok = ctx.load_tokenizer(ModelArtifact("tiny", tiny_model))
    assert tok.is_fast and tokenizer_path(tok) is None
    assert "slow_paths" not in ctx.stats.notes and _said(ctx) == ""


def test_python_tokenizer_is_said_once_and_recorded(make_context, tiny_model, tmp_path):
    slow_a = _python_tokenizer_copy(tiny_model, tmp_path / "a")
    slow_b = _python_tokenizer_copy(tiny_model, tmp_path / "b")
    ctx = _quiet(make_context("slowtok", stage_kind="evaluate"))
    tok = ctx.load_tokenizer(ModelArtifact("a", slow_a))
    ctx.load_tokenizer(ModelArtifact("b", slow_b))
    ctx.load_tokenizer(ModelArtifact("a", slow_a))
    assert tok.is_fast is False
    slow = ctx.stats.notes["slow_paths"]
    assert set(slow) == {"tokenizer: a", "tokenizer: b"}
    assert "ByT5Tokenizer is a pure-Python tokenizer" in slow["tokenizer: a"]
    assert _said(ctx).count("slow path (tokenizer") == 1  # once per kind, every model recorded
    json.dumps(ctx.stats.notes)  # goes into report.json as is


# --- attention: SDPA/flash or eager ----------------------------------------------------------


def test_sdpa_attention_records_nothing(make_context, tiny_model):
    ctx = _quiet(make_context("sdpa"))
    model = ctx.load_model(ModelArtifact("tiny", tiny_model))
    assert model.config._attn_implementation != "eager" and attention_path(model) is None
    assert "slow_paths" not in ctx.stats.notes


def test_eager_attention_is_said_and_recorded(make_context, tiny_model, tmp_path):
    eager = _eager_copy(tiny_model, tmp_path / "eager")
    ctx = _quiet(make_context("eager", stage_kind="evaluate"))
    model = ctx.load_model(ModelArtifact("eager", eager))
    assert model.config._attn_implementation == "eager"
    assert "eager attention" in ctx.stats.notes["slow_paths"]["attention: eager"]
    assert "slow path (attention, eager)" in _said(ctx)


# --- bfloat16 on a GPU that has none -----------------------------------------------------


def test_auto_dtype_and_precision_fall_back_only_on_a_gpu_without_bf16(make_context, tiny_model):
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert "float32 on this GPU" in auto_dtype_path(gpu, bf16_supported=lambda: False)
    assert "full precision" in auto_precision_path(gpu, bf16_supported=lambda: False)
    assert auto_dtype_path(gpu, bf16_supported=lambda: True) is None
    assert auto_precision_path(gpu, bf16_supported=lambda: True) is None
    assert auto_dtype_path(cpu, bf16_supported=lambda: False) is None  # float32 is the CPU's choice
    assert auto_precision_path(cpu, bf16_supported=lambda: False) is None
    ctx = _quiet(make_context("cpu"))
    ctx.load_model(ModelArtifact("tiny", tiny_model))
    assert "slow_paths" not in ctx.stats.notes


# --- num_items_in_batch: the loss of accumulated micro-batches ---------------------------


class MeanLoss(torch.nn.Module):
    """A real tiny Llama behind a ``forward`` that swallows ``num_items_in_batch``, as a
    custom model class with ``**kwargs`` might: its loss is each micro-batch's mean."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, labels=None, **ignored):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _train(ctx, model, tokenizer, text_file, grad_accum):
    params = TrainerParams(steps=2, batch_size=4, grad_accum=grad_accum, seq_len=16, lr=1e-3,
                           log_every=1)
    # stream packing: MeanLoss drops position_ids, so document packing would (rightly)
    # add a packing slow path of its own to the notes this test reads
    batches = training_batches(tokenizer, [DataSource(text_file)], seq_len=16,
                               batch_size=params.micro_batch_size, seed=0, packing="stream")
    return train(ctx, model, batches, params)


def test_loss_scaling_is_found_by_trying(make_context, tiny_model, tiny_tokenizer, text_file):
    ctx = _quiet(make_context("honours"))
    model = ctx.load_model(ModelArtifact("tiny", tiny_model), dtype=torch.float32)
    assert loss_scaling_path(model, torch.device("cpu")) is None
    _train(ctx, model, tiny_tokenizer, text_file, grad_accum=2)
    assert "slow_paths" not in ctx.stats.notes

    wrapped = MeanLoss(ctx.load_model(ModelArtifact("tiny", tiny_model), dtype=torch.float32))
    assert "ignores num_items_in_batch" in loss_scaling_path(wrapped, torch.device("cpu"))
    bad = _quiet(make_context("ignores"))
    _train(bad, wrapped, tiny_tokenizer, text_file, grad_accum=2)
    assert "ignores num_items_in_batch" in bad.stats.notes["slow_paths"]["num_items_in_batch: MeanLoss"]
    assert "slow path (num_items_in_batch" in _said(bad)

    one = _quiet(make_context("one-micro-batch"))  # nothing to accumulate: no difference, no probe
    _train(one, MeanLoss(one.load_model(ModelArtifact("tiny", tiny_model), dtype=torch.float32)),
           tiny_tokenizer, text_file, grad_accum=1)
    assert "slow_paths" not in one.stats.notes
