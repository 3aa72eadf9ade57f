"""Hostile inputs to the actor runtime: an ``on_stop`` override, self-referring and very deep
messages, and timer, timeout, backoff and shutdown values out of range. Each was accepted and
broke something far from the mistake (a zombie actor, a RecursionError, a dead timer thread)."""

from __future__ import annotations

import heapq
import math
import re
import threading
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from actors import NORMAL, ActorDeadError, Registry, monitor
from actors.messages import MAX_DEPTH, decode, encode
from actors.supervision import ChildSpec, Supervisor, backoff_delay
from actors.timers import MAX_DELAY_S, Timer, TimerService, call_later
from tests.actors_fixtures import Collector, Worker


@pytest.fixture
def started():
    """Start actors for a test; whatever is still alive is stopped after it."""
    refs: list[Any] = []

    def start(cls: type, *a: Any, **kw: Any) -> Any:
        ref = cls.start(*a, **kw)
        refs.append(ref)
        return ref

    yield start
    for r in reversed(refs):
        r.stop(timeout=5)


# --- 1. on_stop overrides never leave a zombie -------------------------------------------------


class PassStop(Worker):
    def on_stop(self) -> None:
        pass


class RaisingStop(Worker):
    def on_stop(self) -> None:
        raise RuntimeError("on_stop failed on purpose")


class ExitingStop(Worker):
    def on_stop(self) -> None:
        raise SystemExit(4)


class SuperStop(Worker):
    def on_stop(self) -> None:
        super().on_stop()
        self.journal.append(("after super", self.tag))


class SubOfPassStop(PassStop):
    def on_stop(self) -> None:
        self.journal.append(("sub on_stop", self.tag))
        super().on_stop()


def downs(watcher: Any) -> list[dict[str, Any]]:
    return [m for m in watcher.ask({"kind": "get"}, timeout=5) if m["kind"] == "down"]


@pytest.mark.parametrize("cls", [PassStop, RaisingStop, ExitingStop, SuperStop, SubOfPassStop])
def test_an_actor_overriding_on_stop_still_dies_properly(started, cls):
    journal: list[tuple[str, ...]] = []
    reg = Registry()
    w = started(Collector)
    r = started(cls, "q", journal=journal)
    monitor(w, r)
    reg.register("q", r)
    assert r.stop(timeout=5) is True
    assert not r.is_alive()
    assert r.exit_reason == NORMAL
    assert r.wait(timeout=0) == NORMAL
    assert downs(w) == [{"kind": "down", "urn": r.urn, "reason": NORMAL}]
    assert reg.whereis("q") is None and reg.names() == []
    with pytest.raises(ActorDeadError, match="is dead"):
        r.ask({"kind": "ping"}, timeout=5)
    assert [e for e in journal if e[0] == "stop"] == [("stop", "q", NORMAL)]  # terminate ran once
    if cls is SuperStop:
        assert journal[-1] == ("after super", "q")
    if cls is SubOfPassStop:
        assert ("sub on_stop", "q") in journal


@pytest.mark.parametrize("cls", [RaisingStop, ExitingStop])
def test_an_on_stop_that_raises_is_logged_with_the_actor(started, cls):
    r = started(cls, "q")
    with capture_logs() as logs:
        assert r.stop(timeout=5) is True
    failed = [e for e in logs if e["event"].startswith("on_stop failed")]
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error" and failed[0]["actor"] == cls.__name__
    assert failed[0]["urn"] == r.urn and failed[0]["reason"] == NORMAL


def test_a_supervisor_stops_children_that_override_on_stop(started):
    sup = Supervisor.start(
        [
            ChildSpec("a", PassStop, args=("a",), shutdown="infinity"),
            ChildSpec("b", RaisingStop, args=("b",), shutdown=5),
        ]
    )
    kids = [sup.child_ref("a"), sup.child_ref("b")]
    assert sup.stop(timeout=8) is True
    assert not sup.is_alive() and sup.exit_reason == NORMAL
    assert [k.exit_reason for k in kids] == ["shutdown", "shutdown"]


