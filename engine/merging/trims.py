"""Magnitude trims of task vectors: top-``density`` and magnitude *bands*, exact in pieces.

A trim keeps the entries of one task vector whose magnitude *rank* (0 for the largest
``|x|``; among equal magnitudes the lower flat index ranks first) lies in a band
``[start, stop)``:

* TIES's top-``k`` trim is the band ``[0, k)``;
* Model Breadcrumbs (Davari & Belilovsky 2023) drops the largest outliers too: the band
  ``[a, a + k)`` with ``a`` the number of outliers removed (:class:`MagnitudeBand`).

The rank rule makes the kept set a function of the whole tensor only, so the engine can
find it exactly while reading the tensor in row slices: :class:`BandSelector` feeds each
slice to one or two :class:`MagnitudeThreshold` radix selects (the band's ends), and the
result equals :func:`magnitude_band` on the whole tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BRACKET_WIDTH", "BandSelector", "MagnitudeBand", "MagnitudeThreshold", "band_trim_",
           "bracket_guess", "keep_count", "magnitude_band", "magnitude_trim"]


def keep_count(density: float, numel: int) -> int:
    """How many entries a magnitude trim keeps: ``floor(density * numel)`` as mergekit
    computes it (in floating point), at least 1; everything for ``density >= 1``."""
    if not density > 0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return numel if density >= 1 else min(numel, max(1, int(density * numel)))


@dataclass(frozen=True)
class MagnitudeBand:
    """Which magnitude ranks of a task vector a trim keeps, as fractions of its size.

    ``density`` is the kept fraction (``k = keep_count(density, n)``, at least 1) and
    ``gamma`` the fraction of the largest magnitudes removed first (``floor(gamma * n)``
    of them), mergekit 0.1.5's ``magnitude_outliers`` rule: when removing that many
    would leave fewer than ``k`` entries, fewer outliers are removed, so that ``k`` are
    always kept. ``gamma = 0`` is TIES's top-``density`` trim; ``density >= 1`` keeps
    everything (``gamma`` is then not applied, as in mergekit).
    """

    density: float
    gamma: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.density:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")

    def ranks(self, numel: int) -> tuple[int, int]:
        """The kept ranks ``[start, stop)`` for a tensor of ``numel`` entries."""
        if self.density >= 1:
            return 0, numel
        k = keep_count(self.density, numel)
        start = min(int(self.gamma * numel), numel - k)
        return start, start + k


def _magnitude_bits(delta: Tensor) -> Tensor:
    """``|delta|`` as int32 bit patterns, which order exactly as the magnitudes do (IEEE
    floats >= 0 compare like their bits). Half types widen to float32 exactly."""
    a = delta.abs() if delta.dtype == torch.float32 else delta.abs().float()
    return a.view(torch.int32)


class MagnitudeThreshold:
    """The exact ``k``-th largest magnitude of a tensor seen in pieces, by radix select.

    The tensor's magnitudes are fed in flat order, in any number of contiguous pieces,
    twice: :meth:`count_high` with every piece (a histogram of the top 16 bits of each
    magnitude's float32 bit pattern), then :meth:`count_low` with every piece (the low
    16 bits, of the entries in the one high bin that holds the ``k``-th largest). That
    pins the ``k``-th largest magnitude ``T`` exactly, so :meth:`dropped` can then trim
    piece by piece: every entry with ``|x| > T`` is kept, and of the entries with
    ``|x| == T`` the first ones in flat order until ``k`` are kept. The result equals a
    whole-tensor top-``k`` whose ties go to the lowest index, whatever the pieces.
    Two histogram passes cost a few elementwise passes, a fraction of a ``torch.topk``
    with ``k`` in the millions.
    """

    HIGH = 1 << 15  # |x| bits < 2**31, so the top 16 bits are < 2**15

    def __init__(self, k: int, device: torch.device | str = "cpu",
                 high: Tensor | None = None) -> None:
        self.k = k
        # ``high`` shares another selector's first-pass histogram (same tensor, other k)
        self._high = torch.zeros(self.HIGH, dtype=torch.int64, device=device) if high is None \
            else high
        self._low = torch.zeros(1 << 16, dtype=torch.int64, device=device)
        self._bin: int | None = None
        self.threshold: int | None = None  # the k-th largest magnitude's bits
        self._greater = 0  # entries in the high bins above the chosen one
        self._ties_left = 0  # entries equal to the threshold still to keep
        self._keep_all_ties = False

    def count_high(self, bits: Tensor, high: Tensor | None = None) -> None:
        """First pass over a piece; ``high`` may pass ``bits >> 16`` when already at hand."""
        high = bits >> 16 if high is None else high
        self._high += torch.bincount(high.view(-1), minlength=self.HIGH)

    def _choose_bin(self) -> None:
        above = self._high.flip(0).cumsum(0)  # above[j]: entries whose high bits >= HIGH-1-j
        j = int(torch.searchsorted(above, self.k))
        self._bin = self.HIGH - 1 - j
        self._greater = int(above[j - 1]) if j > 0 else 0

    def count_low(self, bits: Tensor, high: Tensor | None = None) -> None:
        """Second pass over a piece (after every piece's :meth:`count_high`)."""
        if self._bin is None:
            self._choose_bin()
        flat = bits.view(-1)
        high = flat >> 16 if high is None else high.view(-1)
        low = flat[high == self._bin] & 0xFFFF
        self._low += torch.bincount(low, minlength=1 << 16)

    def finish(self) -> None:
        """Fix the threshold after both passes (called by :meth:`dropped` when needed)."""
        if self._bin is None:
            self._choose_bin()
        above = self._low.flip(0).cumsum(0)
        j = int(torch.searchsorted(above, self.k - self._greater))
        self.threshold = (self._bin << 16) | (0xFFFF - j)
        greater = self._greater + (int(above[j - 1]) if j > 0 else 0)
        self._ties_left = self.k - greater
        # every entry equal to the threshold is kept (the usual case for real weights):
        # then no piece needs to count its ties
        self._keep_all_ties = self._ties_left == int(above[j]) - (int(above[j - 1]) if j else 0)

    # --- one counting pass around a guess (the threshold sought in [lo, hi] only) ---

    def bracket(self, lo: int, hi: int) -> None:
        """Count the next pass's pieces (:meth:`count_bracket`) at full resolution, but
        only for magnitude bits in ``[lo, hi]`` (a guess that should hold the threshold),
        plus how many fall above. One pass in place of the two of the radix select."""
        if not 0 <= lo <= hi < lo + BRACKET_WIDTH:
            raise ValueError(f"a bracket needs 0 <= lo <= hi < lo + {BRACKET_WIDTH}, got [{lo}, {hi}]")
        self._lo, self._width = lo, hi - lo + 1
        self._bracket = torch.zeros(self._width + 2, dtype=torch.int64, device=self._low.device)

    def count_bracket(self, bits: Tensor) -> None:
        """The bracket pass over a piece (bin 0: below ``lo``; ``width + 1``: above ``hi``)."""
        idx = (bits.reshape(-1) - (self._lo - 1)).clamp_(0, self._width + 1)
        self._bracket += torch.bincount(idx, minlength=self._width + 2)

    def finish_bracket(self) -> bool:
        """Fix the threshold from the bracket pass; False (and nothing fixed) when the
        ``k``-th largest magnitude lies outside ``[lo, hi]``: then count as usual."""
        above = self._bracket.flip(0).cumsum(0)  # above[j]: entries in bins >= width + 1 - j
        self._bracket = None
        if int(above[0]) >= self.k or int(above[-2]) < self.k:
            return False
        j = int(torch.searchsorted(above, self.k))  # 1 <= j <= width
        self.threshold = self._lo + self._width - j
        greater = int(above[j - 1])
        self._ties_left = self.k - greater
        self._keep_all_ties = self._ties_left == int(above[j]) - greater
        return True

    def dropped(self, bits: Tensor) -> Tensor:
        """The mask of entries the trim zeroes in the next piece (pieces in flat order,
        each exactly once)."""
        if self.threshold is None:
            self.finish()
        assert self.threshold is not None
        if self._keep_all_ties or self.threshold == 0:  # kept zeros stay zeros anyway
            return bits < self.threshold
        drop = bits <= self.threshold
        if self._ties_left > 0:
            ties = (bits.view(-1) == self.threshold).nonzero().view(-1)[:self._ties_left]
            drop.view(-1)[ties] = False
            self._ties_left -= len(ties)
        return drop


class BandSelector:
    """The entries of magnitude ranks ``[start, stop)`` of a tensor seen in pieces.

    The same protocol as :class:`MagnitudeThreshold` (every piece to :meth:`count_high`,
    every piece to :meth:`count_low`, then every piece to :meth:`dropped`, in flat order):
    the band is the top ``stop`` minus the top ``start``, each found exactly by a radix
    select that shares the first pass's histogram. ``start = 0`` is one top-``k`` select.
    """

    def __init__(self, start: int, stop: int, device: torch.device | str = "cpu") -> None:
        if not 0 <= start < stop:
            raise ValueError(f"a magnitude band needs 0 <= start < stop, got [{start}, {stop})")
        self.start, self.stop = start, stop
        self._top = MagnitudeThreshold(stop, device)
        self._outliers = MagnitudeThreshold(start, device, high=self._top._high) if start \
            else None

    def count_high(self, bits: Tensor, high: Tensor | None = None) -> None:
        self._top.count_high(bits, high)  # the outlier select shares this histogram

    def count_low(self, bits: Tensor, high: Tensor | None = None) -> None:
        high = bits >> 16 if high is None else high
        self._top.count_low(bits, high)
        if self._outliers is not None:
            self._outliers.count_low(bits, high)

    @property
    def counted(self) -> bool:
        """Whether the band's ends are fixed (by a bracket pass), so no counting is left."""
        return self._top.threshold is not None

    def bracket(self, sample: Tensor, numel: int) -> bool:
        """Guess a bracket of the threshold from ``sample`` (magnitude bits of entries
        spread over the whole tensor of ``numel``) for a one-pass count
        (:meth:`count_bracket`, then :meth:`finish_bracket`). False when none is worth
        it: a band with outliers, or a guess too wide for a small table."""
        if self._outliers is not None:
            return False
        guess = bracket_guess(sample, self.stop, numel)
        if guess is None:
            return False
        self._top.bracket(*guess)
        return True

    def count_bracket(self, bits: Tensor) -> None:
        self._top.count_bracket(bits)

    def finish_bracket(self) -> bool:
        return self._top.finish_bracket()

    def dropped(self, bits: Tensor) -> Tensor:
        drop = self._top.dropped(bits)
        if self._outliers is not None:
            drop |= ~self._outliers.dropped(bits)
        return drop


#: a bracket pass counts at most this many distinct magnitude bit patterns (a table of
#: 2 MB of counts per model); a wider guess is not worth it
BRACKET_WIDTH = 2**18


def bracket_guess(sample: Tensor, k: int, numel: int, z: float = 4.0) -> tuple[int, int] | None:
    """Magnitude bits ``(lo, hi)`` that hold the ``k``-th largest of ``numel`` entries
    unless ``sample`` (magnitude bits of entries spread evenly over them) misleads more
    than ``z`` standard deviations of a sample quantile; None when the bracket would be
    unbounded or wider than :data:`BRACKET_WIDTH` bit patterns. Only a guess: the
    count finds out whether it held (:meth:`MagnitudeThreshold.finish_bracket`)."""
    n_s = sample.numel()
    if n_s == 0 or not 0 < k < numel:
        return None
    p = k / numel
    expected, margin = p * n_s, z * (n_s * p * (1 - p)) ** 0.5 + 2
    top, bottom = int(expected - margin), int(expected + margin) + 1  # ranks, 1 = largest
    if top < 1 or bottom > n_s:
        return None
    ranked = torch.topk(sample.reshape(-1), bottom, sorted=True).values
    hi, lo = int(ranked[top - 1]), int(ranked[bottom - 1])
    return (lo, hi) if hi - lo + 1 <= BRACKET_WIDTH else None


def band_trim_(delta: Tensor, start: int, stop: int) -> Tensor:
    """In place: zero every entry of ``delta`` whose magnitude rank is outside
    ``[start, stop)`` (see :func:`magnitude_band`)."""
    n = delta.numel()
    stop = min(stop, n)
    if start <= 0 and stop >= n:
        return delta
    if start >= stop:
        return delta.zero_()
    if delta.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        order = torch.topk(delta.reshape(-1).abs(), stop, sorted=True).indices
        drop = torch.ones(n, dtype=torch.bool, device=delta.device)
        drop[order[start:]] = False
        return delta.masked_fill_(drop.view_as(delta), 0)
    bits = _magnitude_bits(delta)
    high = bits >> 16
    selector = BandSelector(max(start, 0), stop, delta.device)
    selector.count_high(bits, high)
    selector.count_low(bits, high)
    del high
    return delta.masked_fill_(selector.dropped(bits), 0)


def _trim_(delta: Tensor, density: float) -> Tensor:
    """In place: zero all but the ``k`` largest magnitudes (see :func:`magnitude_trim`)."""
    return band_trim_(delta, 0, keep_count(density, delta.numel()))


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k`` largest-magnitude entries of ``delta`` and zero the rest.

    ``k = floor(density * numel)`` as mergekit computes it (in floating point), but at
    least 1, so that a small tensor (a norm weight) is never erased entirely where
    mergekit would refuse to merge. ``density >= 1`` keeps everything. Among equal
    magnitudes at the threshold the lowest flat indices are kept (float64 tensors use
    ``torch.topk``, whose choice among ties is unspecified).
    """
    return _trim_(delta.clone(), density)


def magnitude_band(delta: Tensor, band: MagnitudeBand | tuple[int, int]) -> Tensor:
    """Keep the entries of magnitude ranks ``[start, stop)`` (0 is the largest ``|x|``;
    equal magnitudes rank by flat index, lowest first) and zero the rest; ``band`` is a
    :class:`MagnitudeBand` or the ranks themselves. ``delta`` is not modified."""
    start, stop = band.ranks(delta.numel()) if isinstance(band, MagnitudeBand) else band
    return band_trim_(delta.clone(), start, stop)
