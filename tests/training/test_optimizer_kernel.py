"""AdamW's implementation: torch's fused kernel where torch offers it, the same training
as torch's default implementation up to float rounding, and a slow path said otherwise."""

from __future__ import annotations

import pytest
import torch

from engine.api import DataSource
from engine.training import levers
from engine.training.batching import training_batches
from engine.training.loop import TrainerParams, train


def _params(**overrides) -> TrainerParams:
    return TrainerParams(**{"steps": 6, "batch_size": 4, "seq_len": 16, "lr": 3e-3, "log_every": 1,
                            "checkpoint_every": 0, "max_grad_norm": 0.5, **overrides})


def _train(make_context, tiny_model, tiny_tokenizer, text_file, name):
    params = _params()
    ctx = make_context(name)
    model = ctx.load_model(tiny_model, dtype=torch.float32)
    batches = training_batches(tiny_tokenizer, [DataSource(text_file)], seq_len=params.seq_len,
                               batch_size=params.micro_batch_size, seed=params.seed)
    return ctx, train(ctx, model, batches, params)


def test_make_optimizer_takes_the_kernel_adamw_kernel_names():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    kernel, why = levers.adamw_kernel(params)
    opt = levers.make_optimizer(params, _params())
    assert isinstance(opt, torch.optim.AdamW)
    assert bool(opt.defaults["fused"]) == (kernel == "fused")
    assert (why is None) == (kernel == "fused")  # plain tensors: anything but fused is a slow path


def test_tensor_subclasses_keep_torchs_default():
    class Sub(torch.Tensor):
        pass

    p = torch.nn.Parameter(torch.randn(2, 2).as_subclass(Sub))
    assert levers.adamw_kernel([p]) == ("default", None)
    assert not levers.make_optimizer([p], _params()).defaults["fused"]


def test_fused_adamw_trains_as_the_default_one(make_context, tiny_model, tiny_tokenizer, text_file, monkeypatch):
    """The loop with the kernel it picks vs the loop made to use torch's default AdamW: the
    same losses and weights up to rounding; the default one is reported as a slow path."""
    if levers.adamw_kernel([torch.nn.Parameter(torch.zeros(2))])[0] != "fused":
        pytest.skip("this torch offers no fused AdamW on the CPU")
    ctx_f, fused = _train(make_context, tiny_model, tiny_tokenizer, text_file, "fused")
    assert "slow_paths" not in ctx_f.stats.notes
    monkeypatch.setattr(levers, "adamw_kernel", lambda params: ("default", "no fused AdamW here"))
    ctx_d, default = _train(make_context, tiny_model, tiny_tokenizer, text_file, "default")
    assert ctx_d.stats.notes["slow_paths"]["optimizer: adamw"] == "no fused AdamW here"
    assert fused.losses == pytest.approx(default.losses, rel=1e-5)
    assert fused.losses[-1] < fused.losses[0]  # it trains
    moved = 0.0
    base = ctx_f.load_model(tiny_model, dtype=torch.float32).state_dict()
    for (name, a), b in zip(fused.model.state_dict().items(), default.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
        moved = max(moved, float((a - base[name]).abs().max()))
    assert moved > 1e-3  # the weights did change, by far more than the tolerance
