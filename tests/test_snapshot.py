import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.snapshot import Snapshot


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_reading_is_a_copy_with_its_age():
    clock = Clock()
    snap = Snapshot(clock)
    assert snap.read(max_age=1.0).stale and snap.read().value is None
    figures = {"events": 3, "phases": {"a": {"best": 1.0}}}
    snap.publish(figures)
    figures["phases"]["a"]["best"] = 99.0  # the publisher goes on mutating its own dict
    clock.now += 0.5
    r = snap.read(max_age=1.0)
    assert (r.value, r.age_s, r.stale) == ({"events": 3, "phases": {"a": {"best": 1.0}}}, 0.5, False)
    r.value["events"] = -1  # and a reader gets its own copy
    assert snap.read(max_age=1.0).value["events"] == 3
    clock.now += 1.0
    old = snap.read(max_age=1.0)  # nothing to refresh it with: answered at once, stale, with its age
    assert old.stale and old.age_s == 1.5 and old.value["events"] == 3
    assert old.flags() == {"stale": True, "age_s": 1.5}


@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 10), st.integers(0, 100)), min_size=1, max_size=30),
    st.floats(0.01, 5),
)
def test_stale_means_older_than_max_age(steps, max_age):
    clock = Clock()
    snap = Snapshot(clock)
    last, at = None, None
    for publish, dt, value in steps:
        if publish:
            snap.publish(value)
            last, at = value, clock.now
        clock.now += dt
        r = snap.read(max_age=max_age)
        assert r.value == last
        if last is None:
            assert r.stale and r.age_s is None
        else:
            assert r.age_s == clock.now - at and r.stale == (clock.now - at > max_age)


def test_one_refresh_at_a_time_and_reads_never_wait_longer_than_asked():
    snap = Snapshot()
    gate, calls = threading.Event(), []

    def slow_fetch():
        calls.append(1)
        gate.wait(30)
        return {"n": len(calls)}

    t0 = time.monotonic()
    first = snap.read(slow_fetch, max_age=0.0, wait=0.1)  # starts the fetch, waits 0.1 s for it
    assert first.stale and first.value is None and time.monotonic() - t0 >= 0.1
    readers = [
        threading.Thread(target=snap.read, args=(slow_fetch,), kwargs={"max_age": 0.0, "wait": 0.1}) for _ in range(8)
    ]
    t1 = time.monotonic()
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    assert time.monotonic() - t1 < 5  # the fetch under way began over 0.1 s ago: nobody waited for it
    assert len(calls) == 1  # and nobody piled another request on the busy actor
    gate.set()  # the actor answers: its figures are published for every later reader
    assert snap.wait_published(0, timeout=10)
    got = snap.read(max_age=10.0)
    assert got.value == {"n": 1} and not got.stale and len(calls) == 1


def test_reads_do_not_wait_on_an_actor_whose_last_answer_was_late():
    snap = Snapshot()
    # an actor 3 s late, a read that would wait 2.5 s: the gap leaves room for a loaded machine
    snap.read(lambda: threading.Event().wait(3.0) or {"n": 1}, max_age=0.0, wait=0.0)
    assert snap.wait_published(0, timeout=30)
    gate = threading.Event()
    t0 = time.monotonic()
    r = snap.read(lambda: gate.wait(30) and {"n": 2}, max_age=0.0, wait=2.5)
    assert time.monotonic() - t0 < 2.5 and r.value == {"n": 1} and r.stale  # not worth waiting for
    gate.set()
    assert snap.wait_published(1, timeout=10)
    quick = snap.read(lambda: {"n": 3}, max_age=0.0, wait=30)  # it answered fast again: reads wait again
    assert quick.value == {"n": 3} and not quick.stale


@pytest.mark.parametrize("with_fetch", [False, True])
def test_a_value_published_after_the_one_read_does_not_make_it_fresh(with_fetch):
    """A publisher may run between the read taking the old value and the read judging it:
    the old value is still stale (its age says so), whatever was published after it."""
    t = [0.0]
    cut_in: list = []

    def clock():
        if cut_in:  # another thread publishes right as the reader takes the value's age
            cut_in.pop()()
        return t[0]

    snap = Snapshot(clock=clock)
    snap.publish({"v": 1})
    t[0] = 5.0
    cut_in.append(lambda: snap.publish({"v": 2}))
    fetch = (lambda: None) if with_fetch else None  # a refresh that brings nothing in time
    r = snap.read(fetch, max_age=1.0, wait=0)
    if r.value == {"v": 1}:
        assert r.stale and r.age_s == 5.0
    else:  # the newer value itself, published during the read: fresh
        assert r.value == {"v": 2} and not r.stale
