"""The PostgreSQL history store: the same batches and queries as the SQLite one, on a server.

Many processes (a Lab daemon, the hosts of a distributed tree, the CLI) share one history.
Each process keeps one connection pool per server URL (:mod:`psycopg_pool`), shared by all
its stores and closed with the last of them.

**Schema.** The tables of :mod:`telemetry.store` (``batches``, ``spans``, ``runs``) with
PostgreSQL types: ``BIGINT`` times and seqs, ``BYTEA`` batches, ``JSONB`` summaries, and the
text keys in the ``"C"`` collation so that rows sort byte-wise, as SQLite sorts them (the
same order, so the same answers). The project creates and migrates it: :data:`MIGRATIONS`
are ordered SQL steps, each recorded in ``schema_version`` once applied. A writer applies
the missing ones in one transaction under a transaction-level advisory lock, so two
processes starting at once take turns and the second finds nothing left to do; a reader
applies none. A database migrated by a newer version is refused (the message says which).

**Writes.** :meth:`PgHistoryStore.insert_batch` keeps the batch in memory;
:meth:`~PgHistoryStore.commit` sends every kept batch in one transaction: it takes an
advisory lock per run, reads which stored batches the new ones' seq ranges meet (two probes
of the primary key per run: none, for a run's new events), and copies into ``batches``
the events the history lacks (:func:`~telemetry.batchstore.merge_rows`: a batch that meets
stored ones is cut into the parts between them), then the experiment's largest span when it
grew. A batch sent twice (after a commit whose answer was lost, perhaps re-read from the
files with other boundaries) is so stored once, and nothing it adds is lost. The schema's
writers take no ``CREATE`` privilege once it is migrated (:func:`migrate` checks first).
If the server cannot be reached the commit raises
:class:`~telemetry.batchstore.HistoryUnavailable` and keeps the batches for the next
commit; :meth:`~PgHistoryStore.rollback` drops them.

**Errors.** Opening a store that cannot connect (bad URL, refused, unreachable within
``connect_timeout`` seconds, authentication failure) raises one
:class:`~telemetry.batchstore.HistoryConnectError` that names the URL with its password
masked. Any server error later is a :class:`~telemetry.batchstore.HistoryUnavailable`
when the connection is at fault (retry later), a :class:`~telemetry.batchstore.HistoryDamaged`
when the server reports its data or an index corrupted (SQLSTATE ``XX001``, ``XX002``: the
history's problem, as SQLite's "database disk image is malformed"), and a
:class:`~telemetry.batchstore.HistoryError` otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import unquote

import orjson

from actors.log import get_logger
from telemetry.batchstore import (
    OVERLAP_SQL,
    BatchStore,
    HistoryConfigError,
    HistoryConnectError,
    HistoryDamaged,
    HistoryError,
    HistoryGone,
    HistoryUnavailable,
    Reader,
    merge_rows,
    span_of,
)
from telemetry.schema import map_strings

log = get_logger("telemetry.store_pg")
_Ctx = contextlib.AbstractContextManager[Any]

CONNECT_TIMEOUT_S = 5.0
"""Seconds to wait for the server to answer a connection attempt (libpq's ``connect_timeout``)."""
POOL_MAX = 8
"""Connections one process keeps open to one server at most (its stores share them)."""
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())  # its reconnect warnings: ours say it once
_DAMAGED_STATES = ("XX001", "XX002")  # data_corrupted, index_corrupted: the server's "malformed"
_LOCK_KEY = zlib.crc32(b"crucible-lab history schema")  # the advisory lock migrations take

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "batches, spans and runs",
        """
        CREATE TABLE IF NOT EXISTS batches (
            run_id TEXT COLLATE "C" NOT NULL, seq_lo BIGINT NOT NULL, seq_hi BIGINT NOT NULL,
            experiment_id TEXT COLLATE "C" NOT NULL, ts_lo BIGINT NOT NULL, ts_hi BIGINT NOT NULL,
            n INTEGER NOT NULL, data BYTEA NOT NULL,
            PRIMARY KEY (run_id, seq_lo)
        );
        CREATE INDEX IF NOT EXISTS batches_exp_ts ON batches (experiment_id, ts_lo);
        CREATE INDEX IF NOT EXISTS batches_run_ts ON batches (run_id, ts_lo);
        CREATE TABLE IF NOT EXISTS spans (experiment_id TEXT COLLATE "C" PRIMARY KEY, max_span BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS runs (
            run_id TEXT COLLATE "C" PRIMARY KEY, experiment_id TEXT COLLATE "C" NOT NULL, run_dir TEXT,
            started_ts BIGINT, ended_ts BIGINT, summary JSONB
        );
        CREATE INDEX IF NOT EXISTS runs_experiment ON runs (experiment_id);
        """,
    ),
    (
        2,
        "batches compressed with lz4 (stored uncompressed where the server has no lz4)",
        # pglz, the default, spent 3 ms of a 4 ms commit on a 64 KB batch; lz4 compresses as well, 5x faster
        """
        DO $$
        BEGIN
            EXECUTE 'ALTER TABLE batches ALTER COLUMN data SET COMPRESSION lz4';
        EXCEPTION WHEN OTHERS THEN
            EXECUTE 'ALTER TABLE batches ALTER COLUMN data SET STORAGE EXTERNAL';
        END
        $$;
        """,
    ),
)
"""Ordered schema steps ``(version, what, SQL)``; a step is never edited once released, only added to."""
SCHEMA_VERSION = MIGRATIONS[-1][0]

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
_COPY = "COPY batches (run_id, seq_lo, seq_hi, experiment_id, ts_lo, ts_hi, n, data) FROM STDIN (FORMAT BINARY)"
_COPY_TYPES = ("text", "int8", "int8", "text", "int8", "int8", "int4", "bytea")  # binary COPY: no escaping
_RUN_LOCK = zlib.crc32(b"crucible-lab history run") & 0x7FFFFFFF
"""The first key of the advisory lock a commit takes per run (the second: the run id's hash), so
that two writers of one run merge one after the other (:func:`_send`)."""
_LOCK_RUN = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_OVERLAP = OVERLAP_SQL.replace("?", "%s")
_SPAN = (
    "INSERT INTO spans VALUES (%s, %s) ON CONFLICT (experiment_id) DO UPDATE SET "
    "max_span = GREATEST(spans.max_span, excluded.max_span)"
)


