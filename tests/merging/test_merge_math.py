"""Merge arithmetic on small hand-made tensors, with expected values computed by hand.

The convention under test is mergekit's (docs/merging.md): density is the kept
fraction, the TIES sign is elected on weighted deltas, normalize divides by the sum of
the agreeing weights, lambda scales the merged delta.
"""

from __future__ import annotations

import pytest
import torch

from engine.merging.arithmetic import (
    dare_ties,
    disjoint_merge,
    elect_sign,
    linear,
    magnitude_trim,
    random_drop,
    seed_for,
    slack_ties,
    slack_ties_delta,
    stack_deltas,
    task_arithmetic,
    ties,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- building blocks -------------------------------------------------------------------


def test_magnitude_trim_keeps_the_largest_magnitudes():
    x = t(0.1, -5.0, 3.0, -0.2, 4.0)
    assert torch.equal(magnitude_trim(x, 0.4), t(0.0, -5.0, 0.0, 0.0, 4.0))  # k = 2
    assert torch.equal(magnitude_trim(x, 1.0), x)


def test_magnitude_trim_keeps_at_least_one_entry():
    # floor(0.1 * 5) = 0 would erase the tensor; one entry is kept instead
    assert torch.equal(magnitude_trim(t(0.1, -5.0, 3.0, -0.2, 4.0), 0.1), t(0, -5.0, 0, 0, 0))


def test_magnitude_trim_keeps_shape():
    x = torch.arange(12, dtype=torch.float32).view(3, 4) - 6  # -6..5
    out = magnitude_trim(x, 0.25)  # k = 3: -6, -5, 5
    assert out.shape == (3, 4)
    assert sorted(out[out != 0].tolist()) == [-6.0, -5.0, 5.0]


@pytest.mark.parametrize("density", [0.0, -0.5])
def test_magnitude_trim_rejects_non_positive_density(density):
    with pytest.raises(ValueError, match="density"):
        magnitude_trim(t(1, 2), density)


def test_elect_sign_ties_go_positive():
    weighted = torch.stack([t(1.0, -2.0, 1.0), t(-3.0, 1.0, -1.0)])
    assert torch.equal(elect_sign(weighted), t(-1.0, -1.0, 1.0))  # sums -2, -1, 0


def test_disjoint_merge_divides_by_agreeing_weights():
    weights = [2.0, 1.0]
    weighted = torch.stack([t(4.0, -4.0, 0.0), t(2.0, 1.0, 0.0)])  # deltas (2,-2,0), (2,1,0)
    sign = t(1.0, -1.0, 1.0)
    mixed, agree = disjoint_merge(weighted, weights, sign, normalize=True)
    # pos 0: both agree (4+2)/(2+1); pos 1: only model 0, -4/2; pos 2: nobody, 0/1
    assert torch.equal(mixed, t(2.0, -2.0, 0.0))
    assert agree.tolist() == [[True, True, False], [True, False, False]]
    mixed, _ = disjoint_merge(weighted, weights, sign, normalize=False)
    assert torch.equal(mixed, t(6.0, -4.0, 0.0))


def test_random_drop_is_seeded_and_rescaled():
    x = torch.ones(10_000)
    a = random_drop(x, 0.25, torch.Generator().manual_seed(7))
    b = random_drop(x, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 4.0}  # kept entries are divided by 0.25
    assert abs((a != 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(random_drop(x, 0.25, torch.Generator().manual_seed(7), rescale=False),
                       (a != 0).float())


def test_seed_for_is_stable_and_distinct():
    assert seed_for(0, "w", 0) == seed_for(0, "w", 0)
    assert len({seed_for(0, "w", 0), seed_for(0, "w", 1), seed_for(1, "w", 0), seed_for(0, "v", 0)}) == 4


# --- methods ---------------------------------------------------------------------------


def test_linear_weighted_average():
    a, b = t(2.0, 0.0), t(0.0, 4.0)
    assert torch.equal(linear([a, b], [1.0, 3.0]), t(0.5, 3.0))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), t(2.0, 12.0))


def test_task_arithmetic_hand_computed():
    base, a, b = t(1.0, 2.0), t(2.0, 0.0), t(0.0, 4.0)
    # deltas (1, -2) and (-1, 2); 0.5 * a + 2 * b = (-1.5, 3)
    assert torch.allclose(task_arithmetic(base, [a, b], [0.5, 2.0]), t(-0.5, 5.0))
    assert torch.allclose(task_arithmetic(base, [a, b], [0.5, 2.0], normalize=True), t(0.4, 3.2))
    assert torch.allclose(task_arithmetic(base, [a, b], [0.5, 2.0], lam=2.0), t(-2.0, 8.0))


def test_ties_hand_computed():
    base = t(1.0, 1.0, 1.0, 1.0)
    a = base + t(1.0, -2.0, 0.5, 3.0)   # trimmed to (0, -2, 0, 3)
    b = base + t(-3.0, 1.0, 0.25, 1.5)  # trimmed to (-3, 0, 0, 1.5)
    # weights (2, 1): weighted (0,-4,0,6) and (-3,0,0,1.5); sums (-3,-4,0,7.5) -> signs (-,-,+,+)
    # agreeing sums (-3,-4,0,7.5); agreeing weights (1,2,0->1,3)
    got = ties(base, [a, b], [2.0, 1.0], [0.5, 0.5])
    assert torch.allclose(got, base + t(-3.0, -2.0, 0.0, 2.5))
    got = ties(base, [a, b], [2.0, 1.0], [0.5, 0.5], normalize=False)
    assert torch.allclose(got, base + t(-3.0, -4.0, 0.0, 7.5))
    got = ties(base, [a, b], [2.0, 1.0], [0.5, 0.5], lam=0.5)
    assert torch.allclose(got, base + t(-1.5, -1.0, 0.0, 1.25))


def test_ties_per_model_density():
    base = torch.zeros(4)
    a, b = t(4.0, 3.0, 2.0, 1.0), t(1.0, 2.0, 3.0, 4.0)
    # a keeps all four, b keeps only its largest (pos 3): (4,3,2,(1+4)/2)
    assert torch.allclose(ties(base, [a, b], [1.0, 1.0], [1.0, 0.25]), t(4.0, 3.0, 2.0, 2.5))


def test_ties_elects_sign_on_weighted_deltas_like_mergekit():
    base, a, b = t(0.0), t(2.0), t(-3.0)
    # weighted 2*2=4 against 1*(-3): the sum is +1, so a wins and 4/2 = 2.
    # (PEFT elects on unweighted deltas, 2-3 < 0, and would give -3.)
    assert torch.equal(ties(base, [a, b], [2.0, 1.0], [1.0, 1.0]), t(2.0))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_ties_with_one_model_and_density_one_is_task_arithmetic(normalize, weight):
    g = torch.Generator().manual_seed(0)
    base, x = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    expected = task_arithmetic(base, [x], [weight], normalize=normalize, lam=0.8)
    got = ties(base, [x], [weight], [1.0], normalize=normalize, lam=0.8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_dare_ties_with_density_one_is_ties():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=g)
    models = [torch.randn(32, generator=g) for _ in range(3)]
    assert torch.equal(dare_ties(base, models, [1.0, 0.5, 2.0], [1.0] * 3, seed=3, tensor_name="w"),
                       ties(base, models, [1.0, 0.5, 2.0], [1.0] * 3))


def test_dare_ties_depends_on_seed_and_tensor_name_only():
    base = torch.zeros(1000)
    models = [torch.ones(1000), -torch.ones(1000) * 0.5]
    one = dare_ties(base, models, [1.0, 1.0], [0.5, 0.5], seed=1, tensor_name="w")
    assert torch.equal(one, dare_ties(base, models, [1.0, 1.0], [0.5, 0.5], seed=1, tensor_name="w"))
    assert not torch.equal(one, dare_ties(base, models, [1.0, 1.0], [0.5, 0.5], seed=2, tensor_name="w"))
    # entries: 2 (a kept alone or with b: a's 2 outvotes b's -1), -1 (b alone), 0 (both dropped)
    assert set(one.unique().tolist()) <= {2.0, -1.0, 0.0}


# --- slack-TIES ------------------------------------------------------------------------

CT, SFT = t(3.0, -3.0, 1.0), t(-2.0, 1.0, 0.5)  # deltas from a zero base


def test_slack_ties_hand_computed():
    base = torch.zeros(3)
    # TIES: sums (1, -2, 1.5): CT wins positions 0 and 1, both agree at 2 -> (3, -3, 0.75)
    assert torch.allclose(ties(base, [CT, SFT], [1, 1], [1, 1]), t(3.0, -3.0, 0.75))
    # slack 0.5: SFT votes twice, (1-2, -2+1, 1.5+0.5) = (-1, -1, 2): SFT wins position 0
    got = slack_ties(base, [CT, SFT], [1, 1], [1, 1], protect=1, slack=0.5)
    assert torch.allclose(got, t(-2.0, -3.0, 0.75))
    # slack 0.75: SFT votes 4x: position 1 becomes -2 + 3 = 1 > 0, SFT wins it too
    got = slack_ties(base, [CT, SFT], [1, 1], [1, 1], protect=1, slack=0.75)
    assert torch.allclose(got, t(-2.0, 1.0, 0.75))
    # slack 1: the protected model decides every sign where its trimmed delta is non-zero
    got = slack_ties(base, [CT, SFT], [1, 1], [1, 1], protect=1, slack=1.0)
    assert torch.allclose(got, t(-2.0, 1.0, 0.75))


def test_slack_ties_protects_only_important_positions():
    base = torch.zeros(3)
    # SFT density 1/3 keeps only position 0 (|-2|): only there may the slack help it
    got = slack_ties(base, [CT, SFT], [1, 1], [1.0, 1 / 3], protect=1, slack=1.0)
    assert torch.allclose(got, t(-2.0, -3.0, 1.0))


def test_slack_ties_counts():
    r = slack_ties_delta(torch.stack([CT, SFT]), [1, 1], [1, 1], protect=1, slack=0.5)
    assert (r.important, r.kept_by_ties, r.kept) == (3, 1, 2)


def test_slack_ties_with_zero_slack_is_exactly_ties():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(50, 40, generator=g)
    models = [base + torch.randn(50, 40, generator=g) * s for s in (3.0, 1.0, 0.5)]
    weights, densities = [1.0, 0.6, 1.3], [0.2, 0.5, 0.9]
    for protect in range(3):
        for normalize in (True, False):
            assert torch.equal(
                slack_ties(base, models, weights, densities, protect=protect, slack=0.0,
                           normalize=normalize, lam=0.9),
                ties(base, models, weights, densities, normalize=normalize, lam=0.9))


def _protected_kept_fraction(ct_scale: float, slack: float | None) -> float:
    """Fraction of the SFT model's top-20% deltas that survive a CT+SFT merge."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40_000, generator=g)
    sft = base + torch.randn(40_000, generator=g)
    ct = base + torch.randn(40_000, generator=g) * ct_scale  # more CT tokens: larger deltas
    r = slack_ties_delta(stack_deltas(base, [ct, sft]), [1.0, 1.0], [0.2, 0.2], protect=1,
                         slack=slack or 0.0)
    return (r.kept_by_ties if slack is None else r.kept) / r.important


def test_slack_ties_keeps_more_protected_top_deltas_than_ties():
    """The property slack-TIES exists for (Tao et al.'s observation): the larger the CT
    deltas, the more of the SFT model's important deltas TIES discards; slack-TIES
    keeps more of them, monotonically in the slack, and all of them at slack 1."""
    ties_kept = [_protected_kept_fraction(s, None) for s in (1.0, 1.5, 3.0)]
    assert ties_kept[0] > ties_kept[1] > ties_kept[2]
    for scale in (1.0, 1.5, 3.0):
        kept = [_protected_kept_fraction(scale, s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
        assert kept[0] == _protected_kept_fraction(scale, None)
        assert all(x <= y for x, y in zip(kept, kept[1:]))
        assert kept[-1] == 1.0
    assert _protected_kept_fraction(1.5, 0.5) > _protected_kept_fraction(1.5, None) + 0.02


def test_slack_ties_rejects_bad_arguments():
    base = torch.zeros(3)
    with pytest.raises(ValueError, match="slack"):
        slack_ties(base, [CT, SFT], [1, 1], [1, 1], protect=1, slack=1.5)
    with pytest.raises(ValueError, match="protect"):
        slack_ties(base, [CT, SFT], [1, 1], [1, 1], protect=2, slack=0.5)
    with pytest.raises(ValueError, match="densities"):
        slack_ties(base, [CT, SFT], [1, 1], [1], protect=1, slack=0.5)


def test_ties_combine_equals_a_plain_masked_reference():
    """The sign-aligned sum in ties_combine against the textbook masked formulation."""
    from engine.merging.arithmetic import ties_combine

    def reference(trimmed, weights, normalize, lam):
        w = torch.tensor(weights).view(-1, *([1] * (trimmed.dim() - 1)))
        weighted = trimmed * w
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = torch.where(sign > 0, weighted > 0, weighted < 0)
        mixed = torch.where(agree, weighted, torch.zeros(())).sum(0)
        if normalize:
            divisor = (agree * w).sum(0)
            mixed = mixed / torch.where(divisor == 0, torch.ones(()), divisor)
        return mixed * lam

    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        m, n = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
        x = (torch.randint(-2, 3, (m, n), generator=gen).float() if trial % 2
             else torch.randn(m, n, generator=gen))
        weights = [1.0] * m if trial % 3 == 0 else [0.25 * int(v) for v in torch.randint(1, 8, (m,), generator=gen)]
        for normalize in (True, False):
            got = ties_combine(x.clone(), weights, normalize=normalize, lam=0.5)
            torch.testing.assert_close(got, reference(x, weights, normalize, 0.5), rtol=1e-6, atol=0)
