import http.server
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from actors.messages import encode
from experiments.spec import SpecError
from supervisor import AlreadyPaused, Lab, NotFound, NotPaused, NotRunning
from telemetry.jsonl import iter_run
from telemetry.rundir import read_summary, run_status
from telemetry.schema import rows_to_batch
from tests.fault_helpers import crucible_run, until

FAST = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 5}


def spec(name="t", budget=600.0, calls=0, **extra):
    return {
        "name": name,
        "time_budget_s": budget,
        "workload": {"name": "latency", "params": {**FAST, "calls": calls}},
        "metrics": {"publish_interval_s": 0},
        **extra,
    }


def files_account(exp):
    """emitted = persisted + dropped, counted from the files."""
    s = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    on_disk = sum(1 for _ in iter_run(exp.run_dir))
    assert on_disk == s["events_persisted"]
    assert s["events_emitted"] == s["events_persisted"] + s["events_dropped"]
    return s


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def test_durations_are_exact_with_an_injected_clock(tmp_path):
    now = [100.0]
    lab = Lab(tmp_path / "art", clock=lambda: now[0])
    exp = lab.start_experiment(spec())
    for _ in range(3):
        now[0] += 2.0
        exp.pause()
        now[0] += 5.0
        exp.resume()
    now[0] += 1.0
    exp.stop()
    now[0] += 50.0  # time after the stop does not count
    s = exp.summary()
    assert s["wall_clock_duration"] == 22.0
    assert s["paused_duration"] == 15.0
    assert s["active_duration"] == 7.0
    assert (s["pause_count"], s["resume_count"]) == (3, 3)
    lab.shutdown()


def test_no_events_are_collected_while_paused(lab):
    exp = lab.start_experiment(spec())
    exp.pause()
    before = exp.metrics(max_age=0, wait=30)["events"]
    # an event batch published while paused reaches nobody: the subscribers are detached
    stray = rows_to_batch([{"seq": 10**9, "ts": 1, "name": "stray", "values": {"x": 1.0}}], exp.id, exp.run_id)
    assert exp.topics.publish_bytes("events", encode(stray)) == 0
    assert exp.phase_status()["paused"]
    assert exp.metrics(max_age=0, wait=30)["events"] == before  # a fresh answer, asked after the stray batch
    exp.resume()
    exp.stop()
    s = files_account(exp)
    assert "stray" not in {e["name"] for e in iter_run(exp.run_dir)}
    assert s["events_persisted"] > 0


def test_two_experiments_do_not_see_each_other(lab):
    a = lab.start_experiment(spec("a"))
    b = lab.start_experiment(spec("b", workload={"name": "latency", "params": {**FAST, "target": "math:floor"}}))
    a.stop()
    b.stop()
    ea, eb = list(iter_run(a.run_dir)), list(iter_run(b.run_dir))
    assert ea and eb
    assert {e["experiment_id"] for e in ea} == {"a"} and {e["experiment_id"] for e in eb} == {"b"}
    assert all(e["run_id"] == a.run_id for e in a.query_window(("last_n", 10_000)))
    assert a.metrics()["events"] == len(ea) and b.metrics()["events"] == len(eb)


PARKED = threading.Event()  # the test has parked the run: its calls may go fast


def paced_call() -> None:
    """A latency target slow (50 s for 1000 calls) until the test has parked the run, so that the
    run cannot complete before the test's pause however late that comes; fast after."""
    time.sleep(0.001 if PARKED.is_set() else 0.05)


