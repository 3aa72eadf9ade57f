"""OTP supervision: :class:`Supervisor`, :class:`DynamicSupervisor` and :class:`ChildSpec`.

Semantics follow OTP's ``supervisor``:

* children start in list order and stop in reverse order;
* ``permanent`` children are always restarted, ``transient`` ones only after an
  abnormal exit (anything but ``normal``/``shutdown``), ``temporary`` ones never (and
  their spec is removed when they exit, also when a sibling's death terminates them);
* strategies ``one_for_one``, ``one_for_all`` and ``rest_for_one``;
* more than ``max_restarts`` restarts within ``max_seconds`` makes the supervisor stop
  all its children (reverse order) and exit abnormally with reason
  ``reached_max_restart_intensity``, so that its own parent applies its strategy
  (OTP uses the reason ``shutdown`` here; we use a distinct abnormal reason so that a
  ``transient`` supervisor child is restarted too, which is what escalation means);
* a child that does not stop within its ``shutdown`` time is killed (see
  :mod:`actors.base` for what killing a thread-backed actor means); ``brutal_kill``
  kills at once, ``infinity`` waits as long as it takes;
* ``auto_shutdown`` with ``significant`` children, as in OTP 24.

``backoff=(min_s, max_s, jitter)`` delays each restart by ``min(max_s, min_s * 2**n)``
scaled by a random factor in ``[1, 1 + jitter]``, where ``n`` counts the child's
restarts since it last ran for longer than ``max_s`` (Akka's restartWithBackoff).
Messages sent with ``Registry.send`` to a child's registered ``name`` while it
restarts are stashed and delivered to the replacement (see :mod:`actors.registry`).

A child's exit is handled in three steps, as OTP's ``supervisor`` does: the restart
intensity is a pure function of the recent restart times (:func:`within_intensity`); what
to do is a pure function of the strategy, the child's restart type, the exit reason, its
significance and ``auto_shutdown`` (:func:`decide`); :meth:`Supervisor.handle_down` only
carries the :class:`Decision` out. Giving up is an exit like any other, never an exception.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from actors.base import (
    KILLED,
    SHUTDOWN,
    Actor,
    ActorRef,
    Refusal,
    call_local,
    is_abnormal,
    on_death,
    spawn_monitor,
)
from actors.log import get_logger
from actors.registry import Registry, default_registry
from actors.timers import MAX_DELAY_S, Timer, call_later, check_delay

log = get_logger("actors.supervision")

RESTART_TYPES = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
AUTO_SHUTDOWN = ("never", "any_significant", "all_significant")
MAX_INTENSITY = "reached_max_restart_intensity"


class ChildNotFound(KeyError):
    """No child with that id under this supervisor."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "child not found"


class ChildRunning(RuntimeError):
    """The operation needs a child that is not running (restart_child, delete_child)."""


class TooManyChildren(RuntimeError):
    """A DynamicSupervisor already has ``max_children`` children."""


@dataclass(frozen=True)
class ChildSpec:
    """How to start, restart and stop one child.

    ``name`` (optional) registers the child under that name in the supervisor's
    registry on every (re)start.
    """

    id: str
    actor: type
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    restart: str = "permanent"
    shutdown: float | str = 5.0
    significant: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"ChildSpec id must be a non-empty string, got {self.id!r}")
        if not (isinstance(self.actor, type) and issubclass(self.actor, Actor)):
            raise ValueError(f"ChildSpec {self.id!r}: actor must be an Actor subclass, got {self.actor!r}")
        if self.restart not in RESTART_TYPES:
            raise ValueError(
                f"ChildSpec {self.id!r}: unknown restart type {self.restart!r}; "
                f"expected one of {', '.join(RESTART_TYPES)}"
            )
        sd = self.shutdown
        if isinstance(sd, str):
            if sd not in ("brutal_kill", "infinity"):
                raise ValueError(
                    f"ChildSpec {self.id!r}: shutdown must be seconds, 'brutal_kill' or 'infinity', got {sd!r}"
                )
        else:  # seconds: the stop's timeout, so finite and bounded as every timeout is
            try:
                check_delay(sd, "shutdown")
            except ValueError:
                raise ValueError(
                    f"ChildSpec {self.id!r}: shutdown must be >= 0 and <= {MAX_DELAY_S:g} seconds (finite), "
                    f"'brutal_kill' or 'infinity', got {sd!r}"
                ) from None
        if self.significant and self.restart == "permanent":
            raise ValueError(f"ChildSpec {self.id!r}: a significant child must be transient or temporary")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def is_supervisor(self) -> bool:
        return issubclass(self.actor, Supervisor)


