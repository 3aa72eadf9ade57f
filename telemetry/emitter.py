"""The phase's telemetry handle: ``emit()`` appends to a batch; batches go out columnar.

``emit()`` runs on the caller's thread and only appends a tuple to a list (``list.append``
is atomic, so emitting takes no lock). A flush (size trigger ``batch_size`` on the emitting
thread, or time trigger ``flush_interval`` from a small flusher thread) takes the first
``n`` rows and deletes them from the list (two atomic steps: rows appended meanwhile stay
for the next batch), turns them into numpy columns and string codes, encodes one msgpack
message and publishes it on the experiment's ``events`` topic. Flushers exclude each
other with a lock that ``emit()`` never touches.

``emit()`` takes ownership of the ``values`` dict: do not mutate it afterwards (a
``parameters`` dict is serialised at once, so it may be reused). Context defaults
(``phase``, ``pass_``, ``gpu_mode``) are set with :meth:`Emitter.set_context`, which
flushes first so that every buffered event keeps the context it was emitted in.

Overflow: before publishing, the emitter looks at the slowest subscriber's backlog
(mailbox size, in batches). At ``max_backlog`` or more, policy ``drop`` drops the batch;
policy ``block`` waits (bounded by ``block_timeout``) for the backlog to fall, then drops.
Dropped events are counted exactly, reported by a ``telemetry_dropped`` event in the next
batch that goes out, and carried as cumulative counters in every batch; nothing is lost
silently. Malformed events raise :class:`SchemaError` at ``emit()`` with ``debug=True``;
otherwise they are counted as ``rejected`` (and logged) when their batch is built.
"""

from __future__ import annotations

import math
import threading
import time
from operator import itemgetter
from typing import Any

import numpy as np
import orjson

from actors.log import get_logger
from actors.messages import encode
from actors.topics import Topics
from telemetry.schema import COUNTERS, EVENTS, GPU_MODES, EventBatch, SchemaError, check_event_fields

MAX_NOTES_CHARS = 4000
"""An event's ``notes`` past this many characters are cut (a control's reason, a refused
value echoed in an error: text from outside must not make one event megabytes long)."""


def bounded_notes(text: str) -> str:
    """``text`` cut to :data:`MAX_NOTES_CHARS`, saying how much was cut: for notes built from
    text that comes from outside (a control's value and reason, an observer's note), checked
    where it comes in rather than on every emit."""
    if len(text) <= MAX_NOTES_CHARS:
        return text
    return f"{text[:MAX_NOTES_CHARS]}... ({len(text) - MAX_NOTES_CHARS:,} more characters cut)"


log = get_logger("telemetry.emitter")

OVERFLOW_POLICIES = ("block", "drop")
# the defaults, here once: the experiment spec's defaults (experiments/spec.py) read them
BATCH_SIZE = 1024
FLUSH_INTERVAL_S = 0.05
OVERFLOW = "block"
MAX_BACKLOG = 64
BLOCK_TIMEOUT_S = 1.0
REJECTED_LOG_S = 10.0
"""At most one ``event rejected`` warning this often (the first at once): a workload that
emits a malformed field in every event would otherwise write a line per event."""

# The events' clock follows the wall clock forward and never back. Rows hold the monotonic
# reading (one C call on the hot path); a batch turns them into wall-clock times, and where the
# wall clock has stepped back (an NTP correction, a person setting the date) it goes on with the
# monotonic clock from the run's last event instead: time keeps passing, ahead of the wall clock
# by the step (it used to stand still until the wall clock caught up: a sliding window, a stall
# detector, a phase's duration saw no time pass). A step forward (a clock set right after
# boot, a suspended machine) is followed: event time stays the wall clock's.
_clock_ns = time.monotonic_ns


def _wall_offset_ns() -> int:
    """The wall clock minus the monotonic clock, now."""
    return time.time_ns() - time.monotonic_ns()


_NAN = float("nan")
_GPU_CODE = {m: i for i, m in enumerate(GPU_MODES)}


