"""Crash-only restart: a process hosting a Lab is killed (SIGKILL) and a new Lab on the same
artifacts folder resumes its runs (Lab.recover), in the same run directories, numbering
events after those on disk and keeping the run's accounting balanced across the kill."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring.workload import RESULT_FILE
from experiments.lab import HistorySeqs, Lab, resume_point
from experiments.monitor import run_summary
from telemetry.history import open_history
from telemetry.jsonl import iter_run
from telemetry.rundir import (
    CHECKPOINT,
    LIFECYCLE,
    RunStatus,
    count_events,
    find_runs,
    last_event_seq,
    owner_info,
    read_json,
    run_status,
)
from tests.fault_helpers import check_accounts, latency_spec, until

pytest_plugins = ["tests.pg_server"]  # history_target: the history tests run on SQLite and PostgreSQL

ROOT = Path(__file__).resolve().parent.parent

# The host process: resumes what a previous host left, or starts the experiments named in
# argv[2] (``name:kind[:paused]``), then lives until it is killed.
HOST = """
import sys, threading
from experiments.lab import Lab
from telemetry.rundir import count_events
from tests.fault_helpers import coloring_spec, latency_spec, until
lab = Lab(sys.argv[1])
if not lab.recover():
    for item in sys.argv[2].split(","):
        name, kind, *flags = item.split(":")
        spec = (latency_spec if kind == "latency" else coloring_spec)(name, budget=600)
        exp = lab.start_experiment(spec, experiment_id=name)
        if "paused" in flags:
            until(lambda: count_events(exp.run_dir) > 0, 60, "events before the pause")
            exp.pause()
