import math
import os
import shutil
import threading
import time

import orjson
import pyarrow.parquet as pq
import pytest

from actors import Registry, Topics
from actors.recorder import Recorder
from supervisor import ChildSpec, Supervisor
from telemetry.emitter import Emitter
from telemetry.export import export_experiment, export_run
from telemetry.jsonl import iter_run, run_segments
from telemetry.rundir import ArtifactsError, summary_best
from telemetry.schema import SchemaError
from tests.telemetry_helpers import BatchProbe, recorded

pytest_plugins = ["tests.pg_server"]  # history_target: the history tests run on SQLite and PostgreSQL


def seqs_on_disk(run_dir):
    return [ev["seq"] for ev in iter_run(run_dir)]


def emit_n(em, n, start=0, phase="tabu"):
    for i in range(start, start + n):
        em.emit(
            "step",
            {"conflicts": float(n - i), "colors": 20.0 - i % 3},
            phase=phase,
            step=i,
            success=True,
            parameters={"tenure": 7} if i % 100 == 0 else None,
        )


@pytest.fixture
def tree(tmp_path, history_target):
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run1", history=history_target)
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run1", batch_size=64)
    yield topics, rec, em, tmp_path / "exp" / "run1"
    em.close()
    if rec.is_alive():
        rec.stop()


def test_events_reach_jsonl_sqlite_ring_and_summary(tree):
    _topics, rec, em, run_dir = tree
    emit_n(em, 500)
    em.emit("eval", {"colors": 17.0}, phase="memetic", gpu_mode="cpu_fallback", gpu_reason="cupy missing")
    em.close()
    assert rec.ask({"kind": "flush"}) == {"persisted": 501, "last_seq": 500}
    assert seqs_on_disk(run_dir) == list(range(501))
    last = rec.ask({"kind": "recent", "n": 1})[0]
    assert (last["gpu_mode"], last["gpu_reason"], last["phase"]) == ("cpu_fallback", "cupy missing", "memetic")
    hist = rec.ask({"kind": "query_window", "spec": ["last_n", 501], "source": "history"})
    assert [e["seq"] for e in hist] == list(range(501))
    s = rec.ask({"kind": "summary"})
    assert s["events_emitted"] == s["events_persisted"] == 501 and s["events_dropped"] == 0
    assert s["phases"]["tabu"]["best"]["conflicts"] == 1.0
    assert s["phases"]["tabu"]["best"]["colors"] == 18.0
    assert s["phases"]["memetic"]["events"] == 1
    rec.stop()
    on_disk = orjson.loads((run_dir / "summary.json").read_bytes())
    assert on_disk["events_persisted"] == 501


def test_time_trigger_flushes_a_partial_batch(tmp_path):
    topics, got = Topics(), threading.Event()
    probe = BatchProbe.start(got=got)
    topics.subscribe("events", probe)
    em = Emitter(topics, "exp", "r", batch_size=1024, flush_interval=0.05)
    em.emit("one", {"x": 1.0})
    assert got.wait(5), "a lone event must go out on the time trigger"
    assert probe.ask({"kind": "count"}) == [1, 1]
    em.close()
    probe.stop()


def test_drop_policy_accounts_for_every_event(tmp_path):
    topics, gate = Topics(), threading.Event()
    slow = BatchProbe.start(gate=gate)  # a stuck subscriber makes the backlog grow
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    topics.subscribe("events", slow)
    em = Emitter(topics, "exp", "run", batch_size=10, overflow="drop", max_backlog=3)
    emit_n(em, 200)
    gate.set()
    counters = em.close()
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    persisted = len(seqs_on_disk(tmp_path / "exp" / "run"))
    assert counters["dropped"] > 0
    assert s["events_persisted"] == persisted
    assert s["events_emitted"] == counters["emitted"] == persisted + counters["dropped"]
    assert s["events_dropped"] == counters["dropped"]
    reports = rec.ask({"kind": "query_window", "spec": ["last_n", 1000], "filters": {"name": "telemetry_dropped"}})
    assert reports and all(r["values"]["dropped"] > 0 for r in reports)
    rec.stop()
    slow.stop()


def test_block_policy_waits_then_loses_nothing(tmp_path, history_target):
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run", history=history_target)
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=16, overflow="block", max_backlog=2, block_timeout=30)
    emit_n(em, 2000)
    counters = em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 2000
    assert counters["dropped"] == 0
    rec.stop()


