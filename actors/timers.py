"""One timer thread per process: Erlang's ``send_after`` without an OS thread per tick.

Why: ``threading.Timer`` starts a thread for every timer. A metrics actor publishes at
1 Hz and a recorder fsyncs on a tick, so each experiment started a few threads a second
just to wait; a lab daemon that hosts experiments for months started millions of them,
each allocating a stack, a thread state and a dozen Python objects that live as long as
the wait, among the longer-lived objects of the experiments. Like the BEAM's timer wheel,
one thread here keeps every pending timer in a heap and runs each callback when it is due.

Callbacks run on that thread, so they must be quick and must not block: the ones here only
queue a message (:meth:`actors.base.ActorRef.tell_unless_stopping`). A callback that raises
is logged and the thread goes on with the others.

Bounds: a delay (and every timeout an actor call takes, see :func:`check_timeout`) is a
finite number of seconds in ``[0, MAX_DELAY_S]``. ``threading`` waits raise OverflowError
past ``threading.TIMEOUT_MAX``; refusing such values where they are given keeps the error
with the caller instead of in this thread or in an actor's.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from actors.log import get_logger

log = get_logger("actors.timers")

MAX_DELAY_S: float = min(365 * 86400.0, threading.TIMEOUT_MAX / 2)
"""Longest timer delay or wait accepted: one year (half of ``threading.TIMEOUT_MAX`` where that
is less), so no wait built from it can overflow ``threading``'s limit, rounding included."""

_MAX_WAIT_S = min(3600.0, MAX_DELAY_S)  # the timer thread sleeps at most this long at a time


def _bad_seconds(value: object) -> bool:
    """Not a finite real number of seconds in ``[0, MAX_DELAY_S]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    try:
        return not (0 <= value <= MAX_DELAY_S)  # NaN compares False: refused as well
    except OverflowError:  # an int too large for a float
        return True


def check_delay(value: object, name: str = "delay") -> float:
    """``value`` as seconds, or ValueError naming ``name`` and the range (finite, 0..MAX_DELAY_S)."""
    if _bad_seconds(value):
        raise ValueError(f"{name} must be a finite number of seconds in [0, {MAX_DELAY_S:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_timeout(value: object, name: str = "timeout") -> float | None:
    """A blocking call's timeout: None or ``math.inf`` mean no timeout (None is returned), else as
    :func:`check_delay`. ``threading`` raises OverflowError for inf and past TIMEOUT_MAX."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    if _bad_seconds(value):
        raise ValueError(
            f"{name} must be None or inf (no timeout) or a number of seconds in [0, {MAX_DELAY_S:g}], got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


class Timer:
    """A pending call; :meth:`cancel` takes it back if it has not run yet."""

    __slots__ = ("_done", "_lock", "_state", "args", "due", "fn")

    def __init__(self, due: float, fn: Callable[..., Any], args: tuple[Any, ...], lock: threading.Condition) -> None:
        self.due = due
        self.fn = fn
        self.args = args
        # pending -> running -> done, or pending -> cancelled; changed under the service's lock
        self._state = "pending"
        self._lock = lock
        self._done: threading.Event | None = None  # made only for a caller of wait()

    def cancel(self) -> bool:
        """Take the call back; True if it will not run (False: it has run or is running)."""
        with self._lock:
            if self._state == "pending":
                self._finish("cancelled")
                self.fn, self.args = _noop, ()  # drop what the call would have kept alive
            return self._state == "cancelled"

    def is_alive(self) -> bool:
        """Not yet run to its end nor cancelled (as ``threading.Timer.is_alive``)."""
        return self._state in ("pending", "running")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the call has run or was cancelled; False if ``timeout`` passed first."""
        timeout = check_timeout(timeout)
        with self._lock:
            if self._state in ("done", "cancelled"):
                return True
            if self._done is None:
                self._done = threading.Event()
            done = self._done
        return done.wait(timeout)

    def _finish(self, state: str) -> None:
        self._state = state
        if self._done is not None:
            self._done.set()

    def __repr__(self) -> str:
        return f"<Timer {self._state} due={self.due:.3f}>"


def _noop() -> None:
    return None


class TimerService:
    """A heap of pending :class:`Timer` s and the one daemon thread that runs them when due.

    Its clock is ``time.monotonic``: a wall-clock jump neither fires timers early nor holds
    them back.
    """

    def __init__(self, name: str = "crucible-timers") -> None:
        self.name = name
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()  # ties keep the order the timers were set in
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False
        if hasattr(os, "register_at_fork"):
            me = weakref.WeakMethod(self._after_fork)
            os.register_at_fork(after_in_child=lambda: (m := me()) and m())

    def _after_fork(self) -> None:
        """A forked child has the heap (the parent's timers) but not the thread, and maybe a
        lock the thread held at the fork: it starts empty, with a lock of its own."""
        self._heap = []
        self._cond = threading.Condition(threading.Lock())
        self._thread = None

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        """Run ``fn(*args)`` on the timer thread after ``delay`` seconds (0 to :data:`MAX_DELAY_S`)."""
        timer = Timer(time.monotonic() + check_delay(delay, "timer delay"), fn, args, self._cond)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"timer service {self.name!r} is closed")
            self._ensure_thread()
            heapq.heappush(self._heap, (timer.due, next(self._seq), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()  # a new earliest timer: the thread sleeps until it instead
        return timer

    def close(self) -> None:
        """End the thread; pending timers are cancelled (for services other than the process's)."""
        with self._cond:
            self._closed = True
            for _, _, timer in self._heap:
                if timer._state == "pending":
                    timer._finish("cancelled")
            self._heap.clear()
            self._cond.notify()

    def pending(self) -> int:
        """Timers set and not yet run, cancelled ones included until their due time."""
        with self._cond:
            return len(self._heap)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """The thread: sleep until the earliest timer is due, run it, go on. Nothing a timer
        holds may end it (a thread that died would leave every later timer unrun)."""
        while True:
            with self._cond:
                timer = self._next_due()
                if timer is None:
                    return
                timer._state = "running"  # under the lock: cancel() from here on returns False
                fn, args = timer.fn, timer.args
                timer.fn, timer.args = _noop, ()
            try:
                fn(*args)
            except BaseException:  # one bad callback (even a sys.exit) must not stop the rest
                log.exception("timer callback failed", callback=getattr(fn, "__qualname__", repr(fn)))
            finally:
                with self._cond:
                    timer._finish("done")

    def _next_due(self) -> Timer | None:
        """Wait (lock held) for the next pending timer to be due and pop it; None once closed."""
        while True:
            if self._closed:
                return None
            if not self._heap:
                self._cond.wait()
                continue
            due, _, head = self._heap[0]
            wait = due - time.monotonic()
            if not wait > 0:  # due (a NaN due time, which only a hand-made Timer can have, too)
                heapq.heappop(self._heap)
                if head._state == "pending":
                    return head
                continue
            # in slices: a far (even infinite) due time never asks threading for a wait past its limit
            self._cond.wait(min(wait, _MAX_WAIT_S))


_service = TimerService()


def call_later(delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
    """Run ``fn(*args)`` after ``delay`` seconds on the process's timer thread (see the module)."""
    return _service.call_later(delay, fn, *args)


def service() -> TimerService:
    """The process's timer service (tests and diagnostics: :meth:`TimerService.pending`)."""
    return _service
