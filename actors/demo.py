"""A small supervised tree that shows restarts happening (``crucible demo``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from actors.base import Actor
from actors.log import get_logger
from actors.registry import Registry
from actors.supervision import ChildSpec, Supervisor, SupervisorRef

log = get_logger("actors.demo")


class Counter(Actor):
    """Counts ticks; its count restarts from zero when it is restarted."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def handle_tick(self, msg: dict[str, Any]) -> None:
        self.count += 1

    def handle_get(self, msg: dict[str, Any]) -> int:
        return self.count


class Flaky(Actor):
    """Crashes on every ``crash_every``-th tick: a stand-in for a buggy workload."""

    def __init__(self, crash_every: int = 7) -> None:
        super().__init__()
        self.crash_every = crash_every
        self.seen = 0

    def handle_tick(self, msg: dict[str, Any]) -> None:
        self.seen += 1
        if self.seen % self.crash_every == 0:
            raise RuntimeError(f"flaky worker failed on tick {msg['n']}")


def run_demo(seconds: float = 3.0, tick_s: float = 0.02) -> dict[str, Any]:
    """Run the demo tree for ``seconds``; return what happened (restarts, children)."""
    reg = Registry()
    sup: SupervisorRef = Supervisor.start(
        [
            ChildSpec("counter", Counter, name="counter"),
            ChildSpec("flaky", Flaky, kwargs={"crash_every": 7}, name="flaky"),
        ],
        strategy="one_for_one",
        max_restarts=50,
        max_seconds=5.0,
        registry=reg,
    )
    urns: dict[str, set[str]] = {"counter": set(), "flaky": set()}
    stop_at = time.monotonic() + seconds
    n = 0
    ticker = threading.Event()
    while time.monotonic() < stop_at:
        n += 1
        reg.send("counter", {"kind": "tick", "n": n})
        reg.send("flaky", {"kind": "tick", "n": n})
        for ch in sup.which_children():
            if ch["urn"]:
                urns[ch["id"]].add(ch["urn"])
        ticker.wait(tick_s)
    counter = sup.child_ref("counter")
    counted = counter.ask({"kind": "get"}) if counter else 0
    children = sup.which_children()
    sup.stop(timeout=5)
    result = {
        "ticks": n,
        "counter_count": counted,
        "flaky_incarnations": len(urns["flaky"]),
        "counter_incarnations": len(urns["counter"]),
        "children": children,
        "supervisor_exit": sup.exit_reason,
    }
    log.info("demo finished", **{k: v for k, v in result.items() if k != "children"})
    return result
