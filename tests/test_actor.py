import threading

import numpy as np
import pytest

from actors import (
    KILLED,
    NOPROC,
    NORMAL,
    ActorDeadError,
    Registry,
    Topics,
    demonitor,
    encode,
    monitor,
    spawn_monitor,
)
from actors.base import Actor, UnknownMessage
from actors.registry import NameTaken
from tests.actors_fixtures import Collector, Worker


@pytest.fixture
def spawned():
    refs = []
    gates = []

    def spawn(cls, *a, **kw):
        ref = cls.start(*a, **kw)
        refs.append(ref)
        return ref

    spawn.gates = gates
    yield spawn
    for g in gates:
        g.set()
    for r in refs:
        r.stop(timeout=2)


def test_tell_and_ask_roundtrip(spawned):
    w = spawned(Worker, tag="a")
    w.tell({"kind": "note", "v": 1})
    w.tell({"kind": "note", "v": np.arange(3)})
    notes = w.ask({"kind": "notes"})
    assert notes[0] == 1
    np.testing.assert_array_equal(notes[1], [0, 1, 2])
    reply = w.ask({"kind": "ping"})
    assert (reply["tag"], reply["urn"], reply["count"]) == ("a", w.urn, 1)
    assert w.is_alive()


def test_crash_on_ask_reaches_asker_and_stops_actor(spawned):
    w = spawned(Worker, tag="a")
    with pytest.raises(RuntimeError, match="boom a"):
        w.ask({"kind": "crash"})
    assert w.wait(timeout=5).startswith("exception: RuntimeError: boom a")
    assert not w.is_alive()
    with pytest.raises(ActorDeadError):
        w.ask({"kind": "ping"})


def test_crash_on_tell_stops_actor(spawned):
    w = spawned(Worker)
    w.tell({"kind": "crash"})
    assert "RuntimeError" in w.wait(timeout=5)
    assert not w.is_alive()
    w.tell({"kind": "ping"})  # telling the dead is a silent no-op, as in Erlang


@pytest.mark.parametrize("how", ["tell", "ask"])
def test_sys_exit_in_a_handler_crashes_that_actor_alone(spawned, how):
    """SystemExit is a BaseException: pykka stops every actor of the process on one. A handler
    that calls sys.exit() must crash its own actor, like any exception, and nothing else."""
    bystander = spawned(Worker, tag="b")
    w = spawned(Worker, tag="a")
    if how == "ask":
        with pytest.raises(RuntimeError, match="SystemExit"):
            w.ask({"kind": "sys_exit", "code": 3})
    else:
        w.tell({"kind": "sys_exit", "code": 3})
    assert "SystemExit" in w.wait(timeout=5)
    assert not w.is_alive()
    assert bystander.ask({"kind": "ping"})["tag"] == "b"  # the rest of the process goes on
    assert bystander.is_alive()


@pytest.mark.parametrize("what", ["CancelledError", "KeyboardInterrupt", "GeneratorExit", "SystemExit"])
@pytest.mark.parametrize("how", ["tell", "ask"])
def test_any_base_exception_in_a_handler_crashes_that_actor_alone(spawned, how, what):
    """An async client's cancelled task raises CancelledError, a BaseException: pykka stopped
    every actor of the process on it (every experiment of every Lab, each recorded stopped)."""
    bystander = spawned(Worker, tag="b")
    w = spawned(Worker, tag="a")
    if how == "ask":
        with pytest.raises(RuntimeError, match=f"{what}.* raised in a handler"):
            w.ask({"kind": "base_exc", "what": what})
    else:
        w.tell({"kind": "base_exc", "what": what})
    assert what in w.wait(timeout=5)
    assert not w.is_alive()
    assert bystander.ask({"kind": "ping"})["tag"] == "b"  # the rest of the process goes on
    assert bystander.is_alive()


class CancelledTerminate(Worker):
    def terminate(self, reason):
        import asyncio

        raise asyncio.CancelledError  # a cleanup that awaits a cancelled task


def test_a_base_exception_from_terminate_after_a_crash_stays_in_that_actor(spawned):
    """The crash path's terminate() caught Exception only: a CancelledError there reached pykka,
    which stopped every actor of the process, and the crash was recorded as normal."""
    bystander = spawned(Worker, tag="b")
    w = spawned(CancelledTerminate, tag="a")
    w.tell({"kind": "crash"})
    assert w.wait(timeout=5).startswith("exception: RuntimeError: boom a")
    assert bystander.ask({"kind": "ping"})["tag"] == "b" and bystander.is_alive()


