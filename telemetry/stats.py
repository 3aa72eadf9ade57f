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


def _raw(x: Any) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64).ravel()


def _arr(x: Any, name: str, min_n: int = 2) -> np.ndarray:
    a = _raw(x)
    a = a[np.isfinite(a)]
    if a.size < min_n:
        raise ValueError(f"{name} needs at least {min_n} finite values, got {a.size}")
    return a


def _pairs(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray, int]:
    """Matched observations with every pair that has a missing (NaN) or infinite value on
    either side left out, and how many were: dropping each side's gaps on its own would
    shift every later pair against the wrong partner.

    Raises:
        ValueError: the samples differ in length (naming both), or fewer than 2 pairs are whole.
    """
    x, y = _raw(a), _raw(b)
    if x.size != y.size:
        raise ValueError(
            f"paired samples must have the same length, got {x.size} ({names[0]}) and {y.size} ({names[1]})"
        )
    whole = np.isfinite(x) & np.isfinite(y)
    x, y = x[whole], y[whole]
    if x.size < 2:
        raise ValueError(f"paired samples need at least 2 pairs with both values finite, got {x.size}")
    return x, y, int(whole.size - x.size)


def _scale(*samples: np.ndarray) -> float:
    """A power of two that brings the samples' largest magnitude into [1, 2): dividing by it is
    exact, and sums, variances and differences of values near float64's limit (1.8e308) no
    longer overflow (nor those of tiny values underflow). Test statistics, p-values and effect
    sizes do not change with the scale; means and intervals are multiplied back."""
    top = max((float(np.max(np.abs(s))) for s in samples if s.size), default=0.0)
    if top == 0.0 or not math.isfinite(top):
        return 1.0
    return math.ldexp(1.0, min(max(math.frexp(top)[1] - 1, -1022), 1023))


def _scaled(*samples: np.ndarray) -> tuple[float, list[np.ndarray]]:
    s = _scale(*samples)
    return s, [x / s for x in samples]


@contextmanager
def _undefined_is_nan() -> Iterator[None]:
    """scipy warns (a RuntimeWarning naming its own file, on the user's terminal) and answers
    NaN when a test is undefined, e.g. for two constant samples; the NaN says it already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def welch_t(a: Any, b: Any) -> dict[str, float]:
    """Welch's unequal-variance t-test (two-sided), of a - b; NaN where it is undefined (no variance)."""
    _, (x, y) = _scaled(_arr(a, "a"), _arr(b, "b"))
    with _undefined_is_nan():
        r = st.ttest_ind(x, y, equal_var=False)
    return {"test": "welch_t", "statistic": float(r.statistic), "p_value": float(r.pvalue), "df": float(r.df)}


def paired_t(a: Any, b: Any) -> dict[str, float]:
    """Paired t-test on matched observations (two-sided), of a - b. A pair with a missing or
    infinite value on either side is left out whole (``pairs_dropped`` counts them)."""
    x, y, dropped = _pairs(a, b)
    _, (x, y) = _scaled(x, y)
    with _undefined_is_nan():
        r = st.ttest_rel(x, y)
    return {
        "test": "paired_t",
        "statistic": float(r.statistic),
        "p_value": float(r.pvalue),
        "df": float(r.df),
        "pairs_dropped": dropped,
    }


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
    s, (x,) = _scaled(_arr(a, "sample"))
    with _undefined_is_nan():
        lo, hi = st.t.interval(confidence, x.size - 1, loc=x.mean(), scale=st.sem(x))
    return float(lo) * s, float(hi) * s  # Python floats: beyond the range is inf, without a warning


