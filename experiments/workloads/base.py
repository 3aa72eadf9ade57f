"""The workload protocol: a small object the Phase actor drives, not a subclass of an actor.

The Phase actor calls ``start`` once per incarnation (after ``restore`` when it restarts
from a checkpoint), then ``step`` repeatedly: each call does one bounded chunk of work and
emits telemetry, so control messages interleave with steps. ``params`` gives the parameters
in force; ``set_param`` applies a control action at a safe point (raising ``ValueError`` for
an unknown key or a bad value).

A workload also *declares* what the framework needs to steer it, so that the framework
itself names no workload's fields: its :class:`Objective` (the figure a run is judged by),
its :class:`Arm` s (the control actions a controller such as hypertune may take), the
:class:`Control` s a controller sends once before it steers (``takeover``), ``family``
(which runs share what a controller learns) and ``search_space`` (what tuning searches).
The declarations are frozen data; ``to_dict`` gives them as plain msgpack-able dicts for
actors, which never import workloads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from actors.hypertune import arm_value
from telemetry.emitter import Emitter

Direction = Literal["min", "max"]


@dataclass(frozen=True)
class Objective:
    """The figure a run is judged by: its best value of ``field`` (an event value).

    ``direction`` says whether lower (``min``) or higher (``max``) is better. ``label`` is the
    short name displays use for the field (``colors=27`` in a monitor line). ``progress`` is an
    optional second event value that shows progress between two improvements of the objective
    (lower is better, compared only since the last improvement): a search that has not found
    a better colouring yet may still be cutting its conflicts.
    """

    field: str
    direction: Direction = "min"
    label: str = ""
    progress: str | None = None

    def __post_init__(self) -> None:
        if not self.field:
            raise ValueError("an objective needs a field")
        if self.direction not in ("min", "max"):
            raise ValueError(f"objective direction must be 'min' or 'max', got {self.direction!r}")
        if not self.label:
            object.__setattr__(self, "label", self.field)

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b`` in this objective's direction."""
        return a < b if self.direction == "min" else a > b

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Objective:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass(frozen=True)
class Arm:
    """One control action a controller may take, as plain data.

    The controller sends ``set_param(key, value)`` to the phase. The value is ``value`` as given
    when ``param`` is None (an action such as ``skip_phase``), else it is computed from the
    parameters in force (the workload's ``params()``, as the events carry them)::

        x = params.get(param, default) * scale + shift, to 12 significant digits, clamped to [lo, hi], int() if integer

    ``phases`` are the phases (the events' ``phase``) where the arm applies; empty: in every
    phase. The order of a workload's arms is the order a policy tries them in.
    """

    name: str
    key: str
    phases: tuple[str, ...] = ()
    param: str | None = None
    scale: float = 1.0
    shift: float = 0.0
    default: float = 0.0
    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    value: Any = None

    def applies_in(self, phase: str | None) -> bool:
        return not self.phases or phase in self.phases

    def value_for(self, params: dict[str, Any]) -> Any:
        """The value this arm sends when these parameters are in force (see the class docs;
        the rule itself is :func:`actors.hypertune.arm_value`, which reads the plain dict)."""
        return arm_value(self.to_dict(), params)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phases"] = list(self.phases)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arm:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw["phases"] = tuple(kw.get("phases", ()))
        return cls(**kw)


