"""Statistical tests for comparing runs: scipy.stats where it has them, the formulas otherwise.

Welch and paired t-tests, Mann-Whitney U, confidence intervals (t and bootstrap), Cohen's d
and Hedges' g, power and required sample size for a two-sample t-test (noncentral t), and
``compare(control, treatment, metric=...)`` which puts them together for two runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy import stats as st


def _arr(x: Any, name: str, min_n: int = 2) -> np.ndarray:
    a = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} finite values, got {a.size}")
    return a


@contextmanager
def _undefined_is_nan() -> Iterator[None]:
    """scipy warns (a RuntimeWarning naming its own file, on the user's terminal) and answers
    NaN when a test is undefined, e.g. for two constant samples; the NaN says it already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def welch_t(a: Any, b: Any) -> dict[str, float]:
    """Welch's unequal-variance t-test (two-sided); NaN where it is undefined (no variance)."""
    x, y = _arr(a, "a"), _arr(b, "b")
    with _undefined_is_nan():
        r = st.ttest_ind(x, y, equal_var=False)
    return {"test": "welch_t", "statistic": float(r.statistic), "p_value": float(r.pvalue), "df": float(r.df)}


def paired_t(a: Any, b: Any) -> dict[str, float]:
    """Paired t-test on matched observations (two-sided)."""
    x, y = _arr(a, "a"), _arr(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    with _undefined_is_nan():
        r = st.ttest_rel(x, y)
    return {"test": "paired_t", "statistic": float(r.statistic), "p_value": float(r.pvalue), "df": float(r.df)}


def mann_whitney(a: Any, b: Any) -> dict[str, float]:
    """Mann-Whitney U (two-sided), with the rank-biserial correlation as effect size."""
    x, y = _arr(a, "a", 1), _arr(b, "b", 1)
    with _undefined_is_nan():
        r = st.mannwhitneyu(x, y, alternative="two-sided")
    return {
        "test": "mann_whitney_u",
        "statistic": float(r.statistic),
        "p_value": float(r.pvalue),
        "rank_biserial": float(1.0 - 2.0 * r.statistic / (x.size * y.size)),
    }


def t_interval(a: Any, confidence: float = 0.95) -> tuple[float, float]:
    """t confidence interval for the mean."""
    x = _arr(a, "sample")
    with _undefined_is_nan():
        lo, hi = st.t.interval(confidence, x.size - 1, loc=x.mean(), scale=st.sem(x))
    return float(lo), float(hi)


def bootstrap_interval(
    a: Any, confidence: float = 0.95, statistic: Any = np.mean, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap (BCa) confidence interval of a statistic of one sample."""
    x = _arr(a, "sample")
    r = st.bootstrap(
        (x,),
        statistic,
        confidence_level=confidence,
        n_resamples=n_resamples,
        random_state=np.random.default_rng(seed),
        method="BCa",
    )
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def diff_interval(a: Any, b: Any, confidence: float = 0.95) -> tuple[float, float]:
    """Welch confidence interval for mean(b) - mean(a)."""
    x, y = _arr(a, "a"), _arr(b, "b")
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1)) if se > 0 else x.size + y.size - 2
    h = st.t.ppf(0.5 + confidence / 2, df) * se
    d = y.mean() - x.mean()
    return float(d - h), float(d + h)


def cohens_d(a: Any, b: Any) -> float:
    """(mean(b) - mean(a)) / pooled standard deviation."""
    x, y = _arr(a, "a"), _arr(b, "b")
    sp = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    return float((y.mean() - x.mean()) / sp) if sp > 0 else 0.0


def hedges_g(a: Any, b: Any) -> float:
    """Cohen's d with the small-sample correction J = 1 - 3 / (4 (n1 + n2) - 9)."""
    x, y = _arr(a, "a"), _arr(b, "b")
    return cohens_d(x, y) * (1.0 - 3.0 / (4.0 * (x.size + y.size) - 9.0))


def power_two_sample(effect_size: float, n1: int, n2: int | None = None, alpha: float = 0.05) -> float:
    """Power of a two-sided two-sample t-test (equal variances) by the noncentral t."""
    n2 = n1 if n2 is None else n2
    if n1 < 2 or n2 < 2:
        raise ValueError("each group needs at least 2 observations")
    df = n1 + n2 - 2
    nc = abs(effect_size) * math.sqrt(n1 * n2 / (n1 + n2))
    crit = st.t.ppf(1 - alpha / 2, df)
    return float(st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc))


def sample_size_two_sample(effect_size: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest n per group giving at least ``power`` (two-sided, equal groups)."""
    if effect_size == 0:
        raise ValueError("effect_size must be non-zero")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    n = 2
    while power_two_sample(effect_size, n, n, alpha) < power:
        n += 1
        if n > 10_000_000:
            raise ValueError("effect size too small for a feasible sample size")
    return n


def _metric_values(source: Any, metric: str | None) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    items = list(source) if isinstance(source, Iterable) else [source]
    if items and isinstance(items[0], dict):
        if metric is None:
            raise ValueError("metric= is required when comparing events")
        return np.array([(e.get("values") or {}).get(metric, np.nan) for e in items], dtype=np.float64)
    return np.asarray(items, dtype=np.float64)


def compare(
    control: Any, treatment: Any, metric: str | None = None, confidence: float = 0.95, paired: bool = False
) -> dict[str, Any]:
    """Compare two runs (lists of events, or of numbers) on ``metric``.

    Returns the means, Welch (or paired) t-test and Mann-Whitney U p-values, Cohen's d,
    Hedges' g and the confidence interval of the difference of means (treatment - control).
    """
    a, b = _arr(_metric_values(control, metric), "control"), _arr(_metric_values(treatment, metric), "treatment")
    t = paired_t(a, b) if paired else welch_t(a, b)
    return {
        "metric": metric,
        "n_control": int(a.size),
        "n_treatment": int(b.size),
        "mean_control": float(a.mean()),
        "mean_treatment": float(b.mean()),
        "test": t["test"],
        "p_value": t["p_value"],
        "statistic": t["statistic"],
        "mann_whitney_p": mann_whitney(a, b)["p_value"],
        "effect_size": hedges_g(a, b),
        "cohens_d": cohens_d(a, b),
        "ci": t_interval(b - a, confidence) if paired else diff_interval(a, b, confidence),
        "confidence": confidence,
    }
