"""Time-window queries with one API over the live index and the SQLite history.

Window specs (``ts`` is integer microseconds since the Unix epoch, UTC):

* ``("last", N, unit)``: events with ``ts >= now - N unit`` (the lower bound is inclusive);
  ``unit`` is ``seconds``/``minutes``/``hours`` (singular or ``s``/``m``/``h`` too).
* ``("last_n", N)``: the N most recent events (after filters).
* ``("range", t0, t1)``: ``t0 <= ts < t1`` (half-open), t0 and t1 in epoch seconds
  (int or float) or timezone-aware ``datetime``.
* ``("sliding", N, unit, step_s)``: half-open windows ``[s, s + N unit)`` with ``s`` stepping
  by ``step_s`` seconds from the first matching event to the last; each window lists its events.

``windowed_metrics`` uses the same half-open windows. Filters: ``phase``, ``name``,
``success``, ``run_id`` and ``parameters.<key>`` (equality on the event's parameter snapshot).

Limits. A query may select at most ``max_rows`` events (:data:`MAX_ROWS`) and return at
most ``max_rows`` rows (an event counts once per sliding window that holds it), in at most
``max_windows`` windows (:data:`MAX_WINDOWS`); the history also refuses to decode more than
:data:`MAX_SCAN` stored events for one query. Past a limit the query fails with
:class:`QueryLimitError` before the work is done, so that no query can stall (or exhaust
the memory of) the Recorder that answers it. Both stores count the same way, so a query
gets the same answer, or the same error, from either.

Bad specs raise :class:`QueryError` (a ``ValueError``). :func:`prepare_query` checks a
query on the caller's side and puts it in its wire form; an actor that answers queries
replies :func:`query_error` instead of raising, and :func:`query_answer` turns that
reply back into the exception in the asker.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
}
WINDOW_FORMS = ('("last", N, "minutes")', '("last_n", N)', '("range", t0, t1)', '("sliding", N, "minutes", step_s)')
FILTER_KEYS = ("phase", "name", "success", "run_id")

MAX_ROWS = 100_000
"""Events one query may select, and rows it may return (counted once per sliding window)."""
MAX_WINDOWS = 10_000
"""Windows one sliding query or ``windowed_metrics`` call may return."""
MAX_SCAN = 5_000_000
"""Stored events the history may decode to answer one query."""
_MAX_ABS_S = 2.0**62 / 1e6  # any time or duration, in seconds, whose microseconds fit an int64


class QueryError(ValueError):
    """A query is malformed (the message names what and lists the accepted forms)."""


class QueryLimitError(QueryError):
    """A query would select, return or scan more than its limits allow."""


def _bad(spec: Any, why: str) -> QueryError:
    return QueryError(f"bad time-window spec {spec!r}: {why}; accepted forms: {', '.join(WINDOW_FORMS)}")


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float))


def _seconds(x: Any, spec: Any) -> float:
    if isinstance(x, dt.datetime):
        if x.tzinfo is None:
            raise _bad(spec, "datetime must be timezone-aware")
        return x.timestamp()
    if not _number(x):
        raise _bad(spec, f"{x!r} is not a time")
    if not math.isfinite(x) or abs(x) > _MAX_ABS_S:
        raise _bad(spec, f"time {x!r} is not a finite number of epoch seconds within +-{_MAX_ABS_S:.3g}")
    return float(x)


def _duration_us(n: Any, unit: Any, spec: Any) -> int:
    if not _number(n) or not math.isfinite(n) or n <= 0:
        raise _bad(spec, f"duration must be a positive finite number, got {n!r}")
    if not isinstance(unit, str) or unit not in UNITS:
        raise _bad(spec, f"unknown unit {unit!r} (units: seconds, minutes, hours)")
    seconds = n * UNITS[unit]
    if seconds > _MAX_ABS_S:
        raise _bad(spec, f"duration {n!r} {unit} is too long")
    us = int(seconds * 1_000_000)
    if us < 1:
        raise _bad(spec, f"duration {n!r} {unit} is shorter than one microsecond")
    return us


def check_step(step_s: Any, what: str = "step_s") -> int:
    """A window step or width in seconds: finite, at least one microsecond; in microseconds."""
    if not _number(step_s) or not math.isfinite(step_s) or step_s <= 0 or step_s > _MAX_ABS_S:
        raise QueryError(f"{what} must be a positive finite number of seconds, got {step_s!r}")
    us = int(step_s * 1_000_000)
    if us < 1:
        raise QueryError(f"{what} must be at least one microsecond (1e-06), got {step_s!r}")
    return us


class Window:
    """A parsed window spec: either ``[lo, hi)`` bounds, a ``last_n`` count, or sliding windows."""

    __slots__ = ("hi", "kind", "last_n", "lo", "size_us", "step_us")

    def __init__(self, spec: Any, now_us: int | None = None) -> None:
        if not isinstance(spec, (tuple, list)) or not spec:
            raise _bad(spec, "not a tuple")
        if now_us is None:
            now_us = int(time.time() * 1e6)
        elif isinstance(now_us, bool) or not isinstance(now_us, int) or abs(now_us) > 2**62:
            raise QueryError(f"now_us must be an int of epoch microseconds, got {now_us!r}")
        self.kind = spec[0] if isinstance(spec[0], str) else None  # an array would compare element-wise
        self.lo: int | None = None
        self.hi: int | None = None
        self.last_n: int | None = None
        self.size_us = self.step_us = 0
        if self.kind == "last" and len(spec) == 3:
            self.lo = now_us - _duration_us(spec[1], spec[2], spec)
        elif self.kind == "last_n" and len(spec) == 2:
            if isinstance(spec[1], bool) or not isinstance(spec[1], int) or not 0 <= spec[1] < 1 << 63:
                raise _bad(spec, "N must be an integer in [0, 2**63)")  # a message carries at most int64
            self.last_n = spec[1]
        elif self.kind == "range" and len(spec) == 3:
            t0, t1 = _seconds(spec[1], spec), _seconds(spec[2], spec)
            if t1 < t0:
                raise _bad(spec, "end is before start")
            self.lo, self.hi = round(t0 * 1e6), round(t1 * 1e6)
        elif self.kind == "sliding" and len(spec) == 4:
            self.size_us = _duration_us(spec[1], spec[2], spec)
            try:
                self.step_us = check_step(spec[3])
            except QueryError as exc:
                raise _bad(spec, str(exc)) from None
        else:
            raise _bad(spec, "unknown form")


def check_filters(filters: dict[str, Any] | None) -> dict[str, Any]:
    """Validate query filters (keys and value types); return them as a new dict."""
    if filters is not None and not isinstance(filters, dict):
        raise QueryError(f"filters must be a table of field = value, got {type(filters).__name__}")
    filters = dict(filters or {})
    for k, v in filters.items():
        if not isinstance(k, str) or (k not in FILTER_KEYS and not k.startswith(("parameters.", "metadata."))):
            raise QueryError(f"unknown filter {k!r}; use {', '.join(FILTER_KEYS)} or parameters.<key>")
        if k == "success" and v is not None and not isinstance(v, bool):
            raise QueryError(f"filter 'success' must be true, false or None, got {v!r}")
        if k in ("phase", "name") and v is not None and not isinstance(v, str):
            raise QueryError(f"filter {k!r} must be a string or None, got {v!r}")
        if k == "run_id" and not isinstance(v, str):
            raise QueryError(f"filter 'run_id' must be a string, got {v!r}")
        if k.startswith(("parameters.", "metadata.")) and not (v is None or isinstance(v, (str, int, float, bool))):
            raise QueryError(f"filter {k!r} must compare with a string, number, bool or None, got {v!r}")
    return filters


def prepare_query(spec: Any, filters: dict[str, Any] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Check a query where it is asked, and give its wire form (datetimes as epoch seconds).

    Raises :class:`QueryError` for a bad spec or filter, in the caller's thread, before any
    actor sees it.
    """
    w = Window(spec)
    wire = list(spec)
    if w.kind == "range":
        wire = ["range", _seconds(spec[1], spec), _seconds(spec[2], spec)]
    return wire, check_filters(filters)


