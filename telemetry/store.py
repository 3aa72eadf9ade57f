"""The embedded history store: one SQLite file (WAL) in the artifacts folder.

Events are stored the way they arrive: one row per batch, holding the columnar batch
(msgpack, the wire format: about a quarter of the JSONL size), its ``seq`` range and its
``ts`` range. An index on ``(experiment_id, ts_lo)``
finds the batches that overlap a time window (B-tree range scan plus the experiment's
largest batch span), and only those are decoded: never a full scan. ``(run_id, seq_lo)``
is the primary key, so a replayed batch is never stored twice.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from actors.messages import decode
from telemetry.query import Window, check_filters, row_matches, rows_columns, windowed_metrics_arrays
from telemetry.schema import batch_rows, full_event

DB_NAME = "history.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    run_id TEXT NOT NULL, seq_lo INTEGER NOT NULL, seq_hi INTEGER NOT NULL, experiment_id TEXT NOT NULL,
    ts_lo INTEGER NOT NULL, ts_hi INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (run_id, seq_lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_exp_ts ON batches (experiment_id, ts_lo);
CREATE TABLE IF NOT EXISTS spans (experiment_id TEXT PRIMARY KEY, max_span INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL, run_dir TEXT, started_ts INTEGER,
    ended_ts INTEGER, summary BLOB
);
"""


def _batch_events(data: bytes) -> list[dict[str, Any]]:
    return [full_event(r) for r in batch_rows(decode(data))]


