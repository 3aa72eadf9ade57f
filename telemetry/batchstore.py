"""What every history store shares: batches stored as they arrive, and the queries over them.

A history store keeps one row per event batch: the columnar batch in the wire format
(msgpack), its ``seq`` range and its ``ts`` range, plus each experiment's largest batch span
(``spans``) and each ended run's summary (``runs``). :class:`BatchStore` answers every query
from those rows, whatever database holds them: a store supplies a reader (:meth:`_read`,
SQL with ``?`` placeholders) and its writes; the SQL here is the subset that SQLite and
PostgreSQL read alike, so both stores give the same answer, or the same error, to a query.

A time window finds the batches that overlap it (index range scan on ``ts_lo`` widened by
the experiment's largest span) and decodes only those; filters apply to a decoded batch's
columns, and only the events that pass become dicts. Queries take the limits of
:mod:`telemetry.query` and an optional ``run_id`` (one run's events: what that run's
Recorder answers live).

The errors a store raises besides its driver's own are here too, so that a writer (the
Recorder) can tell a server that went away (:class:`HistoryUnavailable`: retry later) from
a store that cannot be used at all, without importing any driver.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import orjson

from actors.log import get_logger
from actors.messages import DecodeError, decode
from telemetry import query as tq  # the query kit the live index shares
from telemetry.schema import (
    CODED_COLUMNS,
    SchemaError,
    batch_rows,
    check_batch,
    full_event,
    select_rows,
    stored_batch,
)

log = get_logger("telemetry.batchstore")

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The range of the stores' integer columns (SQLite ``INTEGER``, PostgreSQL ``BIGINT``)."""


def span_of(ts_lo: int, ts_hi: int) -> int:
    """A batch's time span for ``spans.max_span``, clamped to 64 bits: the schema lets ``ts``
    take any 64-bit value, so ``ts_hi - ts_lo`` can need 65 (a wider span reads the same: every
    batch before the window's end)."""
    return min(ts_hi - ts_lo, INT64_MAX)


def _int64(v: int) -> int:
    """A query bound clamped to 64 bits (``lo - span`` can fall below what a column can hold)."""
    return max(INT64_MIN, min(v, INT64_MAX))


class HistoryError(RuntimeError):
    """The history cannot be used (the message names it, its password masked, and why)."""


class HistoryConfigError(HistoryError, ValueError):
    """A history target that names no store this version can open (a malformed URL, say)."""


class HistoryConnectError(HistoryError):
    """The history's server refused or could not be reached at open (unreachable, auth failure)."""


class HistoryUnavailable(HistoryError):
    """The history's server went away after it was opened. Writes not yet committed are kept
    by the store and go in with the next :meth:`commit` that reaches it: retry later."""


class HistoryGone(HistoryUnavailable):
    """The history this store opened can take no more of a run's events: its SQLite file was
    deleted or replaced by another file after it was opened (what this store writes from now
    on reaches no history anyone reads), or it is damaged (:class:`HistoryDamaged`). Waiting
    will not bring it back: the run's files hold the events, and ``crucible sync`` rebuilds
    the history from them."""


class HistoryDamaged(HistoryGone):
    """The history's database is damaged: SQLite's "database disk image is malformed" (or a
    file that is no longer a database), PostgreSQL's corrupted data or index. A problem of the
    history, not of the disk the run writes to: the run's files still take its events. The
    message names the history; once it is repaired or moved aside, ``crucible sync`` fills it
    from the run folders."""


Row = tuple[Any, ...]
"""A row of the ``batches`` table: ``(run_id, seq_lo, seq_hi, experiment_id, ts_lo, ts_hi, n, data)``."""

OVERLAP_SQL = (
    "SELECT seq_lo, seq_hi FROM (SELECT seq_lo, seq_hi FROM batches WHERE run_id = ? AND seq_lo < ? "
    "ORDER BY seq_lo DESC LIMIT 1) AS before_lo "
    "UNION ALL SELECT seq_lo, seq_hi FROM batches WHERE run_id = ? AND seq_lo >= ? AND seq_lo <= ?"
)
"""The stored batches of a run that can overlap ``[lo, hi]`` (arguments ``run, lo, run, lo, hi``):
stored batches never overlap, so only the last one starting before ``lo`` can reach into it,
besides those starting inside it. Two probes of the ``(run_id, seq_lo)`` key, whatever the run's size."""


