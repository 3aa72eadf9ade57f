"""A crash in each actor of an experiment tree under load: the tree restarts what its
``rest_for_one`` strategy says (the crashed child and the ones after it, never the ones
before), the run goes on recording, and every event is still accounted for on disk."""

from __future__ import annotations

import threading

import pytest

from actors.base import call_local
from supervisor import Lab
from telemetry.jsonl import iter_run
from tests.actors_fixtures import Counting
from tests.fault_helpers import check_accounts, coloring_spec, latency_spec, reached_recorder, until

ORDER = ("recorder", "sampler", "anomaly", "metrics", "phase", "hypertune")  # the start order: sink to source
BRIEF = {"batch_size": 64, "flush_interval_s": 0.02, "block_timeout_s": 0.2}  # the emitter waits 0.2 s, then drops


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def _raise(actor, why: str) -> None:
    raise RuntimeError(why)


def crash(exp, name: str) -> None:
    """Make the named actor raise in its own thread, between two of its messages."""
    with pytest.raises(RuntimeError, match="injected"):
        call_local(exp.registry.whereis(name), _raise, f"injected crash of {name}", timeout=30)


def crash_under_load(exp, name: str) -> None:
    until(lambda: reached_recorder(exp) > 200, what="events flowing")
    before = {n: exp.registry.whereis(n).urn for n in ORDER}
    crash(exp, name)
    assert exp.registry.await_name(name, timeout=30, not_urn=before[name]) is not None
    cut = ORDER.index(name)
    for later in ORDER[cut:]:  # rest_for_one: the crashed child and every child started after it
        assert exp.registry.await_name(later, timeout=30, not_urn=before[later]) is not None, later
    for earlier in ORDER[:cut]:  # the ones before it are untouched
        assert exp.registry.whereis(earlier).urn == before[earlier], earlier
    assert exp.status() == "running"
    seen = reached_recorder(exp)
    until(lambda: reached_recorder(exp) > seen + 100, what="recording after the restart")
    exp.stop()
    assert exp.status() == "stopped" and exp.reason == "stopped"


@pytest.mark.parametrize("name", ORDER)
def test_a_crash_in_any_actor_is_restarted_and_every_event_accounted_for(lab, tmp_path, name):
    exp = lab.start_experiment(latency_spec(f"crash-{name}", budget=600, strategy="all", telemetry=BRIEF))
    crash_under_load(exp, name)
    s = check_accounts(exp, tmp_path / "art", lossless=False)
    assert s["restarts"] == {name: 1}
    # a crash between two messages loses no batch: what was queued for the crashed actor, and
    # for the siblings restarted with it, goes to the replacements. The phase may have given
    # up waiting for a restarting consumer (overflow policy "block"): those drops are
    # counted, and reported in the run's own events.
    assert s["events_lost_in_transit"] == 0
    assert s["events_persisted"] == s["events_emitted"] - s["events_dropped_overflow"]
    reported = sum(e["values"]["dropped"] for e in iter_run(exp.run_dir) if e["name"] == "telemetry_dropped")
    assert reported <= s["events_dropped_overflow"]  # the last report may itself be dropped at close


@pytest.mark.parametrize("name", ["sampler", "recorder", "anomaly"])
def test_a_crash_under_sampling_keeps_the_figures_apart(lab, tmp_path, name):
    """A restarted Sampler (or a restarted Recorder) must not count sampled-out events as lost."""
    exp = lab.start_experiment(latency_spec(f"crash-s-{name}", budget=600, strategy="uniform", telemetry=BRIEF))
    crash_under_load(exp, name)
    s = check_accounts(exp, tmp_path / "art", lossless=False)
    assert s["restarts"] == {name: 1} and s["events_lost_in_transit"] == 0
    assert 0 < s["events_sampled_out"] < s["events_emitted"]


def test_a_phase_crash_in_the_colouring_workload_resumes_from_its_checkpoint(lab, tmp_path):
    exp = lab.start_experiment(coloring_spec("crash-col", budget=600))
    until(lambda: exp.phase_status().get("steps", 0) > 3, what="colouring steps")
    old = exp.registry.whereis("phase")
    crash(exp, "phase")
    assert exp.registry.await_name("phase", timeout=30, not_urn=old.urn) is not None
    steps = exp.phase_status(max_age=0, wait=30)["steps"]
    until(lambda: exp.phase_status().get("steps", 0) > steps + 2, what="steps after the restart")
    exp.stop()
    s = check_accounts(exp, tmp_path / "art", lossless=False)
    assert s["restarts"] == {"phase": 1} and s["events_lost_in_transit"] == 0
    names = [e["name"] for e in iter_run(exp.run_dir)]
    assert names.count("phase_restart") == 1


# --- a phase killed in the middle of a step ------------------------------------------------------------


class Stuck(Counting):
    """A workload whose first incarnation gets stuck in its third step (a long kernel, a
    blocked emit): its supervisor's shutdown timeout then kills the phase mid-step."""

    name = "stuck"
    gate = threading.Event()  # set by the test: the stuck step goes on
    inside: list[threading.Thread] = []  # the thread of the stuck step

    def step(self, emitter):
        self.n += 1
        emitter.emit("tick", {"n": float(self.n)})
        if self.n == 3 and not Stuck.inside:
            Stuck.inside.append(threading.current_thread())
            Stuck.gate.wait(30)
            emitter.emit("late", {"n": float(self.n)})  # after the kill: must never reach the run
            emitter.flush()
        return False