threading.Event().wait()
"""


def host(artifacts: Path, experiments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", HOST, str(artifacts), experiments],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def kill_when(proc: subprocess.Popen[bytes], cond: Any, what: str) -> None:
    """SIGKILL the host at a moment when ``cond`` holds of its files: it is frozen (SIGSTOP)
    while they are read, so what the check saw is what the kill leaves."""

    def frozen_check() -> bool:
        os.kill(proc.pid, signal.SIGSTOP)
        if cond():
            return True
        os.kill(proc.pid, signal.SIGCONT)
        return False

    until(frozen_check, 60, what)
    kill(proc)


def checkpoint_published(d: Path) -> int:
    try:
        cp = orjson.loads((d / CHECKPOINT).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return 0
    return int((cp.get("counters") or {}).get("published", 0))


def run_dir(artifacts: Path, exp_id: str) -> Path:
    dirs = [d for d in (artifacts / exp_id).iterdir() if d.is_dir()] if (artifacts / exp_id).is_dir() else []
    assert len(dirs) <= 1, dirs
    return dirs[0] if dirs else artifacts / exp_id / "-"


def record(artifacts: Path, exp_id: str) -> dict[str, Any]:
    try:
        return read_json(run_dir(artifacts, exp_id) / LIFECYCLE) or {}
    except ValueError:
        return {}


def events_of(d: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in iter_run(d) if e["name"] == name]


def wait_for_events(artifacts: Path, exp_id: str, n: int, what: str) -> None:
    until(lambda: count_events(run_dir(artifacts, exp_id)) >= n, 60, what)


def test_a_killed_lab_s_runs_resume_in_a_new_lab(tmp_path: Path) -> None:
    proc = host(tmp_path, "run:latency,held:latency:paused")

    def events_after_the_checkpoint() -> bool:
        d = run_dir(tmp_path, "run")
        published = checkpoint_published(d)
        return (
            record(tmp_path, "held").get("status") == "paused"
            and 0 < published < last_event_seq(d) + 1  # a new emitter numbering from the checkpoint would replay
        )

    try:
        wait_for_events(tmp_path, "run", 300, "events of the running experiment")
        kill_when(proc, events_after_the_checkpoint, "events on disk newer than the checkpoint")
    finally:
        if proc.poll() is None:
            kill(proc)
    run_d, held_d = run_dir(tmp_path, "run"), run_dir(tmp_path, "held")
    before = {d: record(tmp_path, d.parent.name) for d in (run_d, held_d)}
    assert run_status(run_d).status == RunStatus.CRASHED and run_status(held_d).status == RunStatus.CRASHED
    on_disk, last_seq = count_events(run_d), last_event_seq(run_d)

    lab = Lab(tmp_path)
    try:
        exps = {e.id: e for e in lab.recover()}
        assert sorted(exps) == ["held", "run"]
        run, held = exps["run"], exps["held"]
        assert (run.run_id, run.run_dir, held.run_id, held.run_dir) == (run_d.name, run_d, held_d.name, held_d)
        assert run.status() == "running" and held.status() == "paused"
        assert lab.recover() == []  # taken over: nothing is crashed any more
        for d in (run_d, held_d):
            rec = read_json(d / LIFECYCLE)
            assert rec["owner"]["pid"] == os.getpid() and rec["resumes"] == 1
            assert rec["started_at"] == before[d]["started_at"]
            assert run_status(d).status in (RunStatus.RUNNING, RunStatus.PAUSED)
        # the run goes on recording, the paused one stays parked with nothing new on disk
        wait_for_events(tmp_path, "run", on_disk + 300, "events after the resume")
        held_n = count_events(held_d)
        assert held.phase_status(max_age=0, wait=30)["paused"] is True
        assert count_events(held_d) == held_n
        # durations carry over: the time run before the kill counts
        d = run.durations()
        assert d["active_duration"] >= before[run_d]["active_duration"] and d["resumes"] == 1
        assert d["wall_clock_duration"] >= d["active_duration"] + d["paused_duration"] - 1e-6
        hd = held.durations()
        assert hd["pause_count"] == 1 and hd["paused_duration"] >= before[held_d]["paused_duration"]
        run.stop()
        held.stop()
        for exp in (run, held):
            s = check_accounts(exp, tmp_path, lossless=False)
            assert s["events_lost_in_transit"] >= 0
            (resumed,) = events_of(exp.run_dir, "resumed")
            assert resumed["values"]["resumes"] == 1.0 and "checkpoint_age_s" in resumed["values"]
            assert resumed["values"]["restored_done"] >= 0
            assert exp.summary()["active_duration"] >= before[exp.run_dir]["active_duration"]
            # the phase the run goes on in: no phase of no name holding the resume's figures
            assert resumed["phase"] == "calls"
            assert set(read_json(exp.run_dir / "summary.json")["phases"]) == {"calls"}
            assert set(run_summary(exp.run_dir)["phases"]) == {"calls"}  # crucible monitor RUN --summary
        (resumed,) = events_of(run_d, "resumed")
        assert resumed["seq"] > last_seq  # numbered after what the killed process left on disk
    finally:
        lab.shutdown()


def test_a_run_killed_again_and_again_keeps_its_events_and_accounts(tmp_path: Path) -> None:
    rng = random.Random(7)
    kills = 3
    proc = host(tmp_path, "loop:latency")
    try:
        for _ in range(kills):
            n = count_events(run_dir(tmp_path, "loop"))
            wait_for_events(tmp_path, "loop", n + rng.randint(20, 1500), "events before the next kill")
            kill(proc)
            assert run_status(run_dir(tmp_path, "loop")).status == RunStatus.CRASHED
            proc = host(tmp_path, "loop:latency")
    finally:
        kill(proc)
    lab = Lab(tmp_path)
    try:
        (exp,) = lab.recover()
        n = count_events(exp.run_dir)
        wait_for_events(tmp_path, "loop", n + 100, "events after the last resume")
        resumes = read_json(exp.run_dir / LIFECYCLE)["resumes"]
        assert resumes >= kills  # the last host may have died before it took the run over
        exp.stop()
        s = check_accounts(exp, tmp_path, lossless=False)
        assert s["events_lost_in_transit"] >= 0
        resumed = events_of(exp.run_dir, "resumed")
        assert [int(e["values"]["resumes"]) for e in resumed][-1] == resumes
        assert [e["values"]["resumes"] for e in resumed] == sorted({e["values"]["resumes"] for e in resumed})
    finally:
        lab.shutdown()


def test_a_colouring_run_resumes_from_its_best_k(tmp_path: Path) -> None:
    proc = host(tmp_path, "col:coloring")

    def best_k() -> Any:
        try:
            cp = orjson.loads((run_dir(tmp_path, "col") / CHECKPOINT).read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return (cp.get("workload") or {}).get("best_k")

    try:
        until(lambda: best_k() is not None, 60, "a checkpoint with a best k")
    finally:
        kill(proc)
    k = best_k()
    lab = Lab(tmp_path)
    try:
        (exp,) = lab.recover()
        until(lambda: events_of(exp.run_dir, "resumed"), 60, "the resumed event")
        (resumed,) = events_of(exp.run_dir, "resumed")
        assert resumed["values"]["restored_best_k"] == k
        cp = orjson.loads((exp.run_dir / CHECKPOINT).read_bytes())["workload"]
        assert resumed["pass"] == cp["pass"] == resumed["values"]["restored_pass"]  # where the run goes on
        assert resumed["phase"] == resumed["parameters"]["phase"] in ("tabu", "memetic")
        until(lambda: (best_k() or k + 1) <= k and count_events(exp.run_dir) > resumed["seq"], 60, "a new step")
        exp.stop()
        check_accounts(exp, tmp_path, lossless=False)
        # the resumed run writes its checked result, as one that was never killed does
        result = orjson.loads((exp.run_dir / RESULT_FILE).read_bytes())
        best = orjson.loads((exp.run_dir / CHECKPOINT).read_bytes())["workload"]["best"]
        assert result["reason"] == "stopped" and result["proper"] and result["k"] <= k
        assert result["coloring"] == [c + 1 for c in best]
    finally:
        lab.shutdown()


# A process that dies (as a SIGKILL would take it) at the moment it writes a new run's spec.
DIES_AT_SPEC = """
import os, sys
import experiments.lab as lab_mod
from tests.fault_helpers import latency_spec
real = lab_mod.atomic_write
def dying(path, *args, **kwargs):
    if path.name == lab_mod.SPEC:
        os._exit(9)
    return real(path, *args, **kwargs)
