"""A history that is damaged (SQLite's "database disk image is malformed", PostgreSQL's
corrupted data) is the history's problem, not a full disk: the run goes on into its events
files (the reference), the history counted as lost and its events as unsent, the summary and
``crucible sync`` naming the history and why."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from actors import Topics
from actors.recorder import Recorder
from supervisor import Lab, main
from telemetry.emitter import Emitter
from telemetry.history import HistoryDamaged, open_history
from telemetry.jsonl import iter_run
from telemetry.rundir import RunStatus
from telemetry.store import _SCHEMA, DB_NAME, HistoryStore
from tests.test_pipeline_faults import fast_spec
from tests.test_recorder import emit_n

pytest_plugins = ["tests.pg_server"]

MALFORMED = "database disk image is malformed"


def damage(db: Path) -> None:
    """Overwrite the header of every page but the first (the schema): the file still opens,
    and any read or write of the tables' pages meets "database disk image is malformed"."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    for off in range(size, len(data), size):
        data[off : off + 16] = b"\xde\xad\xbe\xef" * 4
    db.write_bytes(bytes(data))


def run_events(root: Path, run_id: str, n: int, start: int = 0, **opts) -> tuple[dict, dict]:
    """Record ``n`` events of ``exp/<run_id>`` (seqs from ``start``); the summary and counters."""
    topics = Topics()
    rec = Recorder.start(root, "exp", run_id, **opts)
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", run_id, batch_size=25, seq_start=start)
    emit_n(em, n, start=start)
    counters = em.close()
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    rec.stop()
    return s, counters


def damaged_history(root: Path) -> Path:
    """A history holding an earlier run, then damaged; it still opens for writing."""
    run_events(root, "old", 500)
    db = root / DB_NAME
    damage(db)
    HistoryStore(db).close()  # only its tables' pages are damaged: the schema reads
    return db


def test_a_damaged_sqlite_history_leaves_the_run_recording_into_its_files(tmp_path, capsys):
    """The Recorder used to take the malformed commit for a storage failure: it cut the JSONL
    back to nothing and stopped the run, the summary saying the history was available."""
    db = damaged_history(tmp_path)
    with capture_logs() as logs:
        s, counters = run_events(tmp_path, "new", 200)
    (warned,) = [e for e in logs if e["event"].startswith("history damaged")]
    assert str(db) in warned["error"] and MALFORMED in warned["error"] and "crucible sync" in warned["event"]
    h = s["history"]
    assert s["storage_error"] is None and counters["emitted"] == 200
    assert h["available"] is False and h["events_unsent"] == 200, h
    assert h["error"] == f"history {str(db)!r} is damaged: {MALFORMED}"
    assert s["events_persisted"] == 200 and s["events_dropped_storage"] == 0 and s["accounting"]["balanced"]
    assert [e["seq"] for e in iter_run(tmp_path / "exp" / "new")] == list(range(200))  # the reference keeps all
    disk = orjson.loads((tmp_path / "exp" / "new" / "summary.json").read_bytes())
    assert disk["history"]["error"] == h["error"] and disk["storage_error"] is None
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(tmp_path)]) != 0
    out, err = capsys.readouterr()
    assert f"stopped: history {str(db)!r} is damaged: {MALFORMED}" in out
    assert f"the history at {db} is damaged" in err and "run crucible sync again" in err
    # moved aside, the history is rebuilt from the run folders
    for p in tmp_path.glob(f"{DB_NAME}*"):
        p.rename(p.with_name("damaged-" + p.name))
    assert main(["sync", "--artifacts", str(tmp_path)]) == 0
    store = HistoryStore(db, readonly=True)
    try:
        assert [e["seq"] for e in store.iter_events(run_id="new")] == list(range(200))
    finally:
        store.close()


def test_a_run_reopened_on_a_damaged_history_goes_on_recording(tmp_path):
    """The back-fill of a reopened run reads the history: damaged, it used to stop recording
    (a storage error) for the rest of the run."""
    run_events(tmp_path, "run", 100)
    damage(tmp_path / DB_NAME)
    s, _ = run_events(tmp_path, "run", 50, start=100)
    h = s["history"]
    assert s["storage_error"] is None and s["events_dropped_storage"] == 0
    assert s["events_persisted"] == 150 and h["available"] is False and MALFORMED in h["error"]
    assert h["events_unsent"] == 150, h  # the 100 the history can no longer be asked about, and the new 50
    assert [e["seq"] for e in iter_run(tmp_path / "exp" / "run")] == list(range(150))


def test_an_experiment_on_a_damaged_history_runs_to_its_budget(tmp_path):
    """The report's daemon queue: each experiment stopped within a second, ``storage: ...``,
    keeping nothing. It runs its budget now, its events in its files."""
    art = tmp_path / "art"
    db = damaged_history(art)
    with Lab(art) as lab:
        exp = lab.start_experiment(fast_spec("on-damaged", budget=1.0))
        assert exp.wait(30)
        s = exp.summary()
    assert exp.status() == RunStatus.STOPPED and exp.reason == "budget", exp.reason
    assert s["storage_error"] is None and s["events_dropped_storage"] == 0
    assert s["history"]["available"] is False and str(db) in s["history"]["error"]
    events = list(iter_run(exp.run_dir))
    assert len(events) == s["events_persisted"] == s["history"]["events_unsent"] > 0
    assert events[-1]["name"] == "phase_end"


