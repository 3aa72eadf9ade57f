"""The PostgreSQL history: naming it, its schema and migrations, clear errors, writers side by
side, and a server that goes away mid-run (stopped and restarted for real: ``pg_ctl stop -m
fast`` / ``start``) while the Recorder keeps every event."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from actors.recorder import Recorder
from telemetry.emitter import Emitter
from telemetry.history import (
    ENV,
    HistoryConfigError,
    HistoryConnectError,
    HistoryError,
    describe_history,
    open_history,
    resolve_history,
)
from telemetry.jsonl import iter_run
from telemetry.store import DB_NAME, HistoryStore
from telemetry.store_pg import MIGRATIONS, SCHEMA_VERSION, mask_url
from tests.telemetry_helpers import recorded

pytest_plugins = ["tests.pg_server"]  # pg (the session's server), pg_url (a fresh database on it)


def emit_n(em: Emitter, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        em.emit("step", {"x": float(i)}, phase="a", step=i, success=i % 2 == 0)


def until(cond, timeout: float = 30.0, what: str = "condition") -> None:
    """Wait for what no actor signals (a retry timer's effect, a server's state), with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.02)


# --- naming the history ------------------------------------------------------------------------------------


def test_a_target_names_one_store(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_history(None, tmp_path) == tmp_path / DB_NAME
    assert resolve_history("runs.sqlite3") == Path("runs.sqlite3")
    assert resolve_history("sqlite:///rel/h.db") == Path("rel/h.db")
    assert resolve_history("sqlite:////abs/h.db") == Path("/abs/h.db")
    assert resolve_history("postgresql://u@h/db") == "postgresql://u@h/db"
    monkeypatch.setenv(ENV, "postgres://u@h/db")
    assert resolve_history(None, tmp_path) == "postgres://u@h/db"  # the environment, when nothing is given
    assert resolve_history(tmp_path / "x.sqlite3") == tmp_path / "x.sqlite3"
    for bad, match in (("mysql://u@h/db", "unknown history URL scheme 'mysql'"), ("sqlite:h.db", "sqlite:///")):
        with pytest.raises(HistoryConfigError, match=match):
            resolve_history(bad)
    monkeypatch.delenv(ENV)
    with pytest.raises(HistoryConfigError, match=ENV):
        resolve_history(None)


def test_passwords_never_show():
    assert mask_url("postgresql://me:hunter2@db:5432/h") == "postgresql://me:***@db:5432/h"
    assert "hunter2" not in mask_url("postgresql://me@db/h?sslmode=require&password=hunter2")
    assert "sslmode=require" in mask_url("postgresql://me@db/h?sslmode=require&password=hunter2")
    assert describe_history("postgresql://me:hunter2@db/h") == "postgresql://me:***@db/h"
    with pytest.raises(HistoryConfigError) as e:
        resolve_history("ftp://me:hunter2@db/h")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


# --- schema and migrations ---------------------------------------------------------------------------------


def versions(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT version, description FROM schema_version ORDER BY version").fetchall()


def test_the_schema_is_created_once_and_recorded(pg_url):
    with pytest.raises(FileNotFoundError, match="no crucible history"):
        open_history(pg_url, readonly=True)  # a reader creates nothing
    open_history(pg_url).close()
    open_history(pg_url).close()  # nothing left to do the second time
    assert versions(pg_url) == [(v, what) for v, what, _ in MIGRATIONS]
    open_history(pg_url, readonly=True).close()


def test_processes_starting_at_once_migrate_once(pg_url):
    """Eight writers open a new database at the same moment: the advisory lock makes them take
    turns; every one opens, and each step is applied and recorded once."""
    gate, errors, stores = threading.Barrier(8), [], []

    def opener():
        gate.wait()
        try:
            stores.append(open_history(pg_url))
        except Exception as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 8
    assert versions(pg_url) == [(v, what) for v, what, _ in MIGRATIONS]
    for s in stores:
        s.close()


def test_an_older_schema_is_migrated_by_the_next_writer_with_its_rows(pg_url):
    from telemetry.store_pg import migrate

    with psycopg.connect(pg_url) as conn:
        assert migrate(conn, steps=MIGRATIONS[:1]) == 1  # as an older version left it
        conn.execute("INSERT INTO runs (run_id, experiment_id, summary) VALUES ('r', 'e', '{\"a\": 1}')")
    open_history(pg_url).close()
    assert versions(pg_url) == [(v, what) for v, what, _ in MIGRATIONS]
    with psycopg.connect(pg_url) as conn:
        compression = conn.execute(
            "SELECT attcompression, attstorage FROM pg_attribute WHERE attrelid = 'batches'::regclass "
            "AND attname = 'data'"
        ).fetchone()
    assert compression in (("l", "x"), ("", "e"))  # lz4, or stored uncompressed without it
    store = open_history(pg_url, readonly=True)
    assert store.runs() == [
        {
            "run_id": "r",
            "experiment_id": "e",
            "run_dir": None,
            "started_ts": None,
            "ended_ts": None,
            "summary": {"a": 1},
        }
    ]
    store.close()


def test_a_role_without_create_writes_to_a_migrated_history(pg, pg_url, tmp_path):
    """A role that may only read and write the tables (no CREATE on the schema, as PostgreSQL
    15 gives new roles on ``public``) opens a history that another role migrated, and a run
    writes its events and its record there."""
    open_history(pg_url).close()  # migrated by the owner
    db = pg_url.rsplit("/", 1)[1]
    role = f"rw_{db}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}"')
        assert not admin.execute("SELECT has_schema_privilege(%s, 'public', 'CREATE')", (role,)).fetchone()[0]
    url = pg_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    rec, em = recorded(tmp_path, 10, history=url)
    emit_n(em, 30)
    em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 30
    rec.stop()
    assert history_seqs(pg_url, "run") == list(range(30))
    store = open_history(url, readonly=True)
    try:
        assert [r["run_id"] for r in store.runs()] == ["run"]
    finally:
        store.close()
    assert versions(pg_url) == [(v, what) for v, what, _ in MIGRATIONS]


def test_a_nul_in_a_summary_is_written_out_and_the_run_recorded(pg_url, tmp_path, capsys):
    """PostgreSQL's JSONB cannot hold NUL: a value or phase name that has one is stored with the
    NUL written as the six characters \\u0000 (the run's summary.json keeps it as it is), so the
    run is recorded, and a sync finds the record there, not different."""
    from supervisor import main

    rec, em = recorded(tmp_path, 10, history=pg_url)
    for i in range(20):
        em.emit("step", {"x": float(i), "bad\x00key": 2.0}, phase="ph\x00ase", step=i)
    em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 20
    rec.stop()
    store = open_history(pg_url, readonly=True)
    try:
        (row,) = store.runs()
    finally:
        store.close()
    phase = row["summary"]["phases"]["ph\\u0000ase"]
    assert phase["events"] == 20 and phase["max"]["bad\\u0000key"] == 2.0
    assert history_seqs(pg_url, "run") == list(range(20))
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(tmp_path), "--history", pg_url]) == 0
    assert "exp/run: up to date" in capsys.readouterr().out