lab_mod.atomic_write = dying
lab_mod.Lab(sys.argv[1]).start_experiment(latency_spec("born", budget=60), experiment_id="born")
"""


def test_a_run_whose_process_died_as_it_was_created_is_listed_with_why(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", DIES_AT_SPEC, str(tmp_path)], cwd=ROOT, timeout=120)
    assert proc.returncode == 9
    (folder,) = find_runs(tmp_path)  # listed: its record was written first
    assert run_status(folder).status == RunStatus.CRASHED
    lab = Lab(tmp_path)
    try:
        assert lab.recover() == []  # nothing to resume it from
    finally:
        lab.shutdown()
    report = run_status(folder)
    assert report.status == RunStatus.CRASHED and "spec.json was never written" in report.reason


def test_runs_that_ended_or_whose_owner_lives_are_left_alone(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    try:
        done = lab.start_experiment(latency_spec("done", budget=0.2), experiment_id="done")
        assert done.wait(30)
        live = lab.start_experiment(latency_spec("live", budget=600), experiment_id="live")
        other = Lab(tmp_path)  # a second Lab in this (live) process: the owner is alive
        try:
            assert other.recover() == []
            assert read_json(live.run_dir / LIFECYCLE)["resumes"] == 0
            assert run_status(done.run_dir).status == RunStatus.STOPPED
            assert not list(live.run_dir.glob(".resume.*"))
        finally:
            other.shutdown()
        live.stop()
    finally:
        lab.shutdown()


counts = st.integers(min_value=0, max_value=10_000)


@settings(max_examples=60, deadline=None)
@given(
    published=counts, dropped=counts, held=counts, on_disk=st.integers(-1, 20_000), heard=counts, saved=st.booleans()
)
def test_a_resume_numbers_after_everything_used_and_balances(
    tmp_path_factory: Any, published: int, dropped: int, held: int, on_disk: int, heard: int, saved: bool
) -> None:
    """Whatever the checkpoint, the disk and the Recorder's state say, the new emitter numbers
    after every seq any of them has seen, and its counters satisfy emitted = published + dropped
    (what the Recorder's accounting needs to balance), never below what the Recorder heard."""
    d = tmp_path_factory.mktemp("run")
    if on_disk >= 0:
        (d / "events.jsonl").write_bytes(orjson.dumps({"seq": on_disk, "ts": 1_000_000}) + b"\n" + b'{"seq": 99999')
    (d / "recorder.json").write_bytes(orjson.dumps({"counters": {"published": heard, "emitted": heard + 1}}))
    cp: dict[str, Any] = {
        "counters": {"published": published, "dropped": dropped, "emitted": published + dropped + held},
        "steps": 3,
    }
    if saved:
        cp["saved_at"] = 0.5
    point = resume_point(d, cp, 2)
    c, info = point["counters"], point["resume"]
    assert info["seq_start"] == c["published"] >= max(published + held, on_disk + 1, heard)
    assert c["emitted"] == c["published"] + c["dropped"] and c["dropped"] >= dropped
    assert c["emitted"] >= heard + 1
    assert info["last_seq_on_disk"] == on_disk and info["events_after_checkpoint"] == c["published"] - published
    assert ("lost_s" in info) == (saved and on_disk >= 0)


def test_a_run_killed_while_stopping_is_stopped_on_recovery(tmp_path):
    """A kill during a stop leaves a record that says running with ``stop_requested_at`` set:
    the new Lab finishes the stop it was asked for, it does not run the experiment on."""
    art = tmp_path / "art"
    proc = host(art, "halting:latency")
    run = None
    try:
        until(lambda: any(art.glob("halting/*/events.jsonl")), 60, "the run's first events")
        run = next(art.glob("halting/*/"))
        until(lambda: count_events(run) > 200, 60, "events on disk")
    finally:
        kill(proc)
    record = read_json(run / LIFECYCLE)
    assert record["status"] == "running" and record["stop_requested_at"] is None
    record["stop_requested_at"] = record["updated_at"]  # what a kill in the middle of stop() leaves
    (run / LIFECYCLE).write_bytes(orjson.dumps(record))
    lab = Lab(art)
    try:
        (exp,) = lab.recover()
        assert exp.status() == "stopped" and exp.reason == "stopped"
        assert run_status(run).status == RunStatus.STOPPED
        names = [e["name"] for e in iter_run(run)]
        assert names.count("resumed") == 1 and names[-1] == "phase_end"
        check_accounts(exp, art, lossless=False)
    finally:
        lab.shutdown()


def test_a_run_killed_after_its_phase_end_reached_the_disk_balances_on_recovery(tmp_path: Path) -> None:
    """Killed after ``phase_end`` was on disk but before the Recorder took the emitter's final
    counters: the Recorder's record is one behind the checkpoint's. The resume closed the run
    with ``emitted`` one below ``persisted`` (unbalanced for good); the finished phase sends
    its counters again."""
    art = tmp_path / "art"
    lab = Lab(art)
    try:
        exp = lab.start_experiment(latency_spec("ended", budget=0.5), experiment_id="ended")
        assert exp.wait(60) and exp.summary()["accounting"]["balanced"]
    finally:
        lab.shutdown()
    d = exp.run_dir
    life = read_json(d / LIFECYCLE)  # what the kill left: running, a stop asked, the owner gone
    life.update(status="running", reason=None, ended_at=None, stop_requested_at=life["ended_at"])
    life["owner"] = {**owner_info(), "pid": _dead_pid()}
    (d / LIFECYCLE).write_bytes(orjson.dumps(life))
    rec = read_json(d / "recorder.json")
    rec["counters"] = {k: v - 1 if k in ("emitted", "published") else v for k, v in rec["counters"].items()}
    (d / "recorder.json").write_bytes(orjson.dumps(rec))
    os.utime(d / "summary.json", (0, 0))  # older than the events, as after a kill
    lab = Lab(art)
    try:
        (again,) = lab.recover()
        assert again.wait(60)
        acc = again.summary()["accounting"]
        assert acc["balanced"] and acc["emitted"] == acc["persisted"] == count_events(d), acc
    finally:
        lab.shutdown()


def _crashed_run(tmp_path: Path, name: str) -> Path:
    """A latency run whose Lab was SIGKILLed after it recorded some events."""
    proc = host(tmp_path, f"{name}:latency")
    try:
        wait_for_events(tmp_path, name, 50, "events before the kill")
    finally:
        kill(proc)
    d = run_dir(tmp_path, name)
    assert run_status(d).status == RunStatus.CRASHED
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=60)
    return p.pid


