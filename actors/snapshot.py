"""Snapshots: the latest figures an actor published, readable from any thread without a message.

An ``ask`` waits behind everything already in the actor's mailbox; a Recorder that is
64 batches behind answers a ``summary`` ask only when it has written them all, which under
load takes seconds. Readers that must stay prompt (a status panel, a Prometheus scrape, a
Lab listing) read a :class:`Snapshot` instead: a slot holding the latest value and when it
was taken. An actor can publish into it as it works (the PhaseActor does, at its safe
points); otherwise the reads keep it fresh by asking.

When the latest value is older than the reader's ``max_age`` (the actor does not publish,
has been idle, or is busy), :meth:`Snapshot.read` starts one background fetch (an ask on a
helper thread; never more than one in flight, so readers never pile requests into a busy
mailbox) and waits at most ``wait`` seconds for it. If nothing newer arrives in time the
reading is returned anyway, marked ``stale`` with its age: a read never blocks longer than
``wait``, and never passes old figures off as current.

Values are published as msgpack bytes (:func:`actors.messages.encode`) and decoded per read,
so a reader always gets its own copy, never a dict the actor is still mutating.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.log import get_logger
from actors.messages import decode, encode

log = get_logger("actors.snapshot")

MAX_AGE_S = 1.0  # a reading older than this is refreshed (and stale if the refresh does not come in time)
WAIT_S = 0.25  # how long a read waits for a refresh before it answers with what it has


@dataclass(frozen=True)
class Reading:
    """One read of a snapshot: ``value`` (None if nothing was ever published), its age, staleness."""

    value: Any
    age_s: float | None
    stale: bool

    def flags(self) -> dict[str, Any]:
        """The ``stale`` / ``age_s`` keys that reads add to what they return."""
        return {"stale": self.stale, "age_s": None if self.age_s is None else round(self.age_s, 3)}


class Snapshot:
    """A thread-safe slot holding the latest published value and when it was published."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._data: bytes | None = None
        self._at: float | None = None
        self._version = 0
        self._fetching = False
        self._fetch_began: float | None = None  # when the fetch under way began (time.monotonic)
        self._last_fetch_s: float | None = None  # how long the last fetch took

    # --- the publishing side (the actor's thread, or a fetch) -------------------------------------

    def publish(self, value: Any) -> None:
        """Store ``value`` (anything :func:`encode` takes) as the latest."""
        self.publish_bytes(encode(value))

    def publish_bytes(self, data: bytes) -> None:
        """Store an already-encoded value as the latest."""
        with self._cond:
            self._data, self._at = data, self._clock()
            self._version += 1
            self._cond.notify_all()

    # --- the reading side -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """How many values have been published (a reader can wait for a newer one)."""
        return self._version

    def wait_published(self, after: int, timeout: float | None = None) -> bool:
        """Block until more than ``after`` values have been published (see :attr:`version`)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._version > after, timeout)

    def latest(self) -> Reading:
        """The latest value and its age, without refreshing; ``stale`` is decided by the caller."""
        return self._latest()[0]

    def _latest(self) -> tuple[Reading, int]:
        """The latest value and the version it is: a reader compares *that* version, not the
        snapshot's, since a value published after this one was taken is not in it."""
        with self._cond:
            data, at, version = self._data, self._at, self._version
        if data is None or at is None:
            return Reading(None, None, True), version
        return Reading(decode(data), max(0.0, self._clock() - at), False), version

    def read(self, fetch: Callable[[], Any] | None = None, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> Reading:
        """The latest value if it is at most ``max_age`` old; else refresh it with ``fetch``.

        ``fetch`` (typically an ask) runs on a helper thread, one at a time; its answer is
        published when it comes. The read waits for it, but never longer than ``wait``
        seconds after the fetch began (a fetch started earlier by another reader counts), and
        not at all when the last fetch took longer than ``wait`` (the actor is busy; waiting
        would only make every reader slow). The answer is the newest value there is,
        ``stale=True`` if it is older than ``max_age`` and was published before this read
        began (so with ``max_age=0`` only a value published during the read is fresh).
        """
        r, seen = self._latest()
        if r.value is not None and r.age_s is not None and r.age_s <= max_age:
            return r
        if fetch is not None:
            self._start_fetch(fetch)
            with self._cond:
                slow = self._last_fetch_s is not None and self._last_fetch_s > wait
                if wait > 0 and self._fetch_began is not None and not slow:
                    deadline = self._fetch_began + wait
                    while self._version == seen and self._fetching and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
            r, version = self._latest()
            published_since = version > seen  # the value read, not one published after it
        else:
            published_since = False
        fresh = r.value is not None and r.age_s is not None and (r.age_s <= max_age or published_since)
        return Reading(r.value, r.age_s, not fresh)

    def _start_fetch(self, fetch: Callable[[], Any]) -> bool:
        """Start ``fetch`` on a helper thread; False if one is already under way."""
        with self._cond:
            if self._fetching:
                return False
            self._fetching = True
            self._fetch_began = time.monotonic()
        threading.Thread(target=self._run_fetch, args=(fetch,), name="snapshot-fetch", daemon=True).start()
        return True

    def _run_fetch(self, fetch: Callable[[], Any]) -> None:
        try:
            value = fetch()
        except Exception as exc:  # noqa: BLE001 - a dead or busy actor: the reading stays as it was
            log.debug("snapshot fetch failed", error=repr(exc))
            value = None
        try:
            if value is not None:
                self.publish(value)
        finally:
            with self._cond:
                self._fetching = False
                if self._fetch_began is not None:
                    self._last_fetch_s = time.monotonic() - self._fetch_began
                self._fetch_began = None
                self._cond.notify_all()
