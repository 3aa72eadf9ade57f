"""Name registry: ``register(name, ref)`` / ``whereis(name)``; a name is freed when its actor dies.

A :class:`Registry` is an object so that two Labs in one process never share names;
the module-level functions use a default instance.

Stash during restarts: a supervisor that restarts a named child marks the name as
*restarting*. Messages sent with :meth:`Registry.send` while the name is restarting
are stashed (up to ``stash_limit``, then counted as dropped and logged) and delivered
in order to the replacement as soon as it registers. ``whereis`` returns None while a
name is restarting; ``tell`` on an old ref to the dead actor is dropped, as in Erlang.

Nothing sent to a name is lost silently: a send to a name that is not running (and not
restarting), a message left in the mailbox of a named actor that stops for good, a full
stash, a stash dropped because the name will not come back: each is counted per name in
:meth:`Registry.undelivered` and logged (a warning per name at most every
``UNDELIVERED_LOG_S`` seconds, with the running count).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from actors.base import NORMAL, SHUTDOWN, ActorRef, on_death
from actors.log import get_logger
from actors.messages import encode
from actors.timers import check_timeout

log = get_logger("actors.registry")
CLEAN_EXITS = (NORMAL, SHUTDOWN)  # an actor that left on purpose: later sends are not loss

UNDELIVERED_LOG_S = 10.0  # at most one warning per name this often about undelivered messages


class NameTaken(ValueError):
    """The name is already registered to a live actor."""


class Registry:
    """A namespace of actor names."""

    def __init__(self, stash_limit: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._names: dict[str, ActorRef] = {}
        self._stash: dict[str, list[bytes]] = {}
        self.stash_limit = stash_limit
        self.stash_dropped = 0  # stashed messages dropped (full, or the name never came back)
        self._undelivered: dict[str, int] = {}
        self._warned_at: dict[str, float] = {}
        self._retired: set[str] = set()  # names whose actor exited cleanly for good (a shutdown)
        self._after_exit: dict[str, int] = {}

    def undelivered(self) -> dict[str, int]:
        """Messages sent to each name that never reached an actor of that name (see module docs)."""
        with self._lock:
            return dict(self._undelivered)

    def sent_after_exit(self) -> dict[str, int]:
        """Messages to each name after its actor had exited cleanly for good: a tree shutting
        down in reverse start order, an observer stopped before what feeds it. Counted apart
        from :meth:`undelivered` (which is loss nobody asked for) and not warned about."""
        with self._lock:
            return dict(self._after_exit)

    def _lost(self, name: str, n: int, why: str) -> None:
        """Count ``n`` undelivered messages for ``name`` (caller holds the lock); warn, rate-limited."""
        if n <= 0:
            return
        total = self._undelivered[name] = self._undelivered.get(name, 0) + n
        now = time.monotonic()
        last = self._warned_at.get(name)
        if last is None or now - last >= UNDELIVERED_LOG_S:
            self._warned_at[name] = now
            log.warning("messages to a name not delivered", name=name, count=n, total=total, why=why)

    def register(self, name: str, ref: ActorRef, restarting_if: Callable[[str], bool] | None = None) -> None:
        """Bind ``name`` to ``ref``; deliver anything stashed for the name; free it on death.

        ``restarting_if(reason)``, when given, decides at the moment of death (atomically
        with freeing the name) whether the name starts stashing for a replacement.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"actor name must be a non-empty string, got {name!r}")
        with self._lock:
            cur = self._names.get(name)
            if cur is not None and cur.is_alive() and cur != ref:
                raise NameTaken(f"name {name!r} is already registered to {cur!r}")
            self._names[name] = ref
            self._retired.discard(name)
            for data in self._stash.pop(name, []):  # under the lock: stash before new sends
                ref.tell_bytes(data)
            self._registered.notify_all()
        on_death(ref, lambda reason, n=name, r=ref: self._release(n, r, reason, restarting_if))

    def _release(self, name: str, ref: ActorRef, reason: str, restarting_if: Callable[[str], bool] | None) -> None:
        with self._lock:
            if self._names.get(name) == ref:
                del self._names[name]
                held = self._stash.pop(name, [])  # sent while it was dying
                if restarting_if is not None and restarting_if(reason):
                    # under the lock: nothing sent to the name can slip between these
                    self._stash[name] = ref._life.drain_leftovers() + held
                else:  # for good: what it never read, and what waited for its fate, is lost
                    self.stash_dropped += len(held)
                    left = ref._life.drain_leftovers()
                    if reason in CLEAN_EXITS:
                        self._retired.add(name)
                        self._count_after_exit(name, len(held) + len(left))
                    else:
                        self._lost(name, len(held) + len(left), f"actor exited ({reason}) before reading them")

    def _count_after_exit(self, name: str, n: int) -> None:
        if n > 0:
            self._after_exit[name] = self._after_exit.get(name, 0) + n

    def unregister(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)
            self._lost(name, len(self._stash.pop(name, ())), "name unregistered while restarting")

    def whereis(self, name: str) -> ActorRef | None:
        with self._lock:
            ref = self._names.get(name)
        return ref if ref is not None and ref.is_alive() else None

    def await_name(self, name: str, timeout: float | None = None, *, not_urn: str | None = None) -> ActorRef | None:
        """Wait until ``name`` is bound to a live actor (other than ``not_urn``); None on timeout.

        ``timeout`` as for :meth:`ActorRef.ask` (None or inf: no limit; ValueError when out of range).
        """
        timeout = check_timeout(timeout)

        def ready() -> ActorRef | None:
            ref = self._names.get(name)
            return ref if ref is not None and ref.is_alive() and ref.urn != not_urn else None

        with self._registered:
            self._registered.wait_for(ready, timeout)
            return ready()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, r in self._names.items() if r.is_alive())

    def mark_restarting(self, name: str) -> None:
        """Start stashing messages for ``name`` until an actor registers it again."""
        with self._lock:
            self._stash.setdefault(name, [])

    def queue_size(self, name: str) -> int:
        """Mailbox size of the actor behind ``name`` plus anything stashed for it."""
        with self._lock:
            ref = self._names.get(name)
            stashed = len(self._stash.get(name, ()))
        return stashed + (ref.queue_size() if ref is not None and ref.is_alive() else 0)

    def cancel_restarting(self, name: str) -> int:
        """The name will not come back: drop its stash; return how many were dropped."""
        with self._lock:
            lost = len(self._stash.pop(name, []))
            self.stash_dropped += lost
            self._lost(name, lost, "stash dropped: name not restarted")
        return lost

    def send(self, name: str, msg: dict[str, Any]) -> bool:
        """Send to a name: delivered, stashed while restarting, else False (no such name:
        counted in :meth:`undelivered`)."""
        return self.send_bytes(name, encode(msg))

    def send_bytes(self, name: str, data: bytes) -> bool:
        """Send encoded bytes to a name (see :meth:`send`).

        The tell happens under the registry lock, so a message is either queued before
        a dying actor's mailbox is drained (and carried over) or stashed: never lost
        in between.
        """
        with self._lock:
            ref = self._names.get(name)
            if ref is not None:
                if ref.tell_bytes(data):
                    return True
                stash = self._stash.setdefault(name, [])  # dying: held until its fate is known
            else:
                stash = self._stash.get(name)
                if stash is None:
                    if name in self._retired:
                        self._count_after_exit(name, 1)
                    else:
                        self._lost(name, 1, "no actor of that name is running")
                    return False
            if len(stash) >= self.stash_limit:
                self.stash_dropped += 1
                self._lost(name, 1, f"stash full ({self.stash_limit} messages)")
                return False
            stash.append(data)
            return True


default_registry = Registry()


def register(name: str, ref: ActorRef) -> None:
    default_registry.register(name, ref)


def unregister(name: str) -> None:
    default_registry.unregister(name)


def whereis(name: str) -> ActorRef | None:
    return default_registry.whereis(name)


def send(name: str, msg: dict[str, Any]) -> bool:
    return default_registry.send(name, msg)
