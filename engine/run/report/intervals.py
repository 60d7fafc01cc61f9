"""Uncertainty of a score, so that a report names a winner only outside the noise.

Two kinds of numbers reach a report:

- an **accuracy-like** value (``acc``, ``acc_norm``, ``exact_match``, ...): a fraction
  of ``n`` items scored right or wrong, a binomial proportion. Its 95% interval is
  Wilson's score interval; the interval of the difference of two of them is Newcombe's
  hybrid score interval (his method 10), built from the two Wilson intervals. Both stay
  inside [0, 1] and behave at 0 and 1, where the normal (Wald) interval collapses to a
  point. The two models are treated as independent samples; they answer the same items,
  which usually makes a real difference's interval narrower, so this one is cautious.
- a value with a **standard error** given by its evaluator (lm-evaluation-harness
  reports one per metric): value ± 1.96 se, and for a difference
  ± 1.96 sqrt(se1² + se2²).

Anything else (a perplexity, whose evaluator gives no standard error) has no
interval, and the report says so instead of guessing one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the two-sided 95% normal quantile
Z95 = 1.959963984540054
#: metric kinds (the part before ``/``) that are a fraction of items right
ACCURACY_KINDS = ("acc", "acc_norm", "exact_match", "accuracy", "em")


def is_accuracy(metric: str) -> bool:
    """``acc/en``, ``acc_norm/en``, ``exact_match_strict-match/gsm8k`` are proportions."""
    kind = metric.partition("/")[0].lower()
    return any(kind == k or kind.startswith(k + "_") for k in ACCURACY_KINDS)


@dataclass(frozen=True)
class Interval:
    """A closed interval ``[low, high]`` around ``center`` (a value or a difference)."""

    center: float
    low: float
    high: float

    def excludes(self, x: float) -> bool:
        """True when ``x`` lies outside the interval (the difference is beyond noise)."""
        return x < self.low or x > self.high

    @property
    def half_width(self) -> float:
        """The wider side of the interval around its center: ``center ± half_width``
        contains the whole interval."""
        return max(self.center - self.low, self.high - self.center)


def wilson(p: float, n: int, z: float = Z95) -> Interval:
    """Wilson's score interval of a proportion ``p`` observed on ``n`` items."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one item (n = {n})")
    p = min(max(p, 0.0), 1.0)
    denom = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, mid - half), min(1.0, mid + half))


def newcombe(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> Interval:
    """Newcombe's hybrid score interval of ``p1 - p2`` (independent proportions)."""
    a, b = wilson(p1, n1, z), wilson(p2, n2, z)
    d = a.center - b.center
    low = d - math.sqrt((a.center - a.low) ** 2 + (b.high - b.center) ** 2)
    high = d + math.sqrt((a.high - a.center) ** 2 + (b.center - b.low) ** 2)
    return Interval(d, low, high)


def normal(value: float, se: float, z: float = Z95) -> Interval:
    """``value ± z se``."""
    return Interval(value, value - z * se, value + z * se)


@dataclass(frozen=True)
class Score:
    """One model's value of one metric, with what its uncertainty rests on."""

    value: float
    #: items (accuracy) or tokens (perplexity) behind the value, when known
    n: int | None = None
    #: a standard error given by the evaluator
    stderr: float | None = None
    #: a proportion of ``n`` items (binomial)
    accuracy: bool = False

    def _binomial_se(self) -> float | None:
        if self.accuracy and self.n:
            p = min(max(self.value, 0.0), 1.0)
            return math.sqrt(p * (1 - p) / self.n)
        return None

    def _se(self) -> float | None:
        return self.stderr if self.stderr is not None else self._binomial_se()

    @property
    def binomial(self) -> bool:
        """A proportion of ``n`` items whose standard error, if given, is just the binomial
        one ``sqrt(p (1 - p) / n)``: the score intervals are used, which hold at 0 and 1."""
        b = self._binomial_se()
        return b is not None and (self.stderr is None or math.isclose(self.stderr, b, rel_tol=1e-3,
                                                                       abs_tol=1e-9))

    def interval(self) -> Interval | None:
        """The 95% interval of the value, or None when nothing supports one."""
        if self.binomial:
            return wilson(self.value, self.n or 0)
        if self.stderr is not None:
            return normal(self.value, self.stderr)
        return None

    def minus(self, other: Score) -> Interval | None:
        """The 95% interval of ``self.value - other.value``, or None."""
        if self.binomial and other.binomial:
            return newcombe(self.value, self.n or 0, other.value, other.n or 0)
        a, b = self._se(), other._se()
        if a is None or b is None:
            return None
        return normal(self.value - other.value, math.sqrt(a * a + b * b))