def test_tell_later_arrives_unless_cancelled_or_stopping(spawned):
    w = spawned(Worker)
    kept = w.tell_later(0.01, {"kind": "note", "v": "kept"})
    gone = w.tell_later(30, {"kind": "note", "v": "cancelled"})
    gone.cancel()
    assert kept.wait(timeout=5)  # the timer thread has sent it
    assert w.ask({"kind": "notes"}) == ["kept"]
    late = w.tell_later(0.01, {"kind": "note", "v": "after stop"})
    w.stop(timeout=5)
    assert late.wait(timeout=5)
    assert w.wait(timeout=5) == "normal"  # a tick after the stop is not an undelivered message either


def test_undecodable_and_unknown_messages_are_counted_and_dropped(spawned):
    w = spawned(Worker)
    w.tell_bytes(b"\xc1\xc1")
    w.tell_bytes(encode([1, 2, 3]))
    w.tell({"kind": "no_such_kind"})
    with pytest.raises(UnknownMessage, match="no handler for message kind 'no_such_kind'"):
        w.ask({"kind": "no_such_kind"})  # an asker learns it, rather than take None for an answer
    assert w.ask({"kind": "ping"})["count"] == 1
    counts = w.ask({"kind": "ping"})  # still alive
    assert counts["count"] == 2


def test_dropped_counters_are_exact():
    class Probe(Worker):
        def handle_counters(self, msg):
            return [self.dropped_undecodable, self.dropped_unknown]

    w = Probe.start()
    try:
        for _ in range(3):
            w.tell_bytes(b"\xc1")
        for _ in range(4):
            w.tell({"kind": "nope"})
        assert w.ask({"kind": "counters"}) == [3, 4]
    finally:
        w.stop()


def test_unencodable_message_raises_at_send_time(spawned):
    w = spawned(Worker)
    with pytest.raises(TypeError, match=r"payload\.fn"):
        w.tell({"kind": "note", "payload": {"fn": print}})
    assert w.ask({"kind": "ping"})["count"] == 1


def test_ask_timeout_raises_timeouterror(spawned):
    gate = threading.Event()
    spawned.gates.append(gate)
    w = spawned(Worker, gate=gate)
    w.tell({"kind": "block"})
    with pytest.raises(TimeoutError):
        w.ask({"kind": "ping"}, timeout=0.05)
    gate.set()
    assert w.ask({"kind": "ping"}, timeout=5)["count"] >= 1


# --- registry -------------------------------------------------------------------


def test_registry_whereis_and_freed_on_death():
    reg = Registry()
    w = Worker.start()
    reg.register("w", w)
    assert reg.whereis("w") == w
    other = Worker.start()
    with pytest.raises(NameTaken):
        reg.register("w", other)
    other.stop()
    w.tell({"kind": "crash"})
    w.wait(timeout=5)
    assert reg.whereis("w") is None
    assert "w" not in reg.names()
    w2 = Worker.start()
    reg.register("w", w2)  # the name is free again
    assert reg.send("w", {"kind": "note", "v": 5})
    assert w2.ask({"kind": "notes"}) == [5]
    assert not reg.send("nobody", {"kind": "note"})
    w2.stop()
    assert reg.whereis("w") is None


def test_two_registries_do_not_share_names():
    a, b = Registry(), Registry()
    w1, w2 = Worker.start(tag="1"), Worker.start(tag="2")
    a.register("x", w1)
    b.register("x", w2)
    assert a.whereis("x").ask({"kind": "ping"})["tag"] == "1"
    assert b.whereis("x").ask({"kind": "ping"})["tag"] == "2"
    w1.stop()
    w2.stop()


# --- monitors -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["crash", "stop", "kill", "exit"])
def test_monitor_receives_down_with_reason(spawned, how):
    watcher = spawned(Collector)
    w = spawned(Worker)
    monitor(watcher, w)
    if how == "crash":
        w.tell({"kind": "crash"})
        w.wait(5)
    elif how == "stop":
        assert w.stop(timeout=5)
    elif how == "exit":
        w.tell({"kind": "exit", "reason": "done:custom"})
        w.wait(5)
    else:
        w.kill()
    downs = [m for m in watcher.ask({"kind": "get"}) if m["kind"] == "down"]
    assert len(downs) == 1
    assert downs[0]["urn"] == w.urn
    expected = {"crash": None, "stop": NORMAL, "kill": KILLED, "exit": "done:custom"}[how]
    if expected:
        assert downs[0]["reason"] == expected
    else:
        assert downs[0]["reason"].startswith("exception: RuntimeError")