class CrashableRecorder(Recorder):
    def handle_crash(self, msg):
        raise RuntimeError("recorder crash for the test")


def test_recorder_crash_under_supervisor_loses_no_acknowledged_event(tmp_path, history_target):
    reg, topics = Registry(), Topics()
    spec = ChildSpec(
        "recorder", CrashableRecorder, args=(tmp_path, "exp", "run"), kwargs={"history": history_target}, name="rec"
    )
    sup = Supervisor.start([spec], registry=reg)
    topics.subscribe_name("events", "rec", reg)
    em = Emitter(topics, "exp", "run", batch_size=50)
    emit_n(em, 1000)
    em.flush()
    old = reg.whereis("rec")
    acked = old.ask({"kind": "flush"})
    reg.send("rec", {"kind": "crash"})
    emit_n(em, 1000, start=1000)  # sent while it crashes and restarts: stashed, then delivered
    new = reg.await_name("rec", timeout=10, not_urn=old.urn)
    assert new is not None
    counters = em.close()
    after = new.ask({"kind": "flush"})
    seqs = seqs_on_disk(tmp_path / "exp" / "run")
    assert set(range(acked["last_seq"] + 1)) <= set(seqs)  # every acknowledged event survived
    assert len(seqs) == len(set(seqs))  # and nothing was written twice
    s = new.ask({"kind": "summary"})
    assert s["recorder_incarnation"] == 2
    assert s["events_emitted"] == counters["emitted"] == s["events_persisted"] + s["events_dropped"]
    assert after["persisted"] == len(seqs) == 2000
    sup.stop()


def test_restart_cuts_torn_line_and_continues_without_duplicates(tmp_path, history_target):
    rec, em = recorded(tmp_path, 10, history=history_target)
    emit_n(em, 100)
    em.close()
    rec.stop()
    path = tmp_path / "exp" / "run" / "events.jsonl"
    with path.open("ab") as fh:
        fh.write(b'{"v":1,"seq":100,"ts":17')  # as left by kill -9 mid-write
    assert seqs_on_disk(path.parent) == list(range(100))  # the reader skips it, with a warning
    rec2 = Recorder.start(tmp_path, "exp", "run", history=history_target)
    assert path.read_bytes().endswith(b"\n")
    topics2 = Topics()
    topics2.subscribe("events", rec2)
    em2 = Emitter(topics2, "exp", "run", batch_size=10, seq_start=90)  # replays 90..99, then new events
    emit_n(em2, 30, start=90)
    em2.close()
    rec2.ask({"kind": "flush"})
    assert seqs_on_disk(path.parent) == list(range(120))
    hist = rec2.ask({"kind": "query_window", "spec": ["last_n", 10_000], "source": "history"})
    assert [e["seq"] for e in hist] == list(range(120))
    rec2.stop()


def test_rotation_keeps_order_across_files(tmp_path):
    rec, em = recorded(tmp_path, 20, rotate_bytes=4096)
    emit_n(em, 400)
    em.close()
    rec.stop()
    run_dir = tmp_path / "exp" / "run"
    assert len(run_segments(run_dir)) > 3
    assert seqs_on_disk(run_dir) == list(range(400))
    rec2 = Recorder.start(tmp_path, "exp", "run", rotate_bytes=4096)
    assert rec2.ask({"kind": "flush"})["persisted"] == 400
    rec2.stop()


def test_sqlite_is_backfilled_from_jsonl_after_a_crash(tmp_path):
    import sqlite3

    rec, em = recorded(tmp_path, 10)
    emit_n(em, 50)
    em.close()
    rec.stop()
    # as if the process died after the JSONL write and before the SQLite commit of the last batches
    db = sqlite3.connect(tmp_path / "history.sqlite3")
    with db:
        db.execute("DELETE FROM batches WHERE seq_lo >= 30")
    db.close()
    rec2 = Recorder.start(tmp_path, "exp", "run")
    hist = rec2.ask({"kind": "query_window", "spec": ["last_n", 1000], "source": "history"})
    assert [e["seq"] for e in hist] == list(range(50))
    rec2.stop()