# --- the decision: pure functions ---------------------------------------------------------------

IGNORE = "ignore"  # the child stays down (its spec is dropped if it is temporary)
RESTART = "restart"  # stop the rest of the group (reverse order), start the group again in order
SHUTDOWN_SUPERVISOR = "shutdown"  # auto_shutdown: the supervisor exits normally (reason shutdown)
GIVE_UP = "give_up"  # over the intensity: the supervisor exits with MAX_INTENSITY


def would_restart(restart: str, reason: str) -> bool:
    """OTP's restart types: ``permanent`` always, ``transient`` after an abnormal exit only."""
    return restart == "permanent" or (restart == "transient" and is_abnormal(reason))


def within_intensity(
    restarts: tuple[float, ...], now: float, max_restarts: int, max_seconds: float
) -> tuple[bool, tuple[float, ...]]:
    """Count one more restart at ``now``: is the supervisor still within its intensity?

    Returns ``(ok, window)``: ``window`` is the restart times at most ``max_seconds`` before
    ``now``, ``now`` included (the state to keep), and ``ok`` is False when they number more
    than ``max_restarts``. Pure: the caller keeps ``window`` only if it counts the restart.
    """
    window = (*(t for t in restarts if t >= now - max_seconds), now)
    return len(window) <= max_restarts, window


def restart_group(strategy: str, index: int, count: int) -> tuple[int, ...]:
    """Positions (start order) of the children a restart of child ``index`` of ``count`` involves."""
    if strategy == "one_for_one":
        return (index,)
    if strategy == "one_for_all":
        return tuple(range(count))
    if strategy == "rest_for_one":
        return tuple(range(index, count))
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


@dataclass(frozen=True)
class Decision:
    """What a supervisor does about one child's exit.

    ``action`` is :data:`IGNORE`, :data:`RESTART`, :data:`SHUTDOWN_SUPERVISOR` or
    :data:`GIVE_UP`; ``group`` holds the positions (start order) of the children to stop
    and start again, the exited one included (empty unless restarting).
    """

    action: str
    group: tuple[int, ...] = ()


def decide(
    strategy: str,
    restart: str,
    reason: str,
    significant: bool,
    auto_shutdown: str,
    *,
    index: int = 0,
    count: int = 1,
    other_significant_running: bool = False,
    intensity_ok: bool = True,
) -> Decision:
    """OTP's rules for the exit of child ``index`` (of ``count``) with ``reason``.

    A child that is not to be restarted (its restart type and the reason say so) is left
    down, unless it is significant and ``auto_shutdown`` says its exit ends the supervisor
    (``any_significant``; ``all_significant`` once no other significant child runs). A
    child to be restarted is, with its strategy's group, if the restart keeps the
    supervisor within its intensity (``intensity_ok``, from :func:`within_intensity`);
    otherwise the supervisor gives up.
    """
    if not would_restart(restart, reason):
        if significant and (
            auto_shutdown == "any_significant" or (auto_shutdown == "all_significant" and not other_significant_running)
        ):
            return Decision(SHUTDOWN_SUPERVISOR)
        return Decision(IGNORE)
    if not intensity_ok:
        return Decision(GIVE_UP)
    return Decision(RESTART, restart_group(strategy, index, count))


def backoff_delay(n: int, min_s: float, max_s: float, jitter: float, rnd: float) -> float:
    """Delay before the ``n``-th consecutive restart (n >= 1): doubling from ``min_s``, capped
    at ``max_s``, scaled by ``1 + jitter * rnd`` with ``rnd`` in [0, 1). Exact for any ``n``: a
    child restarted thousands of times in a row must not overflow the doubling."""
    try:
        doubled = math.ldexp(min_s, max(n - 1, 0))  # min_s * 2**(n-1), without an int-to-float overflow
    except OverflowError:
        doubled = math.inf
    return min(max_s, doubled) * (1 + jitter * rnd)