def merge_rows(rows: Iterable[Row], stored: Callable[[str, int, int], Iterable[tuple[int, int]]]) -> list[Row]:
    """The rows to insert so that the history holds every event of ``rows`` once, and stored
    batches never overlap: a row whose seq range meets no stored batch goes in as it is; one
    that a stored batch covers whole is left out; one that overlaps stored batches is cut into
    the parts between them (its events that no stored batch holds, each part a batch of its own).

    ``stored(run_id, lo, hi)``: the stored ``(seq_lo, seq_hi)`` ranges of a run that overlap
    ``[lo, hi]`` (:data:`OVERLAP_SQL`). A commit calls this in its write transaction, so what it
    reads cannot change before the rows go in. The rows are taken in key order, each
    checked against the stored batches and the parts taken before it.

    A batch sent again after a commit whose answer was lost, re-read from the files with other
    boundaries than the batches it replaces, is stored exactly once this way: comparing the
    key ``(run_id, seq_lo)`` alone would keep the stored batch and drop the rest of the new one.
    """
    out: list[Row] = []
    by_run: dict[str, list[Row]] = {}
    for r in sorted(rows, key=lambda r: (r[0], r[1])):
        by_run.setdefault(r[0], []).append(r)
    for run_id, run_rows in by_run.items():
        lo, hi = run_rows[0][1], max(r[2] for r in run_rows)
        have = sorted((int(a), int(b)) for a, b in stored(run_id, lo, hi) if b >= lo and a <= hi)
        for r in run_rows:
            parts = _uncovered(r, have)
            for p in parts:
                bisect.insort(have, (p[1], p[2]))
            out += parts
    return out


def _uncovered(row: Row, have: list[tuple[int, int]]) -> list[Row]:
    """The parts of ``row`` that the sorted, disjoint ranges ``have`` do not hold (see :func:`merge_rows`)."""
    run_id, lo, hi = row[0], row[1], row[2]
    meets = []
    for i in range(max(bisect.bisect_right(have, (lo, INT64_MAX)) - 1, 0), len(have)):  # from the last start <= lo
        a, z = have[i]
        if a > hi:
            break
        if z >= lo:
            meets.append((a, z))
    if not meets:
        return [row]
    if meets[0][0] <= lo and meets[0][1] >= hi:
        return []  # held whole (a batch sent again as it was)
    try:
        b = decode(bytes(row[7]))
        check_batch(b)
    except (DecodeError, SchemaError) as exc:
        why = f"a batch of run {run_id!r} (seq {lo}..{hi}) overlaps stored ones and cannot be read: {exc}"
        raise HistoryError(why) from None
    seq = np.asarray(b["seq"], dtype=np.int64)
    los = np.array([a for a, _ in meets], dtype=np.int64)
    his = np.array([z for _, z in meets], dtype=np.int64)
    gap = np.searchsorted(los, seq, side="right")  # the gap between stored ranges each event falls in
    held = (gap > 0) & (seq <= his[np.maximum(gap - 1, 0)])
    parts: list[Row] = []
    for g in np.unique(gap[~held]).tolist():
        keep = ~held & (gap == g)
        part = select_rows(b, keep)
        s, ts = part["seq"], part["ts"]
        parts.append(
            (run_id, int(s[0]), int(s[-1]), row[3], int(ts.min()), int(ts.max()), int(part["n"]), stored_batch(part))
        )
    return parts


class HeldSeqs:
    """Whether a stored batch holds a seq, asked for seqs in increasing order: a walk along
    the run's stored ranges (:meth:`BatchStore.seq_ranges`: in ``seq_lo`` order, disjoint),
    read as the walk needs them. What the history lacks of a run is told this way (a hole in
    the middle as well as a tail) by ``crucible sync`` and by a Recorder that reopens the run."""

    def __init__(self, ranges: Iterator[tuple[int, int]]) -> None:
        self._ranges = ranges
        self._at = next(ranges, None)

    def holds(self, seq: int) -> bool:
        while self._at is not None and self._at[1] < seq:
            self._at = next(self._ranges, None)
        return self._at is not None and self._at[0] <= seq


class Reader(Protocol):
    """Runs one SQL statement (``?`` placeholders); ``stream`` for a large answer read lazily."""

    def __call__(self, sql: str, args: Sequence[Any] = (), *, stream: bool = False) -> Any: ...