def test_a_reopened_run_back_fills_a_hole_in_the_middle_of_the_history(tmp_path, history_target):
    """Batches gone from the middle of a run's stored events (not only past its last stored
    seq): the Recorder that reopens the run sends them again from the JSONL, once each."""
    from structlog.testing import capture_logs

    from telemetry.history import open_history

    rec, em = recorded(tmp_path, 10, history=history_target)
    emit_n(em, 60)
    em.close()
    rec.stop()
    store = open_history(history_target, artifacts=tmp_path)
    try:
        assert store.drop_batches("run", [10, 20, 40]) == 3
        assert store.max_seq("run") == 59
    finally:
        store.close()
    with capture_logs() as logs:
        rec2 = Recorder.start(tmp_path, "exp", "run", history=history_target)
    try:
        hist = rec2.ask({"kind": "query_window", "spec": ["last_n", 1000], "source": "history"})
        assert [e["seq"] for e in hist] == list(range(60))
        assert rec2.ask({"kind": "summary"})["events_persisted"] == 60
    finally:
        rec2.stop()
    filled = [e for e in logs if "middle of the run" in e["event"]]
    assert [e["events"] for e in filled] == [30]


class HeldLock:
    """Another connection holding the SQLite history locked (``BEGIN EXCLUSIVE``), as a long
    transaction or a tool would, until released."""

    def __init__(self, path):
        import sqlite3

        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self):
        self.db.execute("COMMIT")
        self.db.close()


def history_seqs(artifacts, run_id="run"):
    from telemetry.store import HistoryStore

    store = HistoryStore(artifacts / "history.sqlite3", readonly=True)
    try:
        return [e["seq"] for e in store.query("exp", ["last_n", 100_000], run_id=run_id)]
    finally:
        store.close()


def test_a_locked_sqlite_history_is_waited_for_like_an_absent_server(tmp_path):
    """A lock another connection holds past the busy timeout is an outage, not a storage
    failure: the run goes on into its files, and every event reaches the history, once, in
    order, when the lock is released."""
    from tests.fault_helpers import until

    rec, em = recorded(tmp_path, 25)
    emit_n(em, 100)
    em.flush()
    assert rec.ask({"kind": "flush"})["persisted"] == 100
    lock = HeldLock(tmp_path / "history.sqlite3")
    emit_n(em, 150, start=100)
    em.flush()
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    h = s["history"]
    assert (h["available"], h["outages"], h["events_waiting"]) == (False, 1, 150), h
    assert "locked" in h["error"] and s["storage_error"] is None
    assert s["events_persisted"] == 100 and s["accounting"]["balanced"]
    assert seqs_on_disk(tmp_path / "exp" / "run") == list(range(250))  # the files go on
    lock.release()
    until(lambda: rec.ask({"kind": "summary"})["history"]["available"], what="the Recorder writing again")
    assert rec.ask({"kind": "flush"})["persisted"] == 250
    rec.stop()
    assert history_seqs(tmp_path) == list(range(250))


def test_a_stop_while_the_history_is_locked_keeps_the_events_and_a_reopen_sends_them(tmp_path):
    rec, em = recorded(tmp_path, 25, history_stop_wait_s=0.3)
    emit_n(em, 50)
    em.flush()
    rec.ask({"kind": "flush"})
    lock = HeldLock(tmp_path / "history.sqlite3")
    emit_n(em, 75, start=50)
    counters = em.close()
    rec.ask({"kind": "flush"})
    rec.stop()  # waits, gives up: the events stay in the run's files
    s = orjson.loads((tmp_path / "exp" / "run" / "summary.json").read_bytes())
    assert s["events_persisted"] == 125 == counters["emitted"] and s["history"]["events_unsent"] == 75
    assert s["storage_error"] is None and s["accounting"]["balanced"]
    assert s["history"]["available"] is False and "locked" in s["history"]["error"]  # its last commit did not get in
    again = Recorder.start(tmp_path, "exp", "run")  # still locked: nothing fails, the count stays
    assert again.ask({"kind": "summary"})["history"]["events_unsent"] == 75
    assert again.ask({"kind": "summary"})["storage_error"] is None
    again.stop()
    lock.release()
    assert history_seqs(tmp_path) == list(range(50))
    third = Recorder.start(tmp_path, "exp", "run")  # the lock gone: the reopen back-fills from the JSONL
    assert third.ask({"kind": "summary"})["history"]["events_unsent"] == 0
    third.stop()
    assert history_seqs(tmp_path) == list(range(125))


