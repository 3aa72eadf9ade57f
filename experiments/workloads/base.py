"""The workload protocol: a small object the Phase actor drives, not a subclass of an actor.

The Phase actor calls ``start`` once per incarnation (after ``restore`` when it restarts
from a checkpoint), then ``step`` repeatedly: each call does one bounded chunk of work and
emits telemetry, so control messages interleave with steps. ``checkpoint`` returns a
msgpack-able dict (best solution, parameters, pass, progress); ``params`` the parameters in
force; ``set_param`` applies a control action at a safe point (raising ``ValueError`` for an
unknown key or a bad value).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from telemetry.emitter import Emitter


class Workload(Protocol):
    name: ClassVar[str]

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Validate the spec's ``workload.params``; return them with defaults filled in.

        Raise ``ValueError`` naming the key for anything out of place. Check every number
        with the validation kit (``experiments.validate.Num``: finite, in a documented range),
        never with a bare ``v < lo``, which lets NaN through.
        """
        ...

    def start(self, emitter: Emitter) -> None: ...

    def step(self, emitter: Emitter) -> bool:
        """One bounded chunk of work; True when the workload has finished."""
        ...

    def checkpoint(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...

    def params(self) -> dict[str, Any]: ...

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        """Apply a control action; return (before, after)."""
        ...
