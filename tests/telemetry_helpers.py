"""Shared helpers for telemetry tests."""

from __future__ import annotations

import threading
from typing import Any

from actors import Actor, Topics
from actors.recorder import Recorder
from telemetry.emitter import Emitter


class BatchProbe(Actor):
    """Counts event batches and sets an Event on the first one; can be held on a gate."""

    def __init__(self, got: threading.Event | None = None, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.got, self.gate = got, gate
        self.events = 0
        self.batches = 0

    def handle_events(self, msg: dict[str, Any]) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.events += int(msg["n"])
        self.batches += 1
        if self.got is not None:
            self.got.set()

    def handle_counters(self, msg: dict[str, Any]) -> None:
        pass

    def handle_count(self, msg: dict[str, Any]) -> list[int]:
        return [self.events, self.batches]


def recorded(root: Any, batch_size: int, **recorder: Any) -> tuple[Any, Emitter]:
    """A Recorder of run ``exp/run`` under ``root`` (``recorder``: its options) and an Emitter
    whose batches of ``batch_size`` go to it: the pipeline most Recorder tests drive."""
    topics = Topics()
    rec = Recorder.start(root, "exp", "run", **recorder)
    topics.subscribe("events", rec)
    return rec, Emitter(topics, "exp", "run", batch_size=batch_size)