def test_a_newer_schema_is_refused_by_name(pg_url):
    open_history(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, 'from the future')", (99,))
    for readonly in (False, True):
        with pytest.raises(
            HistoryError, match=rf"schema version 99, newer than this crucible-lab knows \({SCHEMA_VERSION}"
        ):
            open_history(pg_url, readonly=readonly)


# --- clear errors, never a hang ----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nobody listens there


def test_unreachable_refused_or_rejected_servers_give_one_clear_error(pg):
    from tests.pg_server import PASSWORD, PASSWORD_USER

    srv = pg
    port = closed_port()
    cases = [
        (f"postgresql://me:hunter2@127.0.0.1:{port}/h", "Connection refused"),
        (f"postgresql://{PASSWORD_USER}:wrong-{PASSWORD}@127.0.0.1:{srv.port}/postgres", "password authentication"),
        (f"postgresql://postgres@127.0.0.1:{srv.port}/no_such_db", 'database "no_such_db" does not exist'),
        (f"postgresql://no_such_role@127.0.0.1:{srv.port}/postgres", 'role "no_such_role" does not exist'),
    ]
    for url, why in cases:
        t0 = time.monotonic()
        with pytest.raises(HistoryConnectError) as e:
            open_history(url, connect_timeout=20)  # a refusal waited out would cost 20 s (or the pool's 40)
        msg = str(e.value)
        assert msg.startswith(f"cannot connect to the history at {mask_url(url)}: ") and why in msg, msg
        assert "hunter2" not in msg and PASSWORD not in msg
        assert time.monotonic() - t0 < 15  # a refusal is said at once: never retried up to a timeout
    good = f"postgresql://{PASSWORD_USER}:{PASSWORD}@127.0.0.1:{srv.port}/postgres"
    srv.execute(f"GRANT CREATE ON SCHEMA public TO {PASSWORD_USER}")
    open_history(good, readonly=False).close()  # the right password gets in