def test_sync_sends_what_a_stop_left_unsent(tmp_path, capsys):
    """A run that ended with events the history never got (locked past the stop wait):
    ``crucible sync`` sends exactly those, records the run, and a second sync finds nothing."""
    from supervisor import main
    from telemetry.rundir import LIFECYCLE, owner_info
    from telemetry.store import HistoryStore
    from telemetry.sync import sync_run

    rec, em = recorded(tmp_path, 25, history_stop_wait_s=0.2)
    emit_n(em, 40)
    em.flush()
    rec.ask({"kind": "flush"})
    lock = HeldLock(tmp_path / "history.sqlite3")
    emit_n(em, 60, start=40)
    em.close()
    rec.ask({"kind": "flush"})
    rec.stop()
    lock.release()
    run = tmp_path / "exp" / "run"
    assert history_seqs(tmp_path) == list(range(40))
    live = tmp_path / "exp" / "live"  # a run its owner (this process) still runs: left to its Recorder
    live.mkdir()
    (live / LIFECYCLE).write_bytes(orjson.dumps({"status": "running", "owner": owner_info(), "updated_at": 0}))
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "exp/run: sent 60 event(s); summary recorded" in out and "exp/live: left alone (running" in out, out
    assert history_seqs(tmp_path) == list(range(100))
    assert orjson.loads((run / "summary.json").read_bytes())["history"]["events_unsent"] == 0
    store = HistoryStore(tmp_path / "history.sqlite3")
    (row,) = [r for r in store.runs("exp") if r["run_id"] == "run"]
    assert row["summary"]["events_persisted"] == 100 and row["summary"]["history"]["events_unsent"] == 0
    again = sync_run(store, run)
    assert (again.sent, again.recorded) == (0, False)
    lag = tmp_path / "exp" / "lag"  # killed before its last summary: the events go, the record waits
    shutil.copytree(run, lag)
    (lag / LIFECYCLE).unlink(missing_ok=True)
    s = orjson.loads((lag / "summary.json").read_bytes())
    (lag / "summary.json").write_bytes(orjson.dumps({**s, "events_persisted": 10}))
    os.utime(lag / "events.jsonl", (time.time() + 5, time.time() + 5))
    got = sync_run(store, lag)
    assert (got.sent, got.recorded) == (100, False)
    assert all(r["run_id"] != "lag" for r in store.runs("exp"))
    store.close()
    assert history_seqs(tmp_path) == list(range(100))  # nothing twice
    assert history_seqs(tmp_path, "lag") == list(range(100))


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_history_file_deleted_or_replaced_mid_run_is_noticed_and_sync_rebuilds_it(tmp_path, how, capsys):
    """The SQLite history removed under a running Recorder (or replaced by another file): the
    Recorder's commits would go into a file no one reads. It notices at its next commit, says
    so naming the file and the repair, and counts what follows as unsent; sync rebuilds it."""
    from structlog.testing import capture_logs

    from supervisor import main
    from telemetry.store import HistoryStore

    rec, em = recorded(tmp_path, 25)
    emit_n(em, 100)
    em.flush()
    assert rec.ask({"kind": "flush"})["persisted"] == 100
    db = tmp_path / "history.sqlite3"
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        p.unlink(missing_ok=True)
    if how == "replaced":
        HistoryStore(db).close()  # another history at the same name
    with capture_logs() as logs:
        emit_n(em, 150, start=100)
        counters = em.close()
        assert rec.ask({"kind": "flush"})["persisted"] == 250
    (warned,) = [e for e in logs if e["event"].startswith("history deleted or replaced during the run")]
    assert "crucible sync" in warned["event"] and str(db) in warned["error"] and how in warned["error"], warned
    s = rec.ask({"kind": "summary"})
    h = s["history"]
    assert h["available"] is False and how in h["error"] and h["events_unsent"] == 150, h
    assert s["accounting"]["balanced"] and s["storage_error"] is None and counters["emitted"] == 250
    rec.stop()
    assert seqs_on_disk(tmp_path / "exp" / "run") == list(range(250))
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(tmp_path)]) == 0
    assert "exp/run: sent 250 event(s); summary recorded" in capsys.readouterr().out
    assert history_seqs(tmp_path) == list(range(250))


