"""Time-window queries with one API over the live index and the SQLite history.

Window specs (``ts`` is integer microseconds since the Unix epoch, UTC):

* ``("last", N, unit)``: events with ``ts >= now - N unit`` (the lower bound is inclusive);
  ``unit`` is ``seconds``/``minutes``/``hours`` (singular or ``s``/``m``/``h`` too).
* ``("last_n", N)``: the N most recent events (after filters).
* ``("range", t0, t1)``: ``t0 <= ts < t1`` (half-open), t0 and t1 in epoch seconds
  (int or float) or timezone-aware ``datetime``.
* ``("sliding", N, unit, step_s)``: half-open windows ``[s, s + N unit)`` with ``s`` stepping
  by ``step_s`` seconds from the first event to the last; each window lists its events.

``windowed_metrics`` uses the same half-open windows. Filters: ``phase``, ``name``,
``success``, ``run_id`` and ``parameters.<key>`` (equality on the event's parameter snapshot).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hour": 3600, "hours": 3600}
WINDOW_FORMS = ('("last", N, "minutes")', '("last_n", N)', '("range", t0, t1)',
                '("sliding", N, "minutes", step_s)')
FILTER_KEYS = ("phase", "name", "success", "run_id")


def _bad(spec: Any, why: str) -> ValueError:
    return ValueError(f"bad time-window spec {spec!r}: {why}; accepted forms: {', '.join(WINDOW_FORMS)}")


def _seconds(x: Any, spec: Any) -> float:
    if isinstance(x, dt.datetime):
        if x.tzinfo is None:
            raise _bad(spec, "datetime must be timezone-aware")
        return x.timestamp()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise _bad(spec, f"{x!r} is not a time")
    return float(x)


def _duration_us(n: Any, unit: Any, spec: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0:
        raise _bad(spec, f"duration must be a positive number, got {n!r}")
    if unit not in UNITS:
        raise _bad(spec, f"unknown unit {unit!r}")
    return int(n * UNITS[unit] * 1_000_000)


class Window:
    """A parsed window spec: either ``[lo, hi)`` bounds, a ``last_n`` count, or sliding windows."""

    __slots__ = ("hi", "kind", "last_n", "lo", "size_us", "step_us")

    def __init__(self, spec: Any, now_us: int | None = None) -> None:
        if not isinstance(spec, (tuple, list)) or not spec:
            raise _bad(spec, "not a tuple")
        now_us = int(time.time() * 1e6) if now_us is None else now_us
        self.kind = spec[0]
        self.lo: int | None = None
        self.hi: int | None = None
        self.last_n: int | None = None
        self.size_us = self.step_us = 0
        if self.kind == "last" and len(spec) == 3:
            self.lo = now_us - _duration_us(spec[1], spec[2], spec)
        elif self.kind == "last_n" and len(spec) == 2:
            if isinstance(spec[1], bool) or not isinstance(spec[1], int) or spec[1] < 0:
                raise _bad(spec, "N must be an integer >= 0")
            self.last_n = spec[1]
        elif self.kind == "range" and len(spec) == 3:
            t0, t1 = _seconds(spec[1], spec), _seconds(spec[2], spec)
            if t1 < t0:
                raise _bad(spec, "end is before start")
            self.lo, self.hi = round(t0 * 1e6), round(t1 * 1e6)
        elif self.kind == "sliding" and len(spec) == 4:
            self.size_us = _duration_us(spec[1], spec[2], spec)
            step = spec[3]
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
                raise _bad(spec, f"step_s must be a positive number, got {step!r}")
            self.step_us = int(step * 1e6)
        else:
            raise _bad(spec, "unknown form")


def check_filters(filters: dict[str, Any] | None) -> dict[str, Any]:
    filters = dict(filters or {})
    for k in filters:
        if k not in FILTER_KEYS and not k.startswith("parameters.") and not k.startswith("metadata."):
            raise ValueError(f"unknown filter {k!r}; use {', '.join(FILTER_KEYS)} or parameters.<key>")
    return filters


def row_matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Whether an event passes the filters (see the module docs)."""
    for k, want in filters.items():
        if k.startswith(("parameters.", "metadata.")):
            params = row.get("parameters") or {}
            if params.get(k.split(".", 1)[1]) != want:
                return False
        elif row.get(k) != want:
            return False
    return True


def window_starts(first_us: int, last_us: int, step_us: int) -> np.ndarray:
    """Starts of the windows that cover ``[first, last]``: first, first+step, ... <= last."""
    if last_us < first_us:
        return np.empty(0, dtype=np.int64)
    return np.arange(first_us, last_us + 1, step_us, dtype=np.int64)


def metrics_of(values: np.ndarray) -> dict[str, float]:
    """count, mean, p50, p95, p99, sum of the finite values (NaN = absent)."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "sum": 0.0}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"count": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p95": float(p95),
            "p99": float(p99), "sum": float(v.sum())}


def windowed_metrics_arrays(ts: np.ndarray, columns: dict[str, np.ndarray], window_s: float, step_s: float,
                            start_us: int | None = None, end_us: int | None = None) -> list[dict[str, Any]]:
    """Per half-open window ``[s, s + window)``: metrics of each numeric column (``ts`` sorted)."""
    if window_s <= 0 or step_s <= 0:
        raise ValueError(f"window_s and step_s must be > 0, got {window_s!r}, {step_s!r}")
    if ts.size == 0:
        return []
    w_us, st_us = int(window_s * 1e6), int(step_s * 1e6)
    first = int(ts[0]) if start_us is None else start_us
    last = int(ts[-1]) if end_us is None else end_us
    starts = window_starts(first, last, st_us)
    lo = np.searchsorted(ts, starts, "left")
    hi = np.searchsorted(ts, starts + w_us, "left")
    out = []
    for s, a, b in zip(starts.tolist(), lo.tolist(), hi.tolist(), strict=True):
        out.append({"window_start": s, "window_end": s + w_us, "count": b - a,
                    "metrics": {k: metrics_of(col[a:b]) for k, col in columns.items()}})
    return out


def rows_columns(rows: Iterable[dict[str, Any]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """ts and value columns (NaN where absent) of event dicts, sorted by ts."""
    rows = sorted(rows, key=lambda r: r["ts"])
    keys = sorted({k for r in rows for k in (r.get("values") or {})})
    ts = np.array([r["ts"] for r in rows], dtype=np.int64)
    cols = {k: np.array([(r.get("values") or {}).get(k, np.nan) for r in rows], dtype=np.float64) for k in keys}
    return ts, cols
