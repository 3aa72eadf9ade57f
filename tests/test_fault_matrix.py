"""Every sampling strategy, with and without anomaly detection, through a real experiment
tree, ended by its budget after a pause and a resume or stopped mid-run: the run ends with
the expected status and reason, and every event it emitted is persisted, dropped or sampled
out, with the persisted figure equal to the JSONL lines and the SQLite rows on disk.

The whole matrix runs on the latency workload (fast: many events per step); a
representative subset runs on the colouring workload."""

from __future__ import annotations

import itertools

import pytest

from supervisor import Lab
from telemetry.jsonl import iter_run
from telemetry.rundir import run_status
from telemetry.schema import RECORD_EVENTS
from tests.fault_helpers import SAMPLING, check_accounts, coloring_spec, latency_spec, reached_recorder, until

MODES = ("pause_resume", "stop")


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def budget(mode: str) -> float:
    """A stopped run's budget cannot run out before the stop; a paused one ends by its budget
    (1 s of active time) after the resume."""
    return 600.0 if mode == "stop" else 1.0


def drive(exp, mode: str) -> None:
    """Pause and resume, then let the budget end it; or stop it mid-run.

    The pause is asked at once: it is urgent, so the phase takes it at its first safe point,
    before its next budget check. Waiting for steps first raced the 1 s budget on a loaded
    machine (a colouring run's first step loads its kernels)."""
    if mode == "stop":
        until(lambda: reached_recorder(exp) > 0, what="the first events")
        exp.stop()
        return
    exp.pause()
    status = exp.phase_status(max_age=0, wait=30)
    assert status["paused"] and not status["finished"], "the budget ran out before the pause"
    assert run_status(exp.run_dir).status == "paused"
    until(lambda: reached_recorder(exp) > 0, what="events at the Recorder")  # sent before the pause
    exp.resume()
    assert exp.wait(60), "the budget never ended the run"


def expect_end(exp, mode: str) -> dict:
    s = exp.summary()
    assert exp.status() == s["status"] == run_status(exp.run_dir).status == "stopped"
    assert exp.reason == s["reason"] == ("budget" if mode == "pause_resume" else "stopped")
    assert (s["pause_count"], s["resume_count"]) == ((1, 1) if mode == "pause_resume" else (0, 0))
    assert s["restarts"] == {}
    return s


def check_sampling(s: dict, strategy: str, anomaly: bool = False, records: int = 0) -> None:
    """``records``: the run's record events on disk (never sampled out: RECORD_EVENTS)."""
    emitted, kept = s["events_emitted"], s["events_persisted"]
    if strategy == "all":
        assert s["events_sampled_out"] == 0 and kept == emitted
    elif strategy == "reservoir":  # exactly k of the measurements, and the whole record beside them
        assert records >= 1 and kept == min(SAMPLING["reservoir"]["k"], emitted - records) + records
    elif strategy == "adaptive" and anomaly:  # the data decides: anomalies every few ms keep everything
        assert 0 <= s["events_sampled_out"] < emitted
    else:
        assert 0 < s["events_sampled_out"] < emitted  # the strategy dropped some and kept some


def check_anomaly_marks(exp, anomaly: bool) -> None:
    from telemetry.jsonl import iter_run

    marked = sum(1 for e in iter_run(exp.run_dir) if e.get("anomaly"))
    if not anomaly:
        assert marked == 0  # the detector is off: nothing is annotated


@pytest.mark.parametrize(("strategy", "anomaly", "mode"), list(itertools.product(SAMPLING, (True, False), MODES)))
def test_latency_matrix(lab, tmp_path, strategy, anomaly, mode):
    exp = lab.start_experiment(latency_spec(f"lat-{strategy}", budget(mode), strategy=strategy, anomaly=anomaly))
    drive(exp, mode)
    s = expect_end(exp, mode)
    check_accounts(exp, tmp_path / "art")
    records = sum(1 for e in iter_run(exp.run_dir) if e["name"] in RECORD_EVENTS)
    check_sampling(s, strategy, anomaly, records)
    check_anomaly_marks(exp, anomaly)


COLORING_CASES = [
    ("all", True, "pause_resume"),
    ("reservoir", False, "stop"),
    ("stratified", True, "stop"),
    ("importance", False, "pause_resume"),
    ("adaptive", True, "pause_resume"),
    ("uniform", False, "stop"),
]


@pytest.mark.parametrize(("strategy", "anomaly", "mode"), COLORING_CASES)
def test_coloring_subset(lab, tmp_path, strategy, anomaly, mode):
    exp = lab.start_experiment(coloring_spec(f"col-{strategy}", budget(mode), strategy=strategy, anomaly=anomaly))
    drive(exp, mode)
    expect_end(exp, mode)
    s = check_accounts(exp, tmp_path / "art")
    if strategy == "all":
        assert s["events_sampled_out"] == 0
    check_anomaly_marks(exp, anomaly)