def test_an_artifacts_folder_whose_name_is_not_utf8_keeps_the_runs_summary_and_record(tmp_path, history_target, capsys):
    """An artifacts folder named in Latin-1 (not UTF-8, so Python reads it with surrogates that
    JSON, SQLite and PostgreSQL refuse): the run's summary and its history record are written,
    the path shown with the byte escaped (``\\xe9``), and ``crucible list --json`` lists it."""
    from supervisor import main
    from telemetry.history import open_history

    art = tmp_path / os.fsdecode(b"caf\xe9")
    rec, em = recorded(art, 25, history=history_target)
    emit_n(em, 50)
    em.close()
    assert rec.ask({"kind": "flush"})["persisted"] == 50
    rec.stop()
    shown = str(tmp_path / "caf\\xe9" / "exp" / "run")
    s = orjson.loads((art / "exp" / "run" / "summary.json").read_bytes())
    assert s["events_persisted"] == 50 and s["run_dir"] == shown
    store = open_history(history_target, artifacts=art, readonly=True)
    try:
        (row,) = store.runs()
    finally:
        store.close()
    assert row["run_dir"] == shown and row["summary"]["events_persisted"] == 50
    capsys.readouterr()
    named = [] if history_target is None else ["--history", history_target]
    assert main(["list", "--artifacts", str(art), "--json", *named]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    info = orjson.loads(line)
    assert (info["path"], info["events"], info["source"]) == (shown, 50, "history")


@pytest.mark.parametrize("with_bad_event", [False, True])
def test_a_bool_value_is_one_or_zero_whatever_else_its_batch_holds(tmp_path, with_bad_event):
    """A bool is a number (1 or 0) in every path: the batch's fast columns, the event by event
    rebuild after a bad event in the same batch, and the debug check."""
    rec, em = recorded(tmp_path, 8)
    em.emit("step", {"converged": True, "loss": 1.0})
    if with_bad_event:
        em.emit("step", {"loss": "not a number"})
    em.emit("step", {"converged": False, "loss": 0.5})
    counters = em.close()
    assert counters["emitted"] == 2 and counters["rejected"] == int(with_bad_event)
    rec.ask({"kind": "flush"})
    events = list(iter_run(tmp_path / "exp" / "run"))
    rec.stop()
    assert [e["values"] for e in events] == [{"converged": 1.0, "loss": 1.0}, {"converged": 0.0, "loss": 0.5}]
    strict = Emitter(Topics(), "exp", "run2", debug=True)
    strict.emit("step", {"converged": True})
    assert strict.close()["rejected"] == 0


def test_bad_input_is_rejected_clearly(tmp_path):
    topics = Topics()
    strict = Emitter(topics, "exp", "run", debug=True)
    with pytest.raises(SchemaError, match="unknown event field"):
        strict.emit("x", colour=3)
    with pytest.raises(SchemaError, match=r"values\.c"):
        strict.emit("x", {"c": "high"})
    with pytest.raises(SchemaError, match="gpu_mode"):
        strict.emit("x", gpu_mode="tpu")
    strict.close()
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    lax = Emitter(topics, "exp", "run", batch_size=4)
    lax.emit("ok", {"a": 1.0})
    lax.emit("bad", colour=3)  # unknown field: counted rejection
    lax.emit("bad", {"a": "not a number"})  # malformed value: counted when the batch is built
    lax.emit("ok", {"a": 2.0})
    counters = lax.close()
    assert counters["rejected"] == 2 and counters["emitted"] == 2
    assert rec.ask({"kind": "flush"})["persisted"] == 2
    rec.tell_bytes(b"\x93garbage")
    rec.tell({"kind": "events", "n": 3})  # malformed batch: counted, dropped
    assert rec.ask({"kind": "summary"})["bad_batches"] == 1
    rec.stop()


def test_rejected_events_are_warned_of_at_most_once_every_few_seconds(monkeypatch):
    """A workload that sends a malformed field in every event gets one warning line, with the
    count since the last one and the run's total, not a line per event."""
    from structlog.testing import capture_logs

    import telemetry.emitter as emitter_module

    topics = Topics()
    em = Emitter(topics, "exp", "run-rejected", batch_size=50)  # its own run id: other tests' threads log too
    with capture_logs() as logs:
        for i in range(500):
            em.emit("bad", {"loss": "high"} if i % 2 else None, colour=3 if not i % 2 else None)
        em.flush()
        monkeypatch.setattr(emitter_module, "REJECTED_LOG_S", 0.0)
        em.emit("bad", {"loss": "low"})
        counters = em.close()
    said = [e for e in logs if e["event"] == "event rejected" and e.get("run_id") == "run-rejected"]
    assert counters["rejected"] == 501 and counters["emitted"] == 0
    assert [e["count"] for e in said] == [1, 500] and said[-1]["total"] == 501
    assert "values.loss" in said[-1]["reason"]


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"fsync_interval": math.nan}, "fsync_interval"),
        ({"fsync_interval": -1}, "fsync_interval"),
        ({"summary_interval": math.inf}, "summary_interval"),
        ({"history_retry_s": (1.0, math.nan)}, r"history_retry_s\[1\]"),
        ({"history_retry_s": (5.0, 1.0)}, "history_retry_s"),
        ({"history_retry_s": 3.0}, "history_retry_s"),
        ({"history_stop_wait_s": 1e300}, "history_stop_wait_s"),
    ],
)
def test_bad_intervals_are_refused_before_any_folder_is_made(tmp_path, kw, name):
    art = tmp_path / "art"
    with pytest.raises(ValueError, match=name):
        Recorder(art, "exp", "run", **kw)
    assert not art.exists()