def check_backoff(backoff: object) -> tuple[float, float, float]:
    """``backoff`` as ``(min_s, max_s, jitter)``, or ValueError saying the allowed ranges.

    Every delay it can give (at most ``max_s * (1 + jitter)``) must be a valid timer delay:
    one refused later would crash the supervisor at its first restart, far from the mistake.
    """
    try:
        lo, hi, jit = backoff  # type: ignore[misc]
        lo, hi = check_delay(lo, "backoff min_s"), check_delay(hi, "backoff max_s")
        if isinstance(jit, bool) or not isinstance(jit, (int, float)):
            raise ValueError("jitter must be a number")
        jit = float(jit)
        ok = lo <= hi and 0 <= jit and hi * (1 + jit) <= MAX_DELAY_S  # NaN and inf fail here
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "backoff must be (min_s, max_s, jitter) with 0 <= min_s <= max_s, jitter >= 0 (finite) and "
            f"max_s * (1 + jitter) <= {MAX_DELAY_S:g} seconds; got {backoff!r}"
        )
    return lo, hi, jit


class _Child:
    __slots__ = ("backoff_n", "pending_gen", "ref", "regrouping", "spec", "started_at", "terminating")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.ref: ActorRef | None = None
        self.started_at = 0.0
        self.backoff_n = 0
        self.pending_gen = 0  # >0 while a delayed restart is scheduled
        self.terminating = False  # stopped on purpose by its supervisor: no stash for its name
        self.regrouping = False  # stopped to be started again with its group: its name stashes

    @property
    def running(self) -> bool:
        return self.ref is not None and self.ref.is_alive()


class SupervisorRef(ActorRef):
    """A ref to a supervisor, with the management API (calls run in its thread)."""

    __slots__ = ()

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return call_local(self, lambda sup, *a: getattr(sup, method)(*a), *args, timeout=timeout)

    def which_children(self) -> list[dict[str, Any]]:
        """One dict per child in start order: id, urn, restart, alive, type, restarting."""
        return self._call("_which_children")

    def child_ref(self, child_id: str) -> ActorRef | None:
        """The child's current ref (a :class:`SupervisorRef` for a nested supervisor), or None."""
        return self._call("_child_ref", child_id)

    def count_children(self) -> dict[str, int]:
        return self._call("_count_children")

    def start_child(self, spec: ChildSpec) -> ActorRef:
        return self._call("_start_child_call", spec)

    def terminate_child(self, child_id: str) -> None:
        self._call("_terminate_child_call", child_id)

    def restart_child(self, child_id: str) -> ActorRef:
        return self._call("_restart_child_call", child_id)

    def delete_child(self, child_id: str) -> None:
        self._call("_delete_child_call", child_id)

    def restart_times(self) -> list[float]:
        """Clock readings of the restarts inside the current intensity window."""
        return self._call("_restart_times")