def query_error(exc: BaseException) -> dict[str, Any]:
    """The reply of an actor whose query failed (it answers with this instead of crashing)."""
    return {"kind": "query_error", "error": type(exc).__name__, "message": str(exc)}


def query_answer(reply: Any) -> Any:
    """The result of a query reply; raise :class:`QueryLimitError` / :class:`QueryError` for an error reply."""
    if isinstance(reply, dict) and reply.get("kind") == "query_error":
        cls = QueryLimitError if reply.get("error") == "QueryLimitError" else QueryError
        raise cls(str(reply.get("message")))
    return reply


def check_rows(count: int, max_rows: int, what: str = "select") -> None:
    """Refuse a query that would select (or return) more than ``max_rows`` events."""
    if count > max_rows:
        raise QueryLimitError(
            f"query would {what} {count:,} events, above the limit of {max_rows:,}: "
            "narrow the window or add filters (export_run reads a whole run)"
        )


def plan_windows(
    ts: np.ndarray, size_us: int, step_us: int, max_windows: int = MAX_WINDOWS, max_rows: int | None = MAX_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window starts over the sorted ``ts`` (first to last) and each window's ``[lo, hi)`` rows.

    Counts first and refuses (:class:`QueryLimitError`) more than ``max_windows`` windows or,
    if ``max_rows`` is given, more than ``max_rows`` rows summed over the windows.
    """
    if ts.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    starts = _starts(int(ts[0]), int(ts[-1]), step_us, max_windows)
    lo = np.searchsorted(ts, starts, "left")
    hi = np.searchsorted(ts, starts + size_us, "left")
    if max_rows is not None:
        check_rows(int((hi - lo).sum()), max_rows, "return")
    return starts, lo, hi


def _starts(first_us: int, last_us: int, step_us: int, max_windows: int) -> np.ndarray:
    """Starts of the windows that cover ``[first, last]`` (first, first+step, ... <= last), counted first."""
    if last_us < first_us:
        return np.empty(0, dtype=np.int64)
    count = (last_us - first_us) // step_us + 1
    if count > max_windows:
        raise QueryLimitError(
            f"query would make {count:,} windows, above the limit of {max_windows:,}: "
            f"use a larger step (the events span {(last_us - first_us) / 1e6:g} s)"
        )
    return first_us + np.arange(count, dtype=np.int64) * step_us


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


def code_mask(codes: np.ndarray, table: list[Any], want: Any) -> np.ndarray:
    """Rows whose string code means ``want`` (None: the absent code -1)."""
    if want is None:
        return codes == -1
    hits = [i for i, x in enumerate(table) if x == want]
    return np.isin(codes, hits) if hits else np.zeros(codes.shape, dtype=bool)


def param_mask(codes: np.ndarray, parsed: Callable[[int], Any], filters: dict[str, Any]) -> np.ndarray:
    """Rows whose parameter snapshot (code -1: none) passes the ``parameters.*`` filters."""
    ok = np.zeros(codes.shape, dtype=bool)
    for c in np.unique(codes).tolist():
        if row_matches({"parameters": parsed(c) if c >= 0 else None}, filters):
            ok |= codes == c
    return ok


def param_filters(filters: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in filters.items() if k.startswith(("parameters.", "metadata."))}


def metrics_of(values: np.ndarray) -> dict[str, float]:
    """count, mean, p50, p95, p99, sum of the finite values (NaN = absent)."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "sum": 0.0}
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "sum": float(v.sum()),
    }