def bootstrap_interval(
    a: Any, confidence: float = 0.95, statistic: Any = np.mean, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap (BCa) confidence interval of a statistic of one sample.

    The sample is scaled by a power of two as elsewhere here (values near 1.8e308 neither
    overflow nor warn), which is exact for a statistic that scales with its data (f(c x) =
    c f(x): the mean, median, quantiles, standard deviation); one that does not (a variance)
    is computed on the values as they are. An interval that is undefined (a constant sample)
    is NaN, without scipy's warnings."""
    x = _arr(a, "sample")
    s, (xs,) = _scaled(x)
    with _undefined_is_nan():
        if s != 1.0 and not _scales_with_data(statistic, xs):
            s, xs = 1.0, x
        r = st.bootstrap(
            (xs,),
            statistic,
            confidence_level=confidence,
            n_resamples=n_resamples,
            random_state=np.random.default_rng(seed),
            method="BCa",
        )
    return float(r.confidence_interval.low) * s, float(r.confidence_interval.high) * s


def _scales_with_data(statistic: Any, x: np.ndarray) -> bool:
    """Whether f(x / 2) = f(x) / 2 on this (scaled, so overflow-free) sample: halving by a power
    of two is exact, so a statistic that scales with its data passes to rounding."""
    try:
        whole, half = float(statistic(x)), float(statistic(x / 2.0))
    except (TypeError, ValueError):
        return False
    return math.isclose(whole, 2.0 * half, rel_tol=1e-9, abs_tol=1e-300)


def diff_interval(a: Any, b: Any, confidence: float = 0.95) -> tuple[float, float]:
    """Welch confidence interval for mean(b) - mean(a); infinite where the difference is
    beyond float64's range."""
    s, (x, y) = _scaled(_arr(a, "a"), _arr(b, "b"))
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1)) if se > 0 else x.size + y.size - 2
    h = st.t.ppf(0.5 + confidence / 2, df) * se
    d = float(y.mean() - x.mean())
    return (d - float(h)) * s, (d + float(h)) * s


def cohens_d(a: Any, b: Any) -> float:
    """(mean(b) - mean(a)) / pooled standard deviation. Neither sample varying (pooled sd 0),
    it is undefined: +-inf when the means differ (a difference without noise is not "no
    effect"), NaN when they are equal."""
    _, (x, y) = _scaled(_arr(a, "a"), _arr(b, "b"))
    sp = math.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2))
    diff = float(y.mean() - x.mean())
    if sp > 0:
        return diff / sp
    return math.copysign(math.inf, diff) if diff else math.nan


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


def metric_value(ev: dict[str, Any], metric: str) -> float | None:
    """``metric``'s value in one event: the number, NaN when it was recorded as not finite
    (its ``nonfinite`` mark: a gap in the run's series), None when the event has no such value."""
    v = (ev.get("values") or {}).get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return math.nan if metric in (ev.get("nonfinite") or {}) else None


def _metric_values(source: Any, metric: str | None, rows: bool = False) -> np.ndarray:
    """The values of ``metric`` in order. From events: an event whose value is not finite (its
    ``nonfinite`` mark) gives NaN, a gap in the series; one without the field is no observation
    of it and is passed over, unless ``rows`` keeps every event's row (NaN) for pairing."""
    if isinstance(source, np.ndarray):
        return source
    items = list(source) if isinstance(source, Iterable) else [source]
    if items and isinstance(items[0], dict):
        if metric is None:
            raise ValueError("metric= is required when comparing events")
        out = []
        for e in items:
            v = metric_value(e, metric)
            if v is not None or rows:
                out.append(math.nan if v is None else v)
        return np.asarray(out, dtype=np.float64)
    return np.asarray(items, dtype=np.float64)


def compare(
    control: Any, treatment: Any, metric: str | None = None, confidence: float = 0.95, paired: bool = False
) -> dict[str, Any]:
    """Compare two runs (lists of events, or of numbers) on ``metric``.

    Returns the means, Welch (or paired) t-test and Mann-Whitney U p-values, Cohen's d,
    Hedges' g and the confidence interval of the difference of means. Every signed figure
    (the t statistic, ``ci``, ``cohens_d``, ``effect_size``) is of treatment - control.
    Values near float64's limit are scaled, never overflowed; a figure that is still not a
    number (no variance, a difference beyond the range) is NaN or +-inf, and ``note`` says why
    (None when every figure is defined).

    A missing (NaN) or infinite value is left out; with ``paired=True`` its whole pair is
    (the rows must line up: two samples of different lengths are an error naming both), and
    ``pairs_dropped`` says how many pairs were (None when not paired).
    """
    dropped: int | None = None
    ra, rb = _raw(_metric_values(control, metric, paired)), _raw(_metric_values(treatment, metric, paired))
    if paired:
        a, b, dropped = _pairs(ra, rb, ("control", "treatment"))
    else:
        a, b = _arr(ra, "control"), _arr(rb, "treatment")
    s, (x, y) = _scaled(a, b)
    t = paired_t(y, x) if paired else welch_t(y, x)  # treatment - control, as the interval and effect sizes
    mean_a, mean_b = float(x.mean()) * s, float(y.mean()) * s
    if paired:
        lo, hi = t_interval(y - x, confidence)
        ci = (lo * s, hi * s)
    else:
        ci = diff_interval(a, b, confidence)
    d = cohens_d(x, y)
    # each in its recorded order, a missing value left as a gap (NaN): its neighbours are no pair
    series = {"differences": rb / s - ra / s} if paired else {"control": ra / s, "treatment": rb / s}
    serial = {k: lag1(v) for k, v in series.items()}
    n_eff = {k: effective_size(v, serial[k]) for k, v in series.items()}
    return {
        "metric": metric,
        "n_control": int(a.size),
        "n_treatment": int(b.size),
        "mean_control": mean_a,
        "mean_treatment": mean_b,
        "test": t["test"],
        "p_value": t["p_value"],
        "statistic": t["statistic"],
        "mann_whitney_p": mann_whitney(x, y)["p_value"],
        "effect_size": hedges_g(x, y),
        "cohens_d": d,
        "ci": ci,
        "confidence": confidence,
        "pairs_dropped": dropped,
        "note": _undefined_note(x, y, s, d, ci, paired),
        "serial_correlation": serial,
        "n_effective": n_eff,
        "warning": _serial_warning(serial, n_eff, {k: int(np.isfinite(v).sum()) for k, v in series.items()}),
    }