def test_unwritable_artifacts_fail_at_start(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactsError, match="not writable"):
        Recorder.start(f, "exp", "run")
    with pytest.raises(ValueError, match="run id"):
        Recorder.start(tmp_path, "exp", "../escape")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        with pytest.raises(ArtifactsError, match="not writable"):
            Recorder.start(ro, "exp", "run")
    finally:
        os.chmod(ro, 0o700)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_run_and_experiment(tmp_path, fmt, history_target):
    rec, em = recorded(tmp_path / "art", 32, history=history_target)
    emit_n(em, 300)
    em.close()
    rec.stop()
    out = tmp_path / f"out.{fmt}"
    assert export_run(tmp_path / "art" / "exp" / "run", fmt, out, chunk=50) == 300
    assert export_experiment(tmp_path / "art", "exp", fmt, tmp_path / f"all.{fmt}", 50, history_target) == 300
    assert (tmp_path / f"all.{fmt}").read_bytes() == out.read_bytes()  # the history holds the same events
    if fmt == "parquet":
        t = pq.read_table(out)
        assert t.num_rows == 300
        assert t.column("values.conflicts").to_pylist()[:2] == [300.0, 299.0]
    elif fmt == "csv":
        lines = out.read_text().splitlines()
        assert len(lines) == 301 and "values.conflicts" in lines[0]
    else:
        assert [orjson.loads(x)["seq"] for x in out.read_bytes().splitlines()] == list(range(300))


def test_events_with_and_without_values_mix_in_one_batch(tmp_path):
    rec, em = recorded(tmp_path, 8)
    for i in range(20):
        em.emit("a", {"x": float(i)}) if i % 3 else em.emit("b")  # values=None in between
    counters = em.close()
    assert counters == {"emitted": 20, "published": 20, "dropped": 0, "rejected": 0}
    assert rec.ask({"kind": "flush"})["persisted"] == 20
    rows = list(iter_run(tmp_path / "exp" / "run"))
    assert [r["values"].get("x") for r in rows] == [None if i % 3 == 0 else float(i) for i in range(20)]
    rec.stop()


def test_the_history_keeps_each_runs_summary(tmp_path, history_target):
    from telemetry.history import open_history

    rec, em = recorded(tmp_path, 10, history=history_target)
    emit_n(em, 25)
    em.close()
    rec.ask({"kind": "flush"})
    rec.stop()
    store = open_history(history_target, artifacts=tmp_path, readonly=True)
    runs = store.runs("exp")
    store.close()
    assert [r["run_id"] for r in runs] == ["run"]
    assert runs[0]["summary"]["events_persisted"] == 25 and runs[0]["ended_ts"] >= runs[0]["started_ts"]


