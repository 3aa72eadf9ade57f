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
def batch_moments(v, shift):  # pragma: no cover - compiled
    """One pass over a batch: (n, mean - shift, M2, min, max, sum, non-finite count, overflow),
    Welford's update on ``x - shift``. Near the running mean those differences are small, so
    a stream far from zero (timestamps, 1e13 + noise) keeps its variance to full precision.
    ``overflow``: a finite value whose difference from ``shift`` or from the mean so far is
    not (near 1.8e308); the figures are then of the values before it only."""
    n = 0
    mean = 0.0
    m2 = 0.0
    lo = np.inf
    hi = -np.inf
    total = 0.0
    bad = 0
    overflow = False
    for x in v:
        if not np.isfinite(x):
            bad += 1
            continue
        y = x - shift
        if not np.isfinite(y):
            overflow = True
            break
        d = y - mean
        if not np.isfinite(d):  # a value and the mean so far of opposite signs, both near the limit
            overflow = True
            break
        n += 1
        mean += d / n
        m2 += d * (y - mean)
        total += x
        if x < lo:
            lo = x
        if x > hi:
            hi = x
    return n, mean, m2, lo, hi, total, bad, overflow


_QUARTER = 0.25
"""Values near float64's limit of both signs (1e308 and -1e308) are folded at a quarter of
their size, where any difference between two of them is a number (exact: a power of two):
the mean is then finite, and a variance beyond the float64 range is +inf, never NaN."""


class Moments:
    """count, mean, variance (population and sample), min, max; mergeable.

    The running mean is kept relative to ``shift`` (the first value folded): what Welford's
    and Chan's updates subtract is then small, so a series with a large offset (1e13 + unit
    noise) keeps its variance to about the precision of its noise, where a plain running
    mean loses it to the offset's rounding."""

    __slots__ = ("count", "m2", "max", "min", "rejected", "rel_mean", "shift", "total")

    def __init__(self) -> None:
        self.count = 0
        self.shift = 0.0
        self.rel_mean = 0.0  # the mean minus ``shift``
        self.m2 = 0.0
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
        n, mean, m2, lo, hi, total, bad, overflow = batch_moments(v, self.shift)
        if overflow:  # values near the float limit: fold unshifted from here on
            self.rel_mean, self.shift = self.mean, 0.0
            n, mean, m2, lo, hi, total, bad, overflow = batch_moments(v, 0.0)
        if overflow:  # and of both signs: at a quarter of their size
            n, mean, m2, lo, hi, total, bad, _ = batch_moments(v * _QUARTER, 0.0)
            mean, m2, total = mean / _QUARTER, m2 / (_QUARTER * _QUARTER), total / _QUARTER
            lo, hi = float(np.min(v[np.isfinite(v)])), float(np.max(v[np.isfinite(v)]))
        self.rejected += bad
        self._merge(n, mean, m2, lo, hi, total)

    def add(self, x: float) -> None:
        self.add_batch(np.array([x]))

    def _merge(self, n: int, rel_mean: float, m2: float, lo: float, hi: float, total: float) -> None:
        """Fold ``n`` values whose mean is ``shift + rel_mean`` (this digest's shift)."""
        if n == 0:
            return
        if self.count == 0:
            self.count, self.rel_mean, self.m2, self.min, self.max, self.total = n, rel_mean, m2, lo, hi, total
            return
        tot = self.count + n
        delta = rel_mean - self.rel_mean
        if math.isfinite(delta):
            self.rel_mean += delta * (n / tot)  # the weight first: delta * n may overflow where the step does not
        else:  # means near the float limit of both signs: their weighted average, at a quarter
            q = _QUARTER
            self.rel_mean = (self.rel_mean * q * (self.count / tot) + rel_mean * q * (n / tot)) / q
        self.m2 += m2 + delta * delta * self.count * n / tot  # +inf past the range, as the spread is
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
        self._merge(other.count, rel, other.m2, other.min, other.max, other.total)
        self.rejected += other.rejected
        return self

    @property
    def variance(self) -> float:
        """Sample variance (n - 1); NaN below two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance) if self.count > 1 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean if self.count else None,
            "std": self.std if self.count > 1 else None,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "sum": self.total,
        }


@njit(cache=True, nogil=True)
def ewma_update(values, alpha, mean, var, seen):  # pragma: no cover - compiled
    """Fold values into an exponentially weighted mean/variance; also return per-value
    z-scores against the state *before* each value (NaN values are skipped).

    The z-score divides by the spread of a *prediction error* (``x - mean``): for a steady
    series that is ``var / (1 - alpha)``, not ``var``, which runs low by ``1 - alpha`` (the
    mean moves towards each value before the variance sees it). With no spread at all (every
    value so far equal), any other value is infinitely far: ``+-inf``."""
    z = np.full(values.shape[0], np.nan)
    scale = 1.0 / (1.0 - alpha) if alpha < 1.0 else 1.0
    for i in range(values.shape[0]):
        x = values[i]
        if not np.isfinite(x):
            continue
        if seen == 0:
            mean = x
            var = 0.0
        else:
            sd = math.sqrt(var * scale)
            if sd > 0.0:
                z[i] = (x - mean) / sd
            elif x != mean:
                z[i] = math.copysign(math.inf, x - mean)
            else:
                z[i] = 0.0
            d = x - mean
            mean += alpha * d
            var = (1.0 - alpha) * (var + alpha * d * d)
        seen += 1
    return mean, var, seen, z


class Ewma:
    """Exponentially weighted mean and variance (``alpha`` = lambda, the weight of a new value)."""

    __slots__ = ("alpha", "mean", "seen", "var")

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"EWMA lambda must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0

    def update(self, values: Any) -> np.ndarray:
        """Fold a batch in; return each value's z-score against the state before it."""
        v = np.ascontiguousarray(values, dtype=np.float64)
        self.mean, self.var, self.seen, z = ewma_update(v, self.alpha, self.mean, self.var, self.seen)
        return z
