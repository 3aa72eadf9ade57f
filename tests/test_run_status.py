"""A run's status is always one of the documented set, derived from durable records.

The hard cases: a process killed with SIGKILL (nothing gets to write "stopped"), a tree that
gives up over its restart intensity, a tree that never starts, a summary that lags its
events, and records that are damaged or written by another host.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import Lab, main
from telemetry import rundir
from telemetry.jsonl import iter_run
from telemetry.rundir import RunStatus, count_events, read_summary, run_status, status_from_record
from telemetry.schema import dumps_line
from tests.fault_helpers import crucible_run

FAST = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 5}
STATUSES = {"running", "paused", "stopped", "failed", "archived", "crashed", "unknown"}


def listed(art, capsys):
    capsys.readouterr()
    assert main(["list", "--json", "--artifacts", str(art)]) == 0
    return {i["run_id"]: i for i in (json.loads(line) for line in capsys.readouterr().out.splitlines())}


def monitor_summary(run_dir, art, capsys):
    capsys.readouterr()
    assert main(["monitor", str(run_dir), "--summary", "--artifacts", str(art)]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_a_killed_run_is_reported_crashed_and_monitors_end(tmp_path, capsys):
    proc, art = crucible_run(tmp_path, "long", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline and proc.poll() is None:  # events on disk, and a heartbeat
            found = list(art.glob("long/*/events.jsonl"))
            if found and found[0].stat().st_size > 20_000 and (found[0].parent / "lifecycle.json").exists():
                run = found[0].parent
                break
            time.sleep(0.05)
        assert run is not None, proc.stderr.read() if proc.poll() is not None else "no events written"
        live = listed(art, capsys)[run.name]
        assert live["status"] == "running" and f"owner pid {proc.pid}" in " ".join(live["evidence"])
    finally:
        proc.kill()  # SIGKILL: nothing in the process gets to write a word
        proc.wait(30)
    on_disk = sum(1 for _ in iter_run(run))
    assert on_disk == count_events(run) > 0
    info = listed(art, capsys)[run.name]
    assert info["status"] == "crashed"
    assert f"owner pid {proc.pid}" in info["reason"] and "last heartbeat" in info["reason"]
    assert info["events"] == on_disk  # reconciled with the files, whatever summary.json last said
    summ = orjson.loads((run / "summary.json").read_bytes()) if (run / "summary.json").exists() else {}
    assert info["summary_stale"] == (summ.get("events_persisted") != on_disk)
    text = monitor_summary(run, art, capsys)
    assert "(crashed)" in text and f"persisted {on_disk}," in text and f"pid {proc.pid}" in text
    # following the dead run reads what is there and ends, in both modes
    for mode in ([], ["--follow"]):
        r = subprocess.run(
            [
                sys.executable,
                "supervisor.py",
                "monitor",
                run.name,
                "--artifacts",
                str(art),
                "--name",
                "no-such-event",
                *mode,
            ],
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr.decode()


def test_a_tree_over_its_restart_intensity_is_reported_failed(tmp_path, capsys):
    art = tmp_path / "art"
    lab = Lab(art)
    try:
        doomed = lab.start_experiment(
            {
                "name": "doomed",
                "time_budget_s": 600,
                "workload": {"name": "latency", "params": FAST},
                "supervision": {"max_restarts": 0, "max_seconds": 60},
            }
        )
        deadline = time.monotonic() + 30
        while count_events(doomed.run_dir) == 0 and time.monotonic() < deadline:
            doomed.wait(0.05)  # some events on disk first
        doomed.pause()  # a sure mid-run target
        doomed.registry.send("phase", {"kind": "crash", "why": "unrecoverable"})
        assert doomed.wait(30)
        assert doomed.status() == "failed"
        assert doomed.reason.startswith("failed: reached_max_restart_intensity")
        info = listed(art, capsys)[doomed.run_id]
        assert info["status"] == "failed" and info["reason"] == doomed.reason
        assert info["events"] == count_events(doomed.run_dir) > 0
        text = monitor_summary(doomed.run_dir, art, capsys)
        assert "(failed)" in text and "reached_max_restart_intensity" in text
        s = doomed.summary()
        assert s["status"] == "failed" and s["stale"] is False
        assert s["events_persisted"] == count_events(doomed.run_dir)
        done = threading.Event()

        def follow():
            main(["monitor", doomed.run_id, "--artifacts", str(art), "--name", "no-such-event"])
            done.set()

        threading.Thread(target=follow, daemon=True).start()
        assert done.wait(60), "monitor kept following a failed run"
    finally:
        lab.shutdown()


def test_every_transition_is_on_disk_with_its_owner(tmp_path):
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment({"name": "t", "time_budget_s": 600, "workload": {"name": "latency", "params": FAST}})
        seen = [run_status(exp.run_dir)]
        exp.pause()
        seen.append(run_status(exp.run_dir))
        exp.resume()
        seen.append(run_status(exp.run_dir))
        exp.stop()
        seen.append(run_status(exp.run_dir))
        exp.archive()
        seen.append(run_status(exp.run_dir))
        assert [r.status for r in seen] == ["running", "paused", "running", "stopped", "archived"]
        assert all(r.record["owner"]["pid"] == os.getpid() for r in seen)
        assert seen[3].reason == "stopped" and seen[3].record["ended_at"] >= seen[3].record["stop_requested_at"]
        assert seen[1].record["pause_count"] == 1
    finally:
        lab.shutdown()


def test_a_tree_that_cannot_start_leaves_a_failed_record(tmp_path, monkeypatch):
    from experiments import lab as lab_mod

    def broken(*a, **k):
        raise RuntimeError("no phase today")

    monkeypatch.setattr(lab_mod.PhaseActor, "__init__", broken)
    lab = Lab(tmp_path / "art")
    try:
        with pytest.raises(RuntimeError, match="no phase today"):
            lab.start_experiment({"name": "t", "workload": {"name": "latency", "params": FAST}})
        (run,) = [p.parent for p in (tmp_path / "art").glob("t/*/lifecycle.json")]
        report = run_status(run)
        assert report.status == "failed" and "could not start" in report.reason and "no phase today" in report.reason
    finally:
        lab.shutdown()


def test_the_heartbeat_keeps_a_live_record_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    from experiments import lab as lab_mod

    monkeypatch.setattr(lab_mod, "HEARTBEAT_S", 0.05)
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment({"name": "t", "time_budget_s": 600, "workload": {"name": "latency", "params": FAST}})
        first = run_status(exp.run_dir).record["updated_at"]
        deadline = time.monotonic() + 30
        while run_status(exp.run_dir).record["updated_at"] == first and time.monotonic() < deadline:
            exp.wait(0.05)
        assert run_status(exp.run_dir).record["updated_at"] > first
    finally:
        lab.shutdown()


# --- deriving the status from a record --------------------------------------------------------------------------


def record(**kw):
    rec = {
        "schema": 1,
        "status": "running",
        "reason": None,
        "owner": rundir.owner_info(),
        "updated_at": time.time(),
        "heartbeat_s": 2.0,
    }
    rec.update(kw)
    return rec


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_record_of_a_gone_owner_is_crashed_with_the_evidence():
    gone = {**rundir.owner_info(), "pid": dead_pid()}
    r = status_from_record(record(owner=gone, status="paused"))
    assert r.status == "crashed" and f"pid {gone['pid']}" in r.reason and "was paused" in r.reason
    stopping = status_from_record(record(owner=gone, stop_requested_at=time.time()))
    assert stopping.status == "crashed" and "was running and stopping" in stopping.reason
    reused = {**rundir.owner_info(), "proc_start": (rundir.owner_info()["proc_start"] or 0) + 1}
    if rundir.owner_info()["proc_start"] is not None:  # /proc: a reused pid is told from the original
        r = status_from_record(record(owner=reused))
        assert r.status == "crashed" and "another process" in r.reason
    rebooted = {**rundir.owner_info(), "boot_id": "another-boot"}
    if rundir.owner_info()["boot_id"]:
        assert status_from_record(record(owner=rebooted)).status == "crashed"
    assert status_from_record(record()).status == "running"  # this very process owns it


def test_an_owner_on_another_host_is_judged_by_its_heartbeat():
    elsewhere = {**rundir.owner_info(), "host": socket.gethostname() + "-elsewhere"}
    now = time.time()
    assert status_from_record(record(owner=elsewhere, updated_at=now - 1), now).status == "running"
    quiet = status_from_record(record(owner=elsewhere, updated_at=now - 3600), now)
    assert quiet.status == "unknown" and "heartbeat is quiet" in quiet.reason
    skewed = status_from_record(record(owner=elsewhere, updated_at=now + 3), now)  # clocks a little apart
    assert skewed.status == "running"
    for future in (now + 3600, 1e308):  # no proof of life: a follower must not wait for ever
        r = status_from_record(record(owner=elsewhere, updated_at=future), now)
        assert r.status == "unknown" and "dated in the future" in r.reason, r
        assert any("in the future" in e for e in r.evidence)
    for bad in (float("nan"), float("inf"), "soon", None):
        assert status_from_record(record(owner=elsewhere, updated_at=bad), now).status == "unknown"
    for beat in (1e308, float("inf"), float("nan"), -5):  # a damaged heartbeat_s keeps nothing alive
        r = status_from_record(record(owner=elsewhere, updated_at=now - 1e6, heartbeat_s=beat), now)
        assert r.status == "unknown", beat


def test_ended_and_missing_records():
    assert status_from_record(record(status="stopped", reason="budget")).reason == "budget"
    failed = status_from_record(record(status="failed", reason="failed: x"))
    assert (failed.status, failed.reason, failed.live) == ("failed", "failed: x", False)
    assert status_from_record(None).status == "unknown"
    assert status_from_record(record(status="crashed")).status == "unknown"  # only ever derived
    for when in (1e300, -1e300, float("nan")):  # a damaged clock field is reported, never a crash
        assert status_from_record(record(updated_at=when)).status == "running"
        assert status_from_record(record(status="stopped", updated_at=when)).status == "stopped"


@given(
    st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["status", "reason", "owner", "updated_at", "heartbeat_s", "stop_requested_at", "x"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(),
                st.floats(allow_nan=True),
                st.text(max_size=12),
                st.sampled_from(sorted(STATUSES)),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "pid": st.integers(),
                        "host": st.text(max_size=8),
                        "proc_start": st.integers(),
                        "boot_id": st.text(max_size=8),
                    },
                ),
            ),
            max_size=7,
        ),
    )
)
def test_any_lifecycle_file_yields_a_documented_status(tmp_path_factory, content):
    run = tmp_path_factory.mktemp("run")
    (run / "lifecycle.json").write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    r = run_status(run)
    assert r.status in STATUSES and isinstance(r.status, RunStatus)
    assert r.live == (r.status in ("running", "paused"))
    if r.status in ("crashed", "unknown"):
        assert r.reason  # never without the evidence


# --- a summary that lags its events --------------------------------------------------------------------------------


def test_a_lagging_summary_is_reconciled_with_the_events_on_disk(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        dumps_line(
            {
                "v": 1,
                "seq": i,
                "ts": 1_000_000 + i,
                "experiment_id": "e",
                "run_id": "r",
                "pass": 0,
                "name": "step",
                "values": {"x": 1.0},
            }
        )
        for i in range(25)
    ]
    (run / "summary.json").write_bytes(orjson.dumps({"events_persisted": 10}))
    old = time.time() - 60
    os.utime(run / "summary.json", (old, old))
    (run / "events.jsonl").write_bytes(b"".join(lines) + lines[0][:9])  # and a torn last line
    s = read_summary(run)
    assert (s["events_persisted"], s["summary_stale"], s["summary_lag_events"]) == (25, True, 15)
    later = (run / "events.jsonl").stat().st_mtime + 1
    os.utime(run / "summary.json", (later, later))  # written after the last event: taken as it is
    assert read_summary(run) == {"events_persisted": 10}


def test_a_count_made_of_the_files_lines_is_shown_as_approximate(tmp_path):
    """``crucible list`` counts a lagging run's events as the lines of its files (parsing them
    would cost minutes on a big run): a line that is no event counts too, so the figure is
    marked approximate (``~`` in the table, ``events_approx`` in the JSON); a count the
    summary gives as current is not."""
    from cli.render import runs_table

    art = tmp_path / "art"
    run = art / "e" / "r"
    run.mkdir(parents=True)
    lines = [
        dumps_line({"v": 1, "seq": i, "ts": 1_000_000 + i, "experiment_id": "e", "run_id": "r", "pass": 0, "name": "s"})
        for i in range(20)
    ]
    garbage = b'GARBAGE\n{"v":1,"seq":5,"bad":1}\nmore garbage\n'
    (run / "events.jsonl").write_bytes(b"".join(lines) + garbage)
    (run / "lifecycle.json").write_bytes(orjson.dumps({"status": "stopped", "reason": "budget", "updated_at": 1.0}))
    old = time.time() - 60
    (run / "summary.json").write_bytes(orjson.dumps({"events_persisted": 10}))
    os.utime(run / "summary.json", (old, old))
    assert sum(1 for _ in iter_run(run, warn=False)) == 20  # what the readers count
    info = rundir.run_info(run)
    assert (info["events"], info["events_approx"]) == (23, True)  # the lines, said to be approximate
    assert "~23" in runs_table("runs", [info]).runs[0]
    (run / "summary.json").unlink()  # killed before its first summary: the lines again
    info = rundir.run_info(run)
    assert (info["events"], info["events_approx"]) == (23, True)
    (run / "summary.json").write_bytes(orjson.dumps({"events_persisted": 20}))  # current: taken as it is
    info = rundir.run_info(run)
    assert (info["events"], info["events_approx"]) == (20, False)
    assert "20" in runs_table("runs", [info]).runs[0]


def test_a_runs_own_objective_direction_wins_over_another_workloads_same_named_field(tmp_path):
    """``crucible list`` asks every run for the best of each known workload's objective; two
    workloads may name the same field with opposite directions. A run's own record (the
    objective its workload declared) decides how its field is read; a malformed objective in
    the record is ignored, not trusted."""
    run = tmp_path / "e" / "r"
    run.mkdir(parents=True)
    summary = {"events_persisted": 1, "phases": {"p": {"min": {"score": 1.0}, "max": {"score": 9.0}}}}
    (run / "summary.json").write_bytes(orjson.dumps(summary))
    record = {"status": "stopped", "reason": "budget", "updated_at": 1.0}
    (run / "lifecycle.json").write_bytes(orjson.dumps({**record, "objective": {"field": "score", "direction": "max"}}))
    info = rundir.run_info(run, None, [("score", "min")])
    assert info["best"] == {"score": 9.0}
    assert info["objective"]["direction"] == "max"
    for bad in ({"field": "score", "direction": "sideways"}, {"field": 3, "direction": "max"}, "score", [1]):
        (run / "lifecycle.json").write_bytes(orjson.dumps({**record, "objective": bad}))
        info = rundir.run_info(run, None, [("score", "min")])
        assert info["objective"] is None
        assert info["best"] == {"score": 1.0}  # the catalogue's direction, as before


def test_a_run_killed_before_its_first_summary_lists_the_best_its_events_hold(tmp_path, monkeypatch):
    """No summary.json yet (killed within its first seconds): the listing's best comes from
    the events, a failed attempt's value never counting, instead of ``-`` (which says "no
    result yet"); a run too big to read that way keeps ``-`` rather than cost the listing."""
    from cli.render import objective_best

    run = tmp_path / "e" / "20261124T000000Z-abcdef"
    run.mkdir(parents=True)
    rows = [(5.0, True), (0.5, False), (2.0, True), (float("nan"), True), (3.0, True)]
    lines = [
        dumps_line(
            {
                "v": 1,
                "seq": i,
                "ts": 1_000_000 + i,
                "experiment_id": "e",
                "run_id": run.name,
                "name": "call",
                "values": {"latency_ms": ms},
                "success": ok,
            }
        )
        for i, (ms, ok) in enumerate(rows)
    ]
    (run / "events.jsonl").write_bytes(b"".join(lines))
    record = {"status": "running", "updated_at": 1.0, "owner": {"host": "elsewhere", "pid": 1}}
    (run / "lifecycle.json").write_bytes(orjson.dumps(record))
    info = rundir.run_info(run, None, [("latency_ms", "min")])
    assert info["best"] == {"latency_ms": 2.0} and info["events"] == 5
    assert objective_best(info["best"]) == "latency_ms 2"
    monkeypatch.setattr(rundir, "BEST_SCAN_BYTES", 100)
    assert rundir.run_info(run, None, [("latency_ms", "min")])["best"] == {}
