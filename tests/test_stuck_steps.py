"""A step that does not yield (a target call that blocks, a kernel without checks) and the
controls that wait on it: a pause not taken in time is withdrawn, a stop that had to kill the
phase says so, and a full Lab refuses a start plainly."""

from __future__ import annotations

import contextlib
import threading

import pytest
import structlog

import experiments.lab as lab_module
from experiments.lab import LabFull, PauseTimedOut
from supervisor import Lab
from telemetry.jsonl import iter_run
from telemetry.rundir import read_json
from tests.fault_helpers import latency_spec, until

GATE = threading.Event()  # a blocked call goes on once the test sets it
INSIDE = threading.Event()  # a call is blocked on the gate
CALLS = {"n": 0}


def blocking_call() -> float:
    """The latency target: its third call blocks on the gate (one call per step: a step that
    does not yield), every other call returns at once."""
    CALLS["n"] += 1
    if CALLS["n"] == 3:
        INSIDE.set()
        GATE.wait(120)
    return 1.0


def stuck_spec(name: str, budget: float = 600.0) -> dict:
    spec = latency_spec(name, budget=budget)
    spec["workload"]["params"] = {"target": "tests.test_stuck_steps:blocking_call", "args": [], "calls_per_step": 1}
    return spec


@pytest.fixture
def lab(tmp_path):
    GATE.clear()
    INSIDE.clear()
    CALLS["n"] = 0
    lab = Lab(tmp_path / "art")
    yield lab
    GATE.set()
    lab.shutdown()


def test_a_pause_the_phase_does_not_take_in_time_is_withdrawn(lab, monkeypatch):
    real_timeout = lab_module.PAUSE_TIMEOUT_S
    monkeypatch.setattr(lab_module, "PAUSE_TIMEOUT_S", 0.5)
    exp = lab.start_experiment(stuck_spec("stuckpause"))
    assert INSIDE.wait(60)
    with pytest.raises(PauseTimedOut, match=r"did not reach a safe point to pause within 0\.5 s.*withdrawn"):
        exp.pause()
    assert isinstance(PauseTimedOut("x"), TimeoutError)
    assert exp.status() == "running"
    monkeypatch.setattr(lab_module, "PAUSE_TIMEOUT_S", real_timeout)  # the pause below must not race 0.5 s
    GATE.set()  # the step ends: the withdrawn pause and its resume are taken, the run goes on
    until(lambda: exp.phase_status(max_age=0)["steps"] >= 6, what="steps after the withdrawn pause")
    assert exp.phase_status(max_age=0)["paused"] is False
    exp.pause()  # a pause taken in time works as ever
    assert exp.status() == "paused"
    exp.resume()
    exp.stop()
    assert exp.reason == "stopped"


def test_a_stop_that_had_to_kill_the_phase_says_so(lab):
    exp = lab.start_experiment(stuck_spec("stuckstop"))
    assert INSIDE.wait(60)
    exp.stop(timeout=1.0)
    assert exp.status() == "stopped"
    assert exp.reason.startswith("stopped (the phase was killed mid-step: it did not take the stop within 1 s")
    assert read_json(exp.run_dir / "lifecycle.json")["reason"] == exp.reason
    # the tree is down when stop() returns (it recorded the end while the Recorder still ran)
    assert not exp.sup.is_alive()
    summary = read_json(exp.run_dir / "summary.json")
    seqs = [e["seq"] for e in iter_run(exp.run_dir)]
    assert summary["events_persisted"] == len(seqs)
    assert seqs == list(range(len(seqs)))


def test_a_stop_the_phase_takes_is_a_plain_stop(lab):
    GATE.set()
    exp = lab.start_experiment(stuck_spec("cleanstop"))
    until(lambda: exp.phase_status(max_age=0)["steps"] >= 3, what="steps")
    exp.stop(timeout=30)
    assert exp.reason == "stopped"


def test_a_full_lab_refuses_a_start_and_leaves_nothing_behind(tmp_path):
    GATE.set()
    lab = Lab(tmp_path / "art", max_experiments=1)
    try:
        first = lab.start_experiment(stuck_spec("one"))
        with pytest.raises(LabFull, match=r"at most 1 experiments at once \(max_experiments\).*running: one"):
            lab.start_experiment(stuck_spec("two"))
        assert not (tmp_path / "art" / "two").exists()
        assert [e["id"] for e in lab.list()] == ["one"]
        first.stop()
        second = lab.start_experiment(stuck_spec("two"))  # a slot again once the first has ended
        assert second.status() == "running"
        second.stop()
    finally:
        lab.shutdown()


