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
def batch_moments(v):  # pragma: no cover - compiled
    """One pass over a batch: (n, mean, M2, min, max, sum, non-finite count), Welford's update."""
    n = 0
    mean = 0.0
    m2 = 0.0
    lo = np.inf
    hi = -np.inf
    total = 0.0
    bad = 0
    for x in v:
        if not np.isfinite(x):
            bad += 1
            continue
        n += 1
        d = x - mean
        mean += d / n
        m2 += d * (x - mean)
        total += x
        if x < lo:
            lo = x
        if x > hi:
            hi = x
    return n, mean, m2, lo, hi, total, bad


class Moments:
    """count, mean, variance (population and sample), min, max; mergeable."""

    __slots__ = ("count", "m2", "max", "mean", "min", "rejected", "total")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.total = 0.0
        self.rejected = 0

    def add_batch(self, values: Any) -> None:
        v = np.ascontiguousarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        n, mean, m2, lo, hi, total, bad = batch_moments(v)
        self.rejected += bad
        self._merge(n, mean, m2, lo, hi, total)

    def add(self, x: float) -> None:
        self.add_batch(np.array([x]))

    def _merge(self, n: int, mean: float, m2: float, lo: float, hi: float, total: float) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.min, self.max, self.total = n, mean, m2, lo, hi, total
            return
        tot = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / tot
        self.m2 += m2 + delta * delta * self.count * n / tot
        self.count = tot
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.total += total

    def merge(self, other: Moments) -> Moments:
        self._merge(other.count, other.mean, other.m2, other.min, other.max, other.total)
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