def windowed_metrics_arrays(
    ts: np.ndarray,
    columns: dict[str, np.ndarray],
    window_s: float,
    step_s: float,
    start_us: int | None = None,
    end_us: int | None = None,
    max_windows: int = MAX_WINDOWS,
) -> list[dict[str, Any]]:
    """Per half-open window ``[s, s + window)``: metrics of each numeric column (``ts`` sorted)."""
    w_us, st_us = check_step(window_s, "window_s"), check_step(step_s, "step_s")
    if ts.size == 0:
        return []
    first = int(ts[0]) if start_us is None else start_us
    last = int(ts[-1]) if end_us is None else end_us
    starts = _starts(first, last, st_us, max_windows)
    lo = np.searchsorted(ts, starts, "left")
    hi = np.searchsorted(ts, starts + w_us, "left")
    out = []
    for s, a, b in zip(starts.tolist(), lo.tolist(), hi.tolist(), strict=True):
        out.append(
            {
                "window_start": s,
                "window_end": s + w_us,
                "count": b - a,
                "metrics": {k: metrics_of(col[a:b]) for k, col in columns.items()},
            }
        )
    return out


def present_fields(columns: dict[str, np.ndarray], fields: list[str] | None) -> list[str]:
    """The value fields a metrics answer covers: those asked for, else those the events carry."""
    if fields is not None:
        return list(fields)
    return sorted(k for k, col in columns.items() if col.size and not np.isnan(col).all())