def test_a_phase_killed_mid_step_leaves_nothing_behind_it(tmp_path):
    """The abandoned thread of a killed phase may finish its step later: it must neither
    publish events (their seqs belong to the replacement now) nor overwrite the checkpoint."""
    from actors import Topics
    from actors.phase import CheckpointStore, PhaseActor
    from actors.recorder import Recorder
    from actors.registry import Registry
    from supervisor import ChildSpec, Supervisor
    from tests.actors_fixtures import Collector

    Stuck.gate.clear()
    Stuck.inside.clear()
    topics, reg, store = Topics(), Registry(), CheckpointStore()
    rec = Recorder.start(tmp_path, "exp", "run")
    seen = Collector.start()  # every batch on the topic, whatever the Recorder keeps
    topics.subscribe("events", rec)
    topics.subscribe("events", seen)
    phase = ChildSpec(
        "phase",
        PhaseActor,
        args=("exp", "run", Stuck, {}, topics, store),
        name="phase",
        shutdown=0.2,
        # a slow consumer on a loaded machine only slows the steps down: nothing is dropped
        kwargs={"budget_s": 600, "emitter_opts": {"batch_size": 1, "block_timeout": 120}},
    )
    sup = Supervisor.start([phase], registry=reg)
    try:
        until(lambda: bool(Stuck.inside), what="the stuck step")
        old = reg.whereis("phase")
        sup.terminate_child("phase")  # the stop cannot get in: killed after the shutdown timeout
        assert old.exit_reason == "killed"
        sup.restart_child("phase")
        new = reg.whereis("phase")
        until(lambda: new.ask({"kind": "status"})["steps"] >= 3, what="steps of the replacement")
        paused = new.ask({"kind": "pause"})  # the replacement parked: nothing of its own changes now
        Stuck.gate.set()
        Stuck.inside[0].join(30)  # the abandoned thread has finished its step
        assert store.get()["steps"] == paused["steps"]  # the checkpoint is still the replacement's
        assert store.get()["counters"] == new.ask({"kind": "status"})["counters"]
        new.ask({"kind": "resume"})
        sup.terminate_child("phase")
    finally:
        Stuck.gate.set()
        sup.stop()
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    rec.stop()
    names = {n for m in seen.ask({"kind": "get"}) if m["kind"] == "events" for n in m["names"]}
    seen.stop()
    assert "late" not in names and "tick" in names
    events = list(iter_run(tmp_path / "exp" / "run"))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(len(seqs)))
    assert s["events_emitted"] == s["events_persisted"] == len(seqs) and s["accounting"]["balanced"]


class Flaky(Counting):
    """A workload whose fifth step changes its state, then raises (once): half a step."""

    name = "flaky"
    raised = threading.Event()

    def step(self, emitter):
        self.n += 1
        if self.n == 5 and not Flaky.raised.is_set():
            Flaky.raised.set()
            raise RuntimeError("step 5 failed half-way")
        emitter.emit("tick", {"n": float(self.n)})
        return self.n >= 8


def test_a_crashed_step_is_retried_from_the_state_before_it(tmp_path):
    """The phase that raised in a step is restarted from the state after the last step that
    completed, not from the crashed one's half-updated workload: the step is done again, and
    the workload's count and the phase's steps agree."""
    from actors import Topics
    from actors.phase import CheckpointStore, PhaseActor
    from actors.registry import Registry
    from supervisor import ChildSpec, Supervisor
    from tests.actors_fixtures import Collector

    Flaky.raised.clear()
    topics, reg, store = Topics(), Registry(), CheckpointStore()
    seen = Collector.start()
    topics.subscribe("events", seen)
    phase = ChildSpec(
        "phase",
        PhaseActor,
        args=("exp", "run", Flaky, {}, topics, store),
        name="phase",
        kwargs={"budget_s": 600, "emitter_opts": {"batch_size": 1}},
    )
    sup = Supervisor.start([phase], registry=reg)
    try:
        until(lambda: store.get().get("finished") is not None, what="the phase to finish")
    finally:
        sup.stop()
    state = store.get()
    assert Flaky.raised.is_set()
    assert state["workload"] == {"n": 8} and state["steps"] == 8
    ticks = [v for m in seen.ask({"kind": "get"}) if m["kind"] == "events" for v in m["values"].get("n", [])]
    seen.stop()
    assert [t for t in ticks if t == t] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_messages_to_a_sibling_restarted_with_its_group_reach_the_replacement():
    """rest_for_one stops the siblings after a crashed child and starts them again: what is
    sent to a sibling meanwhile (even behind the stop, in its mailbox) goes to its replacement."""
    from actors.registry import Registry
    from supervisor import ChildSpec, Supervisor
    from tests.actors_fixtures import Worker

    gate, sink, reg = threading.Event(), [], Registry()
    sup = Supervisor.start(
        [
            ChildSpec("a", Worker, name="a"),
            ChildSpec("b", Worker, kwargs={"gate": gate, "sink": sink}, name="b", shutdown=30),
        ],
        strategy="rest_for_one",
        registry=reg,
    )
    try:
        b = reg.whereis("b")
        reg.send("b", {"kind": "block"})  # b is busy: its stop will queue behind what it already has
        for v in (1, 2, 3):
            reg.send("b", {"kind": "note", "v": v})
        until(lambda: b.queue_size() == 3, what="b's mailbox")
        reg.send("a", {"kind": "crash"})
        until(lambda: b.queue_size() == 4, what="the stop request queued for b")
        for v in (4, 5, 6):  # behind the stop: the old b never reads them
            reg.send("b", {"kind": "note", "v": v})
        gate.set()
        new = reg.await_name("b", timeout=30, not_urn=b.urn)
        assert new is not None
        until(lambda: len(sink) >= 6, what="every note")
        assert sink == [1, 2, 3, 4, 5, 6]  # in order, each once
    finally:
        gate.set()
        sup.stop()