def test_phase_crash_restarts_from_checkpoint_and_completes(lab):
    PARKED.clear()
    slow = {"target": f"{__name__}:paced_call", "args": [], "calls_per_step": 5, "calls": 1000}
    exp = lab.start_experiment(spec(workload={"name": "latency", "params": slow}))
    exp.pause()  # parked mid-run at a safe point: the crash below surely hits a running workload
    PARKED.set()
    assert not exp.phase_status()["finished"]
    phase = exp.registry.whereis("phase")
    exp.registry.send("phase", {"kind": "crash", "why": "drill"})
    assert exp.registry.await_name("phase", timeout=30, not_urn=phase.urn) is not None
    assert exp.phase_status()["paused"]  # the restored phase keeps the checkpointed pause
    exp.resume()
    assert exp.wait(60)
    assert exp.reason == "completed"
    s = files_account(exp)
    assert s["restarts"].get("phase") == 1
    calls = [e for e in iter_run(exp.run_dir) if e["name"] == "call"]
    assert len(calls) == 1000  # the restored phase went on counting, it did not start over
    assert sorted(e["step"] for e in calls) == list(range(1, 1001))
    (restart,) = [e for e in iter_run(exp.run_dir) if e["name"] == "phase_restart"]
    assert restart["phase"] == "calls"  # the phase it goes on in, not a phase of no name
    assert set(read_summary(exp.run_dir)["phases"]) == {"calls"}


def test_a_misspelt_anomaly_metric_is_said_in_the_run_s_events_and_never_sampled_out(lab):
    from actors.anomaly import anomaly_metrics

    exp = lab.start_experiment(
        spec(
            telemetry={"batch_size": 20},
            anomaly={"metrics": ["latncy_ms"]},
            sampling={"strategy": "uniform", "config": {"rate": 0.001}},  # a record event is kept whatever the rate
        )
    )

    def noted():
        return [e for e in iter_run(exp.run_dir) if e["name"] == "anomaly_unseen_metrics"]

    until(noted, 60, "the note of the unseen metric")
    assert anomaly_metrics(exp.registry.whereis("anomaly"))["unseen_metrics"] == ["latncy_ms"]
    exp.stop()
    (note,) = noted()  # said once
    assert note["phase"] == "calls" and note["values"] == {"unseen_metrics": 1.0}
    assert note["notes"].startswith("anomaly.metrics: latncy_ms in none of the first ")
    assert "which carried " in note["notes"] and "latency_ms" in note["notes"]


def test_a_run_that_ends_before_the_check_still_records_its_misspelt_metric(lab):
    """A short run (fewer batches than the detector's check waits for) hears of it as its
    events end, judged on all of them: the note is in its events, before its phase_end."""
    exp = lab.start_experiment(spec(calls=40, telemetry={"batch_size": 10}, anomaly={"metrics": ["latncy_ms"]}))
    assert exp.wait(60) and exp.reason == "completed"
    events = list(iter_run(exp.run_dir))
    names = [e["name"] for e in events]
    assert names.count("anomaly_unseen_metrics") == 1
    assert names.index("anomaly_unseen_metrics") < names.index("phase_end")
    (note,) = [e for e in events if e["name"] == "anomaly_unseen_metrics"]
    assert note["notes"].startswith("anomaly.metrics: latncy_ms in none of the run's ")
    assert "latency_ms" in note["notes"]
    files_account(exp)


def test_a_short_run_with_its_anomaly_metrics_all_seen_records_no_note(lab):
    exp = lab.start_experiment(spec(calls=40, telemetry={"batch_size": 10}, anomaly={"metrics": ["latency_ms"]}))
    assert exp.wait(60) and exp.reason == "completed"
    assert "anomaly_unseen_metrics" not in {e["name"] for e in iter_run(exp.run_dir)}


def test_budget_ends_the_run(lab):
    exp = lab.start_experiment(spec(budget=0.3))
    assert exp.wait(30)
    assert exp.reason == "budget" and exp.status() == "stopped"
    files_account(exp)


def test_lab_shutdown_flushes_everything(tmp_path):
    lab = Lab(tmp_path / "art")
    exps = [lab.start_experiment(spec(f"e{i}")) for i in range(2)]
    lab.shutdown()
    for e in exps:
        assert e.status() == "stopped"
        files_account(e)