def test_a_supervised_child_overriding_on_stop_is_restarted_after_an_abnormal_exit(started):
    reg = Registry()
    sup = started(Supervisor, [ChildSpec("a", PassStop, args=("a",), name="a")], registry=reg)
    old = sup.child_ref("a")
    old.tell({"kind": "exit", "reason": "stopped by hand"})  # abnormal: a permanent child comes back
    assert old.wait(timeout=5) == "stopped by hand"
    new = reg.await_name("a", timeout=5, not_urn=old.urn)
    assert new is not None and new.ask({"kind": "ping"}, timeout=5)["tag"] == "a"


# --- 2. cyclic and deep messages ---------------------------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    """A message ``depth`` dicts deep (the message itself is depth 1)."""
    msg: dict[str, Any] = {"kind": "x"}
    for _ in range(depth - 1):
        msg = {"kind": "x", "x": msg}
    return msg


def test_a_cyclic_message_is_a_type_error_naming_the_field(started):
    d: dict[str, Any] = {"kind": "x"}
    d["x"] = d
    with pytest.raises(TypeError, match=r"message field x \(cyclic"):
        encode(d)
    r = started(Worker)
    with pytest.raises(TypeError, match=r"message field x \(cyclic"):
        r.tell(d)
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(TypeError, match=r"message field params.l\[1\] \(cyclic"):
        encode({"kind": "x", "params": {"l": loop}})
    assert r.ask({"kind": "ping"}, timeout=5)["count"] == 1  # nothing reached the actor


def test_a_message_nested_100000_deep_is_a_type_error_not_a_recursion_error():
    with pytest.raises(TypeError, match=rf"nested deeper than MAX_DEPTH={MAX_DEPTH}") as err:
        encode(nested(100_000))
    assert str(err.value).startswith("message field x.x.x")
    assert len(str(err.value)) < 300  # the path is shortened, not 100,000 segments


def depth_of(msg: dict[str, Any]) -> int:
    """How many dicts deep a message made by :func:`nested` is (without recursing)."""
    n = 1
    while "x" in msg:
        msg, n = msg["x"], n + 1
    return n


def set_in_lists(lists: int) -> dict[str, Any]:
    inner: Any = {1, 2}
    for _ in range(lists):
        inner = [inner]
    return {"kind": "x", "s": inner}


def test_max_depth_is_the_deepest_message_that_travels():
    assert depth_of(decode(encode(nested(MAX_DEPTH)))) == MAX_DEPTH
    with pytest.raises(TypeError, match="nested deeper than MAX_DEPTH"):
        encode(nested(MAX_DEPTH + 1))
    encode(set_in_lists(MAX_DEPTH - 2))  # the set at depth MAX_DEPTH: it travels as a list
    with pytest.raises(TypeError, match=r"message field s\[0\]\[0\].* \(nested deeper than MAX_DEPTH"):
        encode(set_in_lists(MAX_DEPTH - 1))


def test_bad_fields_are_still_named_first_in_order():
    with pytest.raises(TypeError, match=r"message field a\[1\]\.b \(type object\)"):
        encode({"kind": "x", "a": [1, {"b": object()}], "c": object()})
    with pytest.raises(TypeError, match=r"message field p \(numpy dtype object\)"):
        encode({"kind": "x", "p": np.array([object()])})


# --- 3. timers, timeouts, backoff and shutdown values ------------------------------------------


@pytest.mark.parametrize("delay", [1e10, math.inf, -math.inf, math.nan, -1, MAX_DELAY_S * 2, True, "1"])
def test_tell_later_refuses_a_delay_out_of_range_at_the_call(started, delay):
    r = started(Worker)
    with pytest.raises(ValueError, match=r"timer delay must be a finite number of seconds in \[0, "):
        r.tell_later(delay, {"kind": "note", "v": 1})


@pytest.fixture
def timers():
    made: list[TimerService] = []

    def make() -> TimerService:
        made.append(TimerService("hostile-timers"))
        return made[-1]

    yield make
    for ts in made:
        ts.close()


def test_the_timer_thread_survives_a_far_timer_left_alone(timers):
    ts = timers()
    far = ts.call_later(MAX_DELAY_S, lambda: None)
    first = ts.call_later(0, lambda: None)
    assert first.wait(timeout=5)
    thread = ts._thread
    assert thread is not None
    thread.join(timeout=0.3)  # only the far timer left: the thread must wait, not die
    assert thread.is_alive()
    ran = threading.Event()
    ts.call_later(0, ran.set)
    assert ran.wait(timeout=5) and ts._thread is thread
    assert far.cancel()


