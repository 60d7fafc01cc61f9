"""Magnitude bands (engine.merging.trims): keeping magnitude ranks [a, b) of a task
vector is exact whether the tensor is seen whole or in row slices, equals a stable-sort
reference, and Model Breadcrumbs's band follows mergekit 0.1.5's outlier rule.

Property tests (hypothesis) over random shapes, values with many exact ties, bands and
cuts into pieces.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.merging import BandSelector, MagnitudeBand, magnitude_band, magnitude_trim
from engine.merging.trims import _magnitude_bits, keep_count

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_band(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Ranks by a stable descending sort of |x| (equal magnitudes: lowest index first)."""
    flat = x.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[start:stop]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.view_as(x)


def reference_breadcrumbs(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's magnitude_outliers rule written from its description: sort |x|
    ascending, drop the ``n_bot`` smallest and keep the next ``target`` (``n_bot`` =
    what is left after the target and ``floor(gamma n)`` outliers, at least 0), with
    lingoforge's at-least-one ``target`` and its tie rule (an equal magnitude at a higher
    index sorts lower)."""
    if density >= 1:
        return x.clone()
    flat = x.reshape(-1)
    n = flat.numel()
    target = max(1, int(density * n))
    n_bot = max(0, n - target - int(gamma * n))
    ascending = sorted(range(n), key=lambda i: (float(flat[i].abs()), -i))
    keep = torch.tensor(ascending[n_bot:n_bot + target], dtype=torch.long)
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(x)


@st.composite
def tensors(draw, max_numel: int = 600):
    rows = draw(st.integers(1, 30))
    cols = draw(st.integers(1, max(1, max_numel // rows)))
    kind = draw(st.sampled_from(["ties", "random", "half"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct magnitudes, zeros and -0.0: many exact ties
        x = torch.randint(-3, 4, (rows, cols), generator=gen).float() * 0.5
        x[x == 0] = -0.0 if seed % 2 else 0.0
    else:
        x = torch.randn(rows, cols, generator=gen)
        if kind == "half":
            x = x.half().float()
    return x


@st.composite
def band_cases(draw):
    x = draw(tensors())
    n = x.numel()
    start = draw(st.integers(0, n - 1))
    stop = draw(st.integers(start + 1, n))
    cuts = sorted(set(draw(st.lists(st.integers(0, x.shape[0]), max_size=5))) | {0, x.shape[0]})
    return x, start, stop, cuts


def sliced_band(x: torch.Tensor, start: int, stop: int, cuts: list[int]) -> torch.Tensor:
    """The band through BandSelector, fed row slices between ``cuts`` (3 passes)."""
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    sel = BandSelector(start, stop)
    for a, b in pieces:
        sel.count_high(_magnitude_bits(x[a:b]))
    for a, b in pieces:
        sel.count_low(_magnitude_bits(x[a:b]))
    return torch.cat([x[a:b].masked_fill(sel.dropped(_magnitude_bits(x[a:b])), 0)
                      for a, b in pieces])


@FAST
@given(case=band_cases())
def test_band_in_row_slices_equals_whole_tensor_and_reference(case):
    x, start, stop, cuts = case
    whole = magnitude_band(x, (start, stop))
    assert torch.equal(whole, reference_band(x, start, stop))  # values (-0.0 == 0.0)
    # sliced == whole bit for bit, the sign of zero included
    assert torch.equal(sliced_band(x, start, stop, cuts).view(torch.int32), whole.view(torch.int32))


@FAST
@given(x=tensors(), density=st.floats(0.01, 1.0), data=st.data())
def test_top_density_is_the_band_from_zero(x, density, data):
    k = keep_count(density, x.numel())
    assert torch.equal(magnitude_trim(x, density), magnitude_band(x, (0, k)))
    assert torch.equal(magnitude_trim(x, density), magnitude_band(x, MagnitudeBand(density)))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, x.shape[0]), max_size=4))) | {0, x.shape[0]})
    if k < x.numel():
        assert torch.equal(sliced_band(x, 0, k, cuts), magnitude_trim(x, density))


@FAST
@given(x=tensors(max_numel=300), density=st.floats(0.01, 1.0), gamma=st.floats(0.0, 1.0),
       data=st.data())
def test_breadcrumbs_band_follows_mergekits_outlier_rule(x, density, gamma, data):
    band = MagnitudeBand(density, gamma)
    want = reference_breadcrumbs(x, density, gamma)
    assert torch.equal(magnitude_band(x, band), want)
    start, stop = band.ranks(x.numel())
    assert stop - start == keep_count(density, x.numel())  # always density's count
    if (start, stop) != (0, x.numel()):
        cuts = sorted(set(data.draw(st.lists(st.integers(0, x.shape[0]), max_size=4)))
                      | {0, x.shape[0]})
        assert torch.equal(sliced_band(x, start, stop, cuts), want)


def test_band_ranks_examples():
    assert MagnitudeBand(0.2).ranks(100) == (0, 20)
    assert MagnitudeBand(0.2, 0.01).ranks(100) == (1, 21)
    assert MagnitudeBand(0.9, 0.2).ranks(100) == (10, 100)  # too few left: fewer outliers
    assert MagnitudeBand(1.0, 0.5).ranks(100) == (0, 100)  # density 1: no trim at all
    assert MagnitudeBand(0.01, 0.5).ranks(10) == (5, 6)  # at least one entry kept
    x = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5])
    assert magnitude_band(x, (1, 3)).tolist() == [0.0, -4.0, 3.0, 0.0, 0.0, 0.0]
    assert magnitude_band(x, MagnitudeBand(0.5, 0.2)).tolist() == [0.0, -4.0, 3.0, -2.0, 0.0, 0.0]
