"""The Recorder actor: persists event batches to JSONL + SQLite, keeps a live ring and index.

Files: ``<artifacts>/<experiment>/<run_id>/events.jsonl`` (size-based rotation) and the
shared history database ``<artifacts>/history.sqlite3`` (WAL, one transaction per batch).
Every batch is written and flushed before the next message; files are fsynced at least
every ``fsync_interval`` seconds and on stop. An event is *acknowledged* once it is
counted in ``persisted`` (what ``flush`` and ``summary`` answer).

A restarted Recorder reopens the same run: it cuts a torn last line, takes the last ``seq``
on disk so that nothing is written twice, back-fills SQLite from the JSONL if a crash left
it behind, and rebuilds its summary figures from the files. Events whose ``seq`` never
arrived (lost with a crashed Recorder's message in flight) are counted as
``events_lost_in_transit``; ``emitted = persisted + dropped`` holds with
``dropped = overflow drops + lost in transit + sampled out``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.base import Actor
from actors.log import get_logger
from actors.messages import encode
from kernels.jsonl import format_batch
from telemetry.index import LiveIndex
from telemetry.jsonl import JsonlWriter, iter_run
from telemetry.schema import SCHEMA_VERSION, batch_rows, check_id, full_event, rows_to_batch, select_rows
from telemetry.store import DB_NAME, HistoryStore

log = get_logger("actors.recorder")


class ArtifactsError(RuntimeError):
    """The artifacts folder cannot be used (missing permissions, not a directory...)."""


def check_artifacts_dir(path: str | Path) -> Path:
    """Create the artifacts folder if needed and prove it writable, with a clear error if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ArtifactsError(f"artifacts folder {str(p)!r} is not writable: {exc.strerror or exc}") from None
    return p


class _PhaseStats:
    __slots__ = ("count", "first_ts", "last", "last_ts", "max", "min")

    def __init__(self) -> None:
        self.count = 0
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.min: dict[str, float] = {}
        self.max: dict[str, float] = {}
        self.last: dict[str, float] = {}