class Emitter:
    """Batching event emitter bound to one experiment run and one topic."""

    def __init__(
        self,
        topics: Topics,
        experiment_id: str,
        run_id: str,
        *,
        topic: str = EVENTS,
        batch_size: int = BATCH_SIZE,
        flush_interval: float = FLUSH_INTERVAL_S,
        overflow: str = OVERFLOW,
        max_backlog: int = MAX_BACKLOG,
        block_timeout: float = BLOCK_TIMEOUT_S,
        debug: bool = False,
        seq_start: int = 0,
        counters: dict[str, int] | None = None,
        on_publish: Any = None,
        watch: Any = (),
    ) -> None:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow policy must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if batch_size < 1 or flush_interval <= 0 or max_backlog < 1 or block_timeout < 0:
            raise ValueError("batch_size, max_backlog >= 1; flush_interval > 0; block_timeout >= 0")
        self.topics, self.topic = topics, topic
        self.experiment_id, self.run_id = experiment_id, run_id
        self.batch_size, self.flush_interval = batch_size, flush_interval
        self.overflow, self.max_backlog, self.block_timeout = overflow, max_backlog, block_timeout
        self.debug = debug
        self.on_publish = on_publish  # called with the counters after each published batch
        self.watch = tuple(watch)  # more targets whose backlog counts (downstream of the topic)
        c = counters or {}
        self.emitted = c.get("emitted", 0)  # accepted by emit()
        self.published = c.get("published", 0)  # sent downstream (seq numbers used)
        self.dropped = c.get("dropped", 0)  # overflow drops
        self.rejected = c.get("rejected", 0)  # malformed events
        self._seq = max(seq_start, self.published)
        self._unreported_drops = 0
        self._rejects_unsaid, self._rejects_said_at = 0, -math.inf
        self._last_ts = 0
        self._last_mono: int | None = None  # the monotonic reading of the event stamped _last_ts
        self.phase: str | None = None
        self.pass_: int = 0
        self.gpu_mode: str | None = None
        self.gpu_reason: str | None = None
        self._rows: list[tuple[Any, ...]] = []  # only ever appended to, and cut from the front
        self._flush_lock = threading.RLock()
        self._warn_lock = threading.Lock()
        self._closed = threading.Event()
        self.held = False  # while held, batches wait in _held_batches (events emitted during a pause)
        self._abandoned = False  # see abandon()
        self._held_batches: list[EventBatch] = []
        self._flusher = threading.Thread(target=self._flush_loop, name=f"emitter-{run_id}", daemon=True)
        self._flusher.start()

    def set_context(self, *, phase: Any = ..., pass_: Any = ..., gpu_mode: Any = ..., gpu_reason: Any = ...) -> None:
        """Defaults for later events (flushes first: buffered events keep their context)."""
        with self._flush_lock:
            self._flush_locked()
            if phase is not ...:
                self.phase = phase
            if pass_ is not ...:
                self.pass_ = int(pass_)
            if gpu_mode is not ...:
                if gpu_mode is not None and gpu_mode not in GPU_MODES:
                    raise ValueError(f"gpu_mode must be one of {', '.join(GPU_MODES)} or None, got {gpu_mode!r}")
                self.gpu_mode = gpu_mode
            if gpu_reason is not ...:
                if gpu_reason is not None and type(gpu_reason) is not str:
                    raise ValueError(f"gpu_reason must be a string or None, got {gpu_reason!r}")
                self.gpu_reason = gpu_reason

    # --- hot path ------------------------------------------------------------------

    def emit(
        self,
        name: str,
        values: dict[str, float] | None = None,
        *,
        phase: str | None = None,
        step: int | None = None,
        success: bool | None = None,
        parameters: dict[str, Any] | None = None,
        notes: str | None = None,
        gpu_mode: str | None = None,
        gpu_reason: str | None = None,
        anomaly: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        """Record one event (an append, no lock; see the module docs)."""
        if extra or self.debug:
            if self.debug:
                check_event_fields(name, values, phase, step, success, gpu_mode, parameters, notes, extra)
            else:
                self._reject(1, f"unknown field(s) {', '.join(sorted(extra))}")
                return
        if parameters is not None:  # snapshot now: the caller may mutate its dict later
            try:
                parameters = orjson.dumps(parameters)
            except TypeError as exc:
                if self.debug:
                    raise SchemaError(f"event field 'parameters' cannot be encoded as JSON: {exc}") from None
                self._reject(1, f"parameters not JSON-encodable: {exc}")
                return
        rows = self._rows
        rows.append((_clock_ns(), name, values, phase, step, success, parameters, notes, gpu_mode, gpu_reason, anomaly))
        if len(rows) >= self.batch_size:
            self.flush()

    # --- flushing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Send what is buffered now."""
        with self._flush_lock:
            self._flush_locked()

    def close(self) -> dict[str, int]:
        """Flush, stop the flusher, publish the final counters; return them."""
        self._closed.set()
        with self._flush_lock:
            self._flush_locked()  # the last flush waits (bounded) for consumers under either policy
            counters = self.counters()
            if not self._abandoned:
                self.topics.publish(self.topic, {"kind": COUNTERS, "run_id": self.run_id, "counters": counters})
        return counters

    def abandon(self) -> None:
        """Publish nothing more, ever: the owner was killed and its thread may still emit, but
        the seq numbers belong to its replacement now. A publish in progress finishes first:
        nothing goes out once this returns."""
        self._abandoned = True
        self._closed.set()
        with self._flush_lock:
            pass

    def counters(self) -> dict[str, int]:
        """Cumulative counts: ``emitted`` (taken into batches), ``published``, ``dropped``, ``rejected``."""
        return {
            "emitted": self.emitted,
            "published": self.published,
            "dropped": self.dropped,
            "rejected": self.rejected,
        }

    def _reject(self, n: int, why: str) -> None:
        with self._flush_lock:
            self.rejected += n
        self._say_rejected(n, why)

    def _say_rejected(self, n: int, why: str) -> None:
        """Warn of rejected events, at most once every :data:`REJECTED_LOG_S`: the count since
        the last warning, the run's total and the latest reason (the counter has them all)."""
        with self._warn_lock:
            self._rejects_unsaid += n
            now = time.monotonic()
            if now - self._rejects_said_at < REJECTED_LOG_S:
                return
            count, self._rejects_unsaid, self._rejects_said_at = self._rejects_unsaid, 0, now
        log.warning("event rejected", run_id=self.run_id, count=count, total=self.rejected, reason=why)

    def hold(self, on: bool) -> None:
        """Hold batches back (or let them go): a paused phase's notices wait for its resume,
        when the subscribers are attached again. ``close()`` sends held batches regardless."""
        self.held = on

    def _flush_loop(self) -> None:
        interval_ns = int(self.flush_interval * 1e9)
        while not self._closed.wait(self.flush_interval / 2):
            try:
                oldest = self._rows[0][0]
            except IndexError:
                continue
            if time.monotonic_ns() - oldest >= interval_ns:  # the rows' clock (not _clock_ns: tests set that one)
                try:
                    self.flush()
                except Exception:
                    log.exception("emitter flush failed", run_id=self.run_id)

    def _flush_locked(self) -> None:
        held_back = self.held and not self._closed.is_set()
        if not held_back and self._held_batches:
            pending, self._held_batches = self._held_batches, []
            for b in pending:
                self._publish(b)
        n = len(self._rows)
        rows = self._rows[:n]  # slicing, then deleting the same prefix: appends in between survive
        del self._rows[:n]
        self.emitted += n
        if not rows and not self._unreported_drops:
            return
        if self._unreported_drops:
            k, self._unreported_drops = self._unreported_drops, 0
            rows.insert(
                0,
                (
                    _clock_ns(),
                    "telemetry_dropped",
                    {"dropped": k, "dropped_total": self.dropped},
                    None,
                    None,
                    None,
                    None,
                    f"{k} events dropped by overflow policy {self.overflow!r}",
                    None,
                    None,
                    None,
                ),
            )
            self.emitted += 1
        try:
            batch = self._columns(rows)
        except (TypeError, ValueError, KeyError, OverflowError, AttributeError):
            rows = self._valid_rows(rows)
            if not rows:
                return
            try:
                batch = self._columns(rows)
            except (TypeError, ValueError, KeyError, OverflowError, AttributeError) as exc:
                # rows that pass the field checks but still cannot be columned: refuse, counted
                self.rejected += len(rows)
                self.emitted -= len(rows)
                log.error(
                    "events rejected: batch could not be built", run_id=self.run_id, count=len(rows), error=repr(exc)
                )
                return
        if held_back:
            self._held_batches.append(batch)  # built with the context in force, sent after the hold
            return
        self._publish(batch)

    def _publish(self, batch: EventBatch) -> None:
        n = int(batch["n"])
        room = self._make_room()
        if self._abandoned:
            return
        if not room:
            self.dropped += n
            self._unreported_drops += n
            log.warning(
                "events dropped: downstream is behind",
                run_id=self.run_id,
                count=n,
                policy=self.overflow,
                dropped_total=self.dropped,
            )
            return
        batch["seq"] = np.arange(self._seq, self._seq + n, dtype=np.int64)
        self._seq += n
        self.published += n
        batch["counters"] = self.counters()
        self.topics.publish_bytes(self.topic, encode(batch))
        if self.on_publish is not None:
            self.on_publish(batch["counters"])

    def backlog(self) -> int:
        """Batches waiting at the slowest consumer (topic subscribers and watched targets)."""
        b = self.topics.backlog(self.topic)
        for t in self.watch:
            b = max(b, t.queue_size())
        return b

    def _make_room(self) -> bool:
        if self.backlog() < self.max_backlog:
            return True
        if self.overflow == "drop" and not self._closed.is_set():
            return False
        deadline = time.monotonic() + self.block_timeout
        while time.monotonic() < deadline and not self._abandoned:
            time.sleep(0.0005)  # bounded wait for a consumer to catch up (policy "block")
            if self.backlog() < self.max_backlog:
                return True
        return False

    def _valid_rows(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        good = []
        for r in rows:
            try:
                check_event_fields(r[1], r[2], r[3], r[4], r[5], r[8], None, r[7], {})
                if r[9] is not None and not isinstance(r[9], str):
                    raise SchemaError(f"event field 'gpu_reason' must be a string, got {r[9]!r}")
                good.append(r)
            except SchemaError as exc:
                self.rejected += 1
                self.emitted -= 1
                self._say_rejected(1, str(exc))
        return good

    def _columns(self, rows: list[tuple[Any, ...]]) -> EventBatch:
        """Rows -> numpy columns and code tables, with C-speed fast paths for uniform columns."""
        n = len(rows)
        (
            ts_ns,
            name_col,
            val_col,
            phase_col,
            step_col,
            succ_col,
            param_col,
            notes_col,
            gpu_col,
            reason_col,
            anom_col,
        ) = zip(*rows, strict=True)
        mono = np.array(ts_ns, dtype=np.int64)
        ts = (mono + _wall_offset_ns()) // 1000  # each row's wall-clock time
        if self._last_mono is not None:  # the wall clock stepped back: on from the last event, monotonic
            np.maximum(ts, (mono - self._last_mono) // 1000 + self._last_ts, out=ts)
        ts[0] = max(ts[0], self._last_ts)
        np.maximum.accumulate(ts, out=ts)  # time never runs backwards within a run
        self._last_mono = int(mono[-1])
        names, name_c = _codes(name_col, n, None)
        if not all(type(x) is str for x in names):
            raise TypeError("event name must be a string")
        phases, phase_c = _codes(phase_col, n, self.phase)
        if not all(type(x) is str for x in phases):
            raise TypeError("phase must be a string")
        reasons, reason_c = _codes(reason_col, n, self.gpu_reason)
        if not all(type(x) is str for x in reasons):
            raise TypeError("gpu_reason must be a string")
        ptexts, param_c = _codes(param_col, n, None)
        gmodes, gpu_local = _codes(gpu_col, n, self.gpu_mode)
        gpu = np.array([_GPU_CODE[m] for m in gmodes] + [-1], dtype=np.int8)[gpu_local]
        nones = step_col.count(None)
        step = (
            np.array(step_col, dtype=np.int64)
            if nones == 0
            else np.full(n, -1, dtype=np.int64)
            if nones == n
            else np.array([-1 if x is None else x for x in step_col], dtype=np.int64)
        )
        nones = succ_col.count(None)
        succ = (
            np.full(n, -1, dtype=np.int8)
            if nones == n
            else np.array([-1 if x is None else (1 if x else 0) for x in succ_col], dtype=np.int8)
        )
        values, nonfinite = _value_columns(val_col, n)
        sparse: dict[str, list[list[Any]]] = {}
        for f, col in (("notes", notes_col), ("anomaly", anom_col)):
            if col.count(None) != n:
                sparse[f] = [[i, x] for i, x in enumerate(col) if x is not None]
        if nonfinite:
            sparse["nonfinite"] = nonfinite
        self._last_ts = int(ts[-1])
        return {
            "kind": EVENTS,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "n": n,
            "ts": ts,
            "step": step,
            "pass": np.full(n, self.pass_, dtype=np.int32),
            "name": name_c,
            "phase": phase_c,
            "success": succ,
            "gpu": gpu,
            "reason": reason_c,
            "params": param_c,
            "names": names,
            "phases": phases,
            "reasons": reasons,
            "param_texts": ptexts,
            "values": values,
            "sparse": sparse,
        }


def _codes(col: tuple[Any, ...], n: int, default: Any) -> tuple[list[Any], np.ndarray]:
    """A string column as (table, int32 codes); None takes ``default``; -1 where still None."""
    first = col[0]
    if col.count(first) == n:  # uniform column: the common case, C speed
        x = default if first is None else first
        return ([], np.full(n, -1, dtype=np.int32)) if x is None else ([x], np.zeros(n, dtype=np.int32))
    table: dict[Any, int] = {}
    codes = [-1 if (x := (default if v is None else v)) is None else table.setdefault(x, len(table)) for v in col]
    return list(table), np.array(codes, dtype=np.int32)


def _as_float(x: Any) -> Any:
    """An integer past float64's range as an infinity of its sign (then marked ``nonfinite``),
    not an OverflowError that would lose the whole batch; anything else as it is."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) > _FLOAT_MAX_INT:
        return math.inf if x > 0 else -math.inf
    return x


_FLOAT_MAX_INT = int(np.finfo(np.float64).max)


def _value_columns(vals: tuple[Any, ...], n: int) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
    """``values`` dicts -> one float64 column per key (NaN where absent), and the sparse
    ``nonfinite`` entries: a NaN or an infinity *given* (a diverged loss) is no number a file
    can hold, so its column is NaN (absent) and the event says which field held what
    (``[[row, {"loss": "nan"}], ...]``): it is counted and seen, never lost silently."""
    first = vals[0]
    out: dict[str, np.ndarray] = {}
    if first and vals.count(None) == 0 and sum(map(len, vals)) == n * len(first):
        try:  # every dict has the first one's keys (and, by the count, no others)
            for k in first:
                out[k] = np.fromiter(map(itemgetter(k), vals), dtype=np.float64, count=n)
        except (KeyError, TypeError, OverflowError):  # an integer past float64: the careful path below
            out = {}
    if not out:
        keys: dict[str, None] = {}
        for v in vals:
            if v:
                keys.update(dict.fromkeys(v))
        for k in keys:
            out[k] = np.array([_as_float(v.get(k, _NAN)) if v else _NAN for v in vals], dtype=np.float64)
    marks: dict[int, dict[str, str]] = {}
    for k, col in out.items():
        bad = ~np.isfinite(col)
        if not bad.any():
            continue
        for i in np.flatnonzero(bad).tolist():
            v = vals[i]
            if v and k in v:  # given, not absent
                x = col[i]
                marks.setdefault(i, {})[k] = "nan" if x != x else ("inf" if x > 0 else "-inf")
        col[bad] = _NAN
    return out, [[i, marks[i]] for i in sorted(marks)]
