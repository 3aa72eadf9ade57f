"""Process-level tuning for long-running actor hosts.

CPython's cyclic garbage collector periodically rescans every container object in the
process. After numpy, numba, pyarrow and friends are imported that is hundreds of
thousands of objects, and an emitting workload allocates fast enough to trigger a full
rescan every few tens of milliseconds: measured here, the collector took about 40 % of
the telemetry hot path. :func:`freeze_startup_heap` moves everything allocated so far
into the permanent generation (``gc.freeze()``, meant for exactly this), so later
collections only look at objects created afterwards, and raises the young-generation
threshold so that short-lived event rows (freed at each flush) are mostly gone before a
collection would scan them. Collection itself stays on.

That threshold has a cost of its own. CPython counts container allocations *minus*
deallocations, so a process in a steady state (a lab daemon whose experiments come and go)
barely moves the count: measured in a daemon, 2 young collections in 600 experiments and
no full one. Objects in reference cycles (an ended actor tree has a few: refs and their
actors, conditions and their locks, about 27 KB an experiment) were then never freed, and
the daemon's memory grew with every experiment. So a frozen process also collects fully
every :data:`COLLECT_EVERY_S` seconds, on the timer thread (:func:`collect_periodically`),
and hands the freed pages back (:func:`trim_heap`): tens of milliseconds every 30 s.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Any

from actors.timers import Timer, call_later

_frozen = False
YOUNG_THRESHOLD = 50_000  # CPython's default is 700 allocations
COLLECT_EVERY_S = 30.0  # a frozen process's full collection (see the module docstring)


class CollectorStats:
    """What the periodic collection has done (diagnostics and tests)."""

    def __init__(self) -> None:
        self.runs = 0
        self.last_s = 0.0  # how long the last run took
        self.ran = threading.Event()  # set after each run (cleared by whoever waits on it)


collector = CollectorStats()
_periodic: Timer | None = None
_schedule = 0  # which collect_periodically() call the pending run belongs to
_schedule_lock = threading.Lock()


def freeze_startup_heap(collect_every_s: float = COLLECT_EVERY_S) -> bool:
    """Freeze the current heap once per process (after imports) and start the periodic full
    collection that the raised threshold needs; True if it did now."""
    global _frozen
    if _frozen:
        return False
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, g1, g2)
    _frozen = True
    collect_periodically(collect_every_s)
    return True


def collect_periodically(interval_s: float = COLLECT_EVERY_S) -> None:
    """Collect fully (then :func:`trim_heap`) every ``interval_s`` seconds from now on, on the
    process's timer thread; a second call replaces the first one's schedule."""
    global _periodic, _schedule
    with _schedule_lock:
        if _periodic is not None:
            _periodic.cancel()
        _schedule += 1
        _periodic = call_later(interval_s, _collect_and_reschedule, interval_s, _schedule)


def _collect_and_reschedule(interval_s: float, schedule: int) -> None:
    global _periodic
    t0 = time.perf_counter()
    try:
        gc.collect()
        trim_heap()
    finally:
        collector.runs += 1
        collector.last_s = time.perf_counter() - t0
        with _schedule_lock:
            if schedule == _schedule:  # not replaced meanwhile
                _periodic = call_later(interval_s, _collect_and_reschedule, interval_s, schedule)
        collector.ran.set()


_libc_trim: Any = None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); True if it did.

    Why: a long-lived process whose threads come and go (a lab daemon: a dozen threads per
    experiment) leaves freed memory scattered over its malloc arenas; glibc returns it only
    from the top of the main heap on its own. Cheap enough (milliseconds) to call after each
    batch of forgotten experiments. A no-op off glibc.
    """
    global _libc_trim
    if _libc_trim is None:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - glibc only
            _libc_trim = libc.malloc_trim
            _libc_trim.argtypes, _libc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
        except (OSError, AttributeError):
            _libc_trim = False
    return bool(_libc_trim and _libc_trim(0))
