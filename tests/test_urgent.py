"""Urgent messages: a handler busy with long work learns that control waits, and returns early."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Actor
from actors.base import URGENT, ActorDeadError
from actors.messages import encode
from actors.registry import Registry
from actors.topics import NamedTarget


class Busy(Actor):
    """``probe`` blocks until the test opens the gate, then reports ``should_yield()``;
    ``work`` runs chunks until it is told to yield (or ``limit`` chunks)."""

    last: Busy | None = None  # the newest instance, for the test to drive its gates

    def __init__(self) -> None:
        super().__init__()
        Busy.last = self
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.chunk = threading.Event()  # never set: each chunk of ``work`` is a bounded wait on it
        self.seen: list[Any] = []

    def handle_probe(self, msg: dict[str, Any]) -> bool:
        self.entered.set()
        assert self.gate.wait(30)
        return self.should_yield()

    def handle_work(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.entered.set()
        chunks = 0
        while chunks < msg["limit"] and not self.should_yield():
            self.chunk.wait(0.001)  # one chunk of work
            chunks += 1
        return {"chunks": chunks, "yielded": self.should_yield()}

    def handle_note(self, msg: dict[str, Any]) -> None:
        self.seen.append(msg)

    def handle_seen(self, msg: dict[str, Any]) -> list[Any]:
        return self.seen


@settings(max_examples=30, deadline=None)
@given(st.lists(st.booleans(), max_size=6))
def test_a_handler_is_told_to_yield_exactly_when_an_urgent_message_waits(urgent):
    ref = Busy.start()
    actor = Busy.last
    try:
        answer: list[bool] = []
        t = threading.Thread(target=lambda: answer.append(ref.ask({"kind": "probe"}, timeout=30)))
        t.start()
        assert actor.entered.wait(30)
        for i, u in enumerate(urgent):
            ref.tell({"kind": "note", "i": i}, urgent=u)
        actor.gate.set()
        t.join(30)
        assert answer == [any(urgent)]
        # every message arrives in order, without the urgent marker; once taken, nothing waits
        assert ref.ask({"kind": "seen"}, timeout=30) == [{"kind": "note", "i": i} for i in range(len(urgent))]
        actor.entered.clear()
        actor.gate.clear()
        t = threading.Thread(target=lambda: answer.append(ref.ask({"kind": "probe"}, timeout=30)))
        t.start()
        assert actor.entered.wait(30)
        actor.gate.set()
        t.join(30)
        assert answer[1] is False
        assert ref._life.urgent == set()
    finally:
        actor.gate.set()
        ref.stop(timeout=30)


def test_long_work_ends_at_its_next_chunk_when_an_urgent_ask_comes():
    ref = Busy.start()
    actor = Busy.last
    try:
        ref.tell({"kind": "work", "limit": 10**9})  # ~ forever without a reason to yield
        assert actor.entered.wait(30)
        assert ref.ask({"kind": "seen"}, timeout=60, urgent=True) == []  # answered: the work gave way
        assert ref._life.urgent == set()
        # the same work with a plain ask behind it runs to its limit
        actor.entered.clear()
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(ref.ask({"kind": "work", "limit": 50}, timeout=60)))
        t.start()
        assert actor.entered.wait(30)
        ref.ask({"kind": "seen"}, timeout=60)
        t.join(60)
        assert done == [{"chunks": 50, "yielded": False}]
    finally:
        ref.stop(timeout=30)


def test_a_pending_stop_or_a_kill_tells_a_long_handler_to_yield():
    ref = Busy.start()
    actor = Busy.last
    ref.tell({"kind": "work", "limit": 10**9})
    assert actor.entered.wait(30)
    assert ref.stop(timeout=60)  # the work ends at a chunk, then the stop is handled
    assert ref.exit_reason == "normal"

    ref = Busy.start()
    actor = Busy.last
    reply: list[Any] = []
    t = threading.Thread(target=lambda: reply.append(actor.handle_work({"limit": 10**9})))
    ref.kill()
    t.start()  # the work of a killed actor (an abandoned thread) yields at once
    t.join(60)
    assert reply == [{"chunks": 0, "yielded": True}]


def test_an_urgent_message_to_a_dead_actor_leaves_nothing_waiting():
    ref = Busy.start()
    ref.stop(timeout=30)
    with pytest.raises(ActorDeadError):
        ref.ask({"kind": "seen"}, timeout=5, urgent=True)
    ref.tell({"kind": "note"}, urgent=True)  # dropped, as a tell to a dead actor is
    assert ref._life.urgent == set()


def test_an_urgent_message_that_cannot_travel_or_has_no_kind_leaves_nothing_waiting():
    ref = Busy.start()
    try:
        with pytest.raises(TypeError):
            ref.tell({"kind": "note", "v": object()}, urgent=True)  # cannot be encoded: never sent
        with pytest.raises(TypeError):
            ref.ask({"kind": "note", "why": "\udcff"}, timeout=5, urgent=True)  # a lone surrogate
        assert ref.tell({"no": "kind"}, urgent=True)  # sent, then dropped on receipt
        ref.tell_bytes(encode({"kind": "note", URGENT: [1, 2]}))  # a token that is none: no crash
        assert ref.ask({"kind": "seen"}, timeout=30) == [{"kind": "note"}]
        assert ref._life.urgent == set() and ref.is_alive()
    finally:
        ref.stop(timeout=30)


def test_an_urgent_message_to_a_registered_name_reaches_the_actor_holding_it():
    registry = Registry()
    ref = Busy.start()
    actor = Busy.last
    assert actor is not None
    registry.register("worker", ref)
    target = NamedTarget("worker", registry)
    try:
        done: list[Any] = []
        t = threading.Thread(target=lambda: done.append(ref.ask({"kind": "work", "limit": 10**9}, timeout=120)))
        t.start()
        assert actor.entered.wait(30)
        assert target.tell({"kind": "note", "v": 1}, urgent=True)
        t.join(120)
        assert done and done[0]["yielded"] is True
        assert ref.ask({"kind": "seen"}, timeout=30) == [{"kind": "note", "v": 1}]
    finally:
        ref.stop(timeout=30)
    assert not NamedTarget("nobody", registry).tell({"kind": "note"}, urgent=True)  # undelivered, counted
