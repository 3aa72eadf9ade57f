"""Mergeable running moments (Welford within a batch, Chan et al. between batches) and EWMA.

``Moments.add_batch`` folds a whole numpy batch in one vectorised step and merges it with
the running state by Chan's parallel formula, so the result equals a single pass over all
values (up to rounding) whatever the batch boundaries. NaN / infinite values are counted
in ``rejected`` and excluded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _pow2(x):  # pragma: no cover - compiled
    """The power of two at or below ``x`` (> 0, finite): dividing by it is exact."""
    return math.ldexp(1.0, math.frexp(x)[1] - 1)


_SAFE = 2.0**400
"""Differences up to this size (and down to its inverse) square and sum without overflow or
underflow: a batch within it is folded in one pass, unscaled (``scale`` 1)."""


@njit(cache=True, nogil=True)
def batch_moments(v, shift):  # pragma: no cover - compiled
    """A pass over a batch (two for extreme magnitudes): (n, mean - shift, M2 / scale**2,
    scale, min, max, sum, non-finite count, overflow), Welford's update on
    ``(x - shift) / scale``.

    Near the running mean the differences ``x - shift`` are small, so a stream far from zero
    (timestamps, 1e13 + noise) keeps its variance to full precision. ``scale`` is 1 when the
    differences lie within :data:`_SAFE`, else the power of two at their largest magnitude:
    dividing by it is exact, and the squares of differences past 1e154 no longer overflow,
    nor those below 1e-154 underflow (a spread of 1e200, or of 1e-170, is a number like any
    other). ``overflow``: a finite value whose difference from ``shift`` is not (near
    1.8e308); the figures are then of nothing, and the caller folds the batch unshifted."""
    n = 0
    lo = np.inf
    hi = -np.inf
    total = 0.0
    bad = 0
    big = 0.0
    mean = 0.0
    m2 = 0.0
    for x in v:
        if not np.isfinite(x):
            bad += 1
            continue
        y = x - shift
        a = abs(y)
        if not np.isfinite(a):
            return 0, 0.0, 0.0, 1.0, np.inf, -np.inf, 0.0, 0, True
        if a > big:
            big = a
        n += 1
        d = y - mean
        mean += d / n
        m2 += d * (y - mean)
        total += x
        if x < lo:
            lo = x
        if x > hi:
            hi = x
    if big == 0.0 or 1.0 / _SAFE <= big <= _SAFE:
        return n, mean, m2, 1.0, lo, hi, total, bad, False
    scale = _pow2(big)  # the same pass again at the differences' scale
    k = 0
    mean = 0.0
    m2 = 0.0
    for x in v:
        if not np.isfinite(x):
            continue
        y = (x - shift) / scale
        k += 1
        d = y - mean
        mean += d / k
        m2 += d * (y - mean)
    return n, mean * scale, m2, scale, lo, hi, total, bad, False


def pow2_scale(x: float) -> float:
    """The power of two at or below ``abs(x)`` (1 for 0 or a non-number): dividing by it is exact
    and brings ``x`` into [1, 2), where squares, sums and medians of values near float64's
    limits neither overflow nor vanish."""
    x = abs(x)
    return math.ldexp(1.0, math.frexp(x)[1] - 1) if x > 0.0 and math.isfinite(x) else 1.0


_QUARTER = 0.25
"""Means near float64's limit of both signs (1e308 and -1e308) are averaged at a quarter of
their size, where their sum is a number: the mean is then finite, never NaN."""


class Moments:
    """count, mean, variance (population and sample), min, max; mergeable.

    The running mean is kept relative to ``shift`` (the first value folded): what Welford's
    and Chan's updates subtract is then small, so a series with a large offset (1e13 + unit
    noise) keeps its variance to about the precision of its noise, where a plain running
    mean loses it to the offset's rounding. The sum of squared deviations is kept divided by
    ``scale**2`` (a power of two: exact), so the standard deviation of values near 1e300 or
    1e-300 is as precise as that of values near 1; only a *variance* past float64's range is
    +inf (or 0)."""

    __slots__ = ("count", "m2", "max", "min", "rejected", "rel_mean", "scale", "shift", "total")

    def __init__(self) -> None:
        self.count = 0
        self.shift = 0.0
        self.rel_mean = 0.0  # the mean minus ``shift``
        self.m2 = 0.0  # the sum of squared deviations, divided by scale**2
        self.scale = 1.0
        self.min = math.inf
        self.max = -math.inf
        self.total = 0.0
        self.rejected = 0

    @property
    def mean(self) -> float:
        return self.shift + self.rel_mean

    def add_batch(self, values: Any) -> None:
        v = np.ascontiguousarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        if self.count == 0:
            finite = v[np.isfinite(v)][:1]
            self.shift = float(finite[0]) if finite.size else 0.0  # a difference that overflows unshifts (below)
            self.rel_mean = 0.0
        n, mean, m2, scale, lo, hi, total, bad, overflow = batch_moments(v, self.shift)
        if overflow:  # values near the float limit: fold unshifted from here on (then no difference overflows)
            self.rel_mean, self.shift = self.mean, 0.0
            n, mean, m2, scale, lo, hi, total, bad, _ = batch_moments(v, 0.0)
        self.rejected += bad
        self._merge(n, mean, m2, scale, lo, hi, total)

    def add(self, x: float) -> None:
        self.add_batch(np.array([x]))

    def _merge(self, n: int, rel_mean: float, m2: float, scale: float, lo: float, hi: float, total: float) -> None:
        """Fold ``n`` values whose mean is ``shift + rel_mean`` (this digest's shift) and whose
        sum of squared deviations is ``m2 * scale**2`` (Chan et al.)."""
        if n == 0:
            return
        if self.count == 0:
            self.count, self.rel_mean, self.m2, self.scale = n, rel_mean, m2, scale
            self.min, self.max, self.total = lo, hi, total
            return
        tot = self.count + n
        delta = rel_mean - self.rel_mean
        if math.isfinite(delta):
            d_scale = pow2_scale(delta) if delta else 0.0  # no difference: no scale to speak of
        else:  # means near the float limit of both signs: their difference, at the limit's scale
            d_scale = pow2_scale(max(abs(rel_mean), abs(self.rel_mean)))
        # the common scale: the largest of the spreads that are there (a zero one has none)
        big = max(self.scale if self.m2 > 0.0 else 0.0, scale if m2 > 0.0 else 0.0, d_scale) or 1.0
        ds = rel_mean / big - self.rel_mean / big if not math.isfinite(delta) else delta / big
        mine = self.m2 * (self.scale / big) ** 2 if self.m2 > 0.0 else 0.0
        theirs = m2 * (scale / big) ** 2 if m2 > 0.0 else 0.0
        self.m2 = mine + theirs + ds * ds * (self.count * (n / tot))
        self.scale = big
        if math.isfinite(delta):
            self.rel_mean += delta * (n / tot)  # the weight first: delta * n may overflow where the step does not
        else:  # their weighted average, at a quarter
            q = _QUARTER
            self.rel_mean = (self.rel_mean * q * (self.count / tot) + rel_mean * q * (n / tot)) / q
        self.count = tot
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.total += total

    def merge(self, other: Moments) -> Moments:
        if self.count == 0:
            self.shift = other.shift
        rel = (other.shift - self.shift) + other.rel_mean
        if not math.isfinite(rel):  # shifts of opposite signs near the float limit
            self.rel_mean, self.shift = self.mean, 0.0
            rel = other.mean
        self._merge(other.count, rel, other.m2, other.scale, other.min, other.max, other.total)
        self.rejected += other.rejected
        return self

    @property
    def variance(self) -> float:
        """Sample variance (n - 1); NaN below two values; +inf past float64's range."""
        if self.count < 2:
            return math.nan
        return self.m2 / (self.count - 1) * self.scale * self.scale

    @property
    def std(self) -> float:
        """Sample standard deviation, computed at the digest's scale: finite whenever it is."""
        return math.sqrt(self.m2 / (self.count - 1)) * self.scale if self.count > 1 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean if self.count else None,
            "std": self.std if self.count > 1 else None,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "sum": self.total,
        }


