"""The embedded history store: one SQLite file (WAL) in the artifacts folder.

Events are stored the way they arrive: one row per batch, holding the columnar batch
(msgpack, the wire format: about a quarter of the JSONL size), its ``seq`` range and its
``ts`` range. Indexes on ``(experiment_id, ts_lo)`` and ``(run_id, ts_lo)`` find the
batches that overlap a time window (B-tree range scan plus the experiment's largest batch
span), and only those are decoded: never a full scan. Filters are applied to a decoded
batch's columns, and only the events that pass become dicts. ``(run_id, seq_lo)`` is the
primary key, so a replayed batch is never stored twice.

Queries take the limits of :mod:`telemetry.query` and an optional ``run_id`` (one run's
events: what that run's Recorder answers live).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.messages import decode
from telemetry import query as tq  # the query kit the live index shares
from telemetry.schema import CODED_COLUMNS, batch_rows, full_event, select_rows

DB_NAME = "history.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    run_id TEXT NOT NULL, seq_lo INTEGER NOT NULL, seq_hi INTEGER NOT NULL, experiment_id TEXT NOT NULL,
    ts_lo INTEGER NOT NULL, ts_hi INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (run_id, seq_lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_exp_ts ON batches (experiment_id, ts_lo);
CREATE INDEX IF NOT EXISTS batches_run_ts ON batches (run_id, ts_lo);
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

    def insert_batch(
        self,
        experiment_id: str,
        run_id: str,
        seqs: Sequence[int],
        ts_lo: int,
        ts_hi: int,
        data: bytes,
        n: int | None = None,
    ) -> None:
        """Store one encoded columnar batch (its events have the given seqs, in order).

        Writes join an open transaction; :meth:`commit` ends it (the Recorder commits every
        ``commit_every`` batches and at every fsync tick: batched transactions).
        """
        with self._lock:
            self.db.execute(
                "INSERT OR IGNORE INTO batches VALUES (?,?,?,?,?,?,?,?)",
                (run_id, seqs[0], seqs[-1], experiment_id, ts_lo, ts_hi, n or len(seqs), data),
            )
            self.db.execute(
                "INSERT INTO spans VALUES (?, ?) ON CONFLICT(experiment_id) DO UPDATE SET "
                "max_span = MAX(max_span, excluded.max_span)",
                (experiment_id, ts_hi - ts_lo),
            )

    def commit(self) -> None:
        with self._lock:
            self.db.commit()

    def rollback(self) -> None:
        """Drop the writes of the open transaction (the Recorder's roll-back after a failed write)."""
        with self._lock:
            self.db.rollback()

    def max_seq(self, run_id: str) -> int:
        v = self.db.execute("SELECT MAX(seq_hi) FROM batches WHERE run_id = ?", (run_id,)).fetchone()[0]
        return -1 if v is None else int(v)

    def record_run(
        self,
        run_id: str,
        experiment_id: str,
        run_dir: str,
        started_ts: int | None,
        ended_ts: int | None,
        summary: dict[str, Any],
    ) -> None:
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
        return [
            {
                "run_id": r[0],
                "experiment_id": r[1],
                "run_dir": r[2],
                "started_ts": r[3],
                "ended_ts": r[4],
                "summary": orjson.loads(r[5]) if r[5] else None,
            }
            for r in self.db.execute(q + " ORDER BY started_ts", args)
        ]

    def _max_span(self, experiment_id: str) -> int:
        r = self.db.execute("SELECT max_span FROM spans WHERE experiment_id = ?", (experiment_id,)).fetchone()
        return -1 if r is None else int(r[0])

    def _blobs(
        self, experiment_id: str, run_id: str | None, lo: int | None, hi: int | None, max_scan: int
    ) -> list[bytes]:
        """The stored batches that can hold events in ``[lo, hi)``, oldest first (bounded: ``max_scan``)."""
        span = self._max_span(experiment_id)
        if span < 0:
            return []
        sql, args = ["experiment_id = ?"], [experiment_id]
        if run_id is not None:
            sql.append("run_id = ?")
            args.append(run_id)
        if lo is not None:
            sql.append("ts_lo >= ? AND ts_hi >= ?")
            args += [lo - span, lo]
        if hi is not None:
            sql.append("ts_lo < ?")
            args.append(hi)
        where = " AND ".join(sql)
        with self._lock:
            total = self.db.execute(f"SELECT COALESCE(SUM(n), 0) FROM batches WHERE {where}", args).fetchone()[0]
            tq.check_rows(int(total), max_scan, "scan")
            return [b for (b,) in self.db.execute(f"SELECT data FROM batches WHERE {where} ORDER BY ts_lo", args)]

    def _selected(
        self, batches: list[dict[str, Any]], lo: int | None, hi: int | None, filters: dict[str, Any], max_rows: int
    ) -> list[tuple[dict[str, Any], np.ndarray]]:
        """Each batch with the mask of its events in ``[lo, hi)`` that pass the filters (bounded)."""
        out = [(b, m) for b in batches if (m := batch_mask(b, lo, hi, filters)).any()]
        tq.check_rows(sum(int(m.sum()) for _, m in out), max_rows)
        return out

    def _rows(
        self,
        experiment_id: str,
        run_id: str | None,
        lo: int | None,
        hi: int | None,
        filters: dict[str, Any],
        max_rows: int,
        max_scan: int,
    ) -> list[dict[str, Any]]:
        batches = [decode(d) for d in self._blobs(experiment_id, run_id, lo, hi, max_scan)]
        rows = [
            full_event(r)
            for b, m in self._selected(batches, lo, hi, filters, max_rows)
            for r in batch_rows(select_rows(b, m))
        ]
        rows.sort(key=_order)
        return rows

    def query(
        self,
        experiment_id: str,
        spec: Any,
        filters: dict[str, Any] | None = None,
        now_us: int | None = None,
        *,
        run_id: str | None = None,
        max_rows: int = tq.MAX_ROWS,
        max_windows: int = tq.MAX_WINDOWS,
        max_scan: int = tq.MAX_SCAN,
    ) -> list[Any]:
        """The same window specs, filters and limits as the live index (see :mod:`telemetry.query`).

        ``run_id`` keeps the answer to one run (what a run's Recorder answers live); without
        it the answer spans every run of the experiment. Raises
        :class:`~telemetry.query.QueryError` / :class:`~telemetry.query.QueryLimitError`.
        """
        w = tq.Window(spec, now_us)
        filters = tq.check_filters(filters)
        if w.kind == "sliding":
            rows = self._rows(experiment_id, run_id, None, None, filters, max_rows, max_scan)
            ts = np.array([r["ts"] for r in rows], dtype=np.int64)
            starts, lo, hi = tq.plan_windows(ts, w.size_us, w.step_us, max_windows, max_rows)
            return [
                {"window_start": s, "window_end": s + w.size_us, "events": rows[a:b]}
                for s, a, b in zip(starts.tolist(), lo.tolist(), hi.tolist(), strict=True)
            ]
        if w.last_n is not None:
            return self._last_n(experiment_id, run_id, w.last_n, filters, max_rows, max_scan)
        return self._rows(experiment_id, run_id, w.lo, w.hi, filters, max_rows, max_scan)

    def _last_n(
        self, experiment_id: str, run_id: str | None, n: int, filters: dict[str, Any], max_rows: int, max_scan: int
    ) -> list[dict[str, Any]]:
        if n == 0:
            return []
        if n > max_rows:  # count first (masks only): the answer holds min(n, matching) events
            blobs = self._blobs(experiment_id, run_id, None, None, max_scan)
            matching = sum(int(batch_mask(decode(d), None, None, filters).sum()) for d in blobs)
            tq.check_rows(min(n, matching), max_rows)
        span = self._max_span(experiment_id)
        sql, args = "experiment_id = ?", [experiment_id]
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", [*args, run_id]
        got: list[dict[str, Any]] = []
        scanned = 0
        with self._lock:
            cur = self.db.execute(f"SELECT ts_lo, n, data FROM batches WHERE {sql} ORDER BY ts_lo DESC", args)
            for ts_lo, k, data in cur:
                if len(got) >= n:
                    got.sort(key=_order)
                    if ts_lo + span < got[-n]["ts"]:
                        break  # no older batch can reach into the newest n
                scanned += k
                tq.check_rows(scanned, max_scan, "scan")
                b = decode(data)
                got.extend(full_event(r) for r in batch_rows(select_rows(b, batch_mask(b, None, None, filters))))
        got.sort(key=_order)
        return got[-n:]

    def iter_events(
        self, experiment_id: str | None = None, run_id: str | None = None, chunk: int = 64
    ) -> Iterator[dict[str, Any]]:
        """Every event of a run (by seq) or of an experiment (by batch start time), a few
        batches at a time: memory stays bounded whatever the size."""
        if run_id is not None:
            q, key = "SELECT seq_lo, data FROM batches WHERE run_id = ? AND seq_lo > ? ORDER BY seq_lo LIMIT ?", run_id
        elif experiment_id is not None:
            q = (
                "SELECT ts_lo, run_id, seq_lo, data FROM batches WHERE experiment_id = ? "
                "AND (ts_lo, run_id, seq_lo) > (?, ?, ?) ORDER BY ts_lo, run_id, seq_lo LIMIT ?"
            )
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

    def windowed_metrics(
        self,
        experiment_id: str,
        window_s: float,
        step_s: float,
        fields: list[str] | None = None,
        filters: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        max_windows: int = tq.MAX_WINDOWS,
        max_scan: int = tq.MAX_SCAN,
    ) -> list[dict[str, Any]]:
        """Per-window metrics, as :meth:`LiveIndex.windowed_metrics` (columnar: no event dicts)."""
        tq.check_step(window_s, "window_s")
        tq.check_step(step_s, "step_s")
        filters = tq.check_filters(filters)
        batches = [decode(d) for d in self._blobs(experiment_id, run_id, None, None, max_scan)]
        parts = self._selected(batches, None, None, filters, max_scan)
        keys = sorted({k for b, _ in parts for k in b["values"]})
        run_code = {r: i for i, r in enumerate(sorted({b["run_id"] for b, _ in parts}))}

        def column(get: Callable[[dict[str, Any], np.ndarray], np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate([get(b, m) for b, m in parts]) if parts else np.empty(0, dtype=dtype)

        ts = column(lambda b, m: b["ts"][m], np.int64)
        order = np.lexsort(
            (
                column(lambda b, m: b["seq"][m], np.int64),
                column(lambda b, m: np.full(int(m.sum()), run_code[b["run_id"]]), np.int64),
                ts,
            )
        )
        cols = {
            k: column(
                lambda b, m, k=k: b["values"][k][m] if k in b["values"] else np.full(int(m.sum()), np.nan), np.float64
            )[order]
            for k in keys
        }
        keys = tq.present_fields(cols, fields)
        cols = {k: cols.get(k, np.full(ts.size, np.nan)) for k in keys}
        return tq.windowed_metrics_arrays(ts[order], cols, window_s, step_s, max_windows=max_windows)


def _order(r: dict[str, Any]) -> tuple[int, str, int]:
    return r["ts"], r["run_id"], r["seq"]


def batch_mask(b: dict[str, Any], lo: int | None, hi: int | None, filters: dict[str, Any]) -> np.ndarray:
    """The events of a decoded batch in ``[lo, hi)`` that pass the filters (columnar)."""
    ts = b["ts"]
    m = np.ones(ts.size, dtype=bool)
    if lo is not None:
        m &= ts >= lo
    if hi is not None:
        m &= ts < hi
    for k, want in filters.items():
        if k in ("name", "phase"):
            m &= tq.code_mask(b[k], b[CODED_COLUMNS[k]], want)
        elif k == "success":
            m &= b["success"] == (-1 if want is None else int(bool(want)))
        elif k == "run_id" and b["run_id"] != want:
            m[:] = False
    pf = tq.param_filters(filters)
    if pf and m.any():
        texts = b.get("param_texts", [])
        codes = b["params"] if "params" in b else np.full(ts.size, -1)
        m[m] &= tq.param_mask(codes[m], lambda c: orjson.loads(texts[c]), pf)
    return m