def test_errors_are_typed_and_leave_nothing_behind(lab):
    threads = threading.active_count()
    with pytest.raises(SpecError, match=r"available: .*latency"):
        lab.start_experiment({"name": "x", "workload": {"name": "nope"}})
    with pytest.raises(NotFound, match="no experiment 'ghost'"):
        lab.get("ghost")
    assert lab.list() == []
    assert threading.active_count() == threads
    exp = lab.start_experiment(spec())
    assert lab.get(exp.id) is exp
    exp.stop()
    with pytest.raises(NotRunning):
        exp.pause()
    with pytest.raises(NotRunning):
        exp.stop()
    exp.archive()
    assert exp.status() == "archived"


@pytest.mark.parametrize(
    "bad", ["history.sqlite3", "history.sqlite3-wal", "History.Sqlite3-shm", "daemon.log.3", "queue.json", "hypertune"]
)
def test_an_id_the_artifacts_root_keeps_for_itself_is_refused(lab, bad):
    """An experiment folder named like the history database or the daemon's files would break them."""
    db = lab.artifacts / "history.sqlite3"
    with pytest.raises(ValueError, match="reserved"):
        lab.start_experiment(spec(name=bad))
    with pytest.raises(ValueError, match="reserved"):
        lab.start_experiment(spec(), experiment_id=bad)
    assert lab.list() == [] and not (lab.artifacts / bad).is_dir()
    assert not db.exists() or db.is_file()
    ok = lab.start_experiment(spec(name="history"), experiment_id="history.sqlite")  # near names are fine
    assert ok.id == "history.sqlite"
    ok.stop()


def test_unwritable_artifacts_fail_at_start(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(Exception, match="not writable"):
        Lab(f)


def test_timeouts_are_checked_before_anything_changes(tmp_path):
    """``stop(timeout=-1)`` (or NaN, or past the bound) was refused only after the record said
    a stop was under way, and the run went on: a later recovery would finish a stop nobody
    made. ``math.inf`` means no limit, as for the actors (it overflowed threading's wait)."""
    lab = Lab(tmp_path)
    try:
        exp = lab.start_experiment(spec())
        for bad in (math.nan, -1.0, 1e12, "5"):
            with pytest.raises(ValueError, match="timeout must be None or inf"):
                exp.stop(timeout=bad)
            with pytest.raises(ValueError, match="timeout must be None or inf"):
                exp.wait(bad)
        record = orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())
        assert exp.status() == "running" and record["stop_requested_at"] is None
        assert exp.wait(0.01) is False
        exp.stop(timeout=math.inf)
        assert exp.status() == "stopped" and exp.wait(math.inf) is True
        with pytest.raises(ValueError, match="timeout must be None or inf"):
            lab.shutdown(timeout=-5)
        assert not lab.closed
    finally:
        lab.shutdown(timeout=math.inf)
    assert lab.closed


SHUTDOWN_CUT = """
import os, signal, sys, threading
from experiments.lab import Lab
from tests.fault_helpers import latency_spec

lab = Lab(sys.argv[1])
spec = latency_spec("slowstop", budget=600.0)
spec["workload"]["params"] = {"target": "time:sleep", "args": [1.0], "calls_per_step": 1}  # a stop waits for it
exp = lab.start_experiment(spec)
stopping = threading.Event()
real_stop = exp.stop


def stop(timeout=60.0):
    stopping.set()
    real_stop(timeout)


exp.stop = stop
real_rest = lab._shutdown_rest


def rest(timeout):
    print("ended before the rest:", exp.ended, file=sys.stderr, flush=True)  # stderr: the logs go to stdout
    real_rest(timeout)


lab._shutdown_rest = rest
threading.Thread(target=lambda: stopping.wait(60) and os.kill(os.getpid(), signal.SIGINT), daemon=True).start()
try:
    lab.shutdown()
except KeyboardInterrupt:
    print("interrupted", exp.status(), file=sys.stderr, flush=True)
"""


