"""TIES's float32 arithmetic, written for fewer passes, against the plain formulation:
bit for bit, not merely close (signed zeros, subnormals, huge values, any weights)."""

from __future__ import annotations

import pytest
import torch

from engine.merging.arithmetic import ties_combine
from engine.merging.streaming import _into


def _reference(trimmed, weights, normalize, lam):
    """TIES after the trim with a float sign: weight, elect (``sum >= 0`` is +1),
    multiply by the sign, sum the positive parts, divide by the agreeing weights."""
    w = torch.tensor(weights, dtype=trimmed.dtype).view(-1, *([1] * (trimmed.dim() - 1)))
    weighted = trimmed if all(x == 1 for x in weights) else trimmed * w
    sign = (weighted.sum(dim=0) >= 0).to(weighted.dtype).mul_(2).sub_(1)
    aligned = weighted * sign
    agree = aligned > 0
    mixed = aligned.clamp(min=0).sum(dim=0).mul_(sign)
    if normalize:
        divisor = torch.zeros_like(mixed)
        for i, x in enumerate(weights):
            divisor.add_(agree[i], alpha=x)
        mixed.div_(divisor.masked_fill_(divisor == 0, 1))
    return mixed.mul_(lam) if lam != 1 else mixed


def _cases(seed: int, trials: int):
    gen = torch.Generator().manual_seed(seed)
    for trial in range(trials):
        m = int(torch.randint(1, 6, (1,), generator=gen))
        n = int(torch.randint(1, 500, (1,), generator=gen))
        kind = trial % 5
        if kind == 0:
            x = torch.randint(-2, 3, (m, n), generator=gen).float()
        else:
            scale = 10.0 ** float(torch.randint(-44, 37, (1,), generator=gen))
            x = torch.randn(m, n, generator=gen) * scale
        if kind in (2, 3):  # trimmed: mostly zeros, some of them negative zeros
            x[torch.rand(m, n, generator=gen) < 0.7] = 0.0
            x[torch.rand(m, n, generator=gen) < 0.2 * (kind - 2)] = -0.0
        weights = ([1.0] * m if trial % 3 == 0
                   else [0.25 * int(v) for v in torch.randint(1, 8, (m,), generator=gen)]
                   if trial % 3 == 1 else [float(v) for v in torch.randn(m, generator=gen)])
        yield x, weights


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_ties_combine_is_bitwise_the_plain_formulation(normalize, lam):
    checked = 0
    for x, weights in _cases(seed=int(normalize) * 10 + int(lam * 10), trials=400):
        got = ties_combine(x.clone(), weights, normalize=normalize, lam=lam)
        want = _reference(x.clone(), weights, normalize, lam)
        assert got.dtype == torch.float32
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (weights, x)
        checked += 1
    assert checked == 400


def test_ties_combine_elects_plus_on_a_zero_sum_and_minus_below():
    x = torch.tensor([[1.0, -2.0, 0.0, -0.0], [-1.0, 1.0, 0.0, -0.0]])
    got = ties_combine(x.clone(), [1.0, 1.0], normalize=True)
    # sums 0 (+: model 0 agrees), -1 (-: model 0), 0 (nobody agrees), -0 (+0 >= 0: +)
    assert got.tolist() == [1.0, -2.0, 0.0, 0.0]
    assert torch.equal(got.view(torch.int32), _reference(x, [1.0, 1.0], True, 1.0).view(torch.int32))


def test_into_subtracts_like_copy_then_subtract():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=gen)
    raw = torch.randn(64, 33, generator=gen) * 1e-3 + base
    for dtype, cdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                          (torch.float32, torch.float64), (torch.float32, torch.bfloat16)):
        r, b = raw.to(dtype), base.to(cdtype)
        got = torch.empty(64, 33, dtype=cdtype)
        _into(got, r, b)
        want = torch.empty(64, 33, dtype=cdtype).copy_(r).sub_(b)
        assert torch.equal(got, want), (dtype, cdtype)
        _into(got, r, None)
        assert torch.equal(got, torch.empty(64, 33, dtype=cdtype).copy_(r))


def test_whole_tensor_trims_equal_band_trim_per_model():
    from engine.merging.streaming import _trim_whole
    from engine.merging.trims import MagnitudeBand, band_trim_

    gen = torch.Generator().manual_seed(3)
    stacked = torch.randn(3, 300, 40, generator=gen)
    stacked[1] = torch.randint(-3, 4, (300, 40), generator=gen).float()  # ties at the threshold
    bands = [MagnitudeBand(0.2), None, MagnitudeBand(0.5, 0.01)]
    want = stacked.clone()
    for delta, band in zip(want, bands):
        if band is not None:
            band_trim_(delta, *band.ranks(delta.numel()))
    got = stacked.clone()
    _trim_whole(got, bands)
    assert torch.equal(got, want)
    assert not torch.equal(got[0], stacked[0]) and torch.equal(got[1], stacked[1])