class BatchStore:
    """The queries over stored batches (see the module docs); subclasses store and read them."""

    skipped_batches = 0
    """Damaged batches (not msgpack, or not a batch's shape) the reads of this store skipped."""

    _RUNS_SQL = "SELECT run_id, experiment_id, run_dir, started_ts, ended_ts, summary FROM runs"
    _RUNS_ORDER = " ORDER BY started_ts"

    def _read(self) -> contextlib.AbstractContextManager[Reader]:
        """A reader for one consistent read (a lock, or a connection taken from a pool)."""
        raise NotImplementedError

    # --- the writes -----------------------------------------------------------------------------

    _pending: list[tuple[Any, ...]]
    """Batches kept for the next :meth:`commit`, as rows of the ``batches`` table."""
    _pending_lock: threading.Lock
    """Guards ``_pending`` (and whatever else a store's commit must not meet half-done)."""

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
        """Keep one encoded columnar batch (its events have the given seqs, in order) for the
        next :meth:`commit`: it is stored only once that returns. The Recorder commits every
        ``commit_every`` batches and at every fsync tick."""
        row = (run_id, int(seqs[0]), int(seqs[-1]), experiment_id, int(ts_lo), int(ts_hi), n or len(seqs), data)
        with self._pending_lock:
            self._pending.append(row)

    @property
    def pending(self) -> int:
        """Batches kept for the next commit."""
        return len(self._pending)

    # --- the writes each store implements -------------------------------------------------------

    def commit(self) -> int:
        """Store the kept batches in one transaction; return the events it stored. Events the
        history holds already are skipped and not counted, whatever batches they came in
        (:func:`merge_rows`): a batch sent again is stored once, and nothing it adds is lost."""
        raise NotImplementedError

    def rollback(self) -> None:
        """Drop the writes not yet committed."""
        raise NotImplementedError

    def record_run(
        self,
        run_id: str,
        experiment_id: str,
        run_dir: str,
        started_ts: int | None,
        ended_ts: int | None,
        summary: dict[str, Any],
    ) -> None:
        raise NotImplementedError

    def drop_batches(self, run_id: str, seq_los: Sequence[int]) -> int:
        """Delete the run's stored batches that start at these seqs, in one transaction (the
        repair of damaged ones: ``crucible sync --verify`` sends their events again from the
        run's files); return how many were deleted."""
        raise NotImplementedError

    def as_stored(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary as :meth:`record_run` stores it, hence as :meth:`runs` reads it back
        (PostgreSQL writes out the NUL characters its JSONB cannot hold)."""
        return summary

    def close(self) -> None:
        raise NotImplementedError

    # --- reading ----------------------------------------------------------------------------

    def max_seq(self, run_id: str) -> int:
        """The last committed ``seq`` of a run, -1 if none."""
        with self._read() as q:
            v = q("SELECT MAX(seq_hi) FROM batches WHERE run_id = ?", (run_id,)).fetchone()[0]
        return -1 if v is None else int(v)

    def seq_ranges(self, run_id: str, page: int = 10_000) -> Iterator[tuple[int, int]]:
        """The ``(seq_lo, seq_hi)`` of a run's stored batches, by ``seq_lo`` (a page at a time:
        memory stays bounded whatever the run's size)."""
        last = -1
        while True:
            with self._read() as q:
                rows = q(
                    "SELECT seq_lo, seq_hi FROM batches WHERE run_id = ? AND seq_lo > ? ORDER BY seq_lo LIMIT ?",
                    (run_id, last, page),
                ).fetchall()
            if not rows:
                return
            for lo, hi in rows:
                yield int(lo), int(hi)
            last = int(rows[-1][0])

    def damaged_batches(self, run_id: str, page: int = 64) -> Iterator[DamagedBatch]:
        """The run's stored batches that no reader can use as this run's, by ``seq_lo``: each
        that is not a batch (not bytes, not msgpack, not a batch's shape), holds no events,
        holds another run's, or whose events are not what its row says (their seqs, their
        count). Every batch of the run is read and decoded, a page at a time: as long as
        reading the run."""
        last = -1
        while True:
            with self._read() as q:
                rows = q(
                    "SELECT seq_lo, seq_hi, n, data FROM batches WHERE run_id = ? AND seq_lo > ? "
                    "ORDER BY seq_lo LIMIT ?",
                    (run_id, last, page),
                ).fetchall()
            if not rows:
                return
            for lo, hi, n, data in rows:
                lo, hi, n = int(lo), int(hi), int(n)
                b, why = _decoded(data)
                seqs: list[int] = []
                if b is not None:
                    seqs = [int(x) for x in b["seq"]]
                    if not seqs:
                        why = "holds no events"
                    elif b.get("run_id") != run_id:
                        why = f"holds run {str(b.get('run_id'))[:80]!r}'s events"
                    elif len(seqs) != n or seqs[0] != lo or seqs[-1] != hi:
                        why = f"holds {len(seqs)} event(s), seq {seqs[0]}..{seqs[-1]}: not its row's"
                if why is not None:
                    yield DamagedBatch(lo, hi, n, why, seqs if b is not None and b.get("run_id") == run_id else [])
            last = int(rows[-1][0])

    def run_owner(self, run_id: str) -> tuple[str, str | None] | None:
        """The experiment (and, once recorded, the folder) the history holds a run id for: its
        events' experiment, else its ``runs`` row's; None if it holds nothing of it. The history
        keys runs by id alone, so a second folder of the same id is another run it cannot hold."""
        with self._read() as q:
            ev = q("SELECT experiment_id FROM batches WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
            row = q("SELECT experiment_id, run_dir FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if ev is not None:
            return ev[0], (row[1] if row is not None and row[0] == ev[0] else None)
        return None if row is None else (row[0], row[1])

    def runs(self, experiment_id: str | None = None) -> list[dict[str, Any]]:
        """The ended runs (one row each, with the final summary), oldest first."""
        sql, args = self._RUNS_SQL, ()
        if experiment_id:
            sql, args = sql + " WHERE experiment_id = ?", (experiment_id,)
        with self._read() as q:
            rows = q(sql + self._RUNS_ORDER, args).fetchall()
        return [
            {
                "run_id": r[0],
                "experiment_id": r[1],
                "run_dir": r[2],
                "started_ts": r[3],
                "ended_ts": r[4],
                "summary": self._summary(r[0], r[5]),
            }
            for r in rows
        ]

    def _summary(self, run_id: str, text: bytes | str | None) -> dict[str, Any] | None:
        """A run's stored summary; None (with a warning) for one that is not a JSON object:
        the readers then take the run's figures from its folder."""
        if not text:
            return None
        try:
            summary = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            summary, why = None, str(exc)
        else:
            why = f"a JSON {type(summary).__name__}, not an object"
        if isinstance(summary, dict):
            return summary
        log.warning("skipping a damaged run summary in the history", store=repr(self), run_id=run_id, error=why)
        return None

    def _max_span(self, q: Reader, experiment_id: str) -> int:
        r = q("SELECT max_span FROM spans WHERE experiment_id = ?", (experiment_id,)).fetchone()
        return -1 if r is None else int(r[0])

    def _batches(
        self, experiment_id: str, run_id: str | None, lo: int | None, hi: int | None, max_scan: int
    ) -> list[dict[str, Any]]:
        """The stored batches that can hold events in ``[lo, hi)``, decoded, oldest first
        (bounded: ``max_scan``; damaged ones skipped)."""
        with self._read() as q:
            span = self._max_span(q, experiment_id)
            if span < 0:
                return []
            sql, args = ["experiment_id = ?"], [experiment_id]
            if run_id is not None:
                sql.append("run_id = ?")
                args.append(run_id)
            if lo is not None:
                sql.append("ts_lo >= ? AND ts_hi >= ?")
                args += [_int64(lo - span), _int64(lo)]
            if hi is not None:
                sql.append("ts_lo < ?")
                args.append(_int64(hi))
            where = " AND ".join(sql)
            total = q(f"SELECT COALESCE(SUM(n), 0) FROM batches WHERE {where}", args).fetchone()[0]
            tq.check_rows(int(total), max_scan, "scan")
            rows = q(f"SELECT run_id, seq_lo, data FROM batches WHERE {where} ORDER BY ts_lo", args).fetchall()
        return [b for r in rows if (b := self._batch(*r)) is not None]

    def _batch(self, run_id: str, seq_lo: int, data: bytes) -> dict[str, Any] | None:
        """One stored batch decoded and checked; None, with a warning, for one that is damaged
        (not msgpack, or not the shape of a batch): readers skip it, as they skip a bad JSONL
        line, and :attr:`skipped_batches` counts it."""
        b, why = _decoded(data)
        if b is None:
            self.skipped_batches += 1
            log.warning("skipping a damaged history batch", store=repr(self), run_id=run_id, seq_lo=seq_lo, error=why)
        return b

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
        batches = self._batches(experiment_id, run_id, lo, hi, max_scan)
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
        max_scan: int | None = None,
    ) -> list[Any]:
        """The same window specs, filters and limits as the live index (see :mod:`telemetry.query`).

        ``run_id`` keeps the answer to one run (what a run's Recorder answers live); without
        it the answer spans every run of the experiment. Raises
        :class:`~telemetry.query.QueryError` / :class:`~telemetry.query.QueryLimitError`.
        ``max_scan`` None: :data:`telemetry.query.MAX_SCAN` as it is when the query runs.
        """
        max_scan = tq.MAX_SCAN if max_scan is None else max_scan
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
            batches = self._batches(experiment_id, run_id, None, None, max_scan)
            matching = sum(int(batch_mask(b, None, None, filters).sum()) for b in batches)
            tq.check_rows(min(n, matching), max_rows)
        sql, args = "experiment_id = ?", [experiment_id]
        if run_id is not None:
            sql, args = sql + " AND run_id = ?", [*args, run_id]
        got: list[dict[str, Any]] = []
        scanned = 0
        with self._read() as q:
            span = self._max_span(q, experiment_id)
            cur = q(
                f"SELECT ts_lo, n, run_id, seq_lo, data FROM batches WHERE {sql} ORDER BY ts_lo DESC", args, stream=True
            )
            for ts_lo, k, rid, seq_lo, data in cur:
                if len(got) >= n:
                    got.sort(key=_order)
                    if ts_lo + span < got[-n]["ts"]:
                        break  # no older batch can reach into the newest n
                scanned += k
                tq.check_rows(scanned, max_scan, "scan")
                b = self._batch(rid, seq_lo, data)
                if b is None:
                    continue
                got.extend(full_event(r) for r in batch_rows(select_rows(b, batch_mask(b, None, None, filters))))
        got.sort(key=_order)
        return got[-n:]

    def iter_events(
        self, experiment_id: str | None = None, run_id: str | None = None, chunk: int = 64
    ) -> Iterator[dict[str, Any]]:
        """Every event of a run (by seq) or of an experiment (by batch start time), a few
        batches at a time: memory stays bounded whatever the size."""
        if run_id is not None:
            sql = "SELECT run_id, seq_lo, data FROM batches WHERE run_id = ? AND seq_lo > ? ORDER BY seq_lo LIMIT ?"
            key = run_id
        elif experiment_id is not None:
            sql = (
                "SELECT ts_lo, run_id, seq_lo, data FROM batches WHERE experiment_id = ? "
                "AND (ts_lo, run_id, seq_lo) > (?, ?, ?) ORDER BY ts_lo, run_id, seq_lo LIMIT ?"
            )
            key = experiment_id
        else:
            raise ValueError("iter_events needs experiment_id or run_id")
        last: tuple[Any, ...] = (-1,) if run_id is not None else (INT64_MIN, "", -1)
        while True:
            with self._read() as q:
                rows = q(sql, (key, *last, chunk)).fetchall()
            if not rows:
                return
            for r in rows:
                b = self._batch(*r[-3:])  # run_id, seq_lo, data
                if b is not None:
                    yield from (full_event(e) for e in batch_rows(b))
            last = tuple(rows[-1][:-1]) if run_id is None else (rows[-1][1],)

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
        max_scan: int | None = None,
    ) -> list[dict[str, Any]]:
        """Per-window metrics, as :meth:`LiveIndex.windowed_metrics` (columnar: no event dicts)."""
        max_scan = tq.MAX_SCAN if max_scan is None else max_scan
        tq.check_step(window_s, "window_s")
        tq.check_step(step_s, "step_s")
        filters = tq.check_filters(filters)
        batches = self._batches(experiment_id, run_id, None, None, max_scan)
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


class DamagedBatch(NamedTuple):
    """A stored batch no reader can use as its run's (:meth:`BatchStore.damaged_batches`)."""

    seq_lo: int  # its row's key and claims...
    seq_hi: int
    n: int
    why: str
    seqs: list[int]  # ...and the seqs its bytes hold of this run (empty: none readable)


def _decoded(data: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A stored batch's bytes decoded and checked as a live batch is: (the batch, None), or
    (None, why) for a value that is not bytes (SQLite lets a BLOB column hold text), not
    msgpack, or not a batch's shape."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, f"stored as {type(data).__name__}, not bytes"
    try:
        b = decode(bytes(data))
        check_batch(b)
    except (DecodeError, SchemaError) as exc:
        return None, str(exc)
    return b, None


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
