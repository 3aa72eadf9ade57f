"""How an experiment tree ends: the phase is its significant child, the tree shuts itself down
when the phase's work is done, and the Experiment learns the end from the tree's death. A
stop drains the pipeline by the tree's order alone (sink to source).

Every test with a ``lab`` runs on both backends: the embedded one (threads of this process)
and ray (the tree in a Ray actor's process, on a cluster this module starts), which must
behave exactly alike."""

from __future__ import annotations

import threading

import orjson
import pytest
from structlog.testing import capture_logs

from experiments.lab import LifecycleError
from supervisor import AlreadyPaused, Lab, NotFound, NotPaused, NotRunning
from telemetry.jsonl import iter_run
from telemetry.schema import RECORD_EVENTS
from tests.fault_helpers import check_accounts, latency_spec, reached_recorder, until
from tests.ray_cluster import ray_cluster  # noqa: F401 - started for the ray backend's tests only

ORDER = ["recorder", "sampler", "anomaly", "metrics", "phase", "hypertune"]  # sink to source; hypertune last
METRIC_SUBSCRIBERS = {"metrics", "anomaly", "hypertune"}  # on the events topic while running


@pytest.fixture(params=["embedded", "ray"])
def lab(request, tmp_path):
    if request.param == "ray":
        lab = Lab(tmp_path / "art", backend="ray", address=request.getfixturevalue("ray_cluster").address)
    else:
        lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def test_the_tree_starts_sink_to_source_and_the_phase_is_its_significant_child(lab):
    exp = lab.start_experiment(latency_spec("order", budget=600))
    try:
        children = exp.sup.which_children()
        assert [c["id"] for c in children] == ORDER
        assert {c["id"]: c["restart"] for c in children}["phase"] == "transient"
    finally:
        exp.stop()


def test_a_completed_phase_ends_the_run_through_the_tree(lab, tmp_path):
    with capture_logs() as logs:  # the phase may be done before the start returns: its exit is read from the log
        work = {"name": "latency", "params": {"target": "math:sqrt", "calls": 300}}
        exp = lab.start_experiment(latency_spec("done", budget=600, workload=work))
        assert exp.wait(60)
    assert exp.reason == "completed" and exp.status() == "stopped"
    assert exp.sup.exit_reason == "shutdown"  # its supervisor shut the tree down (auto_shutdown)
    if lab.backend == "embedded":
        exits = [(e["reason"], e["restarted"]) for e in logs if e["event"] == "child exited" and e["child"] == "phase"]
        assert exits == [("normal", False)]  # its work done, the phase exited on its own
        assert not [t for t in threading.enumerate() if t.name.startswith(f"exp-{exp.id}-") and t.is_alive()]
    else:
        assert not exp.sup.is_alive()  # the host let go once the end was in
    s = check_accounts(exp, tmp_path / "art")
    calls = [e for e in iter_run(exp.run_dir) if e["name"] == "call"]
    assert len(calls) == 300
    # the final metrics were left by the metrics actor as it stopped: every event is in them
    assert exp.metrics()["events"] == s["events_persisted"]
    assert exp.metrics()["stale"] is False


def test_a_stop_while_paused_records_the_final_events_and_loses_nothing(lab, tmp_path):
    exp = lab.start_experiment(latency_spec("paused-stop", budget=600))
    until(lambda: reached_recorder(exp) > 100, what="events at the Recorder")
    exp.pause()
    exp.stop()
    assert exp.status() == "stopped" and exp.reason == "stopped"
    s = check_accounts(exp, tmp_path / "art", lossless=True)
    names = [e["name"] for e in iter_run(exp.run_dir)]
    assert names[-1] == "phase_end"  # emitted at the stop, after the pause: recorded, and last
    assert exp.metrics()["events"] == s["events_emitted"]


def test_a_stop_drains_the_pipeline_by_the_tree_order(lab, tmp_path):
    """A stop under load: every event emitted reaches the disk, with no drain step by hand."""
    exp = lab.start_experiment(latency_spec("drain", budget=600, strategy="reservoir"))
    until(lambda: reached_recorder(exp) > 500, what="events flowing")
    exp.stop()
    s = check_accounts(exp, tmp_path / "art", lossless=True)
    # the reservoir (40) and the run's record (its phase_end) went out as the sampler stopped
    names = [e["name"] for e in iter_run(exp.run_dir)]
    assert s["events_persisted"] == len(names) == 40 + sum(n in RECORD_EVENTS for n in names)
    assert "phase_end" in names and names.count("call") == 40


def test_undelivered_sends_are_reported_in_the_summary_and_the_lifecycle_record(lab):
    exp = lab.start_experiment(latency_spec("undelivered", budget=600))
    for _ in range(3):
        assert exp.registry.send("nobody", {"kind": "note"}) is False
    assert exp.summary()["undelivered"]["nobody"] == 3
    exp.stop()
    assert exp.summary()["undelivered"]["nobody"] == 3
    record = orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())
    assert record["undelivered"]["nobody"] == 3
    # a normal stop loses nothing anywhere: what came for an actor already stopped in reverse
    # start order (hypertune, the observer) is counted apart, and nothing on the event path
    assert set(record["undelivered"]) == {"nobody"}
    assert not {"recorder", "sampler", "anomaly", "metrics"} & set(record["sent_after_exit"])