def is_postgres_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PASSWORD_PARAM = re.compile(r"(?i)(?<=[?&])(password=)([^&#]*)")
CONNECT_TIMEOUT_MAX_S = 3600
"""The longest ``connect_timeout`` a history URL may ask for (libpq's 0, wait for ever, is refused)."""


def _split_auth(url: str) -> tuple[str, str, str, str] | None:
    """``(scheme://, user, password, rest)`` when the URL carries a password; the credentials end
    at the last ``@`` before the query string, as far as any parser could take them to reach."""
    head = _SCHEME.match(url)
    if head is None:
        return None
    body = url[head.end() :]
    end = min((i for i in (body.find("?"), body.find("#")) if i >= 0), default=len(body))
    at = body.rfind("@", 0, end)
    if at < 0 or ":" not in body[:at]:
        return None
    user, password = body[:at].split(":", 1)
    return head.group(0), user, password, body[at:]


def mask_url(url: str) -> str:
    """The URL with any password (in the authority or as a ``password=`` parameter) shown as
    ``***``; the rest as written, even when the URL is malformed (a message must still say which)."""
    auth = _split_auth(url)
    if auth is not None:
        head, user, _, rest = auth
        url = f"{head}{user}:***{rest}"
    return _PASSWORD_PARAM.sub(r"\1***", url)


