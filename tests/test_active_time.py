"""Active time is one figure: the phase's budget, its checkpoints, the ``phase_end`` event and
the run's record (``lifecycle.json``, ``durations()``) count the same seconds, across steps,
pause/resume cycles and a crash resume (see docs/experiments.md, *Lifecycle* and *Resuming
after a crash*)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from actors.base import on_death
from actors.phase import CheckpointStore, PhaseActor
from actors.topics import Topics
from experiments.lab import Lab
from telemetry.jsonl import iter_run
from telemetry.rundir import CHECKPOINT, LIFECYCLE, RunStatus, read_json, run_status
from tests.fault_helpers import until
from tests.test_lab_recover import ROOT, events_of, kill, kill_when, run_dir

FAST = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 5}


def spec(name: str, budget: float = 600.0, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "time_budget_s": budget,
        "workload": {"name": "latency", "params": dict(params or FAST)},
        "metrics": {"publish_interval_s": 0},
    }


def phase_end(exp: Any) -> dict[str, float]:
    (end,) = [e for e in iter_run(exp.run_dir) if e["name"] == "phase_end"]
    return end["values"]


# --- a checkpoint counts the step it records -------------------------------------------------------------


class Ticking:
    """A workload whose every step takes exactly one second of the test's clock, and which
    notes, as each step begins, what the checkpoint store holds (written after the last step)."""

    name: ClassVar[str] = "ticking"
    now: ClassVar[list[float]] = [0.0]
    store: ClassVar[CheckpointStore | None] = None
    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.n = 0

    def start(self, emitter: Any) -> None:
        pass

    def step(self, emitter: Any) -> bool:
        assert Ticking.store is not None
        Ticking.seen.append(Ticking.store.get())
        Ticking.now[0] += 1.0
        self.n += 1
        return self.n >= 5

    def checkpoint(self) -> dict[str, Any]:
        return {"n": self.n}

    def restore(self, state: dict[str, Any]) -> None:
        self.n = int(state.get("n", 0))

    def params(self) -> dict[str, Any]:
        return {"phase": "ticking"}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        raise ValueError("no controls")


def test_each_checkpoint_counts_the_time_of_the_step_it_records():
    Ticking.now[0], Ticking.seen[:] = 100.0, []
    store = Ticking.store = CheckpointStore()
    ended = threading.Event()
    ref = PhaseActor.start(
        "tick", "r1", Ticking, {}, Topics(), store, budget_s=1e6, clock=lambda: Ticking.now[0], save_every_s=0.0
    )
    on_death(ref, lambda reason: ended.set())
    assert ended.wait(30)
    after = [s for s in Ticking.seen if s.get("steps")]  # the checkpoints written after steps 1 to 4
    assert [s["steps"] for s in after] == [1, 2, 3, 4]
    assert [s["active_s"] for s in after] == [1.0, 2.0, 3.0, 4.0]  # not one step behind its work
    assert store.get()["steps"] == 5 and store.get()["active_s"] == 5.0


def test_a_lab_run_s_checkpoints_cover_the_time_of_the_steps_they_count(tmp_path):
    """Steps of 5 sleeps of 20 ms take at least 0.1 s each: every checkpoint that counts k steps
    has at least k x 0.1 s of active time, on disk as in memory."""
    step_s = 5 * 0.02
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(spec("slow", 1.0, {"target": "time:sleep", "args": [0.02], "calls_per_step": 5}))
        seen: list[dict[str, Any]] = []
        while not exp.wait(0.01):  # watch the run until it ends by its budget
            seen.append(exp.checkpoints.get())
            try:
                seen.append(orjson.loads((exp.run_dir / CHECKPOINT).read_bytes()))
            except (FileNotFoundError, orjson.JSONDecodeError):
                pass
        assert exp.reason == "budget"
        seen.append(orjson.loads((exp.run_dir / CHECKPOINT).read_bytes()))
        counted = [(int(s["steps"]), float(s["active_s"])) for s in seen if s.get("steps")]
        assert len({steps for steps, _ in counted}) >= 3, counted  # several checkpoints were watched
        for steps, active in counted:
            assert active >= steps * step_s - 1e-9, (steps, active)
    finally:
        lab.shutdown()


# --- pause/resume cycles: the record and the phase count the same time ---------------------------------------


def test_the_record_and_the_phase_count_the_same_active_time_over_many_pause_resume_cycles(tmp_path):
    """Between the tree's start and the phase's first step some time passes that the record
    counts and the budget does not; that gap is all they may differ by, however many cycles."""
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(spec("cycles"))

        def gap() -> float:
            """Record minus phase, while paused (both figures stand still then)."""
            phase = exp.phase_status(max_age=0, wait=30)
            assert phase["paused"] and not phase["stale"]
            record = read_json(exp.run_dir / LIFECYCLE)
            assert record["status"] == "paused"
            assert record["active_duration"] == pytest.approx(exp.durations()["active_duration"], abs=1e-7)
            return record["active_duration"] - phase["active_s"]

        exp.pause()
        first = gap()
        assert first >= 0
        for cycle in range(30):
            steps = exp.checkpoints.get().get("steps", 0)
            exp.resume()
            until(lambda s=steps: exp.checkpoints.get().get("steps", 0) > s, 30, f"a step in cycle {cycle}")
            exp.pause()
            assert gap() == pytest.approx(first, abs=1e-6), cycle
        exp.resume()
        exp.stop()
        d = exp.durations()
        assert (d["pause_count"], d["resume_count"]) == (31, 31)
        # at the end the record also counts the drain after the phase stopped, within the stop
        over = d["active_duration"] - phase_end(exp)["active_s"]
        assert first - 1e-6 <= over <= first + (exp.ended_at - exp.stop_started_at) + 1e-6
    finally:
        lab.shutdown()


def test_with_an_injected_clock_the_phase_and_the_record_agree_exactly(tmp_path):
    now = [100.0]
    lab = Lab(tmp_path / "art", clock=lambda: now[0])
    try:
        exp = lab.start_experiment(spec("exact"))
        assert not exp.phase_status(max_age=0, wait=30)["stale"]  # the phase has started counting, at 100
        for _ in range(3):
            now[0] += 2.0
            exp.pause()
            now[0] += 5.0
            exp.resume()
        now[0] += 1.0
        exp.stop()
        d = exp.durations()
        assert (d["active_duration"], d["paused_duration"], d["wall_clock_duration"]) == (7.0, 15.0, 22.0)
        assert phase_end(exp)["active_s"] == 7.0  # the budget's figure: the same clock, the same pauses
    finally:
        lab.shutdown()


# --- a crash resume: the budget goes on from the figure the record carries over ------------------------------

STEP_S = 4 * 0.05  # each step: four sleeps of 50 ms
BUDGET_S = 7.0
LOST_S = 4.0  # how much newer than the checkpoint the record is made to be

HOST = """
import sys, threading
from experiments.lab import Lab
lab = Lab(sys.argv[1])
lab.start_experiment({
    "name": "crash", "time_budget_s": float(sys.argv[2]), "metrics": {"publish_interval_s": 0},
    "workload": {"name": "latency", "params": {"target": "time:sleep", "args": [0.05], "calls_per_step": 4}},
}, experiment_id="crash")
threading.Event().wait()
"""


def test_a_resumed_run_charges_its_budget_with_the_time_it_ran_before_the_crash(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST, str(tmp_path), str(BUDGET_S)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def checkpoint() -> dict[str, Any]:
        try:
            return read_json(run_dir(tmp_path, "crash") / CHECKPOINT) or {}
        except ValueError:
            return {}

    try:
        kill_when(proc, lambda: checkpoint().get("steps", 0) >= 2, "a checkpoint after some steps")
    finally:
        if proc.poll() is None:
            kill(proc)
    d = run_dir(tmp_path, "crash")
    assert run_status(d).status == RunStatus.CRASHED
    cp = checkpoint()
    assert cp["steps"] >= 2 and cp["active_s"] >= cp["steps"] * STEP_S - 1e-9  # the last step's time is in
    assert cp["active_s"] < BUDGET_S - LOST_S - 2 * STEP_S  # the resumed run has steps left to do
    # a record written after the checkpoint: the work between them was run, is lost, and is done again
    rec = read_json(d / LIFECYCLE) or {}
    rec["active_duration"] = cp["active_s"] + LOST_S
    (d / LIFECYCLE).write_bytes(orjson.dumps(rec))

    lab = Lab(tmp_path)
    try:
        (exp,) = lab.recover()
        assert exp.wait(60)
        assert exp.reason == "budget"
        (resumed,) = events_of(d, "resumed")
        assert resumed["values"]["active_s"] == pytest.approx(cp["active_s"] + LOST_S, abs=1e-9)
        ran = phase_end(exp)["active_s"]
        active = exp.durations()["active_duration"]
        assert read_json(d / LIFECYCLE)["active_duration"] == pytest.approx(active, abs=1e-9)
        # the budget holds on the record's figure: one step over at most; the record also counts the
        # tree's start and drain (well under LOST_S, however loaded the machine), and without the
        # carried-over figure it would be LOST_S above the phase's
        assert BUDGET_S <= ran < BUDGET_S + STEP_S + 1.0
        assert 0.0 <= active - ran < LOST_S / 2
    finally:
        lab.shutdown()
