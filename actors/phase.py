"""The PhaseActor: runs a workload in bounded steps, applying control at safe points.

It never runs a long loop inside one message: it sends itself ``step``; each step runs one
chunk of the workload and then sends the next ``step``. Control messages (``pause``,
``resume``, ``stop``, ``set_param``) queue between steps and apply at those safe points;
pausing simply does not send the next step.

A step may be long (a search with a large batch per step). A workload that offers
``use_interrupt(check)`` is given a check to call between the chunks of a step: True means
end the step now, at a safe point. It turns True when a control message waits (the Lab sends
``pause``, ``stop`` and parameter changes as urgent messages, see ``ActorRef.ask``), when
the tree is stopping or the phase was killed, and when the budget is used, so none of them
waits for the rest of the step.

Readers never ask a busy phase for its status: it publishes :meth:`PhaseActor.status` into
a :class:`~actors.snapshot.Snapshot` at its safe points (at most every
``STATUS_INTERVAL_S`` between steps, at once on every control message and at the end).

State survives a crash: after every step (and every published batch) the phase writes a
checkpoint into its :class:`CheckpointStore`, an object its supervisor keeps across
restarts (and mirrors to ``checkpoint.json`` in the run directory). A restarted phase
restores the workload from it and continues the run's event numbering where the crashed
incarnation stopped, so the Recorder neither duplicates nor misses events. A checkpoint's
``active_s`` is the active time when it was written, so it includes the step it records: a
run resumed from it charges its budget with every step it keeps.

A checkpoint file that cannot be written never crashes the phase (a crash would restart it,
and fail again, until the supervisor gave up). A full disk (``ENOSPC``, ``EDQUOT``) ends the
run: the phase stops itself with reason ``storage: <error> (checkpoint <file>)``, as the
Recorder does when its own writes fail. Any other failure (the file replaced by a folder, a
file that may not be replaced) is logged once, with the file and the error, and said once in
the run's events (``checkpoint_failed``); the run goes on, its events recorded as before, and
the phase keeps trying at every checkpoint (``checkpoint written again`` once one gets
through). Meanwhile a run resumed after its process died goes back to the last checkpoint on
disk, older than the events recorded since; a restart of the phase in the same process loses
nothing (the store keeps the state in memory).

A stop asked of the phase is kept in its store (:attr:`CheckpointStore.stop_reason`) before
anything that may fail: a phase that crashes while it stops is restarted, and the replacement
finishes the stop at once, with the same reason, instead of running on to its budget.

Active time is counted on the clock the phase is given (an Experiment gives its Lab's), and
the replies to ``pause`` and ``resume`` carry ``at``, the reading at which that time stopped or
started again: the run's record takes its pauses from them, so the two figures of active time
(``active_duration``, the phase's ``active_s``) never drift apart over pause/resume cycles.

The phase is its tree's *significant* child (``transient``): when its work is done (the
workload completed, the budget ran out, or it was told to ``stop``) it records why in the
checkpoint store (:attr:`CheckpointStore.finish_reason`), closes its emitter (the last
events and the final counters go out) and exits ``normal``. Its supervisor then shuts the
whole tree down (``auto_shutdown``), which is how the run's owner learns that it ended. A
phase restarted after it finished exits again at once. Control that arrives after the end
is refused (``set_param``) or ignored (``note``): nothing is emitted once the emitter is closed.

A phase killed in the middle of a step (its supervisor's shutdown timeout) leaves a thread
that may finish the step later (at its next chunk, for a workload with ``use_interrupt``):
its emitter is abandoned at the kill (nothing it emits is published, since its seq numbers
now belong to the replacement), it stops as soon as the step returns, and the checkpoint
store takes writes only from the incarnation that claimed it last.
"""

from __future__ import annotations

import errno
import math
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.base import KILLED, Actor, is_abnormal, on_death
from actors.files import atomic_write
from actors.log import get_logger
from actors.snapshot import Snapshot
from actors.topics import Topics
from telemetry.emitter import Emitter, bounded_notes
from telemetry.rundir import read_json