def test_a_metrics_actor_slow_to_drain_is_let_finish_at_the_stop(tmp_path, monkeypatch):
    """On a loaded machine the metrics actor took longer than the default 5 s to read its
    backlog at the stop: it was killed, what it had not read was counted as lost, and the
    run's final metrics fell short of its events."""
    import time

    from experiments.lab import ExperimentMetrics

    real = ExperimentMetrics.on_events

    def slow(self, batch):
        time.sleep(0.12)  # a fold on a starved core
        return real(self, batch)

    monkeypatch.setattr(ExperimentMetrics, "on_events", slow)
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(latency_spec("slow-metrics", budget=600))
        # the backlog is bounded (the emitter waits for its slowest subscriber): about 64 batches, 7 s here
        until(lambda: exp.registry.queue_size("metrics") >= 60, what="a backlog at the metrics actor")
        started = time.monotonic()
        exp.stop()
        took = time.monotonic() - started
    record = orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())
    assert took > 5.0  # the backlog needed longer than the old limit
    assert record["undelivered"] == {} and exp.reason == "stopped"
    s = check_accounts(exp, tmp_path / "art")
    assert exp.metrics()["events"] == s["events_persisted"]  # the final metrics hold every event


def test_a_tree_that_gives_up_fails_the_run(lab):
    exp = lab.start_experiment(latency_spec("gives-up", budget=600, supervision={"max_restarts": 0, "max_seconds": 60}))
    exp.pause()
    exp.registry.send("phase", {"kind": "crash", "why": "unrecoverable"})
    assert exp.wait(30)
    assert exp.status() == "failed" and exp.reason.startswith("failed: reached_max_restart_intensity (phase: ")
    assert exp.reason.endswith("RuntimeError: unrecoverable)")  # the exit over the intensity: why it gave up
    record = orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())
    assert record["status"] == "failed"


def subscribers(exp, topic="events"):
    return {t.name for t in exp.topics.subscribers(topic)}


def test_pause_detaches_the_metric_subscribers_and_resume_attaches_them(lab):
    exp = lab.start_experiment(latency_spec("detach", budget=600))
    assert subscribers(exp) == METRIC_SUBSCRIBERS
    exp.pause()
    assert exp.status() == "paused" and subscribers(exp) == set()
    assert exp.phase_status(max_age=0, wait=10)["paused"] is True
    exp.resume()
    assert exp.status() == "running" and subscribers(exp) == METRIC_SUBSCRIBERS
    exp.stop()
    d = exp.durations()
    assert d["pause_count"] == 1 and d["resume_count"] == 1 and d["paused_duration"] > 0


def test_the_lifecycle_errors_are_typed_alike(lab):
    exp = lab.start_experiment(latency_spec("errors", budget=600))
    with pytest.raises(NotPaused, match="running, not paused"):
        exp.resume()
    exp.pause()
    with pytest.raises(AlreadyPaused, match="already paused"):
        exp.pause()
    with pytest.raises(NotRunning, match="only an ended one"):
        lab.forget(exp.id)
    exp.stop()
    assert exp.wait(0) and exp.status() == "stopped" and exp.reason == "stopped"
    for action in (exp.pause, exp.resume, exp.stop):
        with pytest.raises(NotRunning, match="is stopped; cannot"):
            action()
    assert exp.phase_status() == {}
    with pytest.raises(NotFound, match="no experiment 'nope'"):
        lab.get("nope")
    assert [e["id"] for e in lab.list()] == [exp.id]
    lab.forget(exp.id)
    assert lab.list() == []


def test_set_param_applies_a_control_or_refuses_it_alike(lab, tmp_path):
    exp = lab.start_experiment(latency_spec("control", budget=600))
    reply = exp.set_param("calls_per_step", 7, why="test")
    assert reply["ok"] and reply["key"] == "calls_per_step" and reply["after"] == 7
    with pytest.raises(ValueError, match="no tunable parameter 'nope'"):
        exp.set_param("nope", 1)
    with pytest.raises(ValueError, match="refused"):
        exp.set_param("calls_per_step", -3)
    with pytest.raises(LifecycleError, match="cannot restart a pass: the latency workload has no passes"):
        exp.restart_pass()
    exp.stop()
    with pytest.raises(NotRunning, match="is stopped; cannot"):
        exp.set_param("calls_per_step", 8)
    events = list(iter_run(exp.run_dir))
    controls = [e for e in events if e["name"] == "control"]
    assert len(controls) == 1 and "calls_per_step" in controls[0]["notes"] and "(test)" in controls[0]["notes"]
    assert sum(e["name"] == "control_refused" for e in events) == 3  # the restart too: recorded as refused


def test_text_from_outside_in_a_control_is_bounded(lab):
    """A huge value or reason never makes an event (or an error) megabytes long."""
    from telemetry.emitter import MAX_NOTES_CHARS

    exp = lab.start_experiment(latency_spec("bounded", budget=600))
    with pytest.raises(ValueError) as e:
        exp.set_param("calls_per_step", "x" * 1_000_000)
    assert len(str(e.value)) < 2_000
    exp.set_param("calls_per_step", 7, why="w" * 1_000_000)
    exp.stop()
    events = [e for e in iter_run(exp.run_dir) if e["name"] in ("control", "control_refused")]
    assert [e["name"] for e in events] == ["control_refused", "control"]
    assert all(len(e["notes"]) <= MAX_NOTES_CHARS + 60 for e in events)
    assert events[1]["notes"].startswith("calls_per_step: ")


def test_a_phase_restarted_after_its_end_exits_at_once():
    """A phase started on a finished checkpoint (restarted with its group after its end) has
    nothing left to do: it exits normally, so its tree still shuts down."""
    from actors import Topics
    from actors.phase import CheckpointStore, PhaseActor
    from experiments.workloads import registry

    store = CheckpointStore()
    store.update(finished="budget")
    ref = PhaseActor.start("x", "r", registry()["latency"], {"target": "math:sqrt", "args": [2.0]}, Topics(), store)
    assert ref.wait(10) == "normal"
    assert store.finish_reason == "budget"