def test_a_server_that_never_answers_times_out():
    """A socket that accepts and never speaks (a firewall, a hung host): the connect_timeout
    bounds the wait, and the error still names the URL."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://me@127.0.0.1:{silent.getsockname()[1]}/h"
        t0 = time.monotonic()
        with pytest.raises(HistoryConnectError, match=r"cannot connect to the history at postgresql://me@127\.0\.0\.1"):
            open_history(url, connect_timeout=1)
        assert time.monotonic() - t0 < 4.5  # libpq's least is 2 s; the default would be CONNECT_TIMEOUT_S (5 s)
        with pytest.raises(HistoryConnectError):
            open_history(url + "?connect_timeout=1")  # the URL's own setting, as libpq reads it


def test_malformed_urls_are_config_errors():
    for url in ("postgresql://[::1", "postgresql://u@h/db?bogus=1"):
        with pytest.raises(HistoryConfigError, match="bad history URL"):
            open_history(url)


def test_the_lab_and_the_cli_refuse_a_bad_history_at_once(tmp_path, capsys, monkeypatch):
    from supervisor import Lab, main

    url = f"postgresql://me:hunter2@127.0.0.1:{closed_port()}/h"
    with pytest.raises(HistoryConnectError, match="cannot connect to the history"):
        Lab(tmp_path / "art", history=url)
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n[workload.params]\ntarget = "math:sqrt"\ncalls = 10\n')
    for argv in (
        ["run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live", "--history", url],
        ["list", "--artifacts", str(tmp_path / "art"), "--history", url],
        ["lab", "serve", "--artifacts", str(tmp_path / "art"), "--port", "0", "--history", url],
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        if argv[0] == "lab":  # the daemon logs JSON lines to stderr before it reaches the history
            err = err.splitlines()[-1]
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert "postgresql://me:***@127.0.0.1" in err and "hunter2" not in err, err
        assert argv[0] != "run" or err.startswith("crucible run: error: --history: "), err  # not --backend's
        assert argv[0] != "lab" or err.startswith("crucible lab: error: --history: "), err
    monkeypatch.setenv(ENV, url)  # named by the environment: the message says so, not --history
    for argv in (
        ["run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live"],
        ["list", "--artifacts", str(tmp_path / "art")],
        ["lab", "serve", "--artifacts", str(tmp_path / "art"), "--port", "0"],
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f": error: ${ENV}: cannot connect to the history at postgresql://me:***@" in err, (
            err
        )


def test_no_message_shows_a_password_even_of_a_malformed_url():
    """libpq quotes a URL it cannot parse, password and all: the message must not."""
    port = closed_port()
    for url in (
        "postgresql://me:hunter2@[::1/db",  # an IPv6 host never closed
        f"postgresql://me:hun%ter2@127.0.0.1:{port}/db",  # a bad percent-escape in the password itself
        f"postgresql://me@127.0.0.1:{port}/db?password=hun%zzter2",
        f"postgresql://me:hunter2@127.0.0.1:{port}/db?sslmode=bogus",
    ):
        assert "hunter2" not in mask_url(url) and "hun%" not in mask_url(url) and "***" in mask_url(url), url
        with pytest.raises(HistoryError) as e:
            open_history(url)
        msg = str(e.value)
        assert "hunter2" not in msg and "hun%" not in msg and "ter2" not in msg and "***" in msg, msg
    assert mask_url("postgresql://") == "postgresql://"  # as written, not a mangled 'postgresql:'
    assert mask_url("postgresql://me:pa/ss@db/h") == "postgresql://me:***@db/h"


@pytest.mark.parametrize("value", ["0", "-1", "1e99", "nan", "2.5", "3601", "inf"])
def test_a_connect_timeout_that_could_hang_is_refused(value):
    """libpq takes 0 (or less) to mean wait for ever, and psycopg a huge value the same: a history
    that never answers would hang the command. Refused at once, by name."""
    url = f"postgresql://me:hunter2@127.0.0.1:{closed_port()}/h"
    with pytest.raises(HistoryConfigError, match=r"connect_timeout must be a whole number of seconds from 1 to 3600"):
        open_history(f"{url}?connect_timeout={value}")
    if value != "2.5":  # the Python argument is seconds as a float: 2.5 is fine there
        with pytest.raises(HistoryConfigError, match="connect_timeout must be"):
            open_history(url, connect_timeout=float(value))


def test_the_cli_names_the_setting_once_and_a_server_lost_mid_export_is_one_line(
    server_back, pg_url, tmp_path, capsys, monkeypatch
):
    """Every history error of export is one line that names what set the history (--history or
    $CRUCIBLE_HISTORY) and says why once; a server killed (pg_ctl stop -m immediate) while an
    export reads is such a line too, and leaves no file behind, whole or partial."""
    from actors.messages import encode
    from supervisor import main
    from telemetry.batchstore import BatchStore
    from telemetry.schema import rows_to_batch
    from tests.test_queries import T0, S, make_rows

    srv = server_back
    url = pg_url + "?connect_timeout=1"
    store = open_history(url)
    try:
        for row in make_rows([T0 + i * S for i in range(200)], run_id="run1"):  # 200 batches: 4 reads of 64
            store.insert_batch(
                "exp", "run1", [row["seq"]], row["ts"], row["ts"], encode(rows_to_batch([row], "exp", "run1"))
            )
        store.commit()
    finally:
        store.close()
    art, out = tmp_path / "art", tmp_path / "out" / "run1.jsonl"

    def fails(*argv: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["export", *argv, "--artifacts", str(art)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    monkeypatch.setenv(ENV, f"postgresql://me:hunter2@127.0.0.1:{closed_port()}/h")
    err = fails("run1")
    assert err.startswith("crucible export: error: $CRUCIBLE_HISTORY: cannot connect to the history at "), err
    assert err.count("cannot") == 1 and "hunter2" not in err, err
    monkeypatch.delenv(ENV)
    err = fails("a" * 5000, "--history", url)  # too long for a file name: no OSError traceback
    assert "run id must be a string of 1..128 characters" in err, err[:200]

    real = BatchStore.iter_events

    gone_at: list[float] = []

    def server_dies_mid_read(self, *args, **kwargs):
        for n, ev in enumerate(real(self, *args, **kwargs)):
            if n == 100:
                srv._run("pg_ctl", "-D", str(srv.data), "-m", "immediate", "-w", "stop")
                gone_at.append(time.monotonic())
            yield ev

    monkeypatch.setattr(BatchStore, "iter_events", server_dies_mid_read)
    err = fails("run1", "--out", str(out), "--history", url)
    assert err.startswith(f"crucible export: error: --history: history at {mask_url(url)} unavailable: "), err
    # said soon after the server went (the 1 s connect timeout), not after the pool's 10 s of reconnecting;
    # timed from the server's end, so a slow pg_ctl on a loaded machine does not count
    assert gone_at and time.monotonic() - gone_at[0] < 8
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial file


def test_a_file_that_is_no_history_is_refused_not_passed_over(tmp_path, capsys):
    """list took a garbage or empty file as --history and listed the folders as if none was named."""
    from supervisor import main

    garbage, empty = tmp_path / "garbage.sqlite3", tmp_path / "empty.sqlite3"
    garbage.write_bytes(bytes(range(256)) * 20)
    empty.write_bytes(b"")
    for history, why in ((garbage, "it is not a SQLite database"), (empty, "no crucible history at")):
        for argv in (["list"], ["export", "run1"]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main([*argv, "--artifacts", str(tmp_path / "art"), "--history", str(history)])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and len(err.splitlines()) == 1, err
            assert err.startswith(f"crucible {argv[0]}: error: --history: ") and why in err and str(history) in err, err


# --- writers side by side ----------------------------------------------------------------------------------


def test_concurrent_writers_give_the_same_answers_as_sqlite(pg_url, tmp_path):
    """Four writers, one store each, commit batches of one experiment at once into PostgreSQL;
    the same batches go into SQLite; every query answers the same from both."""
    from actors.messages import encode
    from telemetry.schema import rows_to_batch
    from tests.test_queries import T0, S, make_rows

    lite = HistoryStore(tmp_path / "h.sqlite3")
    stores = [open_history(pg_url) for _ in range(4)]
    gate = threading.Barrier(4)

    def write(k: int) -> None:
        rows = make_rows([T0 + (i * 4 + k) * S // 10 for i in range(300)], run_id=f"run{k}")
        gate.wait()
        for i in range(0, len(rows), 17):
            part = rows[i : i + 17]
            b = encode(rows_to_batch(part, "exp", f"run{k}"))
            args = ("exp", f"run{k}", [part[0]["seq"], part[-1]["seq"]], part[0]["ts"], part[-1]["ts"], b, len(part))
            stores[k].insert_batch(*args)
            stores[k].commit()
            with lock:
                lite.insert_batch(*args)

    lock = threading.Lock()
    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lite.commit()
    pg = stores[0]
    for spec, filters in (
        (("last_n", 50), None),
        (("range", T0 / S + 10, T0 / S + 40), {"phase": "a"}),
        (("sliding", 5, "s", 5), {"run_id": "run2"}),
        (("last_n", 7), {"parameters.k": 1, "success": True}),
    ):
        assert pg.query("exp", spec, filters) == lite.query("exp", spec, filters), spec
    assert pg.windowed_metrics("exp", 2, 1) == lite.windowed_metrics("exp", 2, 1)
    assert list(pg.iter_events(experiment_id="exp")) == list(lite.iter_events(experiment_id="exp"))
    assert list(pg.iter_events(run_id="run3")) == list(lite.iter_events(run_id="run3"))
    assert [pg.max_seq(f"run{k}") for k in range(4)] == [299] * 4
    for s in (*stores, lite):
        s.close()


def test_a_batch_sent_twice_is_stored_once(pg_url):
    """A commit whose answer was lost is sent again: the batches already there are skipped, the
    new ones stored, in the same commit."""
    from actors.messages import encode
    from telemetry.schema import rows_to_batch
    from tests.test_queries import T0, S, make_rows

    rows = make_rows([T0 + i * S for i in range(30)])
    parts = [rows[:10], rows[10:20], rows[20:]]
    store = open_history(pg_url)
    try:
        for i, part in enumerate(parts):
            data = encode(rows_to_batch(part, "exp", "run"))
            store.insert_batch("exp", "run", [part[0]["seq"], part[-1]["seq"]], part[0]["ts"], part[-1]["ts"], data)
            if i != 1:
                store.commit()  # the first alone; then the first again (a replay) with the two others
            if i == 0:
                store.insert_batch("exp", "run", [0, 9], parts[0][0]["ts"], parts[0][-1]["ts"], data)
        assert [e["seq"] for e in store.iter_events(run_id="run")] == list(range(30))
        assert store.query("exp", ("last_n", 100)) == rows
    finally:
        store.close()


def test_two_writers_of_one_run_never_deadlock(pg_url):
    """Two writers of the same run id whose batches overlap, given in different orders: each
    commit takes its keys in one order, so one waits for the other instead of both being
    refused as a deadlock."""
    with psycopg.connect(pg_url, autocommit=True) as admin:  # a deadlock would stall 20 s, not be retried in 1
        admin.execute(f"ALTER DATABASE \"{pg_url.rsplit('/', 1)[1]}\" SET deadlock_timeout = '20s'")
    store = open_history(pg_url)
    other = psycopg.connect(pg_url)
    t0 = time.monotonic()
    try:
        other.execute("INSERT INTO batches VALUES ('run', 5, 5, 'exp', 5, 5, 1, 'x')")  # held, uncommitted
        for k in reversed(range(10)):  # a writer given the batches newest first
            store.insert_batch("exp", "run", [k], k, k, b"batch")
        errors: list[BaseException] = []

        def commit() -> None:
            try:
                store.commit()
            except HistoryError as exc:
                errors.append(exc)

        t = threading.Thread(target=commit)
        t.start()
        with psycopg.connect(pg_url, autocommit=True) as watch:
            blocked = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crucible-lab' "
                "AND wait_event_type = 'Lock'"
            )
            until(lambda: watch.execute(blocked).fetchone()[0] == 1 or not t.is_alive(), what="the commit waiting")
        other.execute("INSERT INTO batches VALUES ('run', 6, 6, 'exp', 6, 6, 1, 'x')")  # the deadlock, unsorted
        other.commit()
        t.join(30)
        assert not errors, errors
        assert time.monotonic() - t0 < 15  # no deadlock to wait out (deadlock_timeout is 20 s here)
        assert [r[0] for r in other.execute("SELECT seq_lo FROM batches ORDER BY seq_lo")] == list(range(10))
    finally:
        other.close()
        store.close()


# --- the server goes away mid-run --------------------------------------------------------------------------


def history_seqs(url: str, run_id: str) -> list[int]:
    store = open_history(url, readonly=True)
    try:
        return [e["seq"] for e in store.iter_events(run_id=run_id)]
    finally:
        store.close()


@pytest.fixture
def server_back(pg):
    """The session's server, started again at the end of the test whatever happened."""
    srv = pg
    yield srv
    try:
        srv.start()
    except RuntimeError:
        pass  # it is running already