def test_a_ctrl_c_during_shutdown_lets_the_stops_end_first(tmp_path):
    """Ctrl-C while Lab.shutdown() waited for its stop threads left the process with the stops
    cut short: every run crashed (to be resumed and stopped by the next Lab). The stops end,
    then the interrupt goes on."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_CUT, str(tmp_path)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = out.stderr.splitlines()
    assert said[-2:] == ["ended before the rest: True", "interrupted stopped"], out.stdout + out.stderr[-2000:]
    (run,) = (tmp_path / "slowstop").iterdir()
    record = orjson.loads((run / "lifecycle.json").read_bytes())
    assert (record["status"], record["reason"]) == ("stopped", "stopped")


class Lifecycle(RuleBasedStateMachine):
    """Random pause / resume / stop / archive sequences against the lifecycle rules."""

    def __init__(self):
        super().__init__()
        import tempfile

        self.root = tempfile.mkdtemp(prefix="crucible-sm-")  # removed in teardown: twelve examples a run
        self.lab = Lab(self.root)
        self.exp = self.lab.start_experiment(spec())
        self.model = "running"

    @rule()
    def pause(self):
        expected = {"running": None, "paused": AlreadyPaused, "stopped": NotRunning, "archived": NotRunning}
        self._do(self.exp.pause, expected[self.model], "paused")

    @rule()
    def resume(self):
        expected = {"running": NotPaused, "paused": None, "stopped": NotRunning, "archived": NotRunning}
        self._do(self.exp.resume, expected[self.model], "running")

    @rule()
    def stop(self):
        expected = {"running": None, "paused": None, "stopped": NotRunning, "archived": NotRunning}
        self._do(self.exp.stop, expected[self.model], "stopped")

    @rule()
    def archive(self):
        self.exp.archive()
        self.model = "archived"

    def _do(self, fn, error, then):
        if error is None:
            fn()
            self.model = then
        else:
            with pytest.raises(error):
                fn()

    @invariant()
    def status_matches(self):
        assert self.exp.status() == self.model
        if self.model == "paused":
            assert self.exp.phase_status()["paused"]
        report = run_status(self.exp.run_dir)  # every transition is on disk when it returns
        assert report.status == self.model and report.record["owner"]["pid"] == os.getpid()

    def teardown(self):
        try:
            self.lab.shutdown()
            if self.model in ("stopped", "archived"):
                files_account(self.exp)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(
    max_examples=12, stateful_step_count=8, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture
def http_server():
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path == "/ok" else 404
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_latency_workload_times_http_calls(lab, http_server):
    ok = lab.start_experiment(
        spec(
            "ok",
            workload={"name": "latency", "params": {"target": f"{http_server}/ok", "calls": 20, "calls_per_step": 5}},
        )
    )
    bad = lab.start_experiment(
        spec(
            "bad",
            workload={
                "name": "latency",
                "params": {"target": f"{http_server}/missing", "calls": 10, "calls_per_step": 5},
            },
        )
    )
    assert ok.wait(30) and bad.wait(30)
    calls = [e for e in iter_run(ok.run_dir) if e["name"] == "call"]
    assert len(calls) == 20 and all(e["success"] for e in calls)
    assert all(e["values"]["latency_ms"] > 0 for e in calls)
    failed = [e for e in iter_run(bad.run_dir) if e["name"] == "call"]
    assert len(failed) == 10 and not any(e["success"] for e in failed)
    assert failed[0]["notes"] == "HTTP 404"


def test_callable_costs_and_tokens_are_recorded(lab):
    exp = lab.start_experiment(
        spec(
            "cost",
            workload={
                "name": "latency",
                "params": {"target": "tests.test_lab:fake_llm_call", "calls": 30, "calls_per_step": 10},
            },
        )
    )
    assert exp.wait(30)
    m = exp.metrics()
    assert m["totals"]["cost_usd"] == pytest.approx(30 * 0.002)
    assert m["totals"]["tokens_prompt"] == 30 * 120


def fake_llm_call():
    """Stands for an API call that reports its own cost (real work: it hashes its prompt)."""
    import hashlib

    hashlib.sha256(b"prompt" * 1000).hexdigest()
    return {"cost_usd": 0.002, "tokens_prompt": 120, "tokens_completion": 30}


def test_sigterm_to_crucible_run_flushes_everything(tmp_path):
    proc, art = crucible_run(tmp_path, "long", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    events = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait until events are on disk
        found = list(art.glob("long/*/events.jsonl"))
        if found and found[0].stat().st_size > 10_000:
            events = found[0]
            break
        time.sleep(0.05)
    assert events is not None, proc.stderr.read() if proc.poll() is not None else "no events written"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "run summary" in out
    s = orjson.loads((events.parent / "summary.json").read_bytes())
    assert sum(1 for _ in iter_run(events.parent)) == s["events_persisted"] > 0
    assert s["events_emitted"] == s["events_persisted"] + s["events_dropped"]
    assert orjson.loads((events.parent / "lifecycle.json").read_bytes())["status"] == "stopped"


def test_a_failing_experiment_never_disturbs_another(lab):
    steady = lab.start_experiment(spec("steady"))
    doomed = lab.start_experiment(spec("doomed", supervision={"max_restarts": 0, "max_seconds": 60}))
    doomed.pause()  # a sure mid-run target
    doomed.registry.send("phase", {"kind": "crash", "why": "unrecoverable"})
    assert doomed.wait(30)
    assert doomed.status() == "failed" and doomed.reason.startswith("failed: reached_max_restart_intensity")
    assert steady.status() == "running" and steady.metrics(max_age=0, wait=30)["events"] > 0
    assert lab.sup.is_alive()
    again = lab.start_experiment(spec("after"))  # the Lab keeps taking experiments
    again.stop()
    steady.stop()
    files_account(steady)


def test_a_workload_calling_sys_exit_fails_its_experiment_alone(lab):
    """sys.exit() in user code is a crash of that experiment's phase, restarted and then
    failed by its supervisor; the Lab and the other experiments go on."""
    steady = lab.start_experiment(spec("steady"))
    doomed = lab.start_experiment(
        {
            **spec("exits", supervision={"max_restarts": 1, "max_seconds": 60}),
            "workload": {"name": "latency", "params": {"target": "sys:exit", "args": [4], "calls_per_step": 1}},
        }
    )
    assert doomed.wait(30)
    assert doomed.status() == "failed" and doomed.reason.startswith("failed: reached_max_restart_intensity")
    assert steady.status() == "running" and steady.metrics(max_age=0, wait=30)["events"] > 0
    assert lab.sup.is_alive()
    again = lab.start_experiment(spec("after"))
    again.stop()
    steady.stop()
    files_account(steady)


def test_coloring_experiment_takes_control_at_safe_points(lab):
    exp = lab.start_experiment(
        {
            "name": "col",
            "time_budget_s": 600,  # stopped below once steps have run after the control, however slow the first
            "workload": {
                "name": "coloring",
                "params": {
                    "graph": {"generator": "gnp", "n": 80, "p": 0.5, "seed": 2},
                    "phases": ["tabu"],
                    "tabu": {"iters_per_step": 2000, "max_iters_per_k": 10**9, "stall_iters": 10**12},
                },
            },
        }
    )
    exp.pause()
    phase = exp.registry.whereis("phase")
    parked_at = phase.ask({"kind": "status"}, timeout=30)["steps"]
    ok = phase.ask({"kind": "set_param", "key": "set_tenure", "value": 1.5, "why": "test"})
    assert ok == {"ok": True, "key": "set_tenure", "before": 0.6, "after": 1.5}
    bad = phase.ask({"kind": "set_param", "key": "set_tenure", "value": 99})
    assert bad["ok"] is False and "tenure_alpha" in bad["error"]
    for unsendable in (2**64, object()):  # refused as ValueError, like any value the workload refuses
        with pytest.raises(ValueError, match=r"set_tenure=.* refused: no message can carry it .*cannot be encoded"):
            exp.set_param("set_tenure", unsendable)
    for nonfinite in (math.nan, [1.0, -math.inf]):  # no control takes one, whatever the workload checks
        with pytest.raises(ValueError, match=r"set_tenure=.* refused: set_tenure.* must be a finite number"):
            exp.set_param("set_tenure", nonfinite)
    exp.resume()
    # two steps after the control: the first may be the init step (it emits no step event), the next is not
    until(lambda: phase.ask({"kind": "status"}, timeout=30)["steps"] >= parked_at + 2, 120, "steps after the control")
    exp.stop()
    assert exp.wait(60) and exp.reason == "stopped"
    events = list(iter_run(exp.run_dir))
    control = [e for e in events if e["name"] == "control"]
    assert control and control[0]["notes"] == "set_tenure: 0.6 -> 1.5 (test)"
    refused = [e["notes"] for e in events if e["name"] == "control_refused"]
    assert refused[0].startswith("set_tenure=99 refused:")
    assert refused[1].startswith(f"set_tenure={2**64} refused: no message can carry it")
    assert refused[2].startswith("set_tenure=<object object at")
    assert refused[3] == "set_tenure=nan refused: set_tenure must be a finite number, got nan"
    assert refused[4].startswith("set_tenure=[1.0, -inf] refused: set_tenure[1] must be") and len(refused) == 5
    later = [e for e in events if e["name"] == "step" and e["ts"] > control[0]["ts"]]
    assert later and all(e["parameters"]["tenure_alpha"] == 1.5 for e in later)
    assert {e["gpu_mode"] for e in events if e["name"] == "step"} == {"cpu"}  # the tabu phase runs on the CPU


def test_a_tree_that_dies_while_its_summary_cannot_be_read_still_ends_the_run(tmp_path, monkeypatch):
    """Out of file descriptors (say) as the tree dies: the run is still marked ended, with the
    Recorder's last summary, so it never reads as running nor holds a queue slot."""
    import experiments.lab as lab_module

    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(spec("emfile"))
        until(lambda: exp.summary().get("events_persisted", 0) > 0, what="events recorded")

        def no_fds(run_dir):
            raise OSError(24, "Too many open files")

        monkeypatch.setattr(lab_module, "read_summary", no_fds)
        exp.stop()
        assert exp.wait(60) and exp.status() == "stopped"
        assert exp.summary()["events_persisted"] > 0
    finally:
        monkeypatch.undo()
        lab.shutdown()