SERIAL_WARN = 0.3
"""A lag-1 autocorrelation above this makes :func:`compare` warn that its tests overstate the evidence."""


def lag1(v: np.ndarray) -> float | None:
    """The lag-1 autocorrelation of a series in its order (None below three values, without a
    pair of neighbours or with no spread): how much each value follows the one before it, which
    the tests assume it does not. A value that is not finite is a gap: the values on either
    side of it are not neighbours. Without gaps this is the usual estimate; with them, the mean
    product of neighbours over the variance, scaled alike."""
    ok = np.isfinite(v)
    n = int(ok.sum())
    if n < 3:
        return None
    d = np.where(ok, v - v[ok].mean(), 0.0)
    den = float(np.dot(d, d))
    pairs = int((ok[1:] & ok[:-1]).sum())
    if pairs == 0 or not den > 0 or not math.isfinite(den):
        return None
    r = float(np.dot(d[1:], d[:-1])) / pairs * (n - 1) / den
    return min(1.0, max(-1.0, r))


def effective_size(v: np.ndarray, r: float | None) -> float:
    """The number of independent values a series of ``n`` finite values with lag-1
    autocorrelation ``r`` is worth for its mean, under an AR(1) model: ``n (1 - r) / (1 + r)``
    (``n`` when ``r`` <= 0)."""
    n = int(np.isfinite(v).sum())
    if r is None or r <= 0:
        return float(n)
    return max(1.0, n * (1.0 - r) / (1.0 + r))


def _serial_warning(serial: dict[str, float | None], n_eff: dict[str, float], n: dict[str, int]) -> str | None:
    """Why the p-values and the interval of :func:`compare` overstate the evidence, or None."""
    strong = {k: r for k, r in serial.items() if r is not None and r > SERIAL_WARN}
    if not strong:
        return None
    told = ", ".join(f"{k} {r:.2f} ({n[k]} values worth about {n_eff[k]:.0f})" for k, r in strong.items())
    return (
        f"the values are serially correlated (lag-1 autocorrelation: {told}): the tests take them as "
        "independent, so the p-values and the interval overstate the evidence; for a claim, compare one "
        "result per run over several seeds (as crucible ab does)"
    )


def _undefined_note(
    x: np.ndarray, y: np.ndarray, s: float, d: float, ci: tuple[float, float], paired: bool
) -> str | None:
    """Why a figure of :func:`compare` is not a number, in words; None when all are."""
    said = []
    if any(math.isinf(v) for v in ci):
        diff = (float(y.mean()) - float(x.mean())) * s
        if math.isinf(diff):
            said.append(
                f"the difference of the means ({float(y.mean()) * s:.6g} - {float(x.mean()) * s:.6g}) "
                "is beyond the float64 range (1.8e308): its confidence interval cannot be given"
            )
        else:
            said.append(
                f"the difference of the means ({diff:.6g}) is a number, but the values spread so wide that "
                "its interval reaches past the float64 range (1.8e308): the interval cannot be given"
            )
    if paired and float(np.ptp(y - x)) == 0.0:
        said.append("the paired differences do not vary: the paired t-test is undefined")
    if math.isnan(d):
        said.append(f"both runs hold the one value {float(x[0]) * s:.6g} throughout: there is no difference to test")
    elif math.isinf(d):
        said.append(
            f"neither run varies (control always {float(x[0]) * s:.6g}, treatment always {float(y[0]) * s:.6g}): "
            "with no spread the effect size is infinite and the t-test degenerate"
        )
    return "; ".join(said) or None