log = get_logger("actors.phase")

STATUS_INTERVAL_S = 0.2  # the status snapshot is refreshed at most this often between steps
LAST_NOTES_TIMEOUT_S = 2.0  # how long the end of a run waits for each observer's last notes


NONFINITE = "$nonfinite"
"""The key of the object a checkpoint file holds a NaN or an infinity as (JSON has none):
``{"$nonfinite": "inf"}``, read back as the float."""


def _for_file(value: Any, path: str = "") -> Any:
    """``value`` as the checkpoint file holds it: NaN and the infinities as :data:`NONFINITE`
    objects (JSON would write them as null, and a resumed run would get None back).

    Raises:
        TypeError: something no JSON file can hold (an object, a dict key that is no string,
            an integer past 64 bits), naming its place in the checkpoint.
    """
    if isinstance(value, (float, np.floating)):
        return value if math.isfinite(value) else {NONFINITE: repr(float(value))}
    if value is None or isinstance(value, (str, bool, np.ndarray, np.generic)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise TypeError(f"checkpoint field {path or '(root)'}: an integer of {value.bit_length()} bits")
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint field {path or '(root)'}: a key of type {type(k).__name__} ({k!r:.60})")
            out[k] = _for_file(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(value, (list, tuple)):
        return [_for_file(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"checkpoint field {path or '(root)'}: a value of type {type(value).__name__}, which no file holds")


def _from_file(value: Any) -> Any:
    """The checkpoint as it was saved: :data:`NONFINITE` objects back to floats."""
    if isinstance(value, dict):
        if len(value) == 1 and value.get(NONFINITE) in ("nan", "inf", "-inf"):
            return float(value[NONFINITE])
        return {k: _from_file(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_file(v) for v in value]
    return value


class CheckpointStore:
    """The phase's checkpoint, kept outside the actor (thread-safe), mirrored to a file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.state: dict[str, Any] = {}
        self.finish_reason: str | None = None  # why the phase finished (completed, budget, stopped, ...)
        self.stop_reason: str | None = None  # a stop asked of the phase: a replacement finishes it
        self.save_error: str | None = None  # why the file could not be written, until a write gets through
        self.save_failures = 0  # writes of the file that failed in a row
        self._writer: object | None = None  # the phase incarnation whose writes count
        if path is not None and path.exists():
            try:
                self.state = _from_file(read_json(path) or {})
            except (OSError, ValueError) as exc:  # not JSON, not an object, a folder in its place
                log.warning("checkpoint unreadable; starting fresh", file=str(path), error=str(exc))

    def claim(self, writer: object) -> None:
        """From now on only ``writer``'s writes count (a new phase incarnation claims the store)."""
        with self._lock:
            self._writer = writer

    def update(self, writer: object | None = None, **parts: Any) -> None:
        """Merge ``parts`` into the state; ignored when ``writer`` is not the last claimant."""
        with self._lock:
            if writer is None or writer is self._writer:
                self.state.update(parts)

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.state)

    def save(self) -> None:
        """Write the state to the file.

        Raises:
            OSError: the file could not be written (the state in memory is kept).
        """
        if self.path is None:
            return
        with self._lock:
            self.state["saved_at"] = time.time()  # its age tells how much work a crash lost
            data = orjson.dumps(_for_file(self.state), option=orjson.OPT_SERIALIZE_NUMPY)
        atomic_write(self.path, data)

    def finish(self, reason: str, writer: object | None = None) -> bool:
        """Record why the run's phase finished (kept on disk by the next :meth:`save`: a
        restarted phase exits at once); False when ``writer`` is not the last claimant."""
        if writer is not None and writer is not self._writer:
            return False
        self.finish_reason = reason
        self.update(finished=reason)
        return True


class PhaseActor(Actor):
    """Drives one workload for one run; see the module docs."""

    def __init__(
        self,
        experiment_id: str,
        run_id: str,
        workload_cls: type,
        params: dict[str, Any],
        topics: Topics,
        checkpoints: CheckpointStore,
        *,
        seed: int = 0,
        budget_s: float = 60.0,
        emitter_opts: dict[str, Any] | None = None,
        watch: Any = (),
        clock: Callable[[], float] = time.monotonic,
        save_every_s: float = 1.0,
        run_dir: Path | None = None,
        status_snapshot: Snapshot | None = None,
        last_notes_from: Any = (),
    ) -> None:
        super().__init__()
        self.experiment_id, self.run_id = experiment_id, run_id
        # observers (NamedTargets) asked, as the run's events end, for notes to record before they
        # close: what they judge only at a count of batches a short run never reaches
        self.last_notes_from = tuple(last_notes_from)
        self.topics = topics
        self.checkpoints = checkpoints
        self.budget_s = budget_s
        self.clock = clock
        self.save_every_s = save_every_s
        self.workload = workload_cls(params, seed)
        if run_dir is not None and hasattr(self.workload, "run_dir"):
            self.workload.run_dir = run_dir  # where the workload may keep its own results
        self.emitter_opts = dict(emitter_opts or {})
        self.watch = watch
        self.paused = False
        self._paused_since_us: int | None = None  # when the pause under way began (wall clock, µs: checkpointed)
        self._paused_at: float | None = None  # the same on this incarnation's clock (None: a pause restored)
        self.finished = False
        self.steps = 0
        self.emitter: Emitter | None = None
        self._restored = False  # the workload holds the run's state (a restore that failed: it does not)
        self._last_save = 0.0
        self._active_s = 0.0  # active (unpaused) time used from the budget, across restarts
        self._mark = clock()  # when _active_s was last brought up to date
        self._loop = secrets.token_hex(8)  # this incarnation's step loop (see _next_step)
        self.status_snapshot = status_snapshot
        self._last_status = 0.0
        checkpoints.claim(self)
        on_death(self.ref, self._on_death)

    def _on_death(self, reason: str) -> None:
        """Killed, perhaps mid-step: whatever its thread still emits must never be published."""
        if reason == KILLED and self.emitter is not None:
            self.emitter.abandon()

    def on_start(self) -> None:
        cp = self.checkpoints.get()
        counters = cp.get("counters") or {}
        resume = cp.get("resume") if isinstance(cp.get("resume"), dict) else None
        self.emitter = Emitter(
            self.topics,
            self.experiment_id,
            self.run_id,
            seq_start=int(resume["seq_start"]) if resume else 0,
            counters=counters,
            on_publish=self._published,
            watch=self.watch,
            **self.emitter_opts,
        )
        if cp.get("finished"):  # restarted after its end: nothing left to do
            self.finished = True
            if resume is not None:  # a run resumed in a new process: its counters once more (the
                # Recorder takes them max-wise). A kill after phase_end reached the disk but before
                # the Recorder took the final counters left the Recorder's behind: unbalanced for good
                self.emitter.close()
            else:  # a restart in the same tree: the run's events and counters went out already
                self.emitter.abandon()  # stops its flusher
            self.checkpoints.finish_reason = self.checkpoints.finish_reason or str(cp["finished"])
            self._publish_status(force=True)
            self.exit()
            return
        self.paused = bool(cp.get("paused", False))
        since = cp.get("paused_since_us")
        if self.paused and isinstance(since, int) and not isinstance(since, bool):
            self._paused_since_us = since
        if "workload" in cp:
            self.steps = int(cp.get("steps", 0))
        active = cp.get("active_s")  # also without a workload state: a resumed run's carried-over time
        if isinstance(active, (int, float)) and not isinstance(active, bool):
            self._active_s = max(0.0, float(active))
        self._mark = self.clock()
        use_clock = getattr(self.workload, "use_clock", None)  # optional: a workload that times itself
        if use_clock is not None:
            use_clock(self.active_time)
        use_interrupt = getattr(self.workload, "use_interrupt", None)  # optional: a step that can end early
        if use_interrupt is not None:
            use_interrupt(self._step_should_end)
        if "workload" in cp:
            self.workload.restore(cp["workload"])
        self._restored = True
        self.emitter.hold(self.paused)
        if resume is not None:
            self._announce_resume(resume)
        elif "workload" in cp:
            self.emitter.emit(
                "phase_restart",
                {"steps": float(self.steps)},
                phase=self._phase(),
                parameters=self.workload.params(),
                notes=f"restored from checkpoint after {self.steps} steps",
            )
        self.workload.start(self.emitter)
        self._mark = self.clock()
        self._publish_status(force=True)
        if self.checkpoints.stop_reason is not None:  # its predecessor was asked to stop (and crashed)
            self._finish(self.checkpoints.stop_reason)
            return
        if not self.paused:
            self._next_step()

    def _phase(self) -> str | None:
        """The phase the workload is in, for the events this actor emits: its ``phase`` (see
        :class:`~experiments.workloads.base.Workload`), else the ``phase`` of its ``params()``,
        else the phase its ``start()`` set in the emitter's context (now, or as of the last
        checkpoint). The ``resumed`` and ``phase_restart`` events go out before the workload's
        ``start()`` sets its own context: without it they would open a phase of no name in the
        summaries."""
        phase = getattr(self.workload, "phase", None)
        if not isinstance(phase, str):
            phase = self.workload.params().get("phase")
        if not isinstance(phase, str) and self.emitter is not None:
            phase = self.emitter.phase
        if not isinstance(phase, str):
            phase = self.checkpoints.get().get("phase")
        return phase if isinstance(phase, str) else None

    def _announce_resume(self, resume: dict[str, Any]) -> None:
        """The first start in a new process after the old one died: say from which checkpoint
        the run goes on and how much work the crash lost (once: a later restart of this phase
        in the same process is an ordinary ``phase_restart``)."""
        figures = {
            k: float(v)
            for k, v in resume.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seq_start"
        }
        figures["steps"] = float(self.steps)
        figures["active_s"] = self._active_s
        state = self.workload.checkpoint()
        for k, v in state.items():  # what was restored: a best k, a call count
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                figures[f"restored_{k}"] = float(v)
        passes = state.get("pass")  # the event belongs to the pass and phase the run goes on in
        if isinstance(passes, int) and not isinstance(passes, bool) and passes >= 0:
            self.emitter.set_context(pass_=passes)
        params = self.workload.params()
        age, lost_s = resume.get("checkpoint_age_s"), resume.get("lost_s")
        self.emitter.emit(
            "resumed",
            figures,
            phase=self._phase(),
            parameters=params,
            notes=(
                f"resumed after a crash (resume {resume.get('resumes', 1)}) from the checkpoint of step"
                f" {self.steps}"
                + (f", {age:.1f} s old" if isinstance(age, (int, float)) else ", no checkpoint")
                + f"; {resume.get('events_after_checkpoint', 0)} events were published after it"
                + (f", {lost_s:.2f} s of work to redo" if isinstance(lost_s, (int, float)) else "")
            ),
        )
        self.checkpoints.update(self, resume=None)
        self._save()

    def _published(self, counters: dict[str, int]) -> None:
        self.checkpoints.update(self, counters=counters)

    def _checkpoint(self, force: bool = False) -> None:
        """Record the state as of now: ``active_s`` includes the step just done (a checkpoint that
        lagged a step would let a run resumed from it overrun its budget by that step)."""
        self.checkpoints.update(
            self,
            workload=self.workload.checkpoint(),
            steps=self.steps,
            paused=self.paused,
            paused_since_us=self._paused_since_us,
            active_s=self.active_time(),
            phase=self.emitter.phase if self.emitter is not None else None,  # for a restart's first events
        )
        now = time.monotonic()
        if force or now - self._last_save >= self.save_every_s:
            self._last_save = now
            self._save()
        self._publish_status(force)

    def _save(self) -> None:
        """Write the checkpoint file; a failure never crashes the phase (see the module docs)."""
        store = self.checkpoints
        try:
            store.save()
        except OSError as exc:
            self._save_failed(exc)
            return
        if store.save_error is not None:
            log.info(
                "checkpoint written again",
                experiment=self.experiment_id,
                run_id=self.run_id,
                file=str(store.path),
                failed_writes=store.save_failures,
            )
            store.save_error, store.save_failures = None, 0

    def _save_failed(self, exc: OSError) -> None:
        """A full disk stops the run (reason ``storage: ...``); any other failure is said once
        (a log line and a ``checkpoint_failed`` event) and the run goes on."""
        store = self.checkpoints
        store.save_failures += 1
        first = store.save_error is None
        store.save_error = text = f"{exc}"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = f"storage: {text} (checkpoint {store.path})"
            if first:
                log.error(
                    "checkpoint not written: the disk is full; the run stops",
                    experiment=self.experiment_id,
                    run_id=self.run_id,
                    file=str(store.path),
                    error=text,
                )
            if store.stop_reason is None:
                store.stop_reason = reason
            if not self.finished:  # urgent: a long step ends at its next chunk
                self.ref.tell({"kind": "stop", "reason": store.stop_reason}, urgent=True)
            return
        if not first:
            return
        log.warning(
            "checkpoint not written; the run goes on, its events recorded, but a resume after a crash"
            " goes back to the last checkpoint on disk",
            experiment=self.experiment_id,
            run_id=self.run_id,
            file=str(store.path),
            error=text,
        )
        if self.emitter is not None and not self.finished:
            self.emitter.emit(
                "checkpoint_failed",
                {"steps": float(self.steps)},
                phase=self._phase(),
                notes=bounded_notes(f"checkpoint {store.path} not written: {text}"),
            )

    def _publish_status(self, force: bool = False) -> None:
        if self.status_snapshot is None:
            return
        now = time.monotonic()
        if force or now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            self.status_snapshot.publish(self.status())

    def active_time(self) -> float:
        """Seconds of active (unpaused) time so far, across restarts: the clock the workload
        reads for its own stall and pass times, so that a pause never counts as a stall."""
        t = self._active_s
        if not self.paused and not self.finished:
            t += self.clock() - self._mark
        return t

    def _step_should_end(self) -> bool:
        """What a long step asks between its chunks of work: end now, at a safe point, because a
        control message waits (the Lab's pause, stop and parameter changes are urgent), the tree
        is stopping, the phase was killed, or the budget is used."""
        return self.should_yield() or self.active_time() >= self.budget_s

    def _tick(self) -> float:
        """Bring ``_active_s`` up to now; returns the clock reading it used."""
        now = self.clock()
        if not self.paused:
            self._active_s += now - self._mark
        self._mark = now
        return now

    # --- the step loop -----------------------------------------------------------------------------

    def _next_step(self) -> None:
        """Send the loop's next step. Steps carry the loop's token: a step left in the mailbox by a
        loop that a pause ended (or carried over from a crashed incarnation) is ignored, so there
        is never more than one step loop."""
        self.ref.tell_unless_stopping({"kind": "step", "loop": self._loop})

    def handle_step(self, msg: dict[str, Any]) -> None:
        if msg.get("loop") != self._loop:
            return  # a step of an ended loop
        if self.paused or self.finished:
            return  # parked: the next step is sent by resume
        self._tick()
        if self._active_s >= self.budget_s:
            self._finish("budget")
            return
        done = self.workload.step(self.emitter)
        if not self.ref.is_alive():
            return  # killed during the step: this thread was abandoned (see the module docs)
        self.steps += 1
        self._checkpoint()
        if done:
            self._finish("completed")
        else:
            self._next_step()

    def _finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._tick()
        assert self.emitter is not None
        finish = getattr(self.workload, "finish", None)  # optional: a workload that keeps partial results
        if finish is not None:
            finish(self.emitter, reason)
        self._last_notes()
        self._checkpoint(force=True)
        self.emitter.emit(
            "phase_end",
            {"steps": float(self.steps), "active_s": self._active_s},
            notes=reason,
            phase=self._phase(),
        )
        counters = self.emitter.close()
        self.checkpoints.update(self, counters=counters)
        self._publish_status(force=True)
        if self.checkpoints.finish(reason, self):
            self._save()
        log.info("phase finished", experiment=self.experiment_id, run_id=self.run_id, reason=reason, steps=self.steps)
        self.exit()  # normal: as a significant child, its exit ends the tree (see the module docs)

    # --- control at safe points ------------------------------------------------------------------------

    def handle_pause(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Park the loop; ``at`` in the reply is when active time stopped (the run's record
        starts its pause there, so the record and the budget count the same time)."""
        if self.paused or self.finished:
            return {**self.status(), "at": self._mark}  # stopped already: when it last counted
        at = self._tick()
        self.paused = True
        self._paused_since_us, self._paused_at = time.time_ns() // 1000, at
        self._loop = secrets.token_hex(8)  # a step already queued belongs to the ended loop
        assert self.emitter is not None
        # the record's mark, sent before the Lab detaches the subscribers: the time until the
        # ``unpaused`` mark is no phase's work (durations, hypertune's stall and outcome windows)
        self._mark_pause("paused")
        self.emitter.flush()
        self.emitter.hold(True)
        self._checkpoint(force=True)
        return {**self.status(), "at": at}

    def handle_resume(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Continue the loop; ``at`` in the reply is when active time started again (the end of
        the run's pause in its record); the reading now when there was nothing to resume."""
        at = None
        if self.paused and not self.finished:
            at = self._tick()
            self.paused = False
            assert self.emitter is not None
            self.emitter.hold(False)  # the Lab has attached the subscribers again
            since, self._paused_since_us = self._paused_since_us, None
            began, self._paused_at = self._paused_at, None
            if began is not None:  # measured on the phase's own clock: no wall-clock step in it
                length: float | None = max(0.0, at - began)
            else:  # a pause restored from a checkpoint (a crash while paused): the wall clock is all there is
                length = None if since is None else max(0, time.time_ns() // 1000 - since) / 1e6
            self._mark_pause("unpaused", length)
            self.emitter.flush()  # the consumers learn now that the pause is over, as the Lab's caller does
            self._checkpoint(force=True)
            self._next_step()
        return {**self.status(), "at": self.clock() if at is None else at}

    def _mark_pause(self, name: str, paused_s: float | None = None) -> None:
        """A ``paused`` / ``unpaused`` event (telemetry.schema.RECORD_EVENTS: never sampled out),
        with the active seconds so far; ``unpaused`` also says how long the pause lasted
        (``paused_s``, seconds on the phase's clock), for a reader that missed its start (a
        hypertune restarted during it). A reader of the events leaves the time after a
        ``paused`` mark out."""
        assert self.emitter is not None
        values = {"active_s": self._active_s}
        if paused_s is not None:
            values["paused_s"] = paused_s
        self.emitter.emit(name, values, phase=self._phase())

    def handle_stop(self, msg: dict[str, Any]) -> dict[str, Any]:
        reason = str(msg.get("reason", "stopped"))
        if not self.finished and self.checkpoints.stop_reason is None:
            self.checkpoints.stop_reason = reason  # first: a crash in the stop must not lose it
        self._finish(self.checkpoints.stop_reason or reason)
        return self.status()

    def handle_set_param(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Apply a parameter change at this safe point; refused values come back as an error and
        a ``control_refused`` event in the phase in force.

        A message marked ``controller`` (hypertune's) is first put to the workload's optional
        ``check_controller_action(key, value)``: a workload refuses there what a person may ask
        for but an automatic controller must not do (an action that would end the run with
        budget left). The refusal's notes then end with the controller's reason, which is how
        the controller, reading the events, knows its action was refused."""
        key, value = msg.get("key"), msg.get("value")
        if self.finished:
            return {"ok": False, "error": "the phase has finished"}
        assert self.emitter is not None
        why = f"{msg.get('why', 'requested')}"[:500]
        try:
            if msg.get("refused"):  # a value no message could carry: the sender says what it was
                raise ValueError(str(msg["refused"]))
            if not isinstance(key, str):
                raise ValueError(f"a control's key must be a string, got {key!r:.200}")
            check = getattr(self.workload, "check_controller_action", None)  # optional, see below
            if msg.get("controller") and check is not None:
                check(key, value)
            before, after = self.workload.set_param(key, value)
        except (ValueError, TypeError) as exc:  # the request is the user's data: refused, never a crash
            shown = msg.get("shown") or f"{value!r:.200}"
            # a controller's refused action is part of how it learns (recorded as control_refused):
            # not a warning on the user's terminal; a person's refused request is
            say = log.info if msg.get("controller") else log.warning
            say("control action refused", key=f"{key!r:.200}", value=shown, error=f"{exc}"[:500])
            params = self.workload.params()
            self.emitter.emit(
                "control_refused",
                notes=bounded_notes(f"{key}={shown} refused: {exc}" + (f" ({why})" if msg.get("controller") else "")),
                parameters=params,
                phase=self._phase(),
            )
            return {"ok": False, "error": str(exc)}
        params = self.workload.params()
        self.emitter.emit(
            str(msg.get("event", "control")),
            parameters=params,
            phase=self._phase(),
            notes=bounded_notes(f"{key}: {before!r} -> {after!r} ({why})"),
        )
        # the change's event goes out before the checkpoint that keeps the change: a crash
        # between the two must not leave a resumed run with a value its events never mention
        self.emitter.flush()
        self._checkpoint(force=True)
        return {"ok": True, "key": key, "before": before, "after": after}

    def handle_note(self, msg: dict[str, Any]) -> None:
        """Record an observer's note (e.g. hypertune's outcome of an action) in the run's events."""
        if self.finished:
            return  # the emitter is closed: the run's events are complete
        self._record_note(msg)

    def _last_notes(self) -> None:
        """Ask each of :attr:`last_notes_from` for its last notes and record them. The events
        sent so far go out first, so an observer answers having seen all of them (its mailbox
        takes them before the ask). One that is gone or slow is skipped: the run ends anyway."""
        if not self.last_notes_from:
            return
        assert self.emitter is not None
        self.emitter.flush()
        for target in self.last_notes_from:
            ref = target.registry.whereis(target.name)
            if ref is None:
                continue
            try:
                notes = ref.ask({"kind": "last_notes"}, timeout=LAST_NOTES_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - an observer's trouble never holds up the end of a run
                log.info("no last notes", experiment=self.experiment_id, observer=target.name, error=repr(exc))
                continue
            for note in notes if isinstance(notes, list) else ():
                if isinstance(note, dict):
                    self._record_note(note)

    def _record_note(self, msg: dict[str, Any]) -> None:
        assert self.emitter is not None
        values = {
            k: float(v)
            for k, v in (msg.get("values") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self.emitter.emit(
            str(msg.get("name", "note")),
            values,
            notes=bounded_notes(str(msg.get("notes", ""))),
            phase=self._phase(),
        )

    def status(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "finished": self.finished,
            "steps": self.steps,
            "active_s": self.active_time(),
            "params": self.workload.params(),
            "counters": self.emitter.counters() if self.emitter else {},
        }

    def handle_status(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def handle_crash(self, msg: dict[str, Any]) -> None:
        """Fault injection for tests and drills: crash this phase now."""
        raise RuntimeError(str(msg.get("why", "injected phase crash")))

    def terminate(self, reason: str) -> None:
        if self.emitter is not None and not self._restored:
            # it crashed before the run's state was back (a checkpoint the workload refused):
            # a checkpoint now would replace the run's with a fresh workload's, losing its best
            self.emitter.abandon()
            return
        if self.emitter is not None and not self.finished:
            self._tick()
            if is_abnormal(reason):
                # a crash: the workload may hold half of the step that raised. The store keeps
                # the state after the last step that completed (taken after every step), which
                # the restarted phase goes on from, retrying that step; only the time is added
                self.checkpoints.update(self, active_s=self.active_time())
            else:
                self._last_notes()
                self._checkpoint(force=True)
            self.checkpoints.update(self, counters=self.emitter.close())
            self._save()