@pytest.mark.parametrize("buffer", [1_000_000, 120], ids=["in-memory", "spilled"])
def test_a_recorder_waits_out_a_server_restart_and_loses_nothing(server_back, pg_url, tmp_path, buffer):
    srv = server_back
    rec, em = recorded(tmp_path, 40, history=pg_url, history_buffer=buffer, history_retry_s=(0.05, 0.5))
    emit_n(em, 400)
    em.flush()
    assert rec.ask({"kind": "flush"})["persisted"] == 400
    srv.stop()  # pg_ctl stop -m fast: every connection is cut
    emit_n(em, 600, start=400)
    em.flush()
    rec.ask({"kind": "flush"})  # after the batches: the commit met the stopped server
    s = rec.ask({"kind": "summary"})
    h = s["history"]
    assert (h["available"], h["outages"], h["events_waiting"]) == (False, 1, 600), h
    assert h["events_waiting_max"] == 600, h  # spilled events count, whether a retry ran or not
    assert "unavailable" in h["error"] and s["events_persisted"] == 400
    assert h["events_spilled"] == (600 if buffer < 600 else 0)
    assert s["accounting"]["balanced"] and s["accounting"]["waiting"] == 600
    assert s["storage_error"] is None
    assert [e["seq"] for e in iter_run(tmp_path / "exp" / "run")] == list(range(1000))  # the files go on
    srv.start()
    until(lambda: rec.ask({"kind": "summary"})["history"]["available"], what="the Recorder reaching the server")
    emit_n(em, 200, start=1000)
    counters = em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 1200
    s = rec.ask({"kind": "summary"})
    rec.stop()
    assert history_seqs(pg_url, "run") == list(range(1200))  # every event, once, in order
    h = s["history"]
    assert h["outages"] == 1 and h["retries"] >= 1 and h["down_s"] > 0 and h["events_waiting"] == 0
    assert h["events_waiting_max"] == 600 and h["events_unsent"] == 0
    a = s["accounting"]
    assert a["emitted"] == counters["emitted"] == 1200 == a["persisted"] + a["dropped"] + a["sampled_out"]
    assert a["balanced"] and a["dropped"] == 0