def test_monitor_dead_actor_gets_noproc_and_demonitor(spawned):
    watcher = spawned(Collector)
    w = spawned(Worker)
    w.stop()
    monitor(watcher, w)
    w2 = spawned(Worker)
    monitor(watcher, w2)
    demonitor(watcher, w2)
    w2.stop()
    downs = [m for m in watcher.ask({"kind": "get"}) if m["kind"] == "down"]
    assert downs == [{"kind": "down", "urn": w.urn, "reason": NOPROC}]


class _DiesInOnStart(Actor):
    inners: list = []

    def __init__(self, inner=False):
        # an actor its constructor starts first must not take the monitor meant for this one
        if inner:
            self.inners.append(Worker.start())
        super().__init__()

    def on_start(self):
        raise RuntimeError("no start")


@pytest.mark.parametrize("inner", [False, True])
def test_spawn_monitor_reports_an_on_start_crash_not_noproc(spawned, inner):
    watcher = spawned(Collector)
    late = _DiesInOnStart.start()
    assert late.wait(5) == "exception: RuntimeError: no start"
    monitor(watcher, late)  # taken after the death: all it can say is noproc
    ref = spawn_monitor(watcher, _DiesInOnStart, inner=inner)
    assert ref.wait(5) == "exception: RuntimeError: no start"
    for w in _DiesInOnStart.inners:
        assert w._life.watchers == []
        w.stop(timeout=2)
    _DiesInOnStart.inners.clear()
    after = Worker.start()
    assert after._life.watchers == []  # the pending monitor was not left for the next actor
    after.stop(timeout=2)
    downs = [m for m in watcher.ask({"kind": "get"}) if m["kind"] == "down"]
    assert downs == [
        {"kind": "down", "urn": late.urn, "reason": NOPROC},
        {"kind": "down", "urn": ref.urn, "reason": "exception: RuntimeError: no start"},
    ]


# --- kill -------------------------------------------------------------------------


def test_kill_marks_dead_unregisters_and_never_delivers_again(spawned):
    gate = threading.Event()
    spawned.gates.append(gate)
    reg = Registry()
    sink = []
    w = Worker.start(gate=gate, sink=sink)
    reg.register("stuck", w)
    thread_name = w.ask({"kind": "ping"})["thread"]
    w.tell({"kind": "block"})
    w.tell({"kind": "note", "v": "queued before kill"})
    w.kill()
    assert not w.is_alive()
    assert w.exit_reason == KILLED
    assert reg.whereis("stuck") is None
    with pytest.raises(ActorDeadError):
        w.ask({"kind": "ping"})
    thread = next(t for t in threading.enumerate() if t.name == thread_name)
    assert thread.daemon  # abandoned threads never keep the process alive
    gate.set()  # the handler returns; the thread must exit without handling the queued note
    thread.join(5)
    assert not thread.is_alive()
    assert sink == []


# --- topics -----------------------------------------------------------------------


def test_topic_fans_out_same_bytes(spawned):
    topics = Topics()
    a, b, c = spawned(Collector), spawned(Collector), spawned(Collector)
    topics.subscribe("events", a)
    topics.subscribe("events", b)
    topics.subscribe("events", b)  # idempotent
    topics.subscribe("other", c)
    assert topics.publish("events", {"kind": "ev", "x": np.arange(4)}) == 2
    topics.unsubscribe("events", b)
    assert topics.publish("events", {"kind": "ev", "x": np.arange(2)}) == 1
    got_a = a.ask({"kind": "get"})
    assert [len(m["x"]) for m in got_a] == [4, 2]
    assert len(b.ask({"kind": "get"})) == 1
    assert c.ask({"kind": "get"}) == []


def test_topic_publish_encodes_once():
    topics = Topics()
    calls = []

    class Spy(Collector):
        def on_receive(self, message):
            calls.append(message)
            return super().on_receive(message)

    refs = [Spy.start() for _ in range(3)]
    for r in refs:
        topics.subscribe("t", r)
    topics.publish("t", {"kind": "ev"})
    for r in refs:
        r.stop()
    assert len(calls) == 3
    assert all(c is calls[0] for c in calls)


def test_dead_subscribers_are_pruned(spawned):
    topics = Topics()
    a = spawned(Collector)
    w = Worker.start()
    topics.subscribe("t", a)
    topics.subscribe("t", w)
    w.stop()
    assert topics.subscribers("t") == (a,)