def test_a_lab_killed_while_it_resumed_a_run_does_not_keep_it_from_resuming(tmp_path: Path) -> None:
    """The resume marker of a Lab that died before the run was running again is taken over
    (its owner is gone); damaged records of the Recorder are rebuilt, not a failed start."""
    d = _crashed_run(tmp_path, "claimed")
    dead = _dead_pid()
    stale = {"pid": dead, "host": owner_info()["host"], "boot_id": owner_info()["boot_id"]}
    (d / ".resume.1").write_bytes(orjson.dumps(stale))
    (d / "recorder.json").write_bytes(b"[1, 2, 3]")  # a JSON list, not the Recorder's record
    lab = Lab(tmp_path)
    try:
        (exp,) = lab.recover()
        assert exp.status() == "running" and exp.run_dir == d
        taken = orjson.loads((d / f".resume.1.{dead}").read_bytes())
        assert taken["pid"] == os.getpid()
        other = Lab(tmp_path)
        try:
            assert other._claim(d, 1) is None  # the new owner lives: nobody else takes it
        finally:
            other.shutdown()
        wait_for_events(tmp_path, "claimed", count_events(d) + 50, "events after the resume")
        exp.stop()
        check_accounts(exp, tmp_path, lossless=False)
    finally:
        lab.shutdown()