class LostAnswerProxy:
    """A TCP proxy to the server that, once armed (:meth:`arm`), forwards the next ``COMMIT`` (the
    server commits it) and never relays the answer: it cuts every connection as the answer
    comes and refuses new ones until :meth:`reopen`. The network cut right after a commit."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.answer_lost = threading.Event()
        self.cut = threading.Event()
        self._muted: socket.socket | None = None
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, url: str) -> str:
        return url.replace(f":{self.target}/", f":{self.port}/")

    def arm(self) -> None:
        self.armed.set()

    def reopen(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.listener.close()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.cut.is_set():
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if from_client and self.armed.is_set() and b"COMMIT" in data:
                    self.armed.clear()
                    self.cut.set()
                    self._muted = dst  # what the server says next on this connection reaches no one
                elif not from_client and self._muted is src:
                    self._muted = None
                    self.answer_lost.set()
                    self._cut_all()
                    return
                dst.sendall(data)


@pytest.fixture
def lost_answer(pg):
    proxy = LostAnswerProxy(pg.port)
    yield proxy
    proxy.close()


def test_events_sent_again_after_a_lost_commit_answer_are_all_stored(lost_answer, pg_url, tmp_path):
    """The server commits a batch but its answer never comes, and the outage then spills: the
    Recorder re-reads the waiting events from its files, in chunks that start with the batch
    the server already holds. Every event must reach the history once (the history keeping the
    stored batch and dropping the rest of the chunk lost them while counting them persisted)."""
    proxy = lost_answer
    rec, em = recorded(tmp_path, 40, history=proxy.url(pg_url), history_buffer=50, history_retry_s=(0.05, 0.2))
    emit_n(em, 400)
    em.flush()
    assert rec.ask({"kind": "flush"})["persisted"] == 400
    proxy.arm()
    emit_n(em, 40, start=400)  # one batch: its commit reaches the server, its answer is lost
    em.flush()
    rec.ask({"kind": "flush"})
    assert proxy.answer_lost.is_set()
    assert history_seqs(pg_url, "run") == list(range(440))  # the server has it
    emit_n(em, 560, start=440)  # past history_buffer: spilled, to be re-read from the files
    em.flush()
    rec.ask({"kind": "flush"})
    h = rec.ask({"kind": "summary"})["history"]
    assert not h["available"] and h["events_spilled"] > 0 and h["events_waiting"] == 600, h
    proxy.reopen()
    until(lambda: rec.ask({"kind": "summary"})["history"]["available"], what="the Recorder reaching the server")
    emit_n(em, 200, start=1000)
    em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 1200
    rec.stop()
    assert history_seqs(pg_url, "run") == list(range(1200))  # every event, once, in order


def test_a_stop_while_the_server_is_away_keeps_the_events_in_the_files(server_back, pg_url, tmp_path):
    """The stop waits a little, then gives up: the waiting events are on disk (the reference),
    counted as persisted and as unsent; a Recorder that reopens the run back-fills them."""
    srv = server_back
    rec, em = recorded(tmp_path, 25, history=pg_url, history_stop_wait_s=0.5)
    emit_n(em, 100)
    em.flush()
    rec.ask({"kind": "flush"})
    srv.stop()
    emit_n(em, 150, start=100)
    counters = em.close()
    rec.ask({"kind": "flush"})
    t0 = time.monotonic()
    rec.stop()
    assert time.monotonic() - t0 < 10  # it waited its 0.5 s, not the default HISTORY_STOP_WAIT_S (10 s)
    import orjson

    s = orjson.loads((tmp_path / "exp" / "run" / "summary.json").read_bytes())
    assert s["events_persisted"] == 250 and s["history"]["events_unsent"] == 150
    assert s["history"]["available"] is False and "unavailable" in s["history"]["error"]  # as it stopped
    assert s["accounting"]["balanced"] and counters["emitted"] == 250
    srv.start()
    assert history_seqs(pg_url, "run") == list(range(100))
    again = Recorder.start(tmp_path, "exp", "run", history=pg_url)  # reopening back-fills from the JSONL
    assert again.ask({"kind": "flush"})["persisted"] == 250
    assert again.ask({"kind": "summary"})["history"]["events_unsent"] == 0
    again.stop()
    assert history_seqs(pg_url, "run") == list(range(250))


def test_an_experiment_runs_through_a_server_restart(server_back, pg_url, tmp_path):
    """A real run in a Lab whose history is PostgreSQL: the server is stopped and started again
    mid-run; the run goes on, and at its end the history holds exactly the run's events."""
    from supervisor import Lab

    srv = server_back
    spec = {
        "name": "pgrun",
        "time_budget_s": 600.0,
        "metrics": {"publish_interval_s": 0},
        "workload": {"name": "latency", "params": {"target": "time:sleep", "args": [0.001], "calls_per_step": 5}},
    }
    with Lab(tmp_path / "art", history=pg_url) as lab:
        exp = lab.start_experiment(spec)
        rec = exp.registry.whereis("recorder")
        until(lambda: rec.ask({"kind": "flush"})["persisted"] > 100, what="events in PostgreSQL")
        srv.stop()
        until(lambda: not rec.ask({"kind": "summary"})["history"]["available"], what="the outage noticed")
        waiting = rec.ask({"kind": "summary"})["history"]["events_waiting"]
        until(lambda: rec.ask({"kind": "summary"})["history"]["events_waiting"] > waiting + 50, what="more events")
        srv.start()
        until(lambda: rec.ask({"kind": "summary"})["history"]["available"], what="the server reached again")
        exp.stop()
        s = exp.summary()
    a = s["accounting"]
    assert a["balanced"] and a["emitted"] == a["persisted"] + a["dropped"] + a["sampled_out"] and a["waiting"] == 0
    assert s["history"]["outages"] >= 1 and s["history"]["events_unsent"] == 0
    on_disk = [e["seq"] for e in iter_run(exp.run_dir)]
    assert history_seqs(pg_url, exp.run_id) == on_disk and len(on_disk) == s["events_persisted"]
    store = open_history(pg_url, readonly=True)
    try:
        (row,) = store.runs("pgrun")
    finally:
        store.close()
    assert row["run_id"] == exp.run_id and row["summary"]["events_persisted"] == s["events_persisted"]