def test_live_answers_need_no_events_the_bounded_index_dropped(tmp_path, history_target):
    """Past index_limit the index keeps only the newest events; a live query that needs older
    ones is answered from the history, so live and history agree."""
    from telemetry.query import query_answer

    rec, em = recorded(tmp_path, 50, index_limit=100, history=history_target)
    emit_n(em, 1000)
    em.close()
    rec.ask({"kind": "flush"})
    for spec in (["last_n", 500], ["last_n", 20], ["sliding", 1, "s", 1], ["range", 0, 4e9]):
        live, hist = (
            query_answer(rec.ask({"kind": "query_window", "spec": spec, "source": src})) for src in ("live", "history")
        )
        assert live == hist, spec
    assert len(query_answer(rec.ask({"kind": "query_window", "spec": ["last_n", 500]}))) == 500
    live, hist = (
        query_answer(rec.ask({"kind": "windowed_metrics", "window_s": 1, "step_s": 1, "source": src}))
        for src in ("live", "history")
    )
    assert live == hist and sum(w["count"] for w in live) == 1000
    rec.stop()


def test_the_best_of_a_field_follows_its_declared_direction(tmp_path):
    """A field the run maximises is best at its highest across phases, any other at its lowest;
    the summary says which fields are maximised, so a reader needs nothing else."""
    rec, em = recorded(tmp_path, 8, maximize=["score"])
    for phase, xs in (("a", [3.0, 7.0, 5.0]), ("b", [9.0, 1.0]), ("c", [4.0])):
        for x in xs:
            em.emit("step", {"score": x, "loss": 10.0 - x}, phase=phase)
    em.close()
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    rec.stop()
    assert s["maximize"] == ["score"]
    assert summary_best(s, "score") == 9.0 and summary_best(s, "loss") == 1.0
    assert summary_best(s, "score", "min") == 1.0 and summary_best(s, "loss", "max") == 9.0
    assert summary_best(s, "missing") is None and summary_best({"phases": "junk"}, "score") is None
    damaged = {**s, "phases": {**s["phases"], "x": "junk", "y": {"min_ok": None, "best": None}}}
    assert summary_best(damaged, "score") == 9.0 and summary_best(damaged, "loss") == 1.0  # the others still count


