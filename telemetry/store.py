"""The embedded history store: one SQLite file (WAL) in the artifacts folder.

Events are stored the way they arrive: one row per batch, holding the columnar batch
(msgpack, the wire format: about a quarter of the JSONL size), its ``seq`` range and its
``ts`` range. Indexes on ``(experiment_id, ts_lo)`` and ``(run_id, ts_lo)`` find the
batches that overlap a time window (B-tree range scan plus the experiment's largest batch
span), and only those are decoded: never a full scan. ``(run_id, seq_lo)`` is the primary
key, and a commit stores only the events no stored batch holds (by seq range, under the write
lock: :func:`~telemetry.batchstore.merge_rows`), so a replayed batch is never stored twice,
whatever boundaries it comes with, and stored batches never overlap.

The file is the history only while it is the one this store opened: a commit (or a run's
record) that finds it deleted or replaced by another file (its device and inode compared,
one ``stat``) raises :class:`~telemetry.batchstore.HistoryGone`, as what it wrote went into
a file no one will read.

A file SQLite finds damaged ("database disk image is malformed", ``SQLITE_CORRUPT``; "file
is not a database", ``SQLITE_NOTADB``) on a read or a write raises
:class:`~telemetry.batchstore.HistoryDamaged`, which names the file: the history's problem,
not the disk's (a full disk, an I/O error stay ``sqlite3`` errors: storage failures).

The queries are :class:`~telemetry.batchstore.BatchStore`'s, shared with the PostgreSQL
store (:mod:`telemetry.store_pg`); :func:`telemetry.history.open_history` picks the store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from actors.files import locked
from telemetry.batchstore import (
    OVERLAP_SQL,
    BatchStore,
    HistoryConnectError,
    HistoryDamaged,
    HistoryGone,
    HistoryUnavailable,
    Reader,
    batch_mask,
    merge_rows,
    span_of,
)

__all__ = ["BUSY_TIMEOUT_S", "DB_NAME", "HistoryStore", "batch_mask"]

DB_NAME = "history.sqlite3"

APPLICATION_ID = 0x43524C42  # "CRLB" in the file's header (PRAGMA application_id): this is a crucible history
BATCH_COLUMNS = frozenset({"run_id", "seq_lo", "seq_hi", "experiment_id", "ts_lo", "ts_hi", "n", "data"})
SQLITE_MAGIC = b"SQLite format 3\x00"

BUSY_TIMEOUT_S = 1.0
"""How long a write waits for a lock another connection holds before the history counts as
unavailable (the Recorder then keeps its batches and retries, as for a server that went away).
Writers' transactions take milliseconds; a lock held longer is someone else's long transaction."""

_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_DAMAGED_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_INSERT = "INSERT OR IGNORE INTO batches VALUES (?,?,?,?,?,?,?,?)"  # rows merge_rows kept: none is there already

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


def _refuse_foreign(path: Path) -> None:
    """``HistoryConnectError`` for a file that is no crucible history, found before anything
    is written in it or beside it (no ``.lock``, no switch to WAL, no tables of ours, no
    change of mode): anything but a regular file (a FIFO is never opened, so never waited
    on; a device is never made a history), a ``.lock`` file (also through a link), a file
    that is not a SQLite database, and another program's database. A missing or empty file
    is a new history; one marked with :data:`APPLICATION_ID`, or unmarked (an older history)
    whose ``batches`` table is ours, is ours. One whose tables cannot be read now (another
    program holds it locked) is refused: it cannot be told apart."""
    if path.name.endswith(".lock") or os.path.realpath(path).endswith(".lock"):  # <history>.lock: a slip
        raise HistoryConnectError(f"history {str(path)!r} cannot be opened: a .lock file is no history")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise HistoryConnectError(f"history {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise HistoryConnectError(f"history {str(path)!r} cannot be opened: it is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise HistoryConnectError(
            f"history {str(path)!r} cannot be opened: it is not a regular file (a device, a FIFO or a socket)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise HistoryConnectError(f"history {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if not head:
        return
    if not head.startswith(SQLITE_MAGIC):
        raise HistoryConnectError(
            f"history {str(path)!r} cannot be opened: it is not a SQLite database (nothing was written to it)"
        )
    app_id = int.from_bytes(head[68:72], "big") if len(head) >= 72 else 0
    if app_id == APPLICATION_ID:
        return
    if app_id != 0:
        raise HistoryConnectError(
            f"history {str(path)!r} cannot be opened: it is another program's SQLite database "
            f"(application id {app_id:#x}; nothing was written to it)"
        )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            columns = {r[1] for r in db.execute("PRAGMA table_info(batches)")} if "batches" in tables else set()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        if _code(exc) in _BUSY_CODES:
            raise HistoryConnectError(
                f"history {str(path)!r} cannot be opened: another program holds it locked, so whether it is a "
                "crucible history cannot be told (nothing was written to it); try again once it is free"
            ) from None
        return  # damaged: the open proper says what is wrong
    if tables and not BATCH_COLUMNS <= columns:  # an older history has our batches table, whatever else it lacks
        other = ", ".join(sorted(tables)[:5])
        raise HistoryConnectError(
            f"history {str(path)!r} cannot be opened: it is another program's SQLite database "
            f"(tables {other}; nothing was written to it)"
        )


class HistoryStore(BatchStore):
    """A connection to the history database (thread-safe through a lock)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no history database at {self.path}")
            _refuse_foreign(self.path)  # a file that is no history is said to be so, as to a writer
            # A reader that may write opens read-write with writes refused: a writer killed
            # mid-transaction leaves a hot journal (or a WAL to recover) that SQLite must roll
            # back before anyone reads, and a mode=ro connection fails there with "attempt to
            # write a readonly database". Only a file we cannot write is opened mode=ro.
            mode = "rw" if os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK) else "ro"
            self.db = sqlite3.connect(f"file:{self.path}?mode={mode}", uri=True, check_same_thread=False)
            self.db.execute("PRAGMA query_only = ON")
            self._file = None
        else:
            # Writers open one at a time (a flock on <name>.lock): processes creating one new
            # history at once (ab --parallel workers, a daemon beside a run) meet before it is
            # in WAL mode, where SQLite's rollback-journal locking can refuse one of them at
            # once with "database is locked" rather than let its busy timeout wait.
            try:
                _refuse_foreign(self.path)  # before anything is written beside it (its .lock) or in it
                with locked(self.path):
                    if not self.path.exists():  # a new history is the owner's only (SQLite gives its WAL the same mode)
                        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
                    elif self.path.stat().st_size == 0:  # an empty file made a new history: the owner's only too
                        with contextlib.suppress(OSError):  # not ours to change: it stays as its owner set it
                            os.chmod(self.path, 0o600)
                    self.db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
                    self.db.execute("PRAGMA journal_mode=WAL")
                    self.db.execute("PRAGMA synchronous=NORMAL")
                    self.db.executescript(_SCHEMA)
                    self.db.execute("SELECT experiment_id, run_id, summary FROM runs LIMIT 0")  # another schema: here
                    self._mark()
                    self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")  # writes: see BUSY_TIMEOUT_S
                    st = os.stat(self.path)
                    self._file = (st.st_dev, st.st_ino)  # the file this store writes to (see _check_file)
            except (sqlite3.DatabaseError, OSError) as exc:  # not a database, damaged, another schema, no folder
                what = getattr(exc, "strerror", None) or str(exc)
                raise HistoryConnectError(f"history {str(self.path)!r} cannot be opened: {what}") from None
        self._lock = threading.Lock()  # the connection's
        self._pending_lock = self._lock
        self._pending: list[tuple[Any, ...]] = []  # batches kept until commit

    def __repr__(self) -> str:
        return f"<HistoryStore sqlite {self.path}>"

    def _mark(self) -> None:
        """Write :data:`APPLICATION_ID` into a history not marked yet (new, or an earlier
        version's). A write: one that another connection's lock holds up is left for a later open."""
        if self.db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
            return
        try:
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        except sqlite3.OperationalError as exc:
            if _code(exc) not in _BUSY_CODES:
                raise

    def close(self) -> None:
        """Commit what is kept, then close (closed even when the commit fails)."""
        try:
            self.commit()
        finally:
            self.db.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[Reader]:
        def q(sql: str, args: Sequence[Any] = (), *, stream: bool = False) -> sqlite3.Cursor:
            return self.db.execute(sql, args)  # a cursor reads lazily: streamed either way

        with self._lock:
            try:
                yield q
            except sqlite3.DatabaseError as exc:
                if _code(exc) not in _DAMAGED_CODES:
                    raise
                raise self._damaged(exc) from None

    # --- writing ----------------------------------------------------------------------------

    def commit(self) -> int:
        """Write the kept batches in one transaction; they are stored once this returns. Returns
        the events this commit stored: events the history holds already (a batch sent again, or
        by a concurrent ``crucible sync``) are skipped and not counted, whatever batches they
        came in (:func:`~telemetry.batchstore.merge_rows`, under the write lock).

        Raises:
            HistoryUnavailable: another connection held the database locked for longer than
                ``BUSY_TIMEOUT_S`` (a long transaction, a tool holding ``BEGIN EXCLUSIVE``);
                the batches are kept for the next commit, as for a server that went away.
            HistoryGone: the file was deleted or replaced since this store opened it: the
                batches went into a file no one reads (they are not kept).
            HistoryDamaged: SQLite found the file damaged (the batches are kept: roll back
                to drop them).
            sqlite3.Error: anything else (a full disk, an I/O error): a storage failure.
        """
        with self._lock:
            rows = list(self._pending)
            if not rows:
                return 0
            stored = 0
            try:
                self.db.execute("BEGIN IMMEDIATE")  # the write lock first: what merge_rows reads stays so

                def have(run_id: str, lo: int, hi: int) -> list[tuple[int, int]]:
                    return self.db.execute(OVERLAP_SQL, (run_id, lo, run_id, lo, hi)).fetchall()

                spans: dict[str, int] = {}
                for r in merge_rows(rows, have):
                    spans[r[3]] = max(spans.get(r[3], -1), span_of(r[4], r[5]))
                    stored += r[6] * self.db.execute(_INSERT, r).rowcount
                self.db.executemany(
                    "INSERT INTO spans VALUES (?, ?) ON CONFLICT(experiment_id) DO UPDATE SET "
                    "max_span = MAX(max_span, excluded.max_span)",
                    list(spans.items()),
                )
                self.db.commit()
            except sqlite3.DatabaseError as exc:
                self.db.rollback()
                raise self._classify(exc) from None
            except BaseException:
                self.db.rollback()  # no half-done transaction left open for a later commit to finish
                raise
            del self._pending[: len(rows)]
            self._check_file()
        return stored

    def _check_file(self) -> None:
        """Raise :class:`HistoryGone` if the path no longer names the file this store opened."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise HistoryGone(f"history {str(self.path)!r} was deleted while in use") from None
        except OSError as exc:
            raise HistoryGone(f"history {str(self.path)!r} cannot be found: {exc.strerror or exc}") from None
        if (st.st_dev, st.st_ino) != self._file:
            raise HistoryGone(f"history {str(self.path)!r} was replaced by another file while in use")

    def rollback(self) -> None:
        """Drop the batches not yet committed (the Recorder's roll-back after a failed write)."""
        with self._lock:
            self._pending.clear()
            self.db.rollback()

    def _classify(self, exc: sqlite3.DatabaseError) -> Exception:
        """A lock another connection held past the busy timeout is an outage, a damaged file is
        :class:`HistoryDamaged`; anything else (a full disk, an I/O error) is itself."""
        code = _code(exc)
        if code in _BUSY_CODES:
            return HistoryUnavailable(f"history {str(self.path)!r} is locked by another connection: {exc}")
        if code in _DAMAGED_CODES:
            return self._damaged(exc)
        return exc

    def _damaged(self, exc: sqlite3.DatabaseError) -> HistoryDamaged:
        return HistoryDamaged(f"history {str(self.path)!r} is damaged: {exc}")

    def drop_batches(self, run_id: str, seq_los: Sequence[int]) -> int:
        with self._lock:
            try:
                with self.db:
                    sql = "DELETE FROM batches WHERE run_id = ? AND seq_lo = ?"
                    dropped = sum(self.db.execute(sql, (run_id, int(lo))).rowcount for lo in seq_los)
            except sqlite3.DatabaseError as exc:
                raise self._classify(exc) from None
            self._check_file()
        return dropped

    def record_run(
        self,
        run_id: str,
        experiment_id: str,
        run_dir: str,
        started_ts: int | None,
        ended_ts: int | None,
        summary: dict[str, Any],
    ) -> None:
        with self._lock:
            try:
                with self.db:
                    self.db.execute(
                        "INSERT INTO runs VALUES (?,?,?,?,?,?) ON CONFLICT(run_id) DO UPDATE SET "
                        "ended_ts=excluded.ended_ts, summary=excluded.summary, started_ts=excluded.started_ts",
                        (run_id, experiment_id, run_dir, started_ts, ended_ts, orjson.dumps(summary)),
                    )
            except sqlite3.DatabaseError as exc:
                raise self._classify(exc) from None
            self._check_file()


def _code(exc: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (an extended code's low byte), None if it has none."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None