class Supervisor(Actor):
    """A supervisor actor; start it with :meth:`Supervisor.start` (returns a SupervisorRef)."""

    ref_class: ClassVar[type[ActorRef]] = SupervisorRef

    def __init__(
        self,
        children: Iterable[ChildSpec] = (),
        strategy: str = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        name: str | None = None,
        backoff: tuple[float, float, float] | None = None,
        auto_shutdown: str = "never",
        registry: Registry | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_restart: Callable[[str, str], None] | None = None,
        on_give_up: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__()
        self.on_restart = on_restart  # called (child id, exit reason) before each restart
        self.on_give_up = on_give_up  # called (child id, exit reason) for the exit over the intensity
        specs = list(children)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if auto_shutdown not in AUTO_SHUTDOWN:
            raise ValueError(f"unknown auto_shutdown {auto_shutdown!r}; expected one of {', '.join(AUTO_SHUTDOWN)}")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts must be an int >= 0, got {max_restarts!r}")
        if not max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
        if backoff is not None:
            backoff = check_backoff(backoff)
        seen: set[str] = set()
        for s in specs:
            if not isinstance(s, ChildSpec):
                raise ValueError(f"children must be ChildSpec objects, got {s!r}")
            if s.id in seen:
                raise ValueError(f"duplicate child id {s.id!r}")
            seen.add(s.id)
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = float(max_seconds)
        self.name = name
        self.backoff = backoff
        self.auto_shutdown = auto_shutdown
        self.registry = registry if registry is not None else default_registry
        self.clock = clock
        self._children: list[_Child] = []
        self._by_urn: dict[str, _Child] = {}
        self._restarts: tuple[float, ...] = ()  # restart times inside the intensity window
        self._timers: list[Timer] = []
        self._rng = random.Random()
        on_death(self.ref, self._on_own_death)
        for s in specs:  # a child may send to one that starts after it: held until it registers
            if s.name:
                self.registry.mark_restarting(s.name)
        try:
            for s in specs:
                c = _Child(s)
                self._children.append(c)
                self._start(c)
        except BaseException:
            self._stop_children(reverse_of=self._children)
            for s in specs:  # the tree will not start: what was held for its names is lost
                if s.name and self.registry.whereis(s.name) is None:
                    self.registry.cancel_restarting(s.name)
            raise

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> SupervisorRef:  # type: ignore[override]
        ref = super().start(*args, **kwargs)
        name = kwargs.get("name")
        if name:
            (kwargs.get("registry") or default_registry).register(name, ref)
        return ref  # type: ignore[return-value]

    # --- starting and stopping children ----------------------------------------

    def _start(self, c: _Child) -> ActorRef:
        spec = c.spec
        ref = spawn_monitor(self.ref, spec.actor, *spec.args, **spec.kwargs)
        c.ref = ref
        c.started_at = self.clock()
        c.pending_gen = 0
        c.terminating = c.regrouping = False
        self._by_urn[ref.urn] = c
        if spec.name:
            self.registry.register(
                spec.name,
                ref,
                restarting_if=lambda reason, c=c: (
                    c.regrouping or (not c.terminating and would_restart(c.spec.restart, reason))
                ),
            )
        return ref

    def _terminate(self, c: _Child, regroup: bool = False) -> None:
        """Stop one child under its shutdown rule; its ``down`` is then ignored.

        ``regroup``: it stops to be started again with its group (one_for_all, rest_for_one),
        so its name stashes what is sent to it meanwhile, with what was still in its mailbox.
        """
        c.pending_gen = 0
        ref, c.ref = c.ref, None
        if ref is None:
            return
        c.terminating = True
        c.regrouping = regroup
        self._by_urn.pop(ref.urn, None)
        sd = c.spec.shutdown
        if sd == "brutal_kill":
            ref.kill()
        elif sd == "infinity":
            ref.stop(timeout=None, reason=SHUTDOWN)
        elif not ref.stop(timeout=float(sd), reason=SHUTDOWN):
            log.warning("child did not stop in time; killed", child=c.spec.id, shutdown_s=sd)
            ref.kill()

    def _stop_children(self, reverse_of: Sequence[_Child]) -> None:
        for c in reversed(list(reverse_of)):
            try:
                self._terminate(c)
            except Exception:
                log.exception("error while stopping child", child=c.spec.id)

    def terminate(self, reason: str) -> None:
        for t in self._timers:
            t.cancel()
        self._stop_children(self._children)

    def _on_own_death(self, reason: str) -> None:
        # A killed supervisor takes its children with it, as a linked process would.
        if reason == KILLED:
            for c in list(self._children):
                if c.ref is not None:
                    c.ref.kill()

    # --- reacting to exits -------------------------------------------------------

    def handle_down(self, msg: dict[str, Any]) -> None:
        c = self._by_urn.pop(msg["urn"], None)
        if c is None or c.ref is None or c.ref.urn != msg["urn"]:
            return  # a child we terminated ourselves, or a stale notification
        c.ref = None
        reason = msg["reason"]
        ok, window = within_intensity(self._restarts, self.clock(), self.max_restarts, self.max_seconds)
        decision = decide(
            self.strategy,
            c.spec.restart,
            reason,
            c.spec.significant,
            self.auto_shutdown,
            index=self._children.index(c),
            count=len(self._children),
            other_significant_running=any(ch.running for ch in self._children if ch.spec.significant),
            intensity_ok=ok,
        )
        if decision.action in (RESTART, GIVE_UP):
            self._restarts = window
        self._carry_out(decision, c, reason)

    def _carry_out(self, decision: Decision, c: _Child, reason: str) -> None:
        """Do what :func:`decide` said about the exit of ``c``."""
        action = decision.action
        if action in (IGNORE, SHUTDOWN_SUPERVISOR):
            log.info("child exited", child=c.spec.id, reason=reason, restarted=False)
            if c.spec.restart == "temporary":
                self._children.remove(c)
            if action == SHUTDOWN_SUPERVISOR:
                log.info("auto_shutdown: significant child exited", child=c.spec.id, mode=self.auto_shutdown)
                self._exit_now(SHUTDOWN)
            return
        if action == GIVE_UP:
            log.warning("child exited; over the restart intensity", child=c.spec.id, reason=reason)
            if self.on_give_up is not None:
                try:
                    self.on_give_up(c.spec.id, reason)
                except Exception:
                    log.exception("on_give_up hook failed", child=c.spec.id)
            self._give_up()
            return
        log.warning("child exited; restarting", child=c.spec.id, reason=reason, strategy=self.strategy)
        if self.on_restart is not None:
            try:
                self.on_restart(c.spec.id, reason)
            except Exception:
                log.exception("on_restart hook failed", child=c.spec.id)
        lived = self.clock() - c.started_at
        c.backoff_n = 0 if self.backoff and lived > self.backoff[1] else c.backoff_n + 1
        group = [self._children[i] for i in decision.group]
        for other in reversed(group):
            if other is not c and other.ref is not None:
                if other.spec.name:
                    self.registry.mark_restarting(other.spec.name)
                self._terminate(other, regroup=other.spec.restart != "temporary")
        for other in group:
            if other is not c and other.spec.restart == "temporary":
                self._children.remove(other)
        self._schedule_restart([o for o in group if o in self._children], c)

    def _give_up(self) -> None:
        """Over the intensity: the names waiting for a replacement will not get one; exit."""
        log.error(
            "restart intensity reached; supervisor exits",
            name=self.name,
            max_restarts=self.max_restarts,
            max_seconds=self.max_seconds,
        )
        for ch in self._children:
            if ch.spec.name and ch.ref is None:
                self.registry.cancel_restarting(ch.spec.name)
        self._exit_now(MAX_INTENSITY)

    def _exit_now(self, reason: str) -> None:
        """Exit with ``reason`` when the current message is done, ahead of anything queued.

        As an OTP supervisor exits while handling the exit signal: no later ``down`` (or
        delayed restart) is acted on. Children stop in reverse order in ``terminate``;
        what is still queued is answered ``ActorDeadError``.
        """
        with self._life.lock:
            if self._life.dead:
                return
            self._life.pending_reason = reason
        self.actor_stopped.set()  # pykka's loop ends after this message
        self.on_stop()  # terminate (stops the children), then the exit is recorded and monitors told

    def _schedule_restart(self, group: list[_Child], failed: _Child) -> None:
        if not self.backoff:
            self._restart_group(group)
            return
        delay = min(backoff_delay(failed.backoff_n, *self.backoff, rnd=self._rng.random()), MAX_DELAY_S)
        gen = int(self.clock() * 1e6) or 1
        for g in group:
            g.pending_gen = gen
        ids = [g.spec.id for g in group]
        log.info("restart delayed (backoff)", children=ids, delay_s=round(delay, 4))
        t = call_later(delay, self.ref.tell_unless_stopping, {"kind": "delayed_restart", "ids": ids, "gen": gen})
        self._timers = [x for x in self._timers if x.is_alive()] + [t]

    def handle_delayed_restart(self, msg: dict[str, Any]) -> None:
        group = [c for c in self._children if c.spec.id in msg["ids"] and c.pending_gen == msg["gen"]]
        self._restart_group(group)

    def _restart_group(self, group: list[_Child]) -> None:
        for i, g in enumerate(group):
            if g.running:
                continue
            try:
                self._start(g)
            except Exception as exc:  # noqa: BLE001 - a failed restart is retried, counted
                log.error("child restart failed; retrying", child=g.spec.id, error=repr(exc))
                self.ref.tell({"kind": "retry_restart", "ids": [x.spec.id for x in group[i:]]})
                return

    def handle_retry_restart(self, msg: dict[str, Any]) -> None:
        ok, self._restarts = within_intensity(self._restarts, self.clock(), self.max_restarts, self.max_seconds)
        if not ok:
            self._give_up()
            return
        self._restart_group([c for c in self._children if c.spec.id in msg["ids"]])

    # --- management calls (run in this thread through call_local) ---------------

    def _find(self, child_id: str) -> _Child:
        for c in self._children:
            if c.spec.id == child_id:
                return c
        known = ", ".join(c.spec.id for c in self._children) or "none"
        raise ChildNotFound(f"no child {child_id!r} under supervisor {self.name or self.actor_urn}; children: {known}")

    def _lookup(self, child_id: str) -> _Child | Refusal:
        """The child, or the refusal a caller's request gets back (raised in the caller's thread)."""
        try:
            return self._find(child_id)
        except ChildNotFound as exc:
            return Refusal(exc)

    def _which_children(self) -> list[dict[str, Any]]:
        return [
            {
                "id": c.spec.id,
                "urn": c.ref.urn if c.ref is not None else None,
                "restart": c.spec.restart,
                "alive": c.running,
                "type": "supervisor" if c.spec.is_supervisor else "worker",
                "restarting": c.pending_gen > 0,
            }
            for c in self._children
        ]

    def _child_ref(self, child_id: str) -> Any:
        c = self._lookup(child_id)
        if isinstance(c, Refusal):
            return c
        return c.ref if c.running else None

    def _restart_times(self) -> list[float]:
        return list(self._restarts)

    def _count_children(self) -> dict[str, int]:
        return {
            "specs": len(self._children),
            "active": sum(c.running for c in self._children),
            "supervisors": sum(c.spec.is_supervisor for c in self._children),
            "workers": sum(not c.spec.is_supervisor for c in self._children),
        }

    def _start_child_call(self, spec: ChildSpec) -> Any:
        if not isinstance(spec, ChildSpec):
            return Refusal(ValueError(f"start_child needs a ChildSpec, got {spec!r}"))
        if any(c.spec.id == spec.id for c in self._children):
            return Refusal(ValueError(f"duplicate child id {spec.id!r}"))
        c = _Child(spec)
        try:
            ref = self._start(c)
        except Exception as exc:  # noqa: BLE001 - the caller's child failed to start
            return Refusal(exc)
        self._children.append(c)
        return ref

    def _terminate_child_call(self, child_id: str) -> Any:
        c = self._lookup(child_id)
        if isinstance(c, Refusal):
            return c
        self._terminate(c)
        if c.spec.name:
            self.registry.cancel_restarting(c.spec.name)
        if c.spec.restart == "temporary":
            self._children.remove(c)
        return None

    def _restart_child_call(self, child_id: str) -> Any:
        c = self._lookup(child_id)
        if isinstance(c, Refusal):
            return c
        if c.running:
            return Refusal(ChildRunning(f"child {child_id!r} is running; terminate it first"))
        try:
            return self._start(c)
        except Exception as exc:  # noqa: BLE001
            return Refusal(exc)

    def _delete_child_call(self, child_id: str) -> Any:
        c = self._lookup(child_id)
        if isinstance(c, Refusal):
            return c
        if c.running or c.pending_gen:
            return Refusal(ChildRunning(f"child {child_id!r} is running; terminate it first"))
        self._children.remove(c)
        return None


class DynamicSupervisor(Supervisor):
    """one_for_one over children added at run time, at most ``max_children`` of them."""

    def __init__(
        self,
        max_children: int | None = None,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        name: str | None = None,
        backoff: tuple[float, float, float] | None = None,
        registry: Registry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_children is not None and (not isinstance(max_children, int) or max_children < 0):
            raise ValueError(f"max_children must be an int >= 0 or None, got {max_children!r}")
        self.max_children = max_children
        super().__init__((), "one_for_one", max_restarts, max_seconds, name, backoff, "never", registry, clock)

    def _start_child_call(self, spec: ChildSpec) -> Any:
        if isinstance(spec, ChildSpec) and any(c.spec.id == spec.id for c in self._children):
            return Refusal(ValueError(f"duplicate child id {spec.id!r}"))
        if self.max_children is not None and len(self._children) >= self.max_children:
            return Refusal(
                TooManyChildren(
                    f"dynamic supervisor {self.name or self.actor_urn} already has "
                    f"max_children={self.max_children} children; cannot start {getattr(spec, 'id', spec)!r}"
                )
            )
        return super()._start_child_call(spec)