def _create_and_write(path: str, barrier, i: int) -> str:
    from telemetry.store import HistoryStore

    barrier.wait(30)  # every process opens the new history at the same moment
    try:
        store = HistoryStore(path)
        store.insert_batch("e", f"r{i}", [0], 0, 0, b"x")
        store.commit()
        store.close()
    except Exception as exc:  # noqa: BLE001 - the test reports what each process met
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_processes_creating_one_history_at_once_all_open_it(tmp_path):
    """ab --parallel workers start together on a fresh artifacts folder: each opens (and so
    creates) the history; none may be refused with 'database is locked'."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from telemetry.store import HistoryStore

    ctx = mp.get_context("spawn")
    n = 6
    for attempt in range(3):  # a fresh history each time: the race is at its creation
        path = tmp_path / f"h{attempt}.sqlite3"
        with ctx.Manager() as manager, ProcessPoolExecutor(n, mp_context=ctx) as pool:
            barrier = manager.Barrier(n)
            results = list(pool.map(_create_and_write, [str(path)] * n, [barrier] * n, range(n)))
        assert results == ["ok"] * n, results
        store = HistoryStore(path, readonly=True)
        try:
            assert sorted(r for (r,) in store.db.execute("SELECT run_id FROM batches")) == [f"r{i}" for i in range(n)]
        finally:
            store.db.close()


def test_a_phase_duration_is_its_own_time_when_passes_interleave_the_phases(tmp_path, monkeypatch):
    """Two phases that take turns, pass after pass: each phase's ``duration_s`` is the gaps
    between its own consecutive events (across batches), not its first-to-last span, and the
    Recorder rebuilt from the files and ``crucible monitor --summary`` count it the same."""
    from experiments.monitor import run_summary

    seconds = iter([0, 1, 2, 3, 4, 5, 6, 7, 9])
    monkeypatch.setattr("telemetry.emitter._clock_ns", lambda: next(seconds) * 1_000_000_000)
    monkeypatch.setattr("telemetry.emitter._wall_offset_ns", lambda: 0)
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=3)  # batches cut inside a phase's turn and between turns
    for phase in ("tabu", "tabu", "tabu", "pop", "pop", "tabu", "tabu", "pop", "pop"):
        em.emit("step", {"x": 1.0}, phase=phase)
    em.close()
    rec.ask({"kind": "flush"})
    live = rec.ask({"kind": "summary"})["phases"]
    rec.stop()
    expected = {"tabu": 3.0, "pop": 3.0}  # tabu 0-1-2 and 5-6; pop 3-4 and 7-9
    assert {p: v["duration_s"] for p, v in live.items()} == expected
    again = Recorder.start(tmp_path, "exp", "run")  # a restart rebuilds the figures from the events
    try:
        assert {p: v["duration_s"] for p, v in again.ask({"kind": "summary"})["phases"].items()} == expected
    finally:
        again.stop()
    from_files = run_summary(tmp_path / "exp" / "run")["phases"]
    assert {p: v["duration_s"] for p, v in from_files.items()} == expected


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # (second, name): a pause, then a crash's downtime before the resumed event
        (
            "0 step, 1 step, 2 paused, 10 unpaused, 11 step, 12 step, 20 resumed, 21 step",
            5,  # 0-1, 1-2 (up to the pause), 10-11, 11-12, 20-21
        ),
        # a control held through the pause (recorded inside it), and a crash while paused:
        # the run comes back paused, its resumed event inside the pause too
        (
            "0 step, 1 step, 2 paused, 5 control, 10 unpaused, 11 step, 12 step, "
            "13 paused, 100 resumed, 400 unpaused, 401 step, 402 step",
            7,  # 0-1, 1-2, 10-11, 11-12, 12-13, 400-401, 401-402
        ),
    ],
    ids=["pause-then-crash", "events-inside-pauses"],
)
def test_a_phase_duration_leaves_out_pauses_and_a_crashs_downtime(tmp_path, monkeypatch, script, expected):
    """The time from a ``paused`` mark to its ``unpaused`` one (whatever was recorded inside
    the pause), and before a ``resumed`` event (a crash's downtime), is no phase's, in the
    Recorder's summary (live and rebuilt) and in monitor's."""
    from experiments.monitor import run_summary

    script = [(int(t), name) for t, name in (item.split() for item in script.split(", "))]
    seconds = iter(t for t, _ in script)
    monkeypatch.setattr("telemetry.emitter._clock_ns", lambda: next(seconds) * 1_000_000_000)
    monkeypatch.setattr("telemetry.emitter._wall_offset_ns", lambda: 0)
    rec, em = recorded(tmp_path, 3)
    for _, name in script:
        em.emit(name, {"x": 1.0}, phase="calls")
    em.close()
    rec.ask({"kind": "flush"})
    assert rec.ask({"kind": "summary"})["phases"]["calls"]["duration_s"] == expected
    rec.stop()
    again = Recorder.start(tmp_path, "exp", "run")
    try:
        assert again.ask({"kind": "summary"})["phases"]["calls"]["duration_s"] == expected
    finally:
        again.stop()
    assert run_summary(tmp_path / "exp" / "run")["phases"]["calls"]["duration_s"] == expected


STEPPED_CLOCK = """
import sys, time
real = time.time_ns
step = [0]
time.time_ns = lambda: real() - step[0]  # the system's wall clock, as every reader sees it
from actors import Topics
from actors.recorder import Recorder
from telemetry.emitter import Emitter
from telemetry.jsonl import iter_run
topics = Topics()
rec = Recorder.start(sys.argv[1], "exp", "run")
topics.subscribe("events", rec)
em = Emitter(topics, "exp", "run", batch_size=1)
em.emit("step", {"x": 1.0})
rec.ask({"kind": "flush"})
step[0] = 3600 * 10**9  # an NTP correction: the wall clock steps an hour back
em.emit("step", {"x": 2.0})
rec.ask({"kind": "flush"})
step[0] = -3600 * 10**9  # and then an hour forward of the true time (a clock set after boot)
em.emit("step", {"x": 3.0})
rec.ask({"kind": "flush"})
em.close()
rec.stop()
print(*(e["ts"] for e in iter_run(sys.argv[1] + "/exp/run")))
"""


def test_event_time_goes_on_when_the_wall_clock_steps_back(tmp_path):
    """Event time follows the wall clock forward and never back: a step back of the wall clock
    (an hour, here) used to freeze every later event at the last time seen, until the wall
    clock caught up (a sliding window, a stall detector and durations saw no time pass); it now
    goes on with the monotonic clock. A step forward is followed."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", STEPPED_CLOCK, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    first, second, third = map(int, out.stdout.split())
    assert 0 < second - first < 60_000_000  # µs: time went on, neither frozen nor an hour back
    assert abs(first - time.time_ns() // 1000) < 600_000_000
    assert abs(third - first - 3_600_000_000) < 60_000_000  # a step forward is followed: the wall clock's time
