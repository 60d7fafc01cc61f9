"""The one-pass count of a sliced top-``k`` trim (a threshold bracket guessed from a
sample of rows) keeps exactly the entries the whole-tensor trim keeps, also where the
guess misses (then the radix select's two passes count) and with many ties."""

from __future__ import annotations

import pytest
import torch
from test_merge_plugins import assert_same_state, inputs, state

from engine.merging import arithmetic, execute, streaming, trims
from engine.merging.trims import (
    BandSelector,
    MagnitudeThreshold,
    _magnitude_bits,
    bracket_guess,
    keep_count,
)
from engine_plugins.breadcrumbs import Breadcrumbs
from engine_plugins.ties import Ties


def _tensor(gen: torch.Generator, trial: int) -> torch.Tensor:
    n = int(torch.randint(2000, 20000, (1,), generator=gen))
    if trial % 3 == 0:  # few distinct magnitudes: ties at the threshold, zeros
        return torch.randint(-3, 4, (n,), generator=gen).float()
    return torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) + 0.01)


def _pieces(n: int, gen: torch.Generator) -> list[tuple[int, int]]:
    cuts = sorted({0, n, *torch.randint(0, n, (5,), generator=gen).tolist()})
    return list(zip(cuts, cuts[1:]))


def _trim_with_bracket(x: torch.Tensor, k: int, lo: int, hi: int, pieces) -> tuple[torch.Tensor, bool]:
    bits = _magnitude_bits(x)
    sel = MagnitudeThreshold(k)
    sel.bracket(lo, hi)
    for a, b in pieces:
        sel.count_bracket(bits[a:b])
    hit = sel.finish_bracket()
    if not hit:
        assert sel.threshold is None
        for count in (sel.count_high, sel.count_low):
            for a, b in pieces:
                count(bits[a:b])
    out = torch.cat([torch.where(sel.dropped(bits[a:b]), 0, x[a:b]) for a, b in pieces])
    return out, hit


def test_bracket_count_equals_the_stable_sort_trim_hit_or_miss():
    gen = torch.Generator().manual_seed(0)
    hits = misses = 0
    for trial in range(120):
        x = _tensor(gen, trial)
        n = x.numel()
        k = keep_count(float(torch.rand(1, generator=gen)) * 0.9 + 0.05, n)
        if k >= n:
            continue
        bits = _magnitude_bits(x)
        guess = bracket_guess(bits[::7], k, n)
        true = int(torch.sort(bits, descending=True).values[k - 1])
        brackets = [(max(0, true - 3), true + 3), (true + 1, true + 50), (max(0, true - 50), true - 1)]
        if guess is not None:
            brackets.append(guess)
        for lo, hi in brackets:
            if hi < lo:  # the threshold is 0: nothing lies below it
                continue
            out, hit = _trim_with_bracket(x, k, lo, hi, _pieces(n, gen))
            assert hit == (lo <= true <= hi), (trial, lo, hi, true)
            hits, misses = hits + hit, misses + (not hit)
            ref = torch.zeros_like(x)
            order = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
            ref[order] = x[order]
            assert torch.equal(out, ref), (trial, lo, hi)
    assert hits > 100 and misses > 100


