"""Small actors used across the tests."""

from __future__ import annotations

import threading
from typing import Any

from actors import Actor


class Worker(Actor):
    """Answers pings, crashes or stops on request, can block on a gate."""

    def __init__(
        self,
        tag: str = "",
        gate: threading.Event | None = None,
        journal: list[tuple[str, ...]] | None = None,
        sink: list[Any] | None = None,
        fail_start: threading.Event | None = None,
    ) -> None:
        super().__init__()
        if fail_start is not None and fail_start.is_set():
            raise RuntimeError("start refused")
        self.tag = tag
        self.gate = gate
        self.count = 0
        self.journal = journal
        if journal is not None:
            journal.append(("start", tag))
        self.received: list[Any] = [] if sink is None else sink

    def terminate(self, reason: str) -> None:
        if self.journal is not None:
            self.journal.append(("stop", self.tag, reason))

    def handle_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        return {"tag": self.tag, "urn": self.actor_urn, "count": self.count, "thread": threading.current_thread().name}

    def handle_note(self, msg: dict[str, Any]) -> None:
        self.received.append(msg.get("v"))

    def handle_notes(self, msg: dict[str, Any]) -> list[Any]:
        return self.received

    def handle_crash(self, msg: dict[str, Any]) -> None:
        raise RuntimeError(f"boom {self.tag}")

    def handle_sys_exit(self, msg: dict[str, Any]) -> None:
        raise SystemExit(msg.get("code", 3))  # user code calling sys.exit() inside a handler

    def handle_base_exc(self, msg: dict[str, Any]) -> None:
        """A BaseException that is no Exception, by name (CancelledError, KeyboardInterrupt, ...)."""
        import asyncio

        kinds = {"CancelledError": asyncio.CancelledError, "KeyboardInterrupt": KeyboardInterrupt}
        raise {**kinds, "GeneratorExit": GeneratorExit, "SystemExit": SystemExit}[msg["what"]]()

    def handle_exit(self, msg: dict[str, Any]) -> None:
        self.exit(msg.get("reason", "normal"))

    def handle_block(self, msg: dict[str, Any]) -> None:
        assert self.gate is not None
        self.gate.wait()


class Collector(Actor):
    """Records every message it gets; ``get`` returns them (minus the get itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.msgs: list[dict[str, Any]] = []

    def on_message(self, msg: dict[str, Any]) -> Any:
        if msg["kind"] == "get":
            return self.msgs
        self.msgs.append(msg)
        return None


class SlowStop(Actor):
    """Takes ``delay_gate`` to finish terminate(): used for shutdown timeouts."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def terminate(self, reason: str) -> None:
        self.gate.wait()

    def handle_ping(self, msg: dict[str, Any]) -> str:
        return "pong"


class Counting:
    """The smallest workload of the protocol: each step counts (``n``) and emits a ``tick``;
    no controls. Tests subclass it and change ``step`` (a step that blocks, raises, ...)."""

    name = "counting"

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.n = 0

    def start(self, emitter: Any) -> None:
        pass

    def step(self, emitter: Any) -> bool:
        self.n += 1
        emitter.emit("tick", {"n": float(self.n)})
        return False

    def checkpoint(self) -> dict[str, Any]:
        return {"n": self.n}

    def restore(self, state: dict[str, Any]) -> None:
        self.n = int(state.get("n", 0))

    def params(self) -> dict[str, Any]:
        return {}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        raise ValueError(key)
