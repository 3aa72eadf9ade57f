"""The process's one timer thread (actors/timers.py): order, cancellation, exactly once, and
that ticks no longer cost a thread each."""

from __future__ import annotations

import math
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.timers import TimerService, call_later, service


@pytest.fixture
def timers():
    """A timer service of the test's own, closed after it (its thread ends)."""
    made: list[TimerService] = []

    def make(name: str) -> TimerService:
        made.append(TimerService(name))
        return made[-1]

    yield make
    for ts in made:
        ts.close()


def test_timers_run_in_due_order_each_once_and_cancelled_ones_never(timers):
    ts = timers("test-timers")
    ran: list[int] = []
    lock = threading.Lock()

    def note(i: int) -> None:
        with lock:
            ran.append(i)

    delays = [0.05, 0.0, 0.03, 0.01, 0.04, 0.02]
    timers = [ts.call_later(d, note, i) for i, d in enumerate(delays)]
    assert timers[4].cancel()
    assert not timers[4].is_alive()
    for t in timers:
        assert t.wait(timeout=5)
    assert ran == [1, 3, 5, 2, 0]  # by delay; the cancelled one (4) never ran
    assert not timers[0].cancel()  # too late: it ran
    assert ts.pending() == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=20), st.booleans()),
        min_size=1,
        max_size=30,
    )
)
def test_every_timer_not_cancelled_runs_once_in_order_of_due_then_of_setting(plan):
    """Property: whatever the delays (with ties) and cancellations, the calls that run are
    exactly the ones not cancelled, once each, sorted by (due time, order set)."""
    ts = TimerService("test-timers-prop")
    try:
        check_plan(ts, plan)
    finally:
        ts.close()


def check_plan(ts: TimerService, plan: list[tuple[int, bool]]) -> None:
    gate = threading.Event()
    ran: list[int] = []
    ts.call_later(0, gate.wait, 5)  # holds the thread until every timer below is set
    timers = [ts.call_later(ms / 1000, ran.append, i) for i, (ms, _) in enumerate(plan)]
    cancelled = {i for i, (_, c) in enumerate(plan) if c and timers[i].cancel()}
    gate.set()
    for t in timers:
        assert t.wait(timeout=10)
    expected = sorted((t.due, i) for i, t in enumerate(timers) if i not in cancelled)
    assert ran == [i for _, i in expected]


def test_a_callback_that_raises_does_not_stop_the_others(timers):
    ts = timers("test-timers-raise")
    done = threading.Event()

    def boom() -> None:
        raise RuntimeError("bad tick")

    bad = ts.call_later(0, boom)
    ts.call_later(0.001, done.set)
    assert done.wait(timeout=5)
    assert bad.wait(timeout=5) and not bad.is_alive()


def test_an_earlier_timer_set_later_is_not_held_behind_a_long_one(timers):
    ts = timers("test-timers-early")
    ts.call_later(3600, lambda: None)  # the thread now sleeps for an hour
    quick = threading.Event()
    ts.call_later(0, quick.set)
    assert quick.wait(timeout=5)  # woken for the new earliest one


def test_cancel_racing_the_call_runs_it_at_most_once_and_says_which(timers):
    """cancel() and the timer thread race on every timer: True means it never ran."""
    ts = timers("test-timers-race")
    hits = [0] * 300
    timers = [ts.call_later(0, hits.__setitem__, i, 1) for i in range(300)]
    said = [t.cancel() for t in timers]
    for t in timers:
        assert t.wait(timeout=5)
    assert all(h == (0 if c else 1) for h, c in zip(hits, said, strict=True))


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf, -math.inf, "1", None, True])
def test_a_delay_that_is_not_a_finite_non_negative_number_is_refused(bad):
    with pytest.raises(ValueError, match="timer delay"):
        call_later(bad, lambda: None)


def test_ticks_share_one_thread():
    """A hundred pending timers are one thread, not a hundred (threading.Timer's cost)."""
    before = threading.active_count()
    gate = threading.Event()
    timers = [call_later(30, gate.set) for _ in range(100)]
    try:
        assert threading.active_count() <= before + 1
        assert sum(t.name == "crucible-timers" for t in threading.enumerate()) == 1
        assert service().pending() >= 100
    finally:
        for t in timers:
            t.cancel()
    assert not gate.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_gets_timers_of_its_own_and_none_of_the_parents(timers):
    ts = timers("test-timers-fork")
    ts.call_later(3600, lambda: None)  # the parent's: must not run, or block, in the child
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fired = threading.Event()
            ok = ts.pending() == 0 and ts.call_later(0, fired.set).wait(5) and fired.is_set()
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    assert ts.pending() == 1  # the parent's timer is still the parent's


def test_a_closed_service_ends_its_thread_and_refuses_new_timers(timers):
    ts = timers("test-timers-close")
    ran = threading.Event()
    ts.call_later(0, lambda: None).wait(5)
    thread = next(t for t in threading.enumerate() if t.name == "test-timers-close")
    late = ts.call_later(3600, ran.set)
    ts.close()
    assert late.wait(timeout=0) and not late.is_alive()  # cancelled: nobody waits on it forever
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert not ran.is_set()
    with pytest.raises(RuntimeError, match="closed"):
        ts.call_later(0, ran.set)