def test_a_window_query_racing_the_recorders_stop_is_answered_from_the_store(tmp_path, monkeypatch):
    """The live Recorder stops between being found and being asked: the answer comes from the
    history once the run has stopped, never an error."""
    from actors.base import ActorDeadError

    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(spec("race"))
        until(lambda: exp.summary().get("events_persisted", 0) > 0, what="events recorded")
        real_whereis = exp.registry.whereis

        class StopsAsAsked:
            def ask(self, msg, timeout=None):
                threading.Thread(target=exp.stop).start()
                raise ActorDeadError("recorder stopped")

        monkeypatch.setattr(
            exp.registry, "whereis", lambda name: StopsAsAsked() if name == "recorder" else real_whereis(name)
        )
        events = exp.query_window(("last_n", 5))
        assert exp.status() == "stopped"
        assert len(events) == 5 and events == exp.query_window(("last_n", 5))  # the stopped run's store
    finally:
        lab.shutdown()


def test_a_phase_restarted_on_a_changed_graph_file_fails_the_run_and_keeps_its_checkpoint(tmp_path):
    """The phase restarts from its checkpoint; the graph file was rewritten meanwhile. The
    restored colouring belongs to another graph: the run fails saying so (it segfaulted in the
    kernels before), and the checkpoint keeps the run's best for whoever looks into it."""
    from experiments.coloring.graph import gnp

    def write(path, g):
        path.write_text(f"p edge {g.n} {g.m}\n" + "".join(f"e {u + 1} {v + 1}\n" for u, v in g.edges()))

    graph = tmp_path / "g.col"
    write(graph, gnp(80, 0.5, 1))
    lab = Lab(tmp_path / "art")
    try:
        params = {"graph": {"file": str(graph)}, "phases": ["tabu"], "gpu": "cpu", "tabu": {"iters_per_step": 500}}
        exp = lab.start_experiment(
            {
                "name": "changed",
                "time_budget_s": 600,
                "workload": {"name": "coloring", "params": params},
                "supervision": {"max_restarts": 2, "max_seconds": 60},
            }
        )
        cp_file = exp.run_dir / "checkpoint.json"

        def saved_best():
            try:
                return orjson.loads(cp_file.read_bytes())["workload"].get("best")
            except (OSError, ValueError, KeyError):
                return None

        until(lambda: saved_best() is not None, what="a checkpoint with a colouring")
        write(graph, gnp(30, 0.5, 2))
        exp.registry.send("phase", {"kind": "crash", "why": "drill"})
        assert exp.wait(30)
        assert exp.status() == "failed"
        assert "the checkpoint is of another graph (80 vertices" in exp.reason and "(30 vertices" in exp.reason
        assert len(saved_best()) == 80  # not replaced by the fresh workload that refused it
        assert lab.start_experiment(spec("after", budget=0.3)).wait(30)  # the Lab goes on
    finally:
        lab.shutdown()


