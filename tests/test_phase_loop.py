"""The Phase actor runs one step loop, whatever the order of pauses, resumes and steps in
its mailbox (a step queued before a pause must not start a second loop after the resume)."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from actors.base import call_local
from actors.messages import decode
from actors.phase import CheckpointStore, PhaseActor
from actors.topics import Topics
from tests.actors_fixtures import Counting

GATE = threading.Event()  # the first step waits on it, so control messages queue behind it
ENTERED = threading.Event()


class Stepper(Counting):
    """A workload whose steps only count; the first blocks until the test opens the gate."""

    name: ClassVar[str] = "stepper"

    def step(self, emitter: Any) -> bool:
        self.n += 1
        if self.n == 1:
            ENTERED.set()
            assert GATE.wait(30)
        return False

    def params(self) -> dict[str, Any]:
        return {"phase": "stepper"}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        raise ValueError("no controls")


def _steps_queued(actor: Any) -> int:
    """Steps of the actor's live loop waiting in its mailbox (a stale loop's are ignored)."""
    live = getattr(actor, "_loop", None)
    queued = [decode(env.message) for env in list(actor.actor_inbox.queue) if isinstance(env.message, bytes)]
    return sum(1 for m in queued if m.get("kind") == "step" and m.get("loop") == live)


def test_a_step_queued_before_a_pause_does_not_start_a_second_loop():
    GATE.clear()
    ENTERED.clear()
    ref = PhaseActor.start("loop", "r1", Stepper, {}, Topics(), CheckpointStore(), budget_s=600)
    try:
        assert ENTERED.wait(30)  # the first step is running: what follows queues behind it
        ref.tell({"kind": "pause"})
        ref.tell({"kind": "resume"})
        GATE.set()  # the step ends and sends the next; then pause, resume (which sends one too)
        for _ in range(20):  # between two steps the mailbox holds exactly the loop's next step
            assert call_local(ref, _steps_queued, timeout=30) == 1
    finally:
        GATE.set()
        ref.stop()


@pytest.fixture(autouse=True)
def _open_gate():
    yield
    GATE.set()


class Timed:
    """A workload that times itself with the clock the Phase actor gives it."""

    name: ClassVar[str] = "timed"
    seen: ClassVar[list[float]] = []

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.clock = lambda: 0.0

    def use_clock(self, clock: Any) -> None:
        self.clock = clock

    def start(self, emitter: Any) -> None:
        pass

    def step(self, emitter: Any) -> bool:
        Timed.seen.append(self.clock())
        return False

    def checkpoint(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def params(self) -> dict[str, Any]:
        return {"phase": "timed"}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        raise ValueError("no controls")


def test_the_workload_clock_is_active_time_so_a_pause_never_counts():
    now = [100.0]
    Timed.seen.clear()
    ref = PhaseActor.start("t", "r1", Timed, {}, Topics(), CheckpointStore(), budget_s=1e6, clock=lambda: now[0])
    try:
        ref.ask({"kind": "pause"}, timeout=30)
        paused_at = call_local(ref, lambda a: a.workload.clock(), timeout=30)
        now[0] += 500.0  # five hundred seconds pass while paused
        assert call_local(ref, lambda a: a.workload.clock(), timeout=30) == paused_at
        ref.ask({"kind": "resume"}, timeout=30)
        now[0] += 2.0  # two active seconds
        assert call_local(ref, lambda a: a.workload.clock(), timeout=30) == pytest.approx(paused_at + 2.0)
    finally:
        ref.stop()
