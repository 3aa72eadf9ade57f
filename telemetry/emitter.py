"""The phase's telemetry handle: ``emit()`` appends to a batch; batches go out columnar.

``emit()`` runs on the caller's thread and only appends a tuple to a list under a lock.
A flush (size trigger ``batch_size``, or time trigger ``flush_interval`` from a small
flusher thread) turns the rows into numpy columns and string codes, encodes one msgpack
message and publishes it on the experiment's ``events`` topic.

Overflow: before publishing, the emitter looks at the slowest subscriber's backlog
(mailbox size, in batches). At ``max_backlog`` or more, policy ``drop`` drops the batch;
policy ``block`` waits (bounded by ``block_timeout``) for the backlog to fall, then drops.
Dropped events are counted exactly, reported by a ``telemetry_dropped`` event in the next
batch that goes out, and carried as cumulative counters in every batch; nothing is lost
silently. Malformed events raise :class:`SchemaError` at ``emit()`` with ``debug=True``;
otherwise they are counted as ``rejected`` (and logged) when their batch is built.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from actors.log import get_logger
from actors.messages import encode
from actors.topics import Topics
from telemetry.schema import GPU_MODES, SPARSE_FIELDS, SchemaError, check_event_fields

log = get_logger("telemetry.emitter")

OVERFLOW_POLICIES = ("block", "drop")
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
        topic: str = "events",
        batch_size: int = 1024,
        flush_interval: float = 0.05,
        overflow: str = "block",
        max_backlog: int = 64,
        block_timeout: float = 1.0,
        debug: bool = False,
        seq_start: int = 0,
        counters: dict[str, int] | None = None,
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
        c = counters or {}
        self.emitted = c.get("emitted", 0)  # accepted by emit()
        self.published = c.get("published", 0)  # sent downstream (seq numbers used)
        self.dropped = c.get("dropped", 0)  # overflow drops
        self.rejected = c.get("rejected", 0)  # malformed events
        self.batches = 0
        self._seq = max(seq_start, self.published)
        self._unreported_drops = 0
        self._last_ts = 0
        # context applied to events that do not say otherwise
        self.phase: str | None = None
        self.pass_: int = 0
        self.gpu_mode: str | None = None
        self._rows: list[tuple[Any, ...]] = []
        self._first_at = 0.0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"emitter-{run_id}", daemon=True)
        self._flusher.start()

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
        """Record one event (cheap: an append under a lock; see the module docs)."""
        if extra or self.debug:
            if self.debug:
                check_event_fields(name, values, phase, step, success, gpu_mode, parameters, notes, extra)
            else:
                self._reject(1, f"unknown field(s) {', '.join(sorted(extra))}")
                return
        row = (time.time_ns() // 1000, name, values, phase or self.phase, step, success,
               parameters, notes, gpu_mode or self.gpu_mode, gpu_reason, anomaly, self.pass_)
        with self._lock:
            if not self._rows:
                self._first_at = time.monotonic()
            self._rows.append(row)
            self.emitted += 1
            if len(self._rows) >= self.batch_size:
                self._flush_locked()

    # --- flushing ----------------------------------------------------------------------

    def flush(self) -> None:
        """Send what is buffered now."""
        with self._lock:
            self._flush_locked()

    def close(self) -> dict[str, int]:
        """Flush, stop the flusher, publish the final counters; return them."""
        self._closed.set()
        with self._lock:
            self._flush_locked()  # the last flush waits (bounded) for consumers under either policy
            counters = self.counters()
            self.topics.publish(self.topic, {"kind": "counters", "run_id": self.run_id, "counters": counters})
        return counters

    def counters(self) -> dict[str, int]:
        return {"emitted": self.emitted, "published": self.published, "dropped": self.dropped,
                "rejected": self.rejected}

    def _reject(self, n: int, why: str) -> None:
        with self._lock:
            self.rejected += n
        log.warning("event rejected", run_id=self.run_id, count=n, reason=why)

    def _flush_loop(self) -> None:
        while not self._closed.wait(self.flush_interval / 2):
            if self._rows and time.monotonic() - self._first_at >= self.flush_interval:
                with self._lock:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        rows = self._rows
        if not rows and not self._unreported_drops:
            return
        self._rows = []
        if self._unreported_drops:
            k, self._unreported_drops = self._unreported_drops, 0
            rows.insert(0, (time.time_ns() // 1000, "telemetry_dropped", {"dropped": k, "dropped_total": self.dropped},
                            self.phase, None, None, None, f"{k} events dropped by overflow policy "
                            f"{self.overflow!r}", None, None, None, self.pass_))
            self.emitted += 1
        try:
            batch = self._columns(rows)
        except (TypeError, ValueError, KeyError, OverflowError):
            good = self._valid_rows(rows)
            if not good:
                return
            batch = self._columns(good)
            rows = good
        n = len(rows)
        if not self._make_room():
            self.dropped += n
            self._unreported_drops += n
            log.warning("events dropped: downstream is behind", run_id=self.run_id, count=n,
                        policy=self.overflow, dropped_total=self.dropped)
            return
        batch["seq"] = np.arange(self._seq, self._seq + n, dtype=np.int64)
        self._seq += n
        self.published += n
        self.batches += 1
        batch["counters"] = self.counters()
        self.topics.publish_bytes(self.topic, encode(batch))

    def _make_room(self) -> bool:
        if self.topics.backlog(self.topic) < self.max_backlog:
            return True
        if self.overflow == "drop" and not self._closed.is_set():
            return False
        deadline = time.monotonic() + self.block_timeout
        while time.monotonic() < deadline:
            time.sleep(0.0005)  # bounded wait for a consumer to catch up (policy "block")
            if self.topics.backlog(self.topic) < self.max_backlog:
                return True
        return False

    def _valid_rows(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        good = []
        for r in rows:
            try:
                check_event_fields(r[1], r[2], r[3], r[4], r[5], r[8], r[6], r[7], {})
                good.append(r)
            except SchemaError as exc:
                self.rejected += 1
                self.emitted -= 1
                log.warning("event rejected", run_id=self.run_id, error=str(exc))
        return good

    def _columns(self, rows: list[tuple[Any, ...]]) -> dict[str, Any]:
        cols = list(zip(*rows, strict=True))
        n = len(rows)
        ts = np.array(cols[0], dtype=np.int64)
        ts[0] = max(ts[0], self._last_ts)
        np.maximum.accumulate(ts, out=ts)  # time never runs backwards within a run
        names: dict[str, int] = {}
        name_c = np.array([names.setdefault(x, len(names)) for x in cols[1]], dtype=np.int32)
        if not all(type(x) is str for x in names):
            raise TypeError("event name must be a string")
        phases: dict[str, int] = {}
        phase_c = np.array([-1 if x is None else phases.setdefault(x, len(phases)) for x in cols[3]], dtype=np.int32)
        if not all(type(x) is str for x in phases):
            raise TypeError("phase must be a string")
        step = np.array([-1 if x is None else x for x in cols[4]], dtype=np.int64)
        succ = np.array([-1 if x is None else (1 if x else 0) for x in cols[5]], dtype=np.int8)
        gpu = np.array([-1 if x is None else _GPU_CODE[x] for x in cols[8]], dtype=np.int8)
        keys: dict[str, None] = {}
        for v in cols[2]:
            if v:
                keys.update(dict.fromkeys(v))
        values = {}
        for k in keys:
            col = np.array([v.get(k, _NAN) if v else _NAN for v in cols[2]], dtype=np.float64)
            bad = ~np.isfinite(col) & ~np.isnan(col)
            if bad.any():
                col[bad] = _NAN  # inf is not representable: treated as absent
            values[k] = col
        sparse: dict[str, list[list[Any]]] = {}
        for f, idx in zip(SPARSE_FIELDS, (6, 7, 9, 10), strict=True):
            entries = [[i, x] for i, x in enumerate(cols[idx]) if x is not None]
            if entries:
                sparse[f] = entries
        self._last_ts = int(ts[-1])
        return {
            "kind": "events", "experiment_id": self.experiment_id, "run_id": self.run_id, "n": n,
            "ts": ts, "step": step, "pass": np.array(cols[11], dtype=np.int32), "name": name_c,
            "phase": phase_c, "success": succ, "gpu": gpu, "names": list(names), "phases": list(phases),
            "values": values, "sparse": sparse,
        }