def _left_crashed(art: Path, run: Path, **lab_options: Any) -> str:
    """A Lab on ``art`` recovers nothing and ``run`` stays crashed: the reason it is listed with."""
    lab = Lab(art, **lab_options)
    try:
        assert lab.recover() == []
    finally:
        lab.shutdown()
    report = run_status(run)
    assert report.status == RunStatus.CRASHED
    return report.reason


def test_a_run_that_cannot_be_resumed_says_why_and_resumes_once_repaired(tmp_path: Path) -> None:
    d = _crashed_run(tmp_path, "damaged")
    (d / CHECKPOINT).unlink()
    (d / CHECKPOINT).mkdir()  # nothing can be written there
    reason = _left_crashed(tmp_path, d)
    assert "could not resume it" in reason and "checkpoint.json" in reason
    (d / CHECKPOINT).rmdir()
    proc = host(tmp_path, "unused:latency")  # another process: recovers what it finds
    try:
        until(lambda: record(tmp_path, "damaged").get("resumes") == 1, 60, "the repaired run resumed")
        assert record(tmp_path, "damaged")["owner"]["pid"] == proc.pid
        assert not (tmp_path / "unused").exists()  # the host recovered a run, so it started none
    finally:
        kill(proc)


def test_a_run_is_not_resumed_onto_a_nearly_full_disk(tmp_path: Path) -> None:
    """Resumed with less free disk than a run needs, it would end ``storage: ...`` for good;
    it stays crashed, says why, and the next recovery with room resumes it."""
    import shutil

    d = _crashed_run(tmp_path, "room")
    reason = _left_crashed(tmp_path, d, min_free_bytes=shutil.disk_usage(tmp_path).free + (1 << 40))
    assert "No space left on device" in reason and "min_free_bytes" in reason
    lab = Lab(tmp_path, min_free_bytes=0)
    try:
        (exp,) = lab.recover()
        assert exp.run_dir == d and exp.status() == "running"
        exp.stop()
    finally:
        lab.shutdown()