class Recorder(Actor):
    """Persists one experiment run; answers live queries. See the module docs."""

    def __init__(
        self,
        artifacts_dir: str | Path,
        experiment_id: str,
        run_id: str,
        *,
        rotate_bytes: int = 256 << 20,
        fsync_interval: float = 1.0,
        ring_size: int = 1000,
        index_limit: int = 1_000_000,
        maximize: tuple[str, ...] | list[str] = (),
        summary_interval: float = 5.0,
        commit_every: int = 1,
    ) -> None:
        super().__init__()
        self.experiment_id = check_id("experiment id", experiment_id)
        self.run_id = check_id("run id", run_id)
        self.artifacts = check_artifacts_dir(artifacts_dir)
        self.run_dir = self.artifacts / experiment_id / run_id
        self.fsync_interval = fsync_interval
        self.summary_interval = summary_interval
        self.commit_every = commit_every
        self._uncommitted = 0
        self.maximize = set(maximize)
        self.jsonl = JsonlWriter(self.run_dir, rotate_bytes)
        self.store = HistoryStore(self.artifacts / DB_NAME)
        self.ring_size = ring_size
        self._ring: deque[dict[str, Any]] = deque()  # recent batches, expanded to rows on demand
        self._ring_n = 0
        self.index = LiveIndex(experiment_id, limit=index_limit)
        self.phases: dict[str | None, _PhaseStats] = {}
        self.counters: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.persisted = 0
        self.received = 0
        self.sampled_out = 0
        self.held = 0
        self.bad_batches = 0
        self.started_ts: int | None = None
        self._fsync_timer: threading.Timer | None = None
        self._last_summary = 0.0
        self.last_seq = self.jsonl.last_seq
        self.incarnation = self._recover()

    # --- recovery --------------------------------------------------------------------------------

    def _recover(self) -> int:
        state_path = self.run_dir / "recorder.json"
        state = {}
        if state_path.exists():
            try:
                state = orjson.loads(state_path.read_bytes())
            except orjson.JSONDecodeError:
                log.warning("recorder state unreadable; rebuilding from events", file=str(state_path))
        incarnation = int(state.get("incarnation", 0)) + 1
        self.counters = dict(state.get("counters", {}))
        self.restarts = dict(state.get("restarts", {}))
        self.sampled_out = int(state.get("sampled_out", 0))
        if self.last_seq >= 0:
            db_max = self.store.max_seq(self.run_id)
            chunk: list[dict[str, Any]] = []
            for ev in iter_run(self.run_dir):
                chunk.append(ev)
                if len(chunk) >= 50_000:
                    self._absorb_recovered(chunk, db_max)
                    chunk = []
            self._absorb_recovered(chunk, db_max)
            self.received = self.persisted
            log.info("recorder resumed run", run_id=self.run_id, persisted=self.persisted,
                     last_seq=self.last_seq, incarnation=incarnation)
        self._write_state(incarnation)
        return incarnation

    def _absorb_recovered(self, rows: list[dict[str, Any]], db_max: int) -> None:
        if not rows:
            return
        missing = [r for r in rows if r["seq"] > db_max]
        for i in range(0, len(missing), 1024):
            part = missing[i:i + 1024]
            self._store_batch(rows_to_batch(part, self.experiment_id, self.run_id))
        self.persisted += len(rows)
        by_run = rows_to_batch(rows, self.experiment_id, self.run_id)
        self._ring_push(by_run)
        self.index.append_batch(by_run)
        self._update_stats(by_run)
        if self.started_ts is None:
            self.started_ts = rows[0]["ts"]

    def _write_state(self, incarnation: int | None = None) -> None:
        if incarnation is not None:
            self._incarnation = incarnation
        state = {"incarnation": self._incarnation, "counters": self.counters, "restarts": self.restarts,
                 "sampled_out": self.sampled_out}
        _atomic_write(self.run_dir / "recorder.json", orjson.dumps(state))

    # --- persisting --------------------------------------------------------------------------------

    def handle_events(self, msg: dict[str, Any]) -> None:
        try:
            seq = msg["seq"]
            n = int(msg["n"])
            if len(seq) != n or len(msg["ts"]) != n:
                raise ValueError("column lengths differ from n")
        except (KeyError, TypeError, ValueError) as exc:
            self.bad_batches += 1
            log.warning("malformed events batch dropped", run_id=self.run_id, error=str(exc))
            return
        self._take_counters(msg)
        if "sampling" in msg:
            self.handle_sampling(msg["sampling"])
        keep = None
        if n and int(seq[0]) <= self.last_seq:
            keep = seq > self.last_seq  # a replay after a restart: skip what is on disk
            if not keep.any():
                return
        b = msg if keep is None else select_rows(msg, keep)
        self.jsonl.write(format_batch(b))
        self.jsonl.flush()
        self._store_batch(b)
        m = int(b["n"])
        self.last_seq = int(b["seq"][-1])
        self.persisted += m
        self.received += m
        self._ring_push(b)
        self.index.append_batch(b)
        self._update_stats(b)
        if self.started_ts is None:
            self.started_ts = int(b["ts"][0])
        self._schedule_fsync()

    def _ring_push(self, b: dict[str, Any]) -> None:
        self._ring.append(b)
        self._ring_n += int(b["n"])
        while self._ring and self._ring_n - int(self._ring[0]["n"]) >= self.ring_size:
            self._ring_n -= int(self._ring.popleft()["n"])

    def recent(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` persisted events (at most ``ring_size``), oldest first."""
        n = min(n, self.ring_size)
        out: list[dict[str, Any]] = []
        for b in reversed(self._ring):
            if len(out) >= n:
                break
            out = batch_rows(b) + out
        return [full_event(r) for r in out[-n:]] if n > 0 else []

    def _store_batch(self, b: dict[str, Any]) -> None:
        seq, ts = b["seq"], b["ts"]
        self.store.insert_batch(self.experiment_id, self.run_id, [int(seq[0]), int(seq[-1])],
                                int(ts.min()), int(ts.max()), encode(_wire_fields(b)), n=int(b["n"]))
        self._uncommitted += 1
        if self._uncommitted >= self.commit_every:
            self.store.commit()
            self._uncommitted = 0

    def _take_counters(self, msg: dict[str, Any]) -> None:
        for k, v in (msg.get("counters") or {}).items():
            if isinstance(v, int) and v > self.counters.get(k, -1):
                self.counters[k] = v

    def handle_counters(self, msg: dict[str, Any]) -> None:
        self._take_counters(msg)
        self._write_state()

    def handle_sampling(self, msg: dict[str, Any]) -> None:
        """Cumulative figures from the Sampler: events it dropped, events it still holds."""
        self.sampled_out = max(self.sampled_out, int(msg.get("sampled_out", 0)))
        self.held = int(msg.get("held", 0))

    def handle_note_restart(self, msg: dict[str, Any]) -> None:
        child = str(msg.get("child", "?"))
        self.restarts[child] = self.restarts.get(child, 0) + 1
        self._write_state()

    def _update_stats(self, b: dict[str, Any]) -> None:
        phase_c, ts, vals = b["phase"], b["ts"], b["values"]
        for code in np.unique(phase_c).tolist():
            name = b["phases"][code] if code >= 0 else None
            st = self.phases.get(name)
            if st is None:
                st = self.phases[name] = _PhaseStats()
            m = phase_c == code
            pts = ts[m]
            st.count += int(pts.size)
            st.first_ts = int(pts[0]) if st.first_ts is None else min(st.first_ts, int(pts[0]))
            st.last_ts = int(pts[-1]) if st.last_ts is None else max(st.last_ts, int(pts[-1]))
            for k, col in vals.items():
                x = col[m]
                x = x[~np.isnan(x)]
                if x.size == 0:
                    continue
                lo, hi = float(x.min()), float(x.max())
                st.min[k] = min(st.min.get(k, lo), lo)
                st.max[k] = max(st.max.get(k, hi), hi)
                st.last[k] = float(x[-1])

    def _schedule_fsync(self) -> None:
        if self._fsync_timer is None:
            t = threading.Timer(self.fsync_interval, self.ref.tell, args=({"kind": "fsync"},))
            t.daemon = True
            self._fsync_timer = t
            t.start()

    def _sync(self) -> None:
        self.jsonl.fsync()
        self.store.commit()
        self._uncommitted = 0

    def handle_fsync(self, msg: dict[str, Any]) -> None:
        self._fsync_timer = None
        self._sync()
        if time.monotonic() - self._last_summary >= self.summary_interval:
            self._write_summary()

    def handle_flush(self, msg: dict[str, Any]) -> dict[str, Any]:
        """fsync now; answer what is acknowledged (persisted)."""
        self._sync()
        self._write_summary()
        return {"persisted": self.persisted, "last_seq": self.last_seq}

    # --- summary and queries ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        phases = {}
        ends = [s.last_ts for s in self.phases.values() if s.last_ts is not None]
        for name, st in self.phases.items():
            best = {k: (st.max[k] if k in self.maximize else st.min[k]) for k in st.min}
            phases[name or "-"] = {
                "events": st.count, "first_ts": st.first_ts, "last_ts": st.last_ts,
                "duration_s": (st.last_ts - st.first_ts) / 1e6 if st.first_ts is not None else 0.0,
                "best": best, "min": st.min, "max": st.max, "last": st.last,
            }
        c = self.counters
        published = c.get("published", self.received)
        lost = max(0, published - self.received - self.sampled_out - self.held)
        emitted = c.get("emitted", self.persisted)
        return {
            "schema": SCHEMA_VERSION, "experiment_id": self.experiment_id, "run_id": self.run_id,
            "run_dir": str(self.run_dir), "started_ts": self.started_ts, "ended_ts": max(ends) if ends else None,
            "total_duration_s": (max(ends) - self.started_ts) / 1e6 if ends and self.started_ts else 0.0,
            "phases": phases,
            "events_emitted": emitted, "events_published": published, "events_persisted": self.persisted,
            "events_dropped": c.get("dropped", 0) + lost + self.sampled_out,
            "events_dropped_overflow": c.get("dropped", 0), "events_lost_in_transit": lost,
            "events_sampled_out": self.sampled_out, "events_held_by_sampler": self.held,
            "events_rejected": c.get("rejected", 0),
            "bad_batches": self.bad_batches, "restarts": self.restarts,
            "recorder_incarnation": self._incarnation,
        }

    def _write_summary(self) -> None:
        self._last_summary = time.monotonic()
        s = self.summary()
        _atomic_write(self.run_dir / "summary.json", orjson.dumps(s, option=orjson.OPT_INDENT_2))
        self._write_state()

    def handle_summary(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.summary()

    def handle_recent(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return self.recent(int(msg.get("n", self.ring_size)))

    def handle_query_window(self, msg: dict[str, Any]) -> list[Any]:
        spec, filters = msg["spec"], msg.get("filters")
        if msg.get("source", "live") == "history":
            return self.store.query(self.experiment_id, spec, filters, msg.get("now_us"))
        return self.index.query(spec, filters, msg.get("now_us"))

    def handle_windowed_metrics(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        args = (msg["window_s"], msg["step_s"], msg.get("fields"), msg.get("filters"))
        if msg.get("source", "live") == "history":
            return self.store.windowed_metrics(self.experiment_id, *args)
        return self.index.windowed_metrics(*args)

    def terminate(self, reason: str) -> None:
        if self._fsync_timer is not None:
            self._fsync_timer.cancel()
        try:
            self._sync()
            self.jsonl.close()
            s = self.summary()
            _atomic_write(self.run_dir / "summary.json", orjson.dumps(s, option=orjson.OPT_INDENT_2))
            self._write_state()
            self.store.record_run(self.run_id, self.experiment_id, str(self.run_dir), s["started_ts"],
                                  s["ended_ts"], s)
        finally:
            self.store.close()


_WIRE = ("kind", "experiment_id", "run_id", "n", "seq", "ts", "step", "pass", "name", "phase", "success", "gpu",
         "reason", "params", "names", "phases", "reasons", "param_texts", "values", "sparse")


def _wire_fields(b: dict[str, Any]) -> dict[str, Any]:
    return {k: b[k] for k in _WIRE if k in b}


def summary_best(summary: dict[str, Any], field: str) -> float | None:
    """The best (lowest) value of ``field`` over a RunSummary's phases."""
    bests = [ph.get("best", {}).get(field) for ph in (summary.get("phases") or {}).values()]
    bests = [b for b in bests if isinstance(b, (int, float))]
    return min(bests) if bests else None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