def test_the_timer_thread_survives_a_callback_raising_system_exit(timers):
    ts = timers()

    def bad() -> None:
        raise SystemExit(2)

    with capture_logs() as logs:
        t = ts.call_later(0, bad)
        assert t.wait(timeout=5)
    thread = ts._thread
    ran = threading.Event()
    ts.call_later(0, ran.set)
    assert ran.wait(timeout=5) and ts._thread is thread
    assert any(e["event"] == "timer callback failed" for e in logs)


def test_a_timer_with_a_nan_due_time_does_not_stall_the_others(timers):
    ts = timers()
    odd = threading.Event()
    ran = threading.Event()
    with ts._cond:  # a Timer made by hand, past call_later's checks
        ts._ensure_thread()
        bad = Timer(math.nan, odd.set, (), ts._cond)
        heapq.heappush(ts._heap, (bad.due, -1, bad))
        ts._cond.notify()
    ts.call_later(0.01, ran.set)
    assert ran.wait(timeout=5)
    assert odd.wait(timeout=5)


def test_the_process_timer_refuses_what_would_kill_it():
    with pytest.raises(ValueError, match="delay"):
        call_later(1e10, lambda: None)


def test_backoff_out_of_range_is_refused_at_start():
    for bad in [(1e10, 1e10, 0), (0.01, 1.0, math.inf), (0.01, 1.0, math.nan), (math.nan, 1, 0), (2, 1, 0), (1, 2)]:
        with pytest.raises(ValueError, match=r"backoff must be \(min_s, max_s, jitter\)"):
            Supervisor.start([ChildSpec("a", Worker)], backoff=bad)
    with pytest.raises(ValueError, match="backoff"):
        Supervisor.start([], backoff=(1.0, MAX_DELAY_S, 1.0))  # max_s * (1 + jitter) too long


def test_backoff_delay_does_not_overflow_after_thousands_of_restarts():
    assert backoff_delay(5000, 0.01, 1.0, 0.0, 0.5) == 1.0
    assert backoff_delay(10**6, 0.0, 1.0, 0.5, 0.5) == 0.0
    assert [backoff_delay(n, 0.01, 0.08, 0.0, 0.9) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.08, 0.08]


@pytest.mark.parametrize("shutdown", [math.inf, math.nan, -1, 1e10, True, "forever"])
def test_child_spec_refuses_a_shutdown_out_of_range(shutdown):
    most = re.escape(f"{MAX_DELAY_S:g}")
    with pytest.raises(ValueError, match=rf"shutdown must be (>= 0 and <= {most} seconds|seconds, )"):
        ChildSpec("a", Worker, shutdown=shutdown)


def test_inf_timeouts_mean_no_timeout(started):
    r = started(Worker, "t")
    assert r.ask({"kind": "ping"}, timeout=math.inf)["tag"] == "t"
    reg = Registry()
    reg.register("t", r)
    assert reg.await_name("t", timeout=math.inf) == r
    assert r.stop(timeout=math.inf) is True
    assert r.wait(timeout=math.inf) == NORMAL


@pytest.mark.parametrize("timeout", [math.nan, -1, -math.inf, 1e10, "5"])
def test_timeouts_out_of_range_are_refused_at_the_call(started, timeout):
    r = started(Worker)
    with pytest.raises(ValueError, match="timeout must be None or inf"):
        r.ask({"kind": "ping"}, timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        r.stop(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        r.wait(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        Registry().await_name("nobody", timeout=timeout)
    assert r.ask({"kind": "ping"}, timeout=5)["count"] == 1  # the actor never saw the refused calls


def test_a_supervisor_with_backoff_and_jitter_restarts_its_child(started):
    reg = Registry()
    sup = started(Supervisor, [ChildSpec("a", Worker, args=("a",), name="a")], backoff=(0.01, 0.02, 1.0), registry=reg)
    old = sup.child_ref("a")
    old.tell({"kind": "crash"})
    assert old.wait(timeout=5).startswith("exception: RuntimeError")
    new = reg.await_name("a", timeout=5, not_urn=old.urn)
    assert sup.is_alive() and new is not None and new.ask({"kind": "ping"}, timeout=5)["tag"] == "a"