def test_a_postgresql_history_reporting_corrupted_data_is_a_damaged_history(pg, pg_url, tmp_path):
    """PostgreSQL's equivalent (SQLSTATE XX001, data_corrupted), raised here by the server
    itself: the same path as SQLite's malformed file, never a storage failure."""
    run_events(tmp_path, "before", 10, history=pg_url)  # the schema is in place
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION corrupted() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'invalid page in block 7 of relation base/1/2' USING ERRCODE = 'data_corrupted'; "
            "END $$"
        )
        conn.execute(
            "CREATE TRIGGER corrupted BEFORE INSERT ON batches FOR EACH STATEMENT EXECUTE FUNCTION corrupted()"
        )
    store = open_history(pg_url)
    store.insert_batch("exp", "r", [0, 1], 1, 2, b"x", n=2)
    with pytest.raises(HistoryDamaged, match="is damaged: invalid page in block 7"):
        store.commit()
    store.rollback()
    store.close()
    s, counters = run_events(tmp_path, "during", 100, history=pg_url)
    h = s["history"]
    assert s["storage_error"] is None and counters["emitted"] == 100
    assert h["available"] is False and "is damaged: invalid page" in h["error"] and h["events_unsent"] == 100, h
    assert [e["seq"] for e in iter_run(tmp_path / "exp" / "during")] == list(range(100))


def test_a_file_that_is_no_crucible_history_is_refused_before_anything_is_written(tmp_path):
    """``--history PATH`` names a file: one that is not a database, or another program's
    SQLite database, is refused with nothing written in it or beside it (no ``.lock``, no
    switch to WAL, no tables of ours); an empty file and our own history (marked, or an older
    unmarked one) open."""
    from telemetry.history import HistoryConnectError

    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE foo (x)")
    con.commit()
    con.close()
    marked = tmp_path / "marked.db"
    con = sqlite3.connect(marked)
    con.execute("PRAGMA application_id = 1234")
    con.execute("CREATE TABLE batches (x)")
    con.commit()
    con.close()
    for path, why in ((text, "not a SQLite database"), (foreign, "tables foo"), (marked, "application id 0x4d2")):
        before = path.read_bytes()
        with pytest.raises(HistoryConnectError, match=why):
            HistoryStore(path)
        assert path.read_bytes() == before
        assert not path.with_name(path.name + ".lock").exists()
    con = sqlite3.connect(foreign)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(HistoryConnectError, match="is a folder"):
        HistoryStore(tmp_path / "dir.db")

    zeros = tmp_path / "recorder.reserve"  # a file of zeros (a crashed run's reserve) is no database either
    zeros.write_bytes(bytes(4096))
    lockfile = tmp_path / "history.sqlite3.lock"  # a slip of tab completion
    lockfile.touch()
    for path, why in ((zeros, "not a SQLite database"), (lockfile, "a .lock file is no history")):
        with pytest.raises(HistoryConnectError, match=why):
            HistoryStore(path)
        assert not path.with_name(path.name + ".lock").exists()
    # a reader says the same as a writer (it said "damaged: file is not a database")
    for path, why in ((text, "not a SQLite database"), (zeros, "not a SQLite database"), (lockfile, ".lock file")):
        with pytest.raises(HistoryConnectError, match=why):
            HistoryStore(path, readonly=True)
    with pytest.raises(HistoryConnectError, match="application id 0x4d2"):
        HistoryStore(marked, readonly=True)
    fifo = tmp_path / "fifo.db"  # never opened: a FIFO would hold the open until a writer came
    os.mkfifo(fifo)
    link = tmp_path / "x.sqlite3"  # a link to a lock file is a lock file
    link.symlink_to(lockfile)
    runs_only = tmp_path / "runs_only.db"  # a table named like one of ours is not our history
    con = sqlite3.connect(runs_only)
    con.execute("CREATE TABLE runs (id INTEGER)")
    con.commit()
    con.close()
    locked = tmp_path / "locked.db"  # another program's, held locked: cannot be told apart, so refused
    con = sqlite3.connect(locked)
    con.execute("CREATE TABLE invoices (x)")
    con.commit()
    con.execute("BEGIN EXCLUSIVE")
    try:
        for path, why in (
            (fifo, "not a regular file"),
            (link, "a .lock file is no history"),
            (runs_only, "tables runs"),
            (locked, "another program holds it locked"),
        ):
            before = os.lstat(path)
            with pytest.raises(HistoryConnectError, match=why):
                HistoryStore(path)
            assert os.lstat(path).st_mode == before.st_mode
            assert not path.with_name(path.name + ".lock").exists()
    finally:
        con.rollback()
        con.close()
    con = sqlite3.connect(runs_only)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert {r[0] for r in con.execute("SELECT name FROM sqlite_master")} == {"runs"}
    con.close()
    empty = tmp_path / "empty.db"
    empty.touch(mode=0o644)
    HistoryStore(empty).close()
    assert empty.stat().st_mode & 0o777 == 0o600  # a new history is the owner's only, made in an empty file too
    older = tmp_path / "older.db"  # a history written before the mark: our tables, no application id
    con = sqlite3.connect(older)
    con.executescript(_SCHEMA)
    con.commit()
    con.close()
    HistoryStore(older).close()
    ours = tmp_path / DB_NAME
    HistoryStore(ours).close()
    HistoryStore(ours).close()  # marked now: opens again
    con = sqlite3.connect(ours)
    assert con.execute("PRAGMA application_id").fetchone()[0] == 0x43524C42
    con.close()