_EWMA_RANGE = 2.0**256
"""An EWMA's state is kept in units of a power of two (``scale``), moved when the values, the
mean or the spread leave ``[scale / 2**256, scale * 2**256]``: squares of differences never
overflow nor underflow, whatever the field's magnitude (1e300 or 1e-300)."""


@njit(cache=True, nogil=True)
def ewma_update(values, alpha, mean, var, seen, scale):  # pragma: no cover - compiled
    """Fold values into an exponentially weighted mean/variance, kept in units of ``scale``
    (``mean * scale``, ``var * scale**2``: see :data:`_EWMA_RANGE`); also return per-value
    z-scores against the state *before* each value (NaN values are skipped).

    The z-score divides by the spread of a *prediction error* (``x - mean``): for a steady
    series that is ``var / (1 - alpha)``, not ``var``, which runs low by ``1 - alpha`` (the
    mean moves towards each value before the variance sees it). With no spread at all (every
    value so far equal), any other value is infinitely far: ``+-inf``."""
    z = np.full(values.shape[0], np.nan)
    widen = 1.0 / (1.0 - alpha) if alpha < 1.0 else 1.0
    for i in range(values.shape[0]):
        x = values[i]
        if not np.isfinite(x):
            continue
        if seen == 0:
            scale = _pow2(abs(x)) if x != 0.0 else 1.0
            mean = x / scale
            var = 0.0
            seen += 1
            continue
        xs = x / scale
        top = max(abs(xs), abs(mean), math.sqrt(var))
        if not np.isfinite(xs) or top > _EWMA_RANGE or 0.0 < top < 1.0 / _EWMA_RANGE:
            # the true magnitudes (each finite: a mean or spread of finite values), at most 2**1023
            ref = max(abs(x), abs(mean) * scale, math.sqrt(var) * scale)
            new = _pow2(min(ref, 2.0**1023)) if ref > 0.0 else scale
            if new > 0.0:  # a subnormal power of two is one too
                mean = (mean * scale) / new  # through the true value: the ratio of scales may overflow
                sd = (math.sqrt(var) * scale) / new
                var = sd * sd
                scale = new
                xs = x / scale
        sd = math.sqrt(var * widen)
        d = xs - mean
        if sd > 0.0:
            z[i] = d / sd
        elif d != 0.0:
            z[i] = math.copysign(math.inf, d)
        else:
            z[i] = 0.0
        mean += alpha * d
        var = (1.0 - alpha) * (var + alpha * d * d)
        seen += 1
    return mean, var, seen, scale, z


class Ewma:
    """Exponentially weighted mean and variance (``alpha`` = lambda, the weight of a new value)."""

    __slots__ = ("alpha", "scale", "scaled_mean", "scaled_var", "seen")

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EWMA lambda must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.scaled_mean = 0.0  # the mean / scale
        self.scaled_var = 0.0  # the variance / scale**2
        self.scale = 1.0
        self.seen = 0

    @property
    def mean(self) -> float:
        return self.scaled_mean * self.scale

    @property
    def var(self) -> float:
        """The variance; +inf (or 0) past float64's range, where the z-scores still hold."""
        return self.scaled_var * self.scale * self.scale

    def update(self, values: Any) -> np.ndarray:
        """Fold a batch in; return each value's z-score against the state before it."""
        v = np.ascontiguousarray(values, dtype=np.float64)
        self.scaled_mean, self.scaled_var, self.seen, self.scale, z = ewma_update(
            v, self.alpha, self.scaled_mean, self.scaled_var, self.seen, self.scale
        )
        return z
