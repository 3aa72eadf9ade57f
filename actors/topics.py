"""Topics (pub/sub): ``publish`` encodes a message once and fans the same bytes out.

A :class:`Topics` object is one namespace (each experiment gets its own, so two
experiments never see each other's events); the module-level functions use a
default instance. Dead subscribers are pruned when they die.
"""

from __future__ import annotations

import threading
from typing import Any

from actors.base import ActorRef, on_death
from actors.messages import encode
from actors.registry import Registry


class NamedTarget:
    """A subscriber addressed by registered name: survives restarts (messages stash meanwhile)."""

    __slots__ = ("name", "registry")

    def __init__(self, name: str, registry: Registry) -> None:
        self.name = name
        self.registry = registry

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NamedTarget) and other.name == self.name and other.registry is self.registry

    def __hash__(self) -> int:
        return hash((self.name, id(self.registry)))

    def __repr__(self) -> str:
        return f"<NamedTarget {self.name}>"

    def tell_bytes(self, data: bytes) -> bool:
        """Send to whoever holds the name; False if undelivered (the registry counts and logs it)."""
        return self.registry.send_bytes(self.name, data)

    def tell(self, msg: dict[str, Any], *, urgent: bool = False) -> bool:
        """Send a dict; ``urgent`` (see ``ActorRef.ask``) reaches the actor that holds the name
        now. With none there (restarting), it is stashed like any message, as not urgent."""
        if urgent:
            ref = self.registry.whereis(self.name)
            if ref is not None and ref.tell(msg, urgent=True):
                return True
        return self.tell_bytes(encode(msg))

    def queue_size(self) -> int:
        return self.registry.queue_size(self.name)


class Topics:
    """A set of named topics and their subscribers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, tuple[ActorRef | NamedTarget, ...]] = {}
        self.published = 0

    def subscribe(self, topic: str, ref: ActorRef) -> None:
        """Add ``ref`` to ``topic`` (idempotent); it is removed automatically when it dies."""
        with self._lock:
            cur = self._subs.get(topic, ())
            if ref in cur:
                return
            self._subs[topic] = (*cur, ref)
        on_death(ref, lambda _reason, t=topic, r=ref: self.unsubscribe(t, r))

    def subscribe_name(self, topic: str, name: str, registry: Registry) -> None:
        """Subscribe whoever holds ``name`` in ``registry``, across its restarts."""
        target = NamedTarget(name, registry)
        with self._lock:
            cur = self._subs.get(topic, ())
            if target not in cur:
                self._subs[topic] = (*cur, target)

    def unsubscribe_name(self, topic: str, name: str, registry: Registry) -> None:
        self.unsubscribe(topic, NamedTarget(name, registry))

    def backlog(self, topic: str) -> int:
        """The largest mailbox among the topic's subscribers: how far behind the slowest is."""
        return max((s.queue_size() for s in self._subs.get(topic, ())), default=0)

    def unsubscribe(self, topic: str, ref: ActorRef | NamedTarget) -> None:
        with self._lock:
            cur = self._subs.get(topic, ())
            self._subs[topic] = tuple(r for r in cur if r != ref)

    def subscribers(self, topic: str) -> tuple[ActorRef | NamedTarget, ...]:
        with self._lock:
            return self._subs.get(topic, ())

    def publish(self, topic: str, msg: dict[str, Any]) -> int:
        """Encode once, send to every subscriber; return how many received it."""
        return self.publish_bytes(topic, encode(msg))

    def publish_bytes(self, topic: str, data: bytes) -> int:
        """Send encoded bytes to every subscriber; return how many took them (a subscriber by
        name that is not running is counted undelivered by its registry)."""
        subs = self._subs.get(topic, ())  # tuple swap under lock: a consistent snapshot
        took = sum(1 for ref in subs if ref.tell_bytes(data) is not False)
        self.published += 1
        return took


default_topics = Topics()


def subscribe(topic: str, ref: ActorRef) -> None:
    default_topics.subscribe(topic, ref)


def unsubscribe(topic: str, ref: ActorRef) -> None:
    default_topics.unsubscribe(topic, ref)


def publish(topic: str, msg: dict[str, Any]) -> int:
    return default_topics.publish(topic, msg)
