"""``crucible sync`` against hostile run folders: repeated or out-of-order seqs, 64-bit extreme
timestamps, two syncs at once, one run id in two experiments, an empty history target.

The tests that touch a store run against both histories (SQLite and a real PostgreSQL
server); the run folders are written by hand, as a tester (or a bad copy) would leave them.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from supervisor import main
from telemetry.batchstore import BatchStore, HistoryUnavailable
from telemetry.history import ENV, HistoryConfigError, open_history, resolve_history
from telemetry.sync import sync_run

pytest_plugins = ["tests.pg_server"]  # fixtures history_kind, history_target: both stores

T0 = 1_700_000_000_000_000
RID = "20260101T000000Z-abcdef"


def event(exp: str, run_id: str, seq: int, ts: int | None = None) -> bytes:
    row = {"v": 1, "seq": seq, "ts": T0 + seq if ts is None else ts, "experiment_id": exp, "run_id": run_id}
    return orjson.dumps({**row, "name": "step", "step": seq, "values": {"x": float(seq)}}) + b"\n"


def make_run(art: Path, exp: str, seqs: list[int], run_id: str = RID, persisted: int | None = None) -> Path:
    """An ended run's folder: its events in that order, then its summary (``events_persisted``)."""
    run = art / exp / run_id
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(b"".join(event(exp, run_id, s) for s in seqs))
    summary = {
        "run_id": run_id,
        "experiment_id": exp,
        "events_persisted": len(seqs) if persisted is None else persisted,
    }
    (run / "summary.json").write_bytes(orjson.dumps(summary))
    return run


def target_for(history_target: str | Path | None, art: Path) -> str:
    return str(art / "history.sqlite3") if history_target is None else str(history_target)


def seqs_in(store: BatchStore, run_id: str = RID) -> list[int]:
    return [e["seq"] for e in store.iter_events(run_id=run_id)]


def test_repeated_and_out_of_order_seqs_are_dropped_counted_and_stored_readably(tmp_path, history_target, capsys):
    """A segment appended twice and a line out of order: the history gets each seq once, in a
    batch its readers take (not one they skip, losing the run); the drops are counted and logged;
    ``export`` finds the run; the repeats after the summary do not hold back the run's record."""
    art = tmp_path / "art"
    run = make_run(art, "exp", list(range(10)), persisted=12)
    with (run / "events.jsonl").open("ab") as fh:  # lines repeated, then one out of order
        fh.write(b"".join(event("exp", RID, s) for s in [*range(5, 10), 12, 11, 13]))
    (run / "events.000001.jsonl").write_bytes((run / "events.jsonl").read_bytes())  # the whole file twice
    target = target_for(history_target, art)
    store = open_history(target)
    try:
        with capture_logs() as logs:
            r = sync_run(store, run, chunk=4)  # duplicates across chunk boundaries too
        assert seqs_in(store) == [*range(10), 12, 13]  # a batch the readers take, each seq once
        assert store.skipped_batches == 0
        assert (r.sent, r.out_of_order, r.left_alone) == (12, 18 + 6, None)
        assert r.recorded  # 12 distinct events: the summary's 12, not lagging
        (warned,) = [e for e in logs if e["event"].startswith("events whose seq repeats")]
        assert warned["events"] == 24 and warned["log_level"] == "warning"
        again = sync_run(store, run)
        assert (again.sent, again.recorded) == (0, False)
    finally:
        store.close()
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["export", RID, "--artifacts", str(art), "--history", target, "--out", str(out)]) == 0
    assert [orjson.loads(x)["seq"] for x in out.read_bytes().splitlines()] == [*range(10), 12, 13]