def test_bracket_guess_bounds():
    n = 2**20  # the sample: every 4th entry (the engine's sample size)
    bits = _magnitude_bits(torch.randn(n, generator=torch.Generator().manual_seed(1)))
    lo, hi = bracket_guess(bits[::4], n // 5, n)
    true = int(torch.sort(bits, descending=True).values[n // 5 - 1])
    assert lo <= true <= hi and hi - lo + 1 <= trims.BRACKET_WIDTH
    assert bracket_guess(bits[:10000], 2000, n) is None  # too small a sample: too wide
    assert bracket_guess(bits[:10], 2, 10000) is None  # the margin reaches past the sample
    assert bracket_guess(bits, 0, 10000) is None and bracket_guess(bits, 10000, 10000) is None
    spread = _magnitude_bits(torch.logspace(-30, 30, 10000))  # values over 60 decades
    assert bracket_guess(spread, 5000, 10000) is None  # far wider than BRACKET_WIDTH


def test_a_bracket_wider_than_its_table_is_refused():
    with pytest.raises(ValueError, match="bracket"):
        MagnitudeThreshold(5).bracket(0, trims.BRACKET_WIDTH)


def test_band_with_outliers_takes_no_bracket():
    near_one = _magnitude_bits(1 + torch.randn(1000) * 1e-4)  # a narrow range of bits
    assert not BandSelector(10, 100).bracket(near_one, 1000)
    assert BandSelector(0, 100).bracket(near_one, 1000)


@pytest.fixture
def spy_brackets(monkeypatch):
    """Tiny tensors through the sliced path with a sample small enough to guess from;
    records each bracket's outcome."""
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(streaming, "SAMPLE_ELEMENTS", 64)
    outcomes: list[bool] = []
    finish = BandSelector.finish_bracket

    def spy(self):
        outcomes.append(finish(self))
        return outcomes[-1]

    monkeypatch.setattr(BandSelector, "finish_bracket", spy)
    return outcomes


@pytest.fixture
def narrow_family(tiny_model_family, tmp_path):
    """Models whose task vectors have magnitudes 0.01 * (1 + 1e-4 z) with random signs:
    a narrow range of bits, so that a guess from a small sample is narrow enough to
    count (the engine's sample is 2**18 entries; these tensors are a few thousand)."""
    from test_merge_plugins import edited_copy

    fam = {"base": tiny_model_family["base"]}
    for i, name in enumerate("abc"):
        gen = torch.Generator().manual_seed(10 + i)

        def edit(t, gen=gen):
            for v in t.values():
                sign = torch.randint(0, 2, v.shape, generator=gen).float() * 2 - 1
                v.add_(sign * 0.01 * (1 + 1e-4 * torch.randn(v.shape, generator=gen)))

        fam[name] = edited_copy(tiny_model_family["base"], tmp_path / name, edit)
    return fam


def test_ties_sliced_with_brackets_is_bitwise_the_whole_tensor_merge(narrow_family, make_context,
                                                                     spy_brackets):
    fam = narrow_family
    params = {"density": {"a": 0.3, "b": 0.5, "c": 0.2}, "weight": {"a": 1.0, "b": 0.7}}
    context = make_context("bracketed", stage_kind="merge", plugin="ties")
    out = Ties().run(context, inputs(fam, "a", "b", "c"), Ties.Params.model_validate(params))
    assert spy_brackets.count(True) > len(spy_brackets) // 2  # the one-pass count was used
    b, ms = state(fam["base"]), [state(fam[m]) for m in ("a", "b", "c")]
    expected = {k: arithmetic.ties(b[k], [m[k] for m in ms], [1.0, 0.7, 1.0], [0.3, 0.5, 0.2])
                for k in b}
    assert_same_state(out.path, expected)


def test_missed_brackets_fall_back_to_the_radix_count(tiny_model_family, make_context, spy_brackets,
                                                      monkeypatch):
    monkeypatch.setattr(trims, "bracket_guess", lambda sample, k, n: (0, 0))  # always misses
    fam = tiny_model_family
    context = make_context("missed", stage_kind="merge", plugin="ties")
    out = Ties().run(context, inputs(fam, "a", "b"), Ties.Params.model_validate({"density": 0.3}))
    assert spy_brackets and not any(spy_brackets)
    b, ms = state(fam["base"]), [state(fam[m]) for m in ("a", "b")]
    assert_same_state(out.path, {k: arithmetic.ties(b[k], [m[k] for m in ms], [1.0, 1.0], [0.3, 0.3])
                                 for k in b})


def test_breadcrumbs_sliced_with_a_sample_equals_whole(tiny_model_family, make_context, spy_brackets,
                                                       monkeypatch):
    fam = tiny_model_family
    params = {"density": 0.3, "gamma": 0.05}
    context = make_context("crumbs-sliced", stage_kind="merge", plugin="breadcrumbs")
    sliced = Breadcrumbs().run(context, inputs(fam, "a", "b"), Breadcrumbs.Params.model_validate(params))
    assert not spy_brackets  # bands with outliers count with the radix select
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 10**9)
    context = make_context("crumbs-whole", stage_kind="merge", plugin="breadcrumbs")
    whole = Breadcrumbs().run(context, inputs(fam, "a", "b"), Breadcrumbs.Params.model_validate(params))
    assert_same_state(sliced.path, state(whole.path))
