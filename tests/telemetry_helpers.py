"""Shared helpers for telemetry tests."""

from __future__ import annotations

import threading
from typing import Any

from actors import Actor


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
