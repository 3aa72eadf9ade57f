"""EventConsumer: the one place where an actor's incoming event batches are checked.

A message can decode and still not be an events batch a consumer can use: a column of the
wrong length, a string code outside its table, a ``counters`` figure that is not a number.
Every actor that takes ``events`` batches (StreamingMetrics, AnomalyDetection, Sampler,
Recorder; Hypertune too) subclasses :class:`EventConsumer` and implements ``on_events``
instead of ``handle_events``: the batch shape is checked once, here, with
:func:`telemetry.schema.check_batch`. A batch that fails is counted in ``bad_batches`` and
logged, never handled, so no sender can crash a consumer with a malformed batch. The
``counters`` and ``sampling`` messages that travel with the batches are checked the same
way by :meth:`EventConsumer.accept`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.base import Actor
from actors.log import get_logger
from telemetry.schema import EVENTS, EventBatch, SchemaError, check_batch, check_counters

log = get_logger("actors.consumer")


class EventConsumer(Actor):
    """An actor that consumes ``events`` batches; see the module docs."""

    def __init__(self) -> None:
        super().__init__()
        self.bad_batches = 0

    def accept(self, check: Callable[[Any], None], msg: Any, what: str) -> bool:
        """Run ``check`` on ``msg``; count and log a refusal (``False``) instead of raising."""
        try:
            check(msg)
        except SchemaError as exc:
            self.bad_batches += 1
            log.warning(
                "malformed message dropped",
                actor=type(self).__name__,
                kind=what,
                error=str(exc),
                bad_batches=self.bad_batches,
            )
            return False
        return True

    def handle_events(self, msg: dict[str, Any]) -> Any:
        if not self.accept(check_batch, msg, EVENTS):
            return None
        return self.on_events(msg)

    def on_events(self, batch: EventBatch) -> Any:
        """Handle one checked batch (every column present, of length ``n``; codes in range)."""
        raise NotImplementedError

    def counters_ok(self, msg: dict[str, Any]) -> bool:
        """Whether a ``counters`` message carries a valid table of counts (counted if not)."""
        return self.accept(lambda m: check_counters(m.get("counters", {})), msg, "counters")