@dataclass(frozen=True)
class Control:
    """A control message (``set_param(key, value)``) with the reason recorded beside it."""

    key: str
    value: Any
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Workload(Protocol):
    """What the Phase actor runs and what a controller may steer; see the module docs.

    Checkpoint state: ``checkpoint()`` returns a msgpack-able dict with everything a restarted
    phase needs to go on where this one stopped: the best result so far, the parameters in
    force (so that a controller's changes survive a restart), the pass and the progress
    counters, and any ownership a controller took (``takeover``). ``restore(state)`` takes
    what an earlier ``checkpoint()`` returned, before ``start``; it tolerates missing keys
    (a checkpoint written by an older version) and ignores unknown ones.
    """

    name: ClassVar[str]
    objective: ClassVar[Objective]
    """The figure a run is judged by (hypertune's stalls and rewards, tuning, monitor)."""
    arms: ClassVar[tuple[Arm, ...]]
    """The control actions hypertune may take; every ``key`` must be one ``set_param`` takes."""
    takeover: ClassVar[tuple[Control, ...]]
    """Sent once by a controller before it first steers, so that it is the only controller
    (the workload's own adaptation of the same settings stands down)."""
    search_space: ClassVar[dict[str, tuple[float, float, str]]]
    """What ``crucible tune`` may search: dotted parameter under ``workload.params`` -> (low, high,
    kind), kind ``float``, ``int`` or ``logint``; empty: the workload cannot be tuned."""

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Validate the spec's ``workload.params``; return them with defaults filled in.

        Raise ``ValueError`` naming the key for anything out of place. Check every number
        with the validation kit (``experiments.validate.Num``: finite, in a documented range),
        never with a bare ``v < lo``, which lets NaN through.
        """
        ...

    @classmethod
    def family(cls, params: dict[str, Any]) -> str:
        """The instance family of these parameters: runs of one family share hypertune's
        learned statistics (``<artifacts>/hypertune/<workload>-<family>.json``). A short
        string of letters, digits, ``.``, ``_`` and ``-`` (it names a file)."""
        ...

    # Optional: ``files(cls, params) -> list[Path]``, the local files these (checked) parameters
    # would read, resolved. A lab daemon admits a submission only if each lies in one of its
    # data folders (``crucible lab serve --data-dir``); a workload without it reads none.
    # Optional: ``targets(cls, params) -> list[str]``, the code (``module:function``) and the
    # endpoints (``http(s)://`` URLs) these parameters make the workload call. A lab daemon
    # admits a submission only if it allows each (``crucible lab serve --allow-target``); a
    # workload without it calls nothing a submission chooses.
    # Optional: ``phase`` (a string), the phase the workload is in now; without it, the ``phase``
    # of ``params()``, else the one its ``start()`` set in the emitter's context (as of the last
    # checkpoint, for a restart's first events). The Phase actor's own events (``resumed``, ``phase_restart``, pauses,
    # controls, ``phase_end``) carry it, so that none opens a phase of no name in a summary.
    # Optional: ``finish(emitter, reason)``, called once as the phase ends (completed, budget,
    # stopped), before its last checkpoint and ``phase_end``: a workload that keeps partial
    # results (the colouring's best) writes or emits them.
    # Optional: ``use_clock(clock)``, the Phase actor's clock of active (unpaused) seconds, for a
    # workload that times itself (stalls, passes): a pause never counts as a stall.
    # Optional: ``record_events`` (a tuple of event names), the workload's milestones (a new
    # best, a pass's end) that sampling must never drop, as it never drops the framework's own
    # (telemetry.schema.RECORD_EVENTS).
    # Optional (a classmethod): ``search_space_for(params)``, the part of ``search_space`` a spec
    # with these checked parameters uses (a dimension nothing of the run reads only costs the
    # tuner trials); without it, tuning searches all of ``search_space``.
    # Optional: ``use_interrupt(check)``, for a workload whose step can be long: it calls
    # ``check()`` between chunks of a step and returns from the step when it is True (a pause,
    # a stop or a parameter change waits, or the budget is used). Without it, control waits
    # for the end of the step.

    def start(self, emitter: Emitter) -> None: ...

    def step(self, emitter: Emitter) -> bool:
        """One bounded chunk of work; True when the workload has finished."""
        ...

    def checkpoint(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...

    def params(self) -> dict[str, Any]:
        """The parameters in force; it carries every ``param`` an arm reads."""
        ...

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        """Apply a control action; return (before, after)."""
        ...


def declarations(workload: type[Workload]) -> dict[str, Any]:
    """A workload's objective, arms and takeover controls as plain data (a controller's kwargs)."""
    return {
        "objective": workload.objective.to_dict(),
        "arms": [a.to_dict() for a in workload.arms],
        "takeover": [c.to_dict() for c in workload.takeover],
    }
