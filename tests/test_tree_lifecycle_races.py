"""Races around the end of an experiment tree: a stop, a pause or a second stop that crosses
the phase finishing on its own, a tree that gives up, and what each leaves behind (the
lifecycle record, the summary, threads)."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from actors.base import call_local
from supervisor import Lab
from telemetry.jsonl import iter_run
from tests.fault_helpers import check_accounts, latency_spec, reached_recorder, until


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def record(exp) -> dict:
    return orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())


class Gate:
    """Holds an actor's thread (a call in its thread that waits) until opened, so that the
    tree's shutdown waits on that actor: the window between the phase's end and the tree's
    death stays open for as long as the test needs it."""

    def __init__(self, ref) -> None:
        self.open_ = threading.Event()
        self.entered = threading.Event()

        def hold(_actor) -> None:
            self.entered.set()
            self.open_.wait(30)

        self.thread = threading.Thread(target=call_local, args=(ref, hold), kwargs={"timeout": 180}, daemon=True)
        self.thread.start()
        assert self.entered.wait(120)  # queued behind what the actor holds: a loaded Recorder takes its time

    def open(self) -> None:
        self.open_.set()
        self.thread.join(30)


def finish_phase_and_hold_the_tree(exp, reason: str = "budget") -> Gate:
    """The phase ends on its own (as on its budget) while the Recorder is held: the phase is
    gone, the tree is not down yet. The phase is parked first (subscribers left attached) so
    that nothing piles up behind the held Recorder: only its last events wait there."""
    phase = exp.registry.whereis("phase")
    phase.ask({"kind": "pause"}, timeout=30)
    gate = Gate(exp.registry.whereis("recorder"))
    phase.ask({"kind": "stop", "reason": reason}, timeout=30)
    assert phase.wait(60) == "normal"
    assert exp.sup.is_alive() and not exp.wait(0)
    return gate


def test_a_stop_that_crosses_the_phase_ending_on_its_budget_returns_with_the_tree(lab, tmp_path):
    """Both paths end the run: exactly one end, the phase's reason, and stop() returns as
    soon as the tree is down (it must not wait for a phase replacement that never comes)."""
    exp = lab.start_experiment(latency_spec("cross-stop", budget=600))
    until(lambda: reached_recorder(exp) > 50, what="events at the Recorder")
    gate = finish_phase_and_hold_the_tree(exp)
    done = threading.Event()
    errors: list[BaseException] = []

    def stop() -> None:
        try:
            exp.stop(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=stop, daemon=True).start()
    until(lambda: exp.stop_started_at is not None, what="the stop under way")
    gate.open()
    assert exp.wait(60)  # the event path drains first
    t0 = time.monotonic()
    assert done.wait(30)
    assert time.monotonic() - t0 < 8.0, "stop() kept waiting after the tree was down"  # that wait was 10 s
    assert not errors, errors
    assert exp.status() == "stopped" and exp.reason == "budget"
    rec = record(exp)
    assert rec["status"] == "stopped" and rec["reason"] == "budget"
    assert rec["ended_at"] >= rec["stop_requested_at"]
    check_accounts(exp, tmp_path / "art", lossless=True)


def test_a_pause_that_crosses_the_phase_ending_is_refused_at_once(lab):
    """pause() on a run whose phase has finished (its tree going down) is a NotRunning,
    promptly: never an ActorDeadError, never a wait for a phase that will not come back."""
    from experiments.lab import NotRunning

    exp = lab.start_experiment(latency_spec("cross-pause", budget=600))
    gate = finish_phase_and_hold_the_tree(exp)
    try:
        t0 = time.monotonic()
        with pytest.raises(NotRunning):
            exp.pause()
        assert time.monotonic() - t0 < 8.0, "pause() waited for a phase that had finished"  # that wait was 10 s
        with pytest.raises(NotRunning):
            exp.restart_pass()
    finally:
        gate.open()
    assert exp.wait(60)
    assert exp.status() == "stopped" and exp.reason == "budget"
    assert record(exp)["pause_count"] == 0


def test_a_phase_restarted_on_a_finished_checkpoint_leaves_no_thread_behind():
    """A phase that exits at once on a finished checkpoint publishes nothing and leaves no
    emitter flusher running."""
    from actors import Topics
    from actors.phase import CheckpointStore, PhaseActor
    from actors.registry import Registry
    from experiments.workloads import registry

    topics, names = Topics(), Registry()
    topics.subscribe_name("events", "metrics", names)  # nobody holds the name: a publish would be counted
    store = CheckpointStore()
    store.update(finished="budget", counters={"emitted": 7, "published": 7, "dropped": 0, "rejected": 0})
    ref = PhaseActor.start("x", "r-finished", registry()["latency"], {"target": "math:sqrt"}, topics, store)
    assert ref.wait(10) == "normal"
    assert store.finish_reason == "budget"

    def flushers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "emitter-r-finished" and t.is_alive()]

    until(lambda: not flushers(), timeout=30, what="the emitter's flusher to end")
    assert names.undelivered() == {}  # the original incarnation published the run's events and counters


def test_a_phase_that_keeps_crashing_fails_the_run_and_leaves_the_lab_usable_and_no_thread(lab, tmp_path):
    before = threading.active_count()
    exp = lab.start_experiment(latency_spec("crashes", budget=600, supervision={"max_restarts": 2, "max_seconds": 60}))
    for _ in range(3):
        phase = exp.registry.await_name("phase", timeout=30)
        assert phase is not None
        phase.tell({"kind": "crash", "why": "again"})
        assert phase.wait(30) is not None
    assert exp.wait(30)
    assert exp.status() == "failed" and exp.reason.startswith("failed: reached_max_restart_intensity (phase: ")
    assert exp.reason.endswith("RuntimeError: again)")  # the exit over the intensity: why it gave up
    rec = record(exp)
    assert rec["status"] == "failed" and rec["reason"] == exp.reason and rec["ended_at"] is not None
    assert exp.summary()["status"] == "failed"
    until(lambda: threading.active_count() <= before, timeout=30, what="the failed tree's threads to end")
    # the Lab runs the next experiment as if nothing happened
    nxt = lab.start_experiment(latency_spec("after-crashes", budget=0.3))
    assert nxt.wait(30)
    assert nxt.status() == "stopped" and nxt.reason == "budget"
    check_accounts(nxt, tmp_path / "art", lossless=True)
    from experiments.lab import NotRunning

    with pytest.raises(NotRunning, match="failed"):
        exp.stop()


def test_two_concurrent_stops_end_the_run_once_and_both_return(lab, tmp_path):
    """The stop that waits behind the other one returns when the tree is down (what it asked
    for), not a NotRunning (a 409 through the daemon); a stop asked after the end is refused."""
    from experiments.lab import NotRunning

    exp = lab.start_experiment(latency_spec("two-stops", budget=600))
    until(lambda: reached_recorder(exp) > 50, what="events at the Recorder")
    go = threading.Barrier(3)
    outcomes: list[str] = []

    def stop() -> None:
        go.wait(10)
        try:
            exp.stop(timeout=30)
            outcomes.append("stopped")
        except NotRunning:
            outcomes.append("not running")

    threads = [threading.Thread(target=stop, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    go.wait(10)
    for t in threads:
        t.join(60)
    assert outcomes == ["stopped", "stopped"]
    assert exp.status() == "stopped" and exp.reason == "stopped"
    with pytest.raises(NotRunning, match="stopped; cannot stop"):
        exp.stop(timeout=30)
    rec = record(exp)
    assert rec["status"] == "stopped" and rec["reason"] == "stopped"
    assert rec["stop_requested_at"] <= rec["ended_at"]
    s = check_accounts(exp, tmp_path / "art", lossless=True)
    assert [e["name"] for e in iter_run(exp.run_dir)].count("phase_end") == 1
    assert exp.summary()["events_emitted"] == s["events_emitted"]


@pytest.mark.parametrize("lead", [0.08, 0.03, 0.0, -0.03])
def test_a_stop_at_the_moment_the_budget_runs_out_ends_the_run_once_with_the_phases_reason(lab, tmp_path, lead):
    """Whichever wins (the budget or the stop), the run ends once, and the reason in the
    lifecycle record, the summary and the phase's last event is the same one."""
    from experiments.lab import NotRunning

    budget = 0.4
    exp = lab.start_experiment(latency_spec(f"edge-{lead}", budget=budget))
    until(
        lambda: exp.wait(0) or exp.phase_status(max_age=0.0, wait=1.0).get("active_s", 0.0) >= budget - lead - 0.02,
        what="the edge",
    )
    try:
        exp.stop(timeout=30)
    except NotRunning:
        pass  # the budget ended it first and the tree was already down
    assert exp.wait(0)
    assert exp.status() == "stopped" and exp.reason in ("budget", "stopped")
    rec = record(exp)
    assert (rec["status"], rec["reason"]) == ("stopped", exp.reason)
    assert exp.summary()["reason"] == exp.reason
    ends = [e for e in iter_run(exp.run_dir) if e["name"] == "phase_end"]
    assert len(ends) == 1 and ends[0]["notes"] == exp.reason
    if rec["stop_requested_at"] is not None:
        assert rec["stop_requested_at"] <= rec["ended_at"]
    check_accounts(exp, tmp_path / "art", lossless=True)


def test_the_heartbeat_is_gone_once_the_end_is_on_disk(lab):
    """When wait() returns the heartbeat has ended: nothing rewrites the ended record."""
    exp = lab.start_experiment(latency_spec("beat", budget=0.3))
    assert exp.wait(30)
    assert not [t for t in threading.enumerate() if t.name == f"exp-{exp.id}-heartbeat" and t.is_alive()]
    rec = record(exp)
    assert rec["status"] == "stopped" and rec["reason"] == "budget" and rec["updated_at"] >= rec["ended_at"]