def test_extreme_timestamps_are_stored_and_read(tmp_path, history_target, capsys):
    """Events at ts -2**63 and 2**63-1 (the schema takes any 64-bit ts): their batch's span needs
    65 bits; the store clamps it, queries over any window still read, and nothing raises."""
    art = tmp_path / "art"
    run = make_run(art, "exp", [0, 1])
    (run / "events.jsonl").write_bytes(event("exp", RID, 0, -(2**63)) + event("exp", RID, 1, 2**63 - 1))
    target = target_for(history_target, art)
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(art), "--history", target]) == 0
    assert f"exp/{RID}: sent 2 event(s); summary recorded" in capsys.readouterr().out
    store = open_history(target, readonly=True)
    try:
        assert [e["ts"] for e in store.iter_events(run_id=RID)] == [-(2**63), 2**63 - 1]
        assert [e["ts"] for e in store.iter_events(experiment_id="exp")] == [-(2**63), 2**63 - 1]
        assert [e["seq"] for e in store.query("exp", ("range", 0, 10))] == []
        assert [e["seq"] for e in store.query("exp", ("last", 5, "minutes"))] == []
        assert [e["seq"] for e in store.query("exp", ("last_n", 5))] == [0, 1]
    finally:
        store.close()


def test_a_failed_sync_commit_leaves_nothing_for_close_to_fail_on(tmp_path):
    """A commit the history refuses (here: locked past the busy timeout) fails the sync once;
    the chunk is dropped, so closing the store does not raise it a second time."""
    art = tmp_path / "art"
    run = make_run(art, "exp", list(range(5)))
    store = open_history(art / "history.sqlite3")
    lock = sqlite3.connect(art / "history.sqlite3", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(HistoryUnavailable):
            sync_run(store, run)
        assert store.pending == 0
    finally:
        lock.execute("COMMIT")
        lock.close()
    store.close()  # nothing kept: nothing to fail again
    store = open_history(art / "history.sqlite3")
    try:
        assert sync_run(store, run).sent == 5
    finally:
        store.close()


def test_two_syncs_at_once_each_count_only_what_they_stored(tmp_path, history_target):
    """Two syncs of one run that both read the history before either wrote: both send every
    chunk, the history keeps each once, and each reports only the events it stored."""
    art = tmp_path / "art"
    n = 600
    run = make_run(art, "exp", list(range(n)))
    target = target_for(history_target, art)
    stores = [open_history(target), open_history(target)]
    both_read = threading.Barrier(2, timeout=60)
    results: dict[int, Any] = {}

    def sync(i: int) -> None:
        store = stores[i]
        read = store.max_seq

        def max_seq_then_wait(run_id: str) -> int:
            v = read(run_id)
            both_read.wait()  # neither has written yet: both will send everything
            return v

        store.max_seq = max_seq_then_wait  # type: ignore[method-assign]
        try:
            results[i] = sync_run(store, run, chunk=50)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            results[i] = exc

    threads = [threading.Thread(target=sync, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert all(not isinstance(r, BaseException) for r in results.values()), results
        assert results[0].sent + results[1].sent == n, (results[0].sent, results[1].sent)
        assert seqs_in(stores[0]) == list(range(n))
        stale = open_history(target)  # one that read before the other wrote, and ran after it
        try:
            stale.max_seq = lambda run_id: -1  # type: ignore[method-assign]
            assert sync_run(stale, run).sent == 0
        finally:
            stale.close()
    finally:
        for s in stores:
            s.close()


def test_one_run_id_in_two_experiments_is_reported_and_never_flipped(tmp_path, history_target, capsys):
    """A run copied under another experiment keeps its id, which the history keys runs by: sync
    sends one, leaves the other alone with a line naming both folders, and later syncs find the
    one up to date rather than recording each summary in turn."""
    art = tmp_path / "art"
    a = make_run(art, "alpha", list(range(5)))
    b = make_run(art, "beta", list(range(8)))
    target = target_for(history_target, art)
    argv = ["sync", "--artifacts", str(art), "--history", target]
    capsys.readouterr()
    assert main(argv) == 0
    first = capsys.readouterr().out
    alone = [x for x in first.splitlines() if "left alone" in x]
    assert len(alone) == 1, first
    kept, other = (a, b) if alone[0].startswith(f"beta/{RID}:") else (b, a)
    assert str(kept) in alone[0] and str(other) in alone[0], alone[0]  # one line naming both folders
    assert f"{kept.parent.name}/{RID}: sent {5 if kept is a else 8} event(s); summary recorded" in first
    store = open_history(target, readonly=True)
    try:
        assert seqs_in(store) == list(range(5 if kept is a else 8))
        (row,) = store.runs()
        assert (row["experiment_id"], row["summary"]["experiment_id"]) == (kept.parent.name, kept.parent.name)
        assert store.run_owner(RID) == (kept.parent.name, str(kept))
    finally:
        store.close()
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "summary recorded" not in second and f"{kept.parent.name}/{RID}: up to date" in second, second
    assert f"{other.parent.name}/{RID}: left alone" in second
    with pytest.raises(SystemExit) as e:  # reading the files: the id alone does not say which folder
        main(["export", RID, "--artifacts", str(art)])
    assert e.value.code == 2 and f"run id '{RID}' names 2 run folders" in capsys.readouterr().err
    assert main(["export", str(a), "--out", str(tmp_path / "a.jsonl")]) == 0  # its path does


def test_an_empty_history_target_is_an_error_and_an_empty_variable_is_unset(tmp_path, monkeypatch, capsys):
    """``--history ''`` names nothing: one line, exit 2, rather than the default history
    without a word; ``CRUCIBLE_HISTORY=`` (empty) counts as unset, a blank one is refused."""
    art = tmp_path / "art"
    make_run(art, "exp", [0])
    monkeypatch.delenv(ENV, raising=False)
    for empty in ("", "  "):
        with pytest.raises(HistoryConfigError, match="empty history target"):
            resolve_history(empty, art)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["sync", "--artifacts", str(art), "--history", ""])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "empty history target" in err and len(err.strip().splitlines()) == 1, err
    assert not (art / "history.sqlite3").exists()
    monkeypatch.setenv(ENV, "")
    assert resolve_history(None, art) == art / "history.sqlite3"
    monkeypatch.setenv(ENV, " ")
    with pytest.raises(HistoryConfigError, match=rf"^\${ENV}: empty history target"):
        open_history(None, artifacts=art)
    assert os.environ[ENV] == " "


def test_the_readers_refuse_an_empty_history_and_sync_says_what_it_skipped(tmp_path, capsys):
    from cli import main

    for argv in (["list"], ["export", "x"], ["compare", "a", "b", "--metric", "m"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--history", "", "--artifacts", str(tmp_path / "art")])
        assert e.value.code == 2
        assert "--history: empty history target ''" in capsys.readouterr().err
    make_run(tmp_path / "art", "exp", [1, 2, 2, 3, 1])
    assert main(["sync", "--artifacts", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert "sent 3 event(s)" in out and "skipped 2 event(s) whose seq repeats or goes back" in out


def on_history(target: str, sql: str, args: tuple[Any, ...]) -> int:
    """Run one statement (``?`` placeholders) on the history at ``target``, as a person with a
    database shell would (what damaged disks and bad copies leave); its row count."""
    if target.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(target, autocommit=True) as db:
            return db.execute(sql.replace("?", "%s"), args).rowcount
    db = sqlite3.connect(target)
    try:
        with db:
            return db.execute(sql, args).rowcount
    finally:
        db.close()


def delete_batches(target: str, run_id: str, lo: int, hi: int) -> int:
    """Remove a run's stored batches starting in ``[lo, hi]`` (a hole in the history); how many."""
    return on_history(target, "DELETE FROM batches WHERE run_id = ? AND seq_lo BETWEEN ? AND ?", (run_id, lo, hi))


def test_sync_fills_a_hole_in_the_middle_of_a_run_and_says_so(tmp_path, history_target, capsys):
    """Batches missing in the middle of a run's stored events (whatever removed them): sync
    compares the stored seq ranges with the files and sends what is missing there too, not
    only what follows the last stored seq, and its line says it filled a hole."""
    art = tmp_path / "art"
    seqs = [s for s in range(300) if s % 7 != 3]  # gaps, as sampling leaves: no hole
    run = make_run(art, "exp", seqs)
    target = target_for(history_target, art)
    store = open_history(target)
    try:
        assert sync_run(store, run, chunk=20).sent == len(seqs)
    finally:
        store.close()
    assert delete_batches(target, RID, 40, 90) == 2 and delete_batches(target, RID, 200, 220) == 1
    store = open_history(target, readonly=True)
    try:
        missing = len(seqs) - len(seqs_in(store))
    finally:
        store.close()
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(art), "--history", target]) == 0
    out = capsys.readouterr().out
    assert f"exp/{RID}: sent {missing} event(s); {missing} of them filled a hole" in out, out
    assert delete_batches(target, RID, 100, 140) == 2
    store = open_history(target)
    try:
        with capture_logs() as logs:
            r = sync_run(store, run)
        (warned,) = [e for e in logs if e["event"].startswith("the history lacked events in the middle")]
        assert warned["events"] == r.filled == r.sent > 0 and warned["holes"] == 1, warned
        assert seqs_in(store) == seqs
        ranges = list(store.seq_ranges(RID))
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges
    finally:
        store.close()
    assert main(["sync", "--artifacts", str(art), "--history", target]) == 0
    assert f"exp/{RID}: up to date" in capsys.readouterr().out


def overwrite_batch(target: str, run_id: str, seq_lo: int, data: Any) -> None:
    """Put ``data`` in place of a stored batch's bytes."""
    on_history(target, "UPDATE batches SET data = ? WHERE run_id = ? AND seq_lo = ?", (data, run_id, seq_lo))


def test_sync_verify_replaces_damaged_batches_from_the_runs_files(tmp_path, history_target, capsys):
    """A stored batch that is not msgpack, one that is no batch, and one that holds another
    batch's events look covered to a plain sync (their seq ranges are there) while the readers
    skip them. ``crucible sync --verify`` reads every stored batch, deletes the damaged ones
    and sends their events again from the run's files: the history reads whole again. A
    damaged batch whose events the files no longer hold is left, said, and the exit is 1."""
    from actors.messages import encode

    art = tmp_path / "art"
    seqs = list(range(200))
    run = make_run(art, "exp", seqs)
    target = target_for(history_target, art)
    store = open_history(target)
    try:
        assert sync_run(store, run, chunk=20).sent == 200
        ranges = list(store.seq_ranges(RID))
        with store._read() as q:  # the bytes of the first batch, to copy over the third
            first = bytes(q("SELECT data FROM batches WHERE run_id = ? AND seq_lo = 0", (RID,)).fetchone()[0])
    finally:
        store.close()
    assert ranges[:4] == [(0, 19), (20, 39), (40, 59), (60, 79)]
    overwrite_batch(target, RID, 20, b"\xc1 not msgpack")
    overwrite_batch(target, RID, 40, first)  # a batch, but of seqs 0..19
    overwrite_batch(target, RID, 60, encode({"seq": [60]}))  # msgpack, not a batch's shape
    store = open_history(target, readonly=True)
    try:
        assert len(seqs_in(store)) == 200 - 40  # the readers skip two; the copy reads as seqs 0..19 again
    finally:
        store.close()
    capsys.readouterr()
    assert main(["sync", "--artifacts", str(art), "--history", target]) == 0
    assert f"exp/{RID}: up to date" in capsys.readouterr().out  # the ranges look covered
    assert main(["sync", "--verify", "--artifacts", str(art), "--history", target]) == 0
    out = capsys.readouterr().out
    assert f"exp/{RID}: sent 60 event(s); 60 of them filled a hole" in out, out
    assert "replaced 3 damaged stored batch(es)" in out, out
    store = open_history(target)
    try:
        assert seqs_in(store) == seqs
        assert list(store.damaged_batches(RID)) == []
        # the files lose the run's first 100 events; a damaged batch among them cannot be replaced
        overwrite_batch(target, RID, 0, b"junk")
        (run / "events.jsonl").write_bytes(b"".join(event("exp", RID, s) for s in range(100, 200)))
        with capture_logs() as logs:
            r = sync_run(store, run, verify=True)
        assert (r.damaged, r.replaced, r.sent) == (1, 0, 0)
        (said,) = [e for e in logs if e["event"].startswith("a damaged history batch the run's files cannot")]
        assert (said["seq_lo"], said["events"], said["in_files"]) == (0, 20, 0)
    finally:
        store.close()
    assert main(["sync", "--verify", "--artifacts", str(art), "--history", target]) == 1
    assert "1 damaged stored batch(es) left: the files no longer hold them" in capsys.readouterr().out


def set_row(target: str, run_id: str, seq_lo: int, n: int) -> None:
    """Make a stored batch's row claim ``n`` events (its bytes unchanged)."""
    on_history(target, "UPDATE batches SET n = ? WHERE run_id = ? AND seq_lo = ?", (n, run_id, seq_lo))


def test_sync_verify_trusts_a_batchs_bytes_not_its_row(tmp_path, history_target, capsys):
    """A batch whose row lies (n = 0) but whose bytes read fine is never deleted when the files
    no longer hold its events; one that holds no events, or another run's events, is replaced
    from the files; a value stored as text (SQLite) is a damaged batch, not a traceback."""
    from telemetry.schema import rows_to_batch, stored_batch

    art = tmp_path / "art"
    run = make_run(art, "exp", list(range(100)))
    make_run(art, "other", list(range(10)), run_id="20260101T000000Z-bbbbbb")
    target = target_for(history_target, art)
    store = open_history(target)
    try:
        assert sync_run(store, run, chunk=20).sent == 100
    finally:
        store.close()
    set_row(target, RID, 40, 0)  # a lie: its bytes hold seqs 40..59
    overwrite_batch(target, RID, 0, stored_batch(rows_to_batch([], "exp", RID)))  # no events
    foreign = [orjson.loads(event("other", "20260101T000000Z-bbbbbb", s)) for s in range(20, 40)]
    overwrite_batch(target, RID, 20, stored_batch(rows_to_batch(foreign, "other", "20260101T000000Z-bbbbbb")))
    if history_target is None:
        overwrite_batch(target, RID, 60, "text, not bytes")  # SQLite keeps what it is given
    (run / "events.jsonl").write_bytes(b"".join(event("exp", RID, s) for s in [*range(40), *range(60, 100)]))
    capsys.readouterr()
    assert main(["sync", "--verify", "--artifacts", str(art), "--history", target]) == 1
    out = capsys.readouterr().out
    replaced = 3 if history_target is None else 2
    assert f"replaced {replaced} damaged stored batch(es)" in out and "1 damaged stored batch(es) left" in out, out
    store = open_history(target, readonly=True)
    try:
        assert seqs_in(store) == list(range(100))  # 40..59 from the batch its row misnames; the rest from the files
        assert [d.seq_lo for d in store.damaged_batches(RID)] == [40]
    finally:
        store.close()


def test_a_run_the_history_refuses_is_reported_and_the_others_still_go_in(
    tmp_path, history_target, capsys, monkeypatch
):
    """One run's write refused (a value the server will not take): that run's line says so, the
    runs after it are synced, and the exit status says something was not; a history that is
    away stops the sync at once instead (nothing else could go in)."""
    from telemetry.batchstore import HistoryError

    art = tmp_path / "art"
    bad, good = "20260101T000000Z-aaaaaa", "20260101T000000Z-bbbbbb"
    make_run(art, "exp", [0, 1], run_id=bad)
    make_run(art, "exp", [0, 1, 2], run_id=good)
    target = target_for(history_target, art)
    probe = open_history(target)
    cls = type(probe)
    probe.close()
    record = cls.record_run

    def refuse(self, run_id, *args, **kwargs):
        if run_id == bad:
            raise HistoryError("history at somewhere: a value of this summary is refused")
        return record(self, run_id, *args, **kwargs)

    monkeypatch.setattr(cls, "record_run", refuse)
    capsys.readouterr()
    assert main(["sync", bad, good, "--artifacts", str(art), "--history", target]) == 1
    out = capsys.readouterr().out
    assert f"exp/{bad}: not synced: the history refused it: history at somewhere: a value" in out, out
    assert f"exp/{good}: sent 3 event(s); summary recorded" in out, out

    def away(self, run_id, *args, **kwargs):
        raise HistoryUnavailable("history at somewhere unavailable: connection refused")

    monkeypatch.setattr(cls, "record_run", away)
    make_run(art, "exp2", [0], run_id=bad)
    assert main(["sync", str(art / "exp" / bad), good, "--artifacts", str(art), "--history", target]) == 1
    captured = capsys.readouterr()
    assert f"exp/{bad}: stopped: history at somewhere unavailable" in captured.out
    assert good not in captured.out and "cannot be written now" in captured.err