class HistoryStore:
    """A connection to the history database (thread-safe through a lock)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no history database at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.commit()
        self.db.close()

    # --- writing ----------------------------------------------------------------------------

    def insert_batch(self, experiment_id: str, run_id: str, seqs: Sequence[int], ts_lo: int, ts_hi: int,
                     data: bytes, n: int | None = None) -> None:
        """Store one encoded columnar batch (its events have the given seqs, in order).

        Writes join an open transaction; :meth:`commit` ends it (the Recorder commits every
        ``commit_every`` batches and at every fsync tick: batched transactions).
        """
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO batches VALUES (?,?,?,?,?,?,?,?)",
                            (run_id, seqs[0], seqs[-1], experiment_id, ts_lo, ts_hi, n or len(seqs), data))
            self.db.execute("INSERT INTO spans VALUES (?, ?) ON CONFLICT(experiment_id) DO UPDATE SET "
                            "max_span = MAX(max_span, excluded.max_span)", (experiment_id, ts_hi - ts_lo))

    def commit(self) -> None:
        with self._lock:
            self.db.commit()

    def max_seq(self, run_id: str) -> int:
        v = self.db.execute("SELECT MAX(seq_hi) FROM batches WHERE run_id = ?", (run_id,)).fetchone()[0]
        return -1 if v is None else int(v)

    def record_run(self, run_id: str, experiment_id: str, run_dir: str, started_ts: int | None,
                   ended_ts: int | None, summary: dict[str, Any]) -> None:
        with self._lock, self.db:
            self.db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                "ended_ts=excluded.ended_ts, summary=excluded.summary, started_ts=excluded.started_ts",
                (run_id, experiment_id, run_dir, started_ts, ended_ts, orjson.dumps(summary)),
            )

    # --- reading ----------------------------------------------------------------------------

    def runs(self, experiment_id: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT run_id, experiment_id, run_dir, started_ts, ended_ts, summary FROM runs"
        args: tuple[Any, ...] = ()
        if experiment_id:
            q, args = q + " WHERE experiment_id = ?", (experiment_id,)
        return [{"run_id": r[0], "experiment_id": r[1], "run_dir": r[2], "started_ts": r[3], "ended_ts": r[4],
                 "summary": orjson.loads(r[5]) if r[5] else None}
                for r in self.db.execute(q + " ORDER BY started_ts", args)]

    def _max_span(self, experiment_id: str) -> int:
        r = self.db.execute("SELECT max_span FROM spans WHERE experiment_id = ?", (experiment_id,)).fetchone()
        return -1 if r is None else int(r[0])

    def _events_between(self, experiment_id: str, lo: int | None, hi: int | None) -> list[dict[str, Any]]:
        span = self._max_span(experiment_id)
        if span < 0:
            return []
        sql, args = ["experiment_id = ?"], [experiment_id]
        if lo is not None:
            sql.append("ts_lo >= ? AND ts_hi >= ?")
            args += [lo - span, lo]
        if hi is not None:
            sql.append("ts_lo < ?")
            args.append(hi)
        rows: list[dict[str, Any]] = []
        with self._lock:
            cur = self.db.execute(f"SELECT data FROM batches WHERE {' AND '.join(sql)} ORDER BY ts_lo", args)
            blobs = [b for (b,) in cur]
        for b in blobs:
            rows.extend(r for r in _batch_events(b) if (lo is None or r["ts"] >= lo) and (hi is None or r["ts"] < hi))
        rows.sort(key=lambda r: (r["ts"], r["run_id"], r["seq"]))
        return rows

    def query(self, experiment_id: str, spec: Any, filters: dict[str, Any] | None = None,
              now_us: int | None = None) -> list[Any]:
        """The same window specs and filters as the live index (see :mod:`telemetry.query`)."""
        w = Window(spec, now_us)
        filters = check_filters(filters)
        if w.kind == "sliding":
            rows = [r for r in self._events_between(experiment_id, None, None) if row_matches(r, filters)]
            if not rows:
                return []
            out = []
            for s in range(rows[0]["ts"], rows[-1]["ts"] + 1, w.step_us):
                out.append({"window_start": s, "window_end": s + w.size_us,
                            "events": [r for r in rows if s <= r["ts"] < s + w.size_us]})
            return out
        if w.last_n is not None:
            return self._last_n(experiment_id, w.last_n, filters)
        return [r for r in self._events_between(experiment_id, w.lo, w.hi) if row_matches(r, filters)]

    def _last_n(self, experiment_id: str, n: int, filters: dict[str, Any]) -> list[dict[str, Any]]:
        if n == 0:
            return []
        span = self._max_span(experiment_id)
        got: list[dict[str, Any]] = []
        with self._lock:
            cur = self.db.execute("SELECT ts_lo, ts_hi, data FROM batches WHERE experiment_id = ? "
                                  "ORDER BY ts_lo DESC", (experiment_id,))
            for ts_lo, _ts_hi, data in cur:
                if len(got) >= n:
                    got.sort(key=lambda r: (r["ts"], r["run_id"], r["seq"]))
                    if ts_lo + span < got[-n]["ts"]:
                        break  # no older batch can reach into the newest n
                got.extend(r for r in _batch_events(data) if row_matches(r, filters))
        got.sort(key=lambda r: (r["ts"], r["run_id"], r["seq"]))
        return got[-n:]

    def iter_events(self, experiment_id: str | None = None, run_id: str | None = None,
                    chunk: int = 64) -> Iterator[dict[str, Any]]:
        """Every event of a run (by seq) or of an experiment (by batch start time), a few
        batches at a time: memory stays bounded whatever the size."""
        if run_id is not None:
            q, key = "SELECT seq_lo, data FROM batches WHERE run_id = ? AND seq_lo > ? ORDER BY seq_lo LIMIT ?", run_id
        elif experiment_id is not None:
            q = ("SELECT ts_lo, run_id, seq_lo, data FROM batches WHERE experiment_id = ? "
                 "AND (ts_lo, run_id, seq_lo) > (?, ?, ?) ORDER BY ts_lo, run_id, seq_lo LIMIT ?")
            key = experiment_id
        else:
            raise ValueError("iter_events needs experiment_id or run_id")
        last: tuple[Any, ...] = (-1,) if run_id is not None else (-(2**62), "", -1)
        while True:
            with self._lock:
                rows = self.db.execute(q, (key, *last, chunk)).fetchall()
            if not rows:
                return
            for r in rows:
                yield from _batch_events(r[-1])
            last = tuple(rows[-1][:-1])

    def windowed_metrics(self, experiment_id: str, window_s: float, step_s: float,
                         fields: list[str] | None = None,
                         filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        filters = check_filters(filters)
        rows = [r for r in self._events_between(experiment_id, None, None) if row_matches(r, filters)]
        ts, cols = rows_columns(rows)
        if fields is not None:
            cols = {k: v for k, v in cols.items() if k in fields}
        return windowed_metrics_arrays(ts, cols, window_s, step_s)