def _secrets(url: str) -> list[str]:
    """The password(s) a URL holds, as written and percent-decoded: what no message may show."""
    found = []
    auth = _split_auth(url)
    if auth is not None:
        found.append(auth[2])
    found += [m.group(2) for m in _PASSWORD_PARAM.finditer(url)]
    out = {v for raw in found for v in (raw, unquote(raw)) if v}
    return sorted(out, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message, which may quote the URL) with the URL masked and its password hidden."""
    text = text.replace(url, mask_url(url))
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise HistoryConfigError(
            "a postgresql:// history needs psycopg 3 and psycopg-pool: pip install 'crucible-lab[postgres]'"
        ) from None
    return psycopg


def _send(conn: Any, rows: list[tuple[Any, ...]], spans: dict[str, int]) -> int:
    """One commit's batches, in the connection's transaction: each run's advisory lock (runs
    in order), then the events the history lacks (:func:`~telemetry.batchstore.merge_rows`,
    whatever boundaries the batches they came in had), in one ``COPY``. A batch sent again
    after a commit whose answer was lost, or by a concurrent ``crucible sync``, is stored once.
    Returns the events stored."""
    import psycopg

    for _ in range(2):
        try:
            return _merge(conn, rows, spans)
        except psycopg.errors.UniqueViolation:  # a writer that takes no lock (an older version) got there first
            conn.rollback()  # and again: the merge now sees its rows
    return _merge(conn, rows, spans)


def _merge(conn: Any, rows: list[tuple[Any, ...]], spans: dict[str, int]) -> int:
    with conn.cursor() as cur:
        for run_id in sorted({r[0] for r in rows}):  # one order: two writers wait, never deadlock
            cur.execute(_LOCK_RUN, (_RUN_LOCK, run_id))

        def have(run_id: str, lo: int, hi: int) -> list[tuple[int, int]]:
            return cur.execute(_OVERLAP, (run_id, lo, run_id, lo, hi)).fetchall()

        new = merge_rows(rows, have)  # in key order
        if new:
            with cur.copy(_COPY) as copy:
                copy.set_types(_COPY_TYPES)
                for r in new:
                    copy.write_row(r)
        if spans:
            cur.executemany(_SPAN, sorted(spans.items()))  # a fixed order: no deadlock between writers
    return sum(r[6] for r in new)


def _alive(conn: Any) -> bool:
    import psycopg

    try:
        conn.execute("SELECT 1")
        conn.rollback()
    except psycopg.Error:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Pool:
    """One process-wide pool per URL, counted by the stores that use it."""

    _lock = threading.Lock()
    _pools: dict[str, tuple[Any, int]] = {}

    @classmethod
    def take(cls, url: str, kwargs: dict[str, Any], max_size: int, timeout: float) -> Any:
        from psycopg_pool import ConnectionPool

        with cls._lock:
            pool, users = cls._pools.get(url, (None, 0))
            if pool is None:
                pool = ConnectionPool(
                    url,
                    kwargs=kwargs,
                    min_size=1,
                    max_size=max_size,
                    open=False,
                    timeout=timeout,
                    reconnect_timeout=max(10.0, 2 * timeout),
                    name=f"crucible-history-{len(cls._pools)}",
                )
                pool.open(wait=False)
            cls._pools[url] = (pool, users + 1)
            return pool

    @classmethod
    def give_back(cls, url: str) -> None:
        with cls._lock:
            pool, users = cls._pools.get(url, (None, 0))
            if pool is None:
                return
            if users > 1:
                cls._pools[url] = (pool, users - 1)
                return
            del cls._pools[url]
        pool.close(timeout=5.0)


class PgHistoryStore(BatchStore):
    """A history in a PostgreSQL database (see the module docs); thread-safe.

    Raises:
        HistoryConfigError: the URL is malformed, or psycopg is not installed.
        HistoryConnectError: the server refused, timed out or rejected the credentials.
        HistoryError: the database holds a newer schema than this version knows; or, with
            ``readonly``, no history at all (a :class:`FileNotFoundError` then, as SQLite).
    """

    _RUNS_SQL = "SELECT run_id, experiment_id, run_dir, started_ts, ended_ts, summary::text FROM runs"
    _RUNS_ORDER = " ORDER BY started_ts NULLS FIRST"

    def __init__(
        self,
        url: str,
        *,
        readonly: bool = False,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        pool_max: int = POOL_MAX,
    ) -> None:
        psycopg = _psycopg()
        self.url = url
        self.masked = mask_url(url)
        self.readonly = readonly
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise HistoryConfigError(f"bad history URL {self.masked}: {self._why(exc)}") from None
        in_url = params.get("connect_timeout")
        self.connect_timeout = self._check_timeout(connect_timeout if in_url is None else in_url, in_url is not None)
        self._kwargs: dict[str, Any] = {"application_name": "crucible-lab"}
        if in_url is None:
            self._kwargs["connect_timeout"] = max(1, round(self.connect_timeout))
        self._pending: list[tuple[Any, ...]] = []  # batches kept until commit
        self._spans: dict[str, int] = {}  # the largest span committed per experiment, as far as we know
        self._pending_lock = threading.Lock()
        self._direct = False  # commits bypass the pool until it has a working connection again
        self._prepare()
        self.pool = _Pool.take(url, self._kwargs, pool_max, self.connect_timeout)
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgHistoryStore {self.masked}>"

    def _refused(self, exc: BaseException) -> HistoryError:
        """A server error that is no outage: the history damaged (see the module docs), or refused."""
        if getattr(exc, "sqlstate", None) in _DAMAGED_STATES:
            return HistoryDamaged(f"history at {self.masked} is damaged: {self._why(exc)}")
        return HistoryError(f"history at {self.masked}: {self._why(exc)}")

    def _why(self, exc: BaseException) -> str:
        """A driver error on one line, the URL's password hidden (libpq quotes a URL it cannot parse)."""
        return scrub(_first_line(exc), self.url)

    def _check_timeout(self, value: Any, in_url: bool) -> float:
        """The connect timeout in seconds: a number from 1 to :data:`CONNECT_TIMEOUT_MAX_S`. libpq
        reads 0 or less as "wait for ever", and psycopg a huge value as much the same: a history
        that cannot answer would hang its command, so neither is taken."""
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not 1 <= seconds <= CONNECT_TIMEOUT_MAX_S or (in_url and not str(value).strip().isdigit()):
            where = f"bad history URL {self.masked}: " if in_url else f"history at {self.masked}: "
            raise HistoryConfigError(
                f"{where}connect_timeout must be a whole number of seconds from 1 to {CONNECT_TIMEOUT_MAX_S}, "
                f"got {value!r}"
            )
        return seconds

    def _prepare(self) -> None:
        """Connect once (a clear error now, not later) and bring the schema up to date."""
        psycopg = _psycopg()
        try:
            with psycopg.connect(self.url, **self._kwargs) as conn:
                if self.readonly:
                    self._check_version(conn)
                else:
                    migrate(conn, self.masked)
        except psycopg.OperationalError as exc:
            raise HistoryConnectError(f"cannot connect to the history at {self.masked}: {self._why(exc)}") from None
        except psycopg.Error as exc:
            raise HistoryError(f"history at {self.masked} unusable: {self._why(exc)}") from None

    def _check_version(self, conn: Any) -> None:
        if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
            raise FileNotFoundError(f"no crucible history in the database at {self.masked}")
        have = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        _refuse_newer(have, self.masked)

    # --- connections ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _conn(self, ping: bool = False) -> Iterator[Any]:
        """A pooled connection in a transaction (committed on leaving); server trouble as our errors.

        ``ping`` first proves the connection alive (one ``SELECT 1``), trading a dead one left
        over from a server restart for another: a read after an outage never fails for a
        connection that merely went stale. A write needs no ping (see :meth:`commit`).
        """
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            conn = self.pool.getconn(timeout=self.connect_timeout)
            for _ in range(self.pool.max_size):
                if not ping or _alive(conn):
                    break
                self.pool.putconn(conn)  # closed by now: the pool replaces it
                conn = self.pool.getconn(timeout=self.connect_timeout)
            try:
                with conn:
                    yield conn
            finally:
                self.pool.putconn(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise HistoryUnavailable(f"history at {self.masked} unavailable: {self._why(exc)}") from None
        except psycopg.Error as exc:
            raise self._refused(exc) from None

    @contextlib.contextmanager
    def _own_conn(self) -> Iterator[Any]:
        """A connection of its own, outside the pool, in a transaction: for a commit while the
        pool may hold only dead connections (a refused connection fails at once, where the pool
        would wait out its timeout)."""
        import psycopg

        try:
            with psycopg.connect(self.url, **self._kwargs) as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise HistoryUnavailable(f"history at {self.masked} unavailable: {self._why(exc)}") from None
        except psycopg.Error as exc:
            raise self._refused(exc) from None

    @contextlib.contextmanager
    def _read(self) -> Iterator[Reader]:
        with self._conn(ping=True) as conn:

            def q(sql: str, args: Sequence[Any] = (), *, stream: bool = False) -> Any:
                cur = conn.cursor(name="crucible_scan") if stream else conn.cursor()
                return cur.execute(sql.replace("?", "%s"), args)

            yield q

    # --- writing ----------------------------------------------------------------------------

    def commit(self) -> int:
        """Send the kept batches in one transaction; they are stored once this returns. Returns
        the events this commit stored (a batch the history holds already is not counted).

        Raises:
            HistoryUnavailable: the server could not be reached; the batches are kept.
            HistoryError: the server refused them (they are kept too: roll back to drop them).
        """
        with self._pending_lock:
            rows = list(self._pending)
            if not rows:
                return 0
            spans: dict[str, int] = {}
            for r in rows:
                if (span := span_of(r[4], r[5])) > max(spans.get(r[3], -1), self._spans.get(r[3], -1)):
                    spans[r[3]] = span
            stored: list[int] = []
            self._write(lambda conn: stored.append(_send(conn, rows, spans)))
            del self._pending[: len(rows)]
            for exp, span in spans.items():
                self._spans[exp] = max(span, self._spans.get(exp, -1))
        return stored[-1]

    def _write(self, work: Callable[[Any], None]) -> None:
        """Run one write transaction: on a pooled connection; after the server went away, and
        until the pool holds a working connection again, on a connection of its own, which a
        stopped server refuses at once where the pool would wait out its timeout.

        Raises:
            HistoryUnavailable: the server cannot be reached (the transaction did not happen).
        """
        if not self._direct or self.pool.get_stats().get("pool_available", 0) > 0:
            try:
                with self._conn() as conn:
                    work(conn)
            except HistoryGone:  # damaged: another connection would meet the same data
                raise
            except HistoryUnavailable:
                self._direct = True  # a dead pooled connection, or the server is away: see below
            else:
                self._direct = False
                return
        with self._own_conn() as conn:
            work(conn)

    def rollback(self) -> None:
        """Drop the batches not yet committed."""
        with self._pending_lock:
            self._pending.clear()

    def record_run(
        self,
        run_id: str,
        experiment_id: str,
        run_dir: str,
        started_ts: int | None,
        ended_ts: int | None,
        summary: dict[str, Any],
    ) -> None:
        text = orjson.dumps(self.as_stored(summary))
        self._write(
            lambda conn: conn.execute(
                "INSERT INTO runs VALUES (%s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT (run_id) DO UPDATE SET "
                "ended_ts = excluded.ended_ts, summary = excluded.summary, started_ts = excluded.started_ts",
                (run_id, experiment_id, run_dir, started_ts, ended_ts, text.decode()),
            )
        )

    def drop_batches(self, run_id: str, seq_los: Sequence[int]) -> int:
        dropped: list[int] = []
        self._write(
            lambda conn: dropped.append(
                conn.execute(
                    "DELETE FROM batches WHERE run_id = %s AND seq_lo = ANY(%s)", (run_id, [int(lo) for lo in seq_los])
                ).rowcount
            )
        )
        return dropped[-1]

    def as_stored(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary as :meth:`record_run` stores it (NUL written out: :func:`jsonb_text`)."""
        return jsonb_text(summary) if b"\\u0000" in orjson.dumps(summary) else summary

    def close(self) -> None:
        """Commit what is kept (if the server is there) and give the pool back."""
        if self._closed:
            return
        try:
            if self._pending:
                self.commit()
        finally:
            self._closed = True
            _Pool.give_back(self.url)


NUL_TEXT = "\\u0000"
"""What a NUL in a summary's text becomes in PostgreSQL (see :func:`jsonb_text`)."""


def jsonb_text(value: Any) -> Any:
    """``value`` with each NUL character in its keys and strings written as the six characters
    ``\\u0000`` (:data:`NUL_TEXT`): PostgreSQL's text and JSONB cannot hold NUL, and refuse
    the whole summary for one value or phase name that has it. The JSON escape stays legible
    and keeps names apart that differ only there (a stripped NUL could merge two keys)."""
    return map_strings(value, lambda s: s.replace("\x00", NUL_TEXT))


def _refuse_newer(have: int, masked: str) -> None:
    if have > SCHEMA_VERSION:
        raise HistoryError(
            f"the history at {masked} has schema version {have}, newer than this crucible-lab knows "
            f"({SCHEMA_VERSION}): upgrade crucible-lab to use it"
        )


def migrate(conn: Any, masked: str = "this database", steps: tuple[tuple[int, str, str], ...] = MIGRATIONS) -> int:
    """Apply the missing ``steps`` (:data:`MIGRATIONS`) in one transaction, under an advisory
    lock; return the schema version. Safe when several processes start at once: they take turns.

    A database whose tables are there and whose ``schema_version`` says every step is applied
    is left as it is, before any ``CREATE`` (which PostgreSQL refuses to a role without the
    privilege, ``IF NOT EXISTS`` or not): a role that may only read and write the tables writes
    to a history that a role with ``CREATE`` migrated."""
    with conn.transaction():
        found = conn.execute(
            "SELECT to_regclass('schema_version'), to_regclass('batches'), to_regclass('spans'), to_regclass('runs')"
        ).fetchone()
        if all(t is not None for t in found):
            have = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
            _refuse_newer(have, masked)
            if have >= steps[-1][0]:
                return have
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(_VERSION_TABLE)
        have = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        _refuse_newer(have, masked)
        for version, what, sql in steps:
            if version <= have:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)", (version, what))
            log.info("history schema migrated", version=version, step=what)
            have = version
    return have
