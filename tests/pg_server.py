"""A real PostgreSQL server for the tests: Debian's binaries, started once per test session.

:func:`pg_server` starts ``postgres`` in a temporary folder (``initdb`` with trust
authentication, listening on 127.0.0.1 at a free port, its unix socket in that folder) the
first time a test asks for it, and stops it when the session ends. The server refuses to run
as root: under uid 0 the binaries run as ``nobody`` (``runuser``), which owns the folder.

When the binaries are missing, the tests that need the server FAIL with a message that says
how to install them (CI installs them: ``.ci/run``), unless ``CRUCIBLE_SKIP_POSTGRES=1`` says
to skip them (for a developer without PostgreSQL at hand).

Each test gets a database of its own (:meth:`PgServer.new_database`), so tests never see
each other's rows. :meth:`PgServer.stop` and :meth:`PgServer.start` take the server away and
bring it back mid-test, as an outage would.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

SKIP_ENV = "CRUCIBLE_SKIP_POSTGRES"
PASSWORD_USER, PASSWORD = "crucible_pw", "s3cret-Pw"
BIN_ENV = "CRUCIBLE_PG_BIN"  # a folder holding initdb, pg_ctl and postgres, if not Debian's


def find_bin() -> Path | None:
    """The folder of initdb/pg_ctl/postgres: $CRUCIBLE_PG_BIN, Debian's newest, or the PATH's."""
    if os.environ.get(BIN_ENV):
        return Path(os.environ[BIN_ENV])
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One postgres process in a temporary folder (see the module docs)."""

    def __init__(self, bindir: Path, fsync: bool = False) -> None:
        """``fsync``: flush the WAL to disk at every commit, as a production server does (the
        tests run without: their data dies with the folder; the benchmark runs with)."""
        self.bindir = bindir
        self.fsync = fsync
        root_user = os.geteuid() == 0
        # as root, somewhere nobody can reach (a root-only $TMPDIR would not do)
        self.root = Path(tempfile.mkdtemp(prefix="crucible-pg-", dir="/tmp" if root_user else None))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        if root_user:  # postgres will not run as root
            os.chown(self.root, _nobody(), -1)
            self._as = ["runuser", "-u", "nobody", "--"]
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        hba = self.data / "pg_hba.conf"  # one role that must give its password: for the auth-failure tests
        hba.write_text(f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        self.start()
        self.execute(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self._as, str(self.bindir / tool), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200" + ("" if self.fsync else " -F")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        with self._lock:
            name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the server with the session (a test module lists this module in ``pytest_plugins``)."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.close()
            _server = None


def _nobody() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_uid


_server: PgServer | None = None
_server_lock = threading.Lock()


def pg_server() -> PgServer:
    """The session's server, started on first use (fails, or skips if told to, without binaries)."""
    global _server
    with _server_lock:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"PostgreSQL tests skipped: {SKIP_ENV}=1")
        if _server is None:
            bindir = find_bin()
            if bindir is None or not (bindir / "initdb").exists():
                pytest.fail(
                    "PostgreSQL server binaries not found (initdb, pg_ctl, postgres): install Debian's "
                    f"'postgresql' package (apt-get install postgresql), or point {BIN_ENV} at their folder; "
                    f"or set {SKIP_ENV}=1 to skip the PostgreSQL tests",
                    pytrace=False,
                )
            _server = PgServer(bindir)
            atexit.register(_server.close)  # if used outside pytest; closing twice is harmless
        return _server


@pytest.fixture
def pg() -> PgServer:
    """The session's server (started on first use)."""
    return pg_server()


@pytest.fixture
def pg_url() -> str:
    """The URL of a fresh database on the session's server."""
    return pg_server().new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def history_kind(request: pytest.FixtureRequest) -> str:
    """Run the test against both stores."""
    return request.param


@pytest.fixture
def history_target(history_kind: str, tmp_path: Path) -> str | Path | None:
    """The history target for this test's store: None (the embedded SQLite default) or a fresh
    PostgreSQL database's URL."""
    if history_kind == "postgresql":
        return pg_server().new_database()
    return None


def truncate(url: str) -> None:
    """Empty a history database's tables (keeping its schema)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE batches, spans, runs")


@pytest.fixture
def new_store(history_kind: str, tmp_path: Path):
    """Make fresh, empty history stores of this test's kind (closed at the end): a new SQLite
    file each time, or one PostgreSQL database emptied before each new store."""
    from telemetry.history import open_history

    made = []
    url = pg_server().new_database() if history_kind == "postgresql" else None
    if url is not None:  # the pool now, not inside a hypothesis example (its jitter draws on `random`)
        made.append(open_history(url))

    def make():
        if url is None:
            store = open_history(tmp_path / f"history-{len(made)}.sqlite3")
        else:
            truncate(url)
            store = open_history(url)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()
