"""Sends to names: what is not delivered is counted per name and logged, never lost silently."""

from __future__ import annotations

import threading

import pytest
from structlog.testing import capture_logs

from actors import Registry, Topics
from actors.topics import NamedTarget
from supervisor import ChildSpec, Supervisor
from tests.actors_fixtures import Worker
from tests.fault_helpers import until


def warnings(logs: list[dict]) -> list[dict]:
    return [e for e in logs if e["event"] == "messages to a name not delivered"]


def test_a_send_to_a_name_that_crashed_for_good_is_counted_and_logged_once_per_name():
    reg = Registry()
    ref = Worker.start()
    reg.register("w", ref)
    assert reg.send("w", {"kind": "note", "v": 1})
    assert ref.ask({"kind": "notes"}) == [1]
    ref.tell({"kind": "crash"})  # no supervisor: gone for good, and not on purpose
    until(lambda: not ref.is_alive(), what="the crash")
    with capture_logs() as logs:
        for v in range(5):
            assert reg.send("w", {"kind": "note", "v": v}) is False
        assert reg.send("nobody", {"kind": "note"}) is False
    assert reg.undelivered() == {"w": 5, "nobody": 1} and reg.sent_after_exit() == {}
    warned = warnings(logs)  # rate-limited: one warning per name, not one per message
    assert [(e["name"], e["total"]) for e in warned] == [("w", 1), ("nobody", 1)]
    assert all(e["log_level"] == "warning" for e in warned)


def test_sends_after_a_clean_exit_are_counted_apart_and_not_warned_about():
    """A tree stopping in reverse start order stops an observer before what feeds it: what
    still comes for it is counted as sent after its exit, not as loss, and logs no warning."""
    reg = Registry()
    ref = Worker.start()
    reg.register("w", ref)
    ref.stop()
    with capture_logs() as logs:
        for v in range(4):
            assert reg.send("w", {"kind": "note", "v": v}) is False
    assert reg.sent_after_exit() == {"w": 4} and reg.undelivered() == {}
    assert warnings(logs) == []
    reg.register("w", Worker.start())  # the name is taken again: sends are delivered, or loss again
    assert reg.send("w", {"kind": "note", "v": 9})
    reg.whereis("w").stop()


def test_a_named_target_reports_what_its_registry_could_not_deliver():
    reg, topics = Registry(), Topics()
    topics.subscribe_name("events", "gone", reg)
    target = NamedTarget("gone", reg)
    assert target.tell_bytes(b"\x80") is False
    assert topics.publish("events", {"kind": "x"}) == 0  # nobody took it
    assert reg.undelivered() == {"gone": 2}


def test_messages_left_behind_a_stop_are_counted():
    """Tells queued behind a named actor's stop are never read: they count as sent after its exit."""
    reg, gate = Registry(), threading.Event()
    ref = Worker.start(gate=gate)
    reg.register("w", ref)
    try:
        reg.send("w", {"kind": "block"})  # busy: what follows queues behind
        until(lambda: ref.queue_size() == 0, what="the block taken")
        stopping = threading.Thread(target=ref.stop, daemon=True)
        stopping.start()
        until(lambda: ref.queue_size() == 1, what="the stop queued")
        for v in range(3):  # behind the stop: the actor will never read them
            assert reg.send("w", {"kind": "note", "v": v})
    finally:
        gate.set()
    stopping.join(10)
    assert not ref.is_alive()
    assert reg.sent_after_exit() == {"w": 3} and reg.undelivered() == {}


def test_a_name_whose_supervisor_gives_up_counts_its_stash():
    reg = Registry()
    sup = Supervisor.start([ChildSpec("w", Worker, name="w")], max_restarts=0, backoff=(30.0, 30.0, 0.0), registry=reg)
    old = reg.whereis("w")
    old.tell({"kind": "crash"})  # over the intensity at once: no restart, no stash to wait for
    assert sup.wait(10) == "reached_max_restart_intensity"
    assert reg.send("w", {"kind": "note"}) is False
    assert reg.undelivered() == {"w": 1}


def test_a_restarting_name_stashes_and_counts_nothing():
    reg = Registry()
    sup = Supervisor.start([ChildSpec("w", Worker, name="w")], backoff=(0.3, 1.0, 0.0), registry=reg)
    try:
        old = reg.whereis("w")
        old.tell({"kind": "crash"})
        old.wait(10)
        assert reg.send("w", {"kind": "note", "v": 7})  # stashed for the replacement
        new = reg.await_name("w", timeout=10, not_urn=old.urn)
        assert new.ask({"kind": "notes"}) == [7]
        assert reg.undelivered() == {}
    finally:
        sup.stop()


def test_an_actors_own_ticks_never_queue_behind_its_stop():
    """A timer's tick or a next step an actor sends itself is refused once a stop is on its
    way (it would never be read, and would count as undelivered); sent before, it is read."""
    reg, gate = Registry(), threading.Event()
    ref = Worker.start(gate=gate)
    reg.register("w", ref)
    try:
        reg.send("w", {"kind": "block"})
        until(lambda: ref.queue_size() == 0, what="the block taken")
        assert ref.tell_unless_stopping({"kind": "note", "v": "before"})  # ahead of the stop: read
        stopping = threading.Thread(target=ref.stop, daemon=True)
        stopping.start()
        until(lambda: ref.queue_size() == 2, what="the stop queued")
        assert not ref.tell_unless_stopping({"kind": "note", "v": "after"})
        assert ref.queue_size() == 2
    finally:
        gate.set()
    stopping.join(10)
    assert not ref.is_alive()
    assert reg.undelivered() == {}


class _Greeter(Worker):
    """Sends to a sibling that its supervisor starts after it (a metrics actor publishing to
    hypertune, which starts last)."""

    def __init__(self, registry: Registry, to: str) -> None:
        super().__init__()
        registry.send(to, {"kind": "note", "v": "hello"})


def test_a_send_to_a_sibling_not_started_yet_waits_for_it():
    reg = Registry()
    sink: list[object] = []
    sup = Supervisor.start(
        [
            ChildSpec("first", _Greeter, args=(reg, "second"), name="first"),
            ChildSpec("second", Worker, kwargs={"sink": sink}, name="second"),
        ],
        strategy="rest_for_one",
        registry=reg,
    )
    try:
        until(lambda: sink == ["hello"], what="the greeting")
        assert reg.undelivered() == {}
    finally:
        sup.stop()


def test_a_tree_that_cannot_start_drops_what_it_held_for_its_names():
    reg, refuse = Registry(), threading.Event()
    refuse.set()
    with pytest.raises(Exception, match="start refused"):
        Supervisor.start(
            [
                ChildSpec("first", _Greeter, args=(reg, "second"), name="first"),
                ChildSpec("second", Worker, kwargs={"fail_start": refuse}, name="second"),
            ],
            registry=reg,
        )
    assert reg.undelivered() == {"second": 1}
    assert reg.send("second", {"kind": "note"}) is False  # nothing is held for it any more