def test_a_pause_cut_short_by_ctrl_c_is_withdrawn(lab):
    """A KeyboardInterrupt in pause()'s wait (a notebook's interrupt while a long step runs)
    left the phase parked by the pause that reached it while the record said running: resume()
    was refused and the run never reached its budget. The pause is withdrawn, as on a timeout."""
    exp = lab.start_experiment(stuck_spec("ctrlcpause", budget=600.0))
    assert INSIDE.wait(60)
    real = exp._ask_phase

    def cut(msg, action, timeout=30):
        if msg["kind"] == "pause":
            with contextlib.suppress(TimeoutError):  # the pause is asked, as pause() asks it...
                real(msg, action, timeout=0.2)
            raise KeyboardInterrupt  # ...and Ctrl-C ends the wait for its answer
        return real(msg, action, timeout)

    exp._ask_phase = cut
    with pytest.raises(KeyboardInterrupt):
        exp.pause()
    del exp._ask_phase
    assert exp.status() == "running" and read_json(exp.run_dir / "lifecycle.json")["status"] == "running"
    GATE.set()  # the step ends: the pause and the resume behind it are taken, the run goes on
    until(lambda: exp.phase_status(max_age=0)["steps"] >= 6, what="steps after the withdrawn pause")
    assert exp.phase_status(max_age=0)["paused"] is False
    exp.pause()
    exp.resume()
    exp.stop()
    assert exp.reason == "stopped" and exp.pause_count == 1


def test_a_start_cut_short_by_ctrl_c_leaves_no_tree_running(lab, monkeypatch):
    """A KeyboardInterrupt in start_experiment()'s wait: the Lab's supervisor started the tree
    all the same, and it ran to its budget, writing into a run recorded as failed, with no
    handle to stop it. The tree is taken down before the interrupt goes on."""
    cls = type(lab.sup)
    real = cls.start_child

    def cut(self, spec):
        ref = real(self, spec)  # the supervisor started the tree...
        if self is lab.sup:
            raise KeyboardInterrupt  # ...and Ctrl-C ended the wait for its answer
        return ref

    monkeypatch.setattr(cls, "start_child", cut)
    with pytest.raises(KeyboardInterrupt):
        lab.start_experiment(latency_spec("ctrlcstart", budget=600.0))
    monkeypatch.undo()
    assert lab.sup.which_children() == []  # no tree left
    assert [e["id"] for e in lab.list()] == []
    (run,) = (lab.artifacts / "ctrlcstart").iterdir()
    record = read_json(run / "lifecycle.json")
    assert (record["status"], record["reason"]) == ("failed", "failed: could not start: KeyboardInterrupt: ")
    again = lab.start_experiment(latency_spec("ctrlcstart", budget=0.5))  # the id is free again
    assert again.wait(60) and again.reason == "budget"


def test_a_pause_refused_as_not_running_withdraws_nothing(lab):
    """Only an interrupt withdraws a pause: a NotRunning (the phase gone while asked) sent a
    stray resume to whatever phase came next and logged a timeout that never happened."""
    exp = lab.start_experiment(latency_spec("gonepause", budget=600.0))

    def gone(msg, action, timeout=30):
        raise lab_module.NotRunning(f"experiment {exp.id!r} is ending; cannot {action}")

    exp._ask_phase = gone
    with structlog.testing.capture_logs() as logs, pytest.raises(lab_module.NotRunning):
        exp.pause()
    del exp._ask_phase
    assert not [e for e in logs if e["log_level"] == "warning"], logs
    assert exp.status() == "running"


def test_a_second_ctrl_c_while_a_cut_start_is_undone_leaves_at_once(lab, monkeypatch):
    """Each further Ctrl-C was swallowed while the tree of a cut start was taken down (a start
    that hangs, the usual reason to press it, kept the process deaf). The second one goes
    on, and the run is still recorded as a start that failed."""
    cls = type(lab.sup)
    real_start, real_terminate = cls.start_child, cls.terminate_child

    def cut(self, spec):
        ref = real_start(self, spec)
        if self is lab.sup:
            raise KeyboardInterrupt
        return ref

    def again(self, child_id):
        if self is lab.sup:
            raise KeyboardInterrupt  # the second Ctrl-C, in the terminate's wait
        return real_terminate(self, child_id)

    monkeypatch.setattr(cls, "start_child", cut)
    monkeypatch.setattr(cls, "terminate_child", again)
    with pytest.raises(KeyboardInterrupt):
        lab.start_experiment(latency_spec("twice", budget=600.0))
    monkeypatch.undo()
    (run,) = (lab.artifacts / "twice").iterdir()
    assert read_json(run / "lifecycle.json")["reason"] == "failed: could not start: KeyboardInterrupt: "
    lab.sup.terminate_child("twice")  # what the caller left: the tree is still there to stop
