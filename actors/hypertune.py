"""The Hypertune actor's place in the tree.

For now a pass-through: it listens to the ``metrics`` and ``anomalies`` topics and records
what it sees (how many snapshots and anomalies, the latest snapshot) without acting on the
phase. Telemetry-driven control, the learning policy and cross-run tuning replace this
body; its position in the tree and its subscriptions stay.
"""

from __future__ import annotations

from typing import Any

from actors.base import Actor


class Hypertune(Actor):
    """Records metric snapshots and anomalies; takes no control action yet."""

    def __init__(self, experiment_id: str, enabled: bool = False, **config: Any) -> None:
        super().__init__()
        self.experiment_id = experiment_id
        self.enabled = enabled
        self.config = config
        self.snapshots = 0
        self.anomalies = 0
        self.periods = 0
        self.last: dict[str, Any] | None = None

    def handle_metrics(self, msg: dict[str, Any]) -> None:
        self.snapshots += 1
        self.last = msg

    def handle_anomalies(self, msg: dict[str, Any]) -> None:
        self.anomalies += len(msg.get("items", ()))

    def handle_anomaly_period(self, msg: dict[str, Any]) -> None:
        if msg.get("state") == "start":
            self.periods += 1

    def handle_get(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {"enabled": self.enabled, "acting": False, "snapshots_seen": self.snapshots,
                "anomalies_seen": self.anomalies, "anomaly_periods_seen": self.periods, "actions": []}