def test_a_daemon_resumes_the_runs_a_full_disk_left_crashed_once_there_is_room_and_before_its_queue(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import shutil

    from experiments.service import LabService

    monkeypatch.setattr("experiments.service.HOLD_RETRY_S", (0.05, 0.2))
    d = _crashed_run(tmp_path, "early")
    service = LabService(tmp_path, max_running=1, min_free_bytes=shutil.disk_usage(tmp_path).free + (1 << 40))
    try:
        assert run_status(d).status == RunStatus.CRASHED  # no room: left crashed
        later = service.submit(latency_spec("later", budget=0.2))["id"]
        assert {e["id"]: e["status"] for e in service.list(history=False)}[later] == "queued"
        service.lab.min_free_bytes = 0  # room again: the timer finds it
        until(lambda: run_status(d).status == RunStatus.RUNNING, 60, "the crashed run resumed")
        # the resumed run holds the one slot: the later submission waits for it
        assert {e["id"]: e["status"] for e in service.list(history=False)}[later] == "queued"
        service.stop("early")
        until(lambda: {e["id"]: e["status"] for e in service.list(history=False)}[later] == "stopped", 60, "later ran")
    finally:
        service.shutdown()


def _history_seqs(target: Any, art: Path, run_id: str) -> dict[int, tuple[int, str]]:
    store = open_history(target, artifacts=art, readonly=True)
    try:
        return {e["seq"]: (e["ts"], e["name"]) for e in store.iter_events(run_id=run_id)}
    finally:
        store.close()


def test_a_run_whose_files_hold_less_than_the_history_resumes_past_the_history(
    tmp_path: Path, history_target: Any, monkeypatch: Any
) -> None:
    """A run folder restored from a backup (or whose JSONL lost its tail to a crash of the
    disk) holds fewer events than the history: the resumed run numbers after the history's
    last seq, so every new event reaches the history and each seq names one event in both."""
    if history_target is not None:
        monkeypatch.setenv("CRUCIBLE_HISTORY", history_target)  # the host's Lab writes there too
    proc = host(tmp_path, "restored:latency")
    backup = tmp_path / "backup"
    try:
        wait_for_events(tmp_path, "restored", 200, "events before the backup")
        os.kill(proc.pid, signal.SIGSTOP)  # a consistent copy of the folder, as a backup takes it
        d = run_dir(tmp_path, "restored")
        shutil.copytree(d, backup)
        os.kill(proc.pid, signal.SIGCONT)
        backed_up = last_event_seq(backup)
        until(lambda: max(_history_seqs(history_target, tmp_path, d.name), default=-1) > backed_up + 500, 60, "more")
    finally:
        kill(proc)
    shutil.rmtree(d)
    shutil.copytree(backup, d)  # the folder restored: the history holds events past its files
    held = _history_seqs(history_target, tmp_path, d.name)
    assert max(held) > last_event_seq(d) + 500
    lab = Lab(tmp_path, history=history_target)
    try:
        (exp,) = lab.recover()
        wait_for_events(tmp_path, "restored", count_events(d) + 300, "events after the resume")
        exp.stop()
    finally:
        lab.shutdown()
    (resumed,) = events_of(d, "resumed")
    assert resumed["seq"] > max(held)  # numbered past everything the history held
    jsonl = {e["seq"]: (e["ts"], e["name"]) for e in iter_run(d)}
    hist = _history_seqs(history_target, tmp_path, d.name)
    assert {s: hist.get(s) for s in jsonl} == jsonl  # each seq of the files: the same event in the history
    assert {s: v for s, v in hist.items() if s in held} == held  # what the history held is kept as it was


def test_a_history_that_cannot_be_asked_leaves_the_numbering_to_the_files(tmp_path: Path) -> None:
    """No history file yet: it holds nothing (-1). A damaged one: None (the resume numbers from
    the files and checkpoints, as without it), and it is not opened again for the next run."""
    assert HistorySeqs(tmp_path / "none.sqlite3", tmp_path).last_seq("r1") == -1
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database" * 1000)
    seqs = HistorySeqs(bad, tmp_path)
    assert seqs.last_seq("r1") is None
    bad.unlink()  # would open now as "no history": it is not asked again in this recovery
    assert seqs.last_seq("r2") is None
    info = resume_point(tmp_path, {"counters": {"published": 7}}, 1, None)["resume"]
    assert info["seq_start"] == 7 and info["last_seq_in_history"] is None
    assert resume_point(tmp_path, {"counters": {"published": 7}}, 1, 40)["resume"]["seq_start"] == 41


def test_a_run_whose_record_cannot_be_written_is_not_resumed(tmp_path: Path, monkeypatch: Any) -> None:
    """A resume whose first lifecycle record is refused by the disk does not go ahead: the run
    would run with a record that says it crashed, and be resumed again at every start. It
    stays crashed, its claim is released, the error names the file; once the disk takes the
    record again, the next recovery resumes it, once."""
    from structlog.testing import capture_logs

    import experiments.lab as lab_mod

    d = _crashed_run(tmp_path, "stuck")
    segments = sorted(d.glob("events*.jsonl"))
    real = lab_mod.write_json

    def write_json(path: Path, data: Any, *args: Any, **kwargs: Any) -> None:
        if path == d / LIFECYCLE:
            raise OSError(1, "Operation not permitted")
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(lab_mod, "write_json", write_json)
    lab = Lab(tmp_path)
    try:
        with capture_logs() as logs:
            assert lab.recover() == []
        assert lab.experiments == {}  # no tree runs it
    finally:
        lab.shutdown()
    (failed,) = [e for e in logs if e["event"] == "could not resume a crashed run"]
    assert failed["log_level"] == "error" and failed["run_dir"] == str(d)
    assert not [e for e in logs if e["event"] == "experiment resumed after a crash"]
    assert run_status(d).status == RunStatus.CRASHED and read_json(d / LIFECYCLE)["resumes"] == 0
    assert not list(d.glob(".resume.*"))  # the claim released
    assert len(sorted(d.glob("events*.jsonl"))) <= len(segments) + 1  # no run went on in a new segment
    assert not events_of(d, "resumed")
    monkeypatch.setattr(lab_mod, "write_json", real)  # the disk takes it again
    lab = Lab(tmp_path)
    try:
        (exp,) = lab.recover()
        assert exp.run_dir == d and read_json(d / LIFECYCLE)["resumes"] == 1
        exp.stop()
    finally:
        lab.shutdown()


def test_a_run_with_an_unreadable_record_is_named_in_the_log(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    d = _crashed_run(tmp_path, "torn")
    (d / LIFECYCLE).write_bytes((d / LIFECYCLE).read_bytes()[:40])  # cut in the middle of the JSON
    lab = Lab(tmp_path)
    try:
        with capture_logs() as logs:
            assert lab.recover() == []
    finally:
        lab.shutdown()
    (said,) = [e for e in logs if e["event"] == "a run's status is unknown; not resumed"]
    assert said["log_level"] == "warning" and said["file"] == str(d / LIFECYCLE)
    assert "lifecycle.json unreadable" in said["reason"]