def test_a_second_ctrl_c_ends_a_run_whose_step_hangs_at_once(tmp_path):
    """The first SIGINT asks for a graceful stop, which waits on the step; a step that hangs (a
    call that never returns) would hold it for minutes. The second exits now, 130; the run,
    its owner gone, reads crashed (a Lab's recovery resumes it)."""
    proc, art = crucible_run(tmp_path, "hang", "time:sleep", "[300]", 1, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        until(lambda: list(art.glob("hang/*/lifecycle.json")), 60, "the run to start")
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)  # the same request delivered twice (as `timeout` does): one stop
        said = ""
        while "exits at once" not in " ".join(said.split()):  # the graceful stop has begun (the line may wrap)
            line = proc.stdout.readline()
            assert line, said
            said += line
        assert "signal received" in said and proc.poll() is None  # the graceful stop, waiting on the step
        for _ in range(20):  # a second Ctrl-C, once past the window where it would be the first again
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
        assert proc.returncode == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "second signal: exiting now" in proc.stderr.read()
    (run_dir,) = art.glob("hang/*")
    assert run_status(run_dir).status == "crashed"


def test_a_parameter_change_is_in_the_events_before_its_checkpoint(lab):
    """The change's ``control`` event goes out at once, not at the emitter's next flush: a crash
    after the checkpoint that keeps the change must not leave it unmentioned in the events."""
    from tests.fault_helpers import latency_spec

    spec = latency_spec("steer-flush", budget=600)
    spec["workload"]["params"] = {"target": "time:sleep", "args": [0.05], "calls_per_step": 1}  # 20 events/s
    spec["telemetry"] = {"batch_size": 100_000, "flush_interval_s": 60.0}  # nothing else would flush it
    exp = lab.start_experiment(spec)
    try:
        assert exp.set_param("calls_per_step", 17, why="now\x00\x1b[31m")["after"] == 17
        until(
            lambda: any(e["name"] == "control" for e in iter_run(exp.run_dir)),
            30,
            "the control event on disk",
        )
        (note,) = [e["notes"] for e in iter_run(exp.run_dir) if e["name"] == "control"]
        assert note.endswith("(now\\x00\\x1b[31m)") and note.isprintable()  # a note, made printable
        cp = orjson.loads((exp.run_dir / "checkpoint.json").read_bytes())
        assert b"17" in orjson.dumps(cp)
    finally:
        exp.stop()
