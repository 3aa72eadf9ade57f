"""Experiments as supervised actor trees, and the Lab that runs many of them.

One experiment = one ``rest_for_one`` supervisor over Recorder, Sampler, AnomalyDetection,
StreamingMetrics, Phase and Hypertune (its start order: sink to source), with its own topics
and names (nothing is shared between experiments). Events flow one way::

    phase --events--> metrics
                  \\-> anomaly --> sampler --> recorder
    metrics --metrics--> hypertune;  anomaly --anomalies--> hypertune, sampler
    hypertune --control--> phase

Every child starts after what it feeds and stops before it, so a stop drains the pipeline
by construction. The phase is the tree's significant child: when its work is done it exits
and the tree shuts itself down (``auto_shutdown``); the Experiment learns the end from the
tree's death. See docs/experiments.md.

The Lab is a DynamicSupervisor of experiment trees. Trees are ``temporary`` children: an
experiment whose own supervisor gives up is marked failed and never drags the Lab (or
another experiment) down. Everything here is thread-safe and usable from any thread of
the host program; two Labs in one process share nothing.
"""

from __future__ import annotations

import errno
import numbers
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import orjson

from actors.anomaly import AnomalyDetection
from actors.base import ActorDeadError, ActorRef, is_abnormal, on_death
from actors.files import atomic_write
from actors.hypertune import Hypertune
from actors.log import get_logger
from actors.messages import encode
from actors.phase import CheckpointStore, PhaseActor
from actors.recorder import SHUTDOWN_S as RECORDER_SHUTDOWN_S
from actors.recorder import Recorder, check_artifacts_dir
from actors.registry import Registry
from actors.sampler import Sampler
from actors.snapshot import MAX_AGE_S, WAIT_S, Reading, Snapshot
from actors.streaming_metrics import StreamingMetrics
from actors.supervision import MAX_INTENSITY, ChildSpec, DynamicSupervisor, Supervisor, SupervisorRef
from actors.timers import check_timeout
from actors.topics import NamedTarget, Topics
from experiments.spec import load_spec
from experiments.validate import tree_problem
from experiments.workloads import Objective, declarations
from experiments.workloads import registry as workload_registry
from telemetry.history import HistoryTarget, describe_history, open_history, prepare_history
from telemetry.jsonl import JsonlWriter
from telemetry.query import prepare_query, query_answer
from telemetry.rundir import (
    CHECKPOINT,
    HEARTBEAT_S,
    HYPERTUNE_DIR,
    LIFECYCLE,
    LIFECYCLE_SCHEMA,
    LIVE,
    RECORDER_STATE,
    RUN_ID_TIME,
    SPEC,
    SUMMARY,
    RunStatus,
    check_experiment_id,
    find_runs,
    last_event_seq,
    last_event_ts,
    owner_alive,
    owner_info,
    read_json,
    read_summary,
    run_status,
    write_json,
)
from telemetry.schema import RECORD_EVENTS

log = get_logger("experiments.lab")

FETCH_TIMEOUT_S = 120.0  # a background refresh gives up after this (its ask stays queued: keep it rare)
METRIC_SUBSCRIBERS = ("metrics", "anomaly", "hypertune")  # detached from the events topic while paused
START_FAILED = "failed: could not start: "  # the reason of a run whose tree never started (see _fail_start)
EVENT_PATH_SHUTDOWN_S = 30.0
"""How long the tree's stop lets the sampler, the anomaly detector and the metrics actor finish
what is in their mailboxes before killing them. A kill loses what they had not read: events
on their way to the Recorder, the final metrics. A loaded machine can take seconds to drain
a backlog, so this is a limit for a hung actor only (the default 5 s was reached under load)."""
TREE_GONE_S = 60.0
"""After a stop from above (a phase that did not take the stop), how long ``stop()`` waits
for the tree to be down before it records the end anyway: the stuck phase is let go after
its shutdown time, then the event path drains (at most :data:`EVENT_PATH_SHUTDOWN_S`)."""
PAUSE_TIMEOUT_S = 30.0
"""How long pause() waits for the phase to reach a safe point (the end of a step, or its
``use_interrupt`` check) before withdrawing the pause."""
FINAL_RECORD_RETRY_S = (1.0, 60.0)  # an end's record that could not be written: tried again after, doubling to
MIN_FREE_BYTES = 16 << 20
"""Free space a new run needs on the artifacts disk (and the SQLite history's) to start. Below
it the start fails with ENOSPC before the run's folder is made: a run started on a nearly full
disk ends ``storage: ...`` within a second, where a failed start is held by a daemon's queue
until space is back (experiments.service)."""


def check_min_free(min_free_bytes: Any) -> int:
    """``min_free_bytes`` as an int if it is a whole number of bytes, 0 or more (a numpy
    integer too); ValueError naming it otherwise."""
    if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, numbers.Integral) or min_free_bytes < 0:
        raise ValueError(f"min_free_bytes must be a whole number of bytes, 0 or more, got {min_free_bytes!r}")
    return int(min_free_bytes)


class LifecycleError(RuntimeError):
    """Base of the lifecycle errors."""


class AlreadyPaused(LifecycleError):
    """pause() on a paused experiment."""


class NotRunning(LifecycleError):
    """The experiment is stopped, failed or archived."""


class NotPaused(LifecycleError):
    """resume() on an experiment that is not paused."""


class PauseTimedOut(LifecycleError, TimeoutError):
    """pause() whose phase did not reach a safe point in time (a step that does not yield):
    the pause is withdrawn, the run goes on as it was."""


class LabFull(LifecycleError):
    """start_experiment() on a Lab that runs ``max_experiments`` experiments already."""


class NotFound(LifecycleError, KeyError):
    """No experiment with that id in this Lab."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class ExperimentMetrics(StreamingMetrics):
    """StreamingMetrics that leaves its figures in the Experiment's snapshot when it stops: the
    final metrics of a run whose tree has gone down (see :meth:`Experiment.metrics`)."""

    def __init__(self, *args: Any, final: Snapshot, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final = final

    def terminate(self, reason: str) -> None:
        super().terminate(reason)
        self.final.publish(self.snapshot())


def _marker_owner(path: Path) -> dict[str, Any] | None:
    """Who wrote a resume marker (:func:`owner_info`; an older marker holds a bare pid), or None."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        owner = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(owner, int) and not isinstance(owner, bool):
        return {"pid": owner, "host": socket.gethostname()}
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def resume_point(
    run_dir: Path, checkpoint: dict[str, Any], resumes: int, history_seq: int | None = -1
) -> dict[str, Any]:
    """Where a crashed run's events go on, and its emitter counters, from its checkpoint and disk.

    The new emitter numbers from ``seq_start`` = max(the checkpoint's ``published``, the last
    seq on disk + 1, what the Recorder last heard, the history's last seq of the run + 1): the
    Recorder skips rows at or below the last seq on disk as replays, and the history keeps only
    the seqs no stored batch holds, so a lower start would silently lose new events (the
    history holds more than the files when their tail was lost: cut by a crash of the disk
    before its fsync, or restored from a backup). ``history_seq`` is the history's last seq of
    the run (-1: none), or None when the history could not be asked (said in ``resume``). Every seq
    below the start counts as published, so what was published (or taken into a batch held
    by a pause) and never reached the disk (the in-flight batches lost in the kill) is
    accounted as lost in transit; ``emitted`` is then ``published + dropped``, which keeps
    ``emitted = persisted + dropped + sampled_out`` balanced across the restart.
    """
    cp_counters = {k: int(v) for k, v in (checkpoint.get("counters") or {}).items() if isinstance(v, int)}
    try:
        rec_counters = (read_json(run_dir / RECORDER_STATE) or {}).get("counters") or {}
    except (OSError, ValueError):
        rec_counters = {}
    rec_counters = {k: int(v) for k, v in rec_counters.items() if isinstance(v, int) and not isinstance(v, bool)}
    published = cp_counters.get("published", 0)
    dropped = max(cp_counters.get("dropped", 0), rec_counters.get("dropped", 0))
    unsent = max(0, cp_counters.get("emitted", 0) - published - cp_counters.get("dropped", 0))  # held back
    last_seq = last_event_seq(run_dir)
    seq_start = max(
        published + unsent,
        last_seq + 1,
        rec_counters.get("published", 0),
        rec_counters.get("emitted", 0) - rec_counters.get("dropped", 0),
        -1 if history_seq is None else history_seq + 1,
    )
    counters = {
        "emitted": seq_start + dropped,
        "published": seq_start,
        "dropped": dropped,
        "rejected": max(cp_counters.get("rejected", 0), rec_counters.get("rejected", 0)),
    }
    now = time.time()
    saved = checkpoint.get("saved_at")
    saved = float(saved) if isinstance(saved, (int, float)) and not isinstance(saved, bool) else None
    last_ts = last_event_ts(run_dir)
    info: dict[str, Any] = {
        "seq_start": seq_start,
        "resumes": resumes,
        "last_seq_on_disk": last_seq,
        "last_seq_in_history": history_seq,  # None: the history could not be asked
        "checkpoint_steps": int(checkpoint.get("steps", 0) or 0),
        "checkpoint_published": published,
        "events_after_checkpoint": seq_start - published,
    }
    if saved is not None:
        info["checkpoint_age_s"] = max(0.0, now - saved)
        if last_ts is not None:
            info["lost_s"] = max(0.0, last_ts / 1e6 - saved)
    return {"counters": counters, "resume": info}


class HistorySeqs:
    """The history's last seq of each run a recovery resumes (:meth:`BatchStore.max_seq`), the
    history opened once, read-only, on first use. A history that cannot be asked (a server
    away, a damaged file) is said once in the log and then answers None: the resumes go on,
    numbered after what the files and the checkpoints say (as they would without it)."""

    def __init__(self, target: HistoryTarget, artifacts: Path) -> None:
        self.target, self.artifacts = target, artifacts
        self._store: Any = None
        self._away: str | None = None

    def last_seq(self, run_id: str) -> int | None:
        if self._away is not None:
            return None
        try:
            if self._store is None:
                self._store = open_history(self.target, artifacts=self.artifacts, readonly=True)
            return self._store.max_seq(run_id)
        except FileNotFoundError:  # no history file yet: it holds nothing of any run
            return -1
        except Exception as exc:  # noqa: BLE001 - away or damaged: no worse than numbering without it
            self._away = f"{type(exc).__name__}: {exc}"
            log.warning(
                "the history could not be asked for the runs' last seqs; resumed runs are numbered after "
                "their files and checkpoints alone, and events the history holds past those will not reach it",
                history=describe_history(self.target, self.artifacts),
                error=self._away,
            )
            self.close()
            return None

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - a read-only handle: nothing of ours is lost
                pass


def new_run_id() -> str:
    return time.strftime(RUN_ID_TIME, time.gmtime()) + "-" + secrets.token_hex(3)


class Experiment:
    """A handle on one running (or finished) experiment; returned by :meth:`Lab.start_experiment`.

    Reads (:meth:`status`, :meth:`summary`, :meth:`metrics`, :meth:`phase_status`,
    :meth:`durations`) never queue behind a busy actor: they take the snapshots the actors
    publish (see :mod:`actors.snapshot`) and say ``stale`` with the age when a snapshot
    could not be refreshed in time. Transitions (pause, resume, stop, archive) are
    serialised and each one is written to ``lifecycle.json`` before it returns (see
    :mod:`telemetry.rundir`).
    """

    def __init__(
        self, lab: Lab, spec: dict[str, Any], exp_id: str, run_id: str, resume: dict[str, Any] | None = None
    ) -> None:
        self.lab = lab
        self.spec = spec
        self.id = exp_id
        self.run_id = run_id
        self.clock = lab.clock
        self.topics = Topics()
        self.registry = Registry()
        self.run_dir = lab.artifacts / exp_id / run_id
        # the owner's only: the workload's arguments are in the spec, the events and the checkpoints
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.checkpoints = CheckpointStore(self.run_dir / CHECKPOINT)
        self._lock = threading.RLock()  # serialises transitions (may be held for a whole stop)
        self._state = threading.Lock()  # guards what readers see; only ever held briefly
        self._write_lock = threading.Lock()  # one lifecycle.json writer at a time, newest state last
        self._status = RunStatus.RUNNING
        self._reason: str | None = None
        self._ended = False
        self._start_failed = False  # the tree never started (see _fail_start)
        self._objective = self._own_objective()  # in every lifecycle record: see telemetry.rundir.recorded_objective
        self._stop_not_taken: tuple[str, float | None] | None = None  # see _killed_reason
        self._stopped = threading.Event()  # set once the end is recorded (on disk, or owed: see _end)
        self._beat_stop = threading.Event()  # ends the heartbeat, before the final record is written
        self.final_record_written = threading.Event()  # the end's lifecycle record is on disk (see _end)
        self._gave_up_on: str | None = None  # "child: reason": the exit over the restart intensity
        self._beat: threading.Thread | None = None
        self.started_at = self.clock()
        self.stop_started_at: float | None = None  # when a stop began (the Lab's clock)
        self.ended_at: float | None = None
        self._wall = {"started_at": time.time(), "stop_requested_at": None, "ended_at": None}
        self._paused_at: float | None = None
        self.paused_duration = 0.0
        self.pause_count = 0
        self.resume_count = 0
        self.resumes = 0  # how many times the run was resumed in a new process after its owner died
        self._prior = {"wall": 0.0, "active": 0.0, "paused": 0.0, "down": 0.0}  # before the last such resume
        self.sup: SupervisorRef | None = None
        self._final_summary: dict[str, Any] | None = None
        self._final_metrics: dict[str, Any] | None = None
        self._summary_snap = Snapshot()  # refreshed by asking the Recorder (one ask at a time)
        self._phase_snap = Snapshot()  # published by the phase at its safe points
        self._metrics_snap = Snapshot()  # refreshed by asking StreamingMetrics (one ask at a time)
        self._owner = owner_info()
        if resume is None:
            spec_json = orjson.dumps(spec, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
            # the record first: a process killed from here on leaves a run that lists (crashed, and why)
            self._write_lifecycle()
            atomic_write(self.run_dir / SPEC, spec_json, mode=0o600)  # specs may be private: the owner's only
        else:
            self._take_over(resume)
            # not resumed unless its record says so: a run that ran with a record still saying it
            # crashed would be resumed again at every start of a Lab on the folder, and listed crashed
            path = self.run_dir / LIFECYCLE
            try:
                write_json(path, self._record())
            except OSError as exc:
                raise LifecycleError(
                    f"cannot write the lifecycle record {str(path)!r} ({exc.strerror or exc}); not resumed"
                ) from exc

    def _take_over(self, rec: dict[str, Any]) -> None:
        """Carry a crashed run's lifecycle record over: counts, the original start, and the time
        it had run, been paused and been down (nobody running it) before this process took it."""
        now = time.time()

        def num(key: str) -> float:
            v = rec.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

        cp_active = self.checkpoints.get().get("active_s")
        active = max(num("active_duration"), float(cp_active) if isinstance(cp_active, (int, float)) else 0.0)
        # the phase goes on from the same figure: its budget counts the time actually run, as the record does
        self.checkpoints.update(active_s=active)
        paused = num("paused_duration")
        started = rec.get("started_at")
        wall = max(now - started, active + paused) if isinstance(started, (int, float)) else active + paused
        self._prior = {"wall": wall, "active": active, "paused": paused, "down": wall - active - paused}
        self._wall["started_at"] = started if isinstance(started, (int, float)) else now
        self._wall["resumed_at"] = now
        self.pause_count = int(num("pause_count"))
        self.resume_count = int(num("resume_count"))
        self.resumes = int(num("resumes")) + 1
        if rec.get("status") == RunStatus.PAUSED:
            self._status = RunStatus.PAUSED  # the pause goes on: it ends with resume() or stop()
            self._paused_at = self.clock()

    # --- the tree ------------------------------------------------------------------------------------

    def child_spec(self) -> ChildSpec:
        s, t, a, h = self.spec, self.spec["telemetry"], self.spec["anomaly"], self.spec["hypertune"]
        reg, topics = self.registry, self.topics
        wl_cls = workload_registry()[s["workload"]["name"]]
        children = [
            ChildSpec(
                "recorder",
                Recorder,
                args=(self.lab.artifacts, self.id, self.run_id),
                name="recorder",
                shutdown=RECORDER_SHUTDOWN_S,
                kwargs={
                    "history": self.lab.history,
                    "rotate_bytes": int(t["rotate_mb"] * (1 << 20)),
                    "fsync_interval": t["fsync_interval_s"],
                    "ring_size": t["ring_size"],
                    "index_limit": t["index_limit"],
                    "maximize": self._maximize(),
                    "on_storage_failure": NamedTarget("phase", reg),
                },
            ),
            ChildSpec(
                "sampler",
                Sampler,
                args=(
                    self.id,
                    NamedTarget("recorder", reg),
                    s["sampling"]["strategy"],
                    s["sampling"]["config"],
                    s["seed"],
                    (*RECORD_EVENTS, *getattr(wl_cls, "record_events", ())),  # the run's record: never sampled out
                ),
                name="sampler",
                shutdown=EVENT_PATH_SHUTDOWN_S,
            ),
            ChildSpec(
                "anomaly",
                AnomalyDetection,
                args=(self.id, NamedTarget("sampler", reg), topics),
                name="anomaly",
                shutdown=EVENT_PATH_SHUTDOWN_S,
                kwargs={
                    "enabled": a["enabled"],
                    "methods": a["methods"],
                    "metrics": a.get("metrics"),
                    "threshold": a.get("threshold"),
                    "action": a["action"],
                    "window": a["window"],
                    "warmup": a["warmup"],
                    "ewma_lambda": a["ewma_lambda"],
                    "period_gap_s": a["period_gap_s"],
                    "seed": s["seed"],
                    "notes_to": NamedTarget("phase", reg),  # an unseen metric is said in the run's events
                },
            ),
            ChildSpec(
                "metrics",
                ExperimentMetrics,
                args=(self.id, topics),
                name="metrics",
                shutdown=EVENT_PATH_SHUTDOWN_S,
                kwargs={
                    "final": self._metrics_snap,
                    "windows": s["metrics"]["windows_s"],
                    "publish_interval": s["metrics"]["publish_interval_s"],
                    "compression": s["metrics"]["compression"],
                },
            ),
            # significant: its normal exit (work done) shuts the tree down; transient: a crash restarts it
            ChildSpec(
                "phase",
                PhaseActor,
                name="phase",
                restart="transient",
                significant=True,
                args=(self.id, self.run_id, wl_cls, s["workload"]["params"], topics, self.checkpoints),
                kwargs={
                    "seed": s["seed"],
                    "budget_s": s["time_budget_s"],
                    "clock": self.clock,  # one clock for the budget and the record (see _phase_time)
                    "run_dir": self.run_dir,
                    "status_snapshot": self._phase_snap,
                    "watch": (NamedTarget("sampler", reg), NamedTarget("recorder", reg)),
                    # a short run still hears of a misspelt anomaly.metrics (asked only when there are some)
                    "last_notes_from": (NamedTarget("anomaly", reg),) if a["enabled"] and a.get("metrics") else (),
                    "emitter_opts": {
                        "batch_size": t["batch_size"],
                        "flush_interval": t["flush_interval_s"],
                        "overflow": t["overflow"],
                        "max_backlog": t["max_backlog"],
                        "block_timeout": t["block_timeout_s"],
                        "debug": t["debug"],
                    },
                },
            ),
            # last: under rest_for_one a hypertune crash then restarts only hypertune, never the phase;
            # and it is the first to stop, so no control reaches a phase that is draining
            ChildSpec(
                "hypertune",
                Hypertune,
                args=(self.id, h["enabled"], reg),
                name="hypertune",
                kwargs={
                    "window_s": h["window_s"],
                    "policy": h["policy"],
                    "state_file": self._policy_file(),
                    "workload": s["workload"]["name"],
                    "family": self._family(),
                    "seed": s["seed"],
                    **declarations(wl_cls),  # objective, arms, takeover as plain data: hypertune imports no workload
                },
            ),
        ]
        if self._status != RunStatus.PAUSED:  # a run resumed paused starts detached, as pause() leaves it
            self._attach_event_subscribers(True)
        topics.subscribe_name("metrics", "hypertune", reg)
        topics.subscribe_name("anomalies", "hypertune", reg)
        topics.subscribe_name("anomalies", "sampler", reg)
        sv = s["supervision"]
        return ChildSpec(
            self.id,
            Supervisor,
            restart="temporary",
            shutdown="infinity",
            kwargs={
                "children": children,
                "strategy": "rest_for_one",
                "auto_shutdown": "any_significant",
                "max_restarts": sv["max_restarts"],
                "max_seconds": sv["max_seconds"],
                "registry": reg,
                "on_restart": self._note_restart,
                "on_give_up": self._note_give_up,
            },
        )

    def _family(self) -> str:
        """The instance family, as the workload tells it (hypertune's learning is shared by family)."""
        wl = self.spec["workload"]
        return workload_registry()[wl["name"]].family(wl["params"] or {})

    def _policy_file(self) -> str:
        """Per workload and instance family, shared by the runs of this artifacts folder."""
        explicit = self.spec["hypertune"].get("state_file")
        if explicit:
            return explicit
        return str(self.lab.artifacts / HYPERTUNE_DIR / f"{self.spec['workload']['name']}-{self._family()}.json")

    def _note_restart(self, child: str, reason: str) -> None:
        self.registry.send("recorder", {"kind": "note_restart", "child": child, "reason": reason})

    def _note_give_up(self, child: str, reason: str) -> None:
        self._gave_up_on = f"{child}: {reason}"  # the run's reason says why the tree kept failing

    def _attach(self, sup: SupervisorRef) -> None:
        self.sup = sup
        self._beat = threading.Thread(target=self._heartbeat, name=f"exp-{self.id}-heartbeat", daemon=True)
        self._beat.start()
        on_death(sup, self._tree_died)  # at once if the tree is already down

    def _heartbeat(self) -> None:
        """Rewrite lifecycle.json every HEARTBEAT_S while the run lives: its owner is alive."""
        while not self._beat_stop.wait(HEARTBEAT_S):
            self._write_lifecycle()

    def _tree_died(self, reason: str) -> None:
        """The end of the run, whatever ended it (in the dying supervisor's thread, its children
        all stopped): the phase finished (completed, budget, stopped, storage: the tree shut
        itself down), the tree was stopped, or it gave up (failed). The run is marked ended
        whatever reading its summary meets (out of file descriptors, say): a run that reads
        as running after its tree died would hold its queue slot for ever."""
        try:
            self._final_summary = self._last_summary()
        except Exception as exc:  # noqa: BLE001 - the end must be recorded whatever the disk says
            log.error("final summary unreadable", experiment=self.id, error=repr(exc))
            self._final_summary = self._summary_snap.latest().value or {}
        self._final_metrics = self._metrics_snap.latest().value
        if is_abnormal(reason):
            if reason == MAX_INTENSITY and self._gave_up_on:
                reason = f"{reason} ({self._gave_up_on})"
            log.error("experiment tree gave up", experiment=self.id, reason=reason)
            self._end(RunStatus.FAILED, f"failed: {reason}")
        elif self._end(RunStatus.STOPPED, self.checkpoints.finish_reason or self._killed_reason() or "stopped"):
            log.info("experiment ended", experiment=self.id, run_id=self.run_id, reason=self._reason)

    def _killed_reason(self) -> str | None:
        """The end's reason when a stop's phase never took it (a step that does not yield) and
        never finished: the tree was stopped from above, the phase killed mid-step (its thread
        abandoned). A run cut short so must not read as a clean stop. (A phase that took the
        stop late has finished: its own reason stands.)"""
        if self._stop_not_taken is None:
            return None
        reason, timeout = self._stop_not_taken
        within = "" if timeout is None else f" within {timeout:g} s"
        return f"{reason} (the phase was killed mid-step: it did not take the stop{within})"

    def _last_summary(self) -> dict[str, Any]:
        """The Recorder's final summary: summary.json (written as it stopped) or, if that says
        less (it could not be written), the Recorder's last answer."""
        disk = read_summary(self.run_dir)
        last = self._summary_snap.latest().value
        if last is not None and (last.get("events_persisted") or 0) > (disk.get("events_persisted") or 0):
            return last
        return disk

    def _live_phase(self, timeout: float) -> ActorRef | None:
        """The live phase, waiting at most ``timeout`` for a replacement while it restarts, but
        not at all once it has finished or the run has ended: no replacement will come then."""
        deadline = time.monotonic() + timeout
        while True:
            ref = self.registry.await_name("phase", timeout=max(0.0, min(0.05, deadline - time.monotonic())))
            if ref is not None:
                return ref
            if self._ended or self.checkpoints.finish_reason is not None or time.monotonic() >= deadline:
                return None

    def _ask_phase(self, msg: dict[str, Any], action: str, timeout: float = 30) -> Any:
        """Ask the phase, urgently (a step under way ends at its next safe point); NotRunning if
        it is gone or goes while asked (the run is ending)."""
        ref = self._live_phase(10)
        if ref is None:
            raise NotRunning(f"experiment {self.id!r} has no live phase (status {self._status}); cannot {action}")
        try:
            return ref.ask(msg, timeout=timeout, urgent=True)  # a long step ends early for it
        except ActorDeadError as exc:
            raise NotRunning(f"experiment {self.id!r} is ending; cannot {action}") from exc

    # --- lifecycle -----------------------------------------------------------------------------------------

    def status(self) -> str:
        """``running``, ``paused``, ``stopped``, ``failed`` or ``archived`` (a :class:`RunStatus`)."""
        return self._status

    @property
    def reason(self) -> str | None:
        """Why it ended: ``completed``, ``budget``, ``stopped``, ``failed: ...``."""
        return self._reason

    def _check_live(self, action: str) -> RunStatus:
        with self._state:
            status = self._status
        if self._ended or status not in LIVE:
            raise NotRunning(f"experiment {self.id!r} is {status}; cannot {action}")
        return status

    def pause(self) -> None:
        """Detach the metric subscribers and park the phase at its next safe point."""
        with self._lock:
            if self._status == RunStatus.PAUSED:
                raise AlreadyPaused(f"experiment {self.id!r} is already paused")
            self._check_live("pause")
            asked = self.clock()
            try:
                reply = self._ask_phase({"kind": "pause"}, "pause", timeout=PAUSE_TIMEOUT_S)
            except TimeoutError:
                self._withdraw_pause()
                raise PauseTimedOut(
                    f"experiment {self.id!r}: the phase did not reach a safe point to pause within "
                    f"{PAUSE_TIMEOUT_S:g} s (a step that does not yield: see the workload protocol's "
                    "use_interrupt); the pause is withdrawn and the run goes on"
                ) from None
            except Exception:  # NotRunning (no live phase): nothing was left in a phase's mailbox
                raise
            except BaseException:  # Ctrl-C in the wait: as a timeout, or the phase parks a run said running
                self._withdraw_pause()
                raise
            if reply.get("finished"):
                raise NotRunning(f"experiment {self.id!r} has finished; cannot pause")
            try:
                self._attach_event_subscribers(False)
            except BaseException:  # the same, one step later: the run goes on as the record says
                self._attach_event_subscribers(True)
                self._withdraw_pause()
                raise
            with self._state:
                self._paused_at = self._phase_time(reply, asked)
                self.pause_count += 1
                self._status = RunStatus.PAUSED
            self._write_lifecycle()

    def resume(self) -> None:
        """Reattach the subscribers and let the phase continue; the pause ends when the phase
        starts again (its reply's ``at``), so the record counts active what the budget counts."""
        with self._lock:
            if self._status == RunStatus.RUNNING:
                raise NotPaused(f"experiment {self.id!r} is running, not paused")
            self._check_live("resume")
            self._attach_event_subscribers(True)
            asked = self.clock()
            reply = self._ask_phase({"kind": "resume"}, "resume")
            with self._state:
                self._close_pause(self._phase_time(reply, asked))
                self.resume_count += 1
                self._status = RunStatus.RUNNING
            self._write_lifecycle()

    def _withdraw_pause(self) -> None:
        """Undo a pause the phase did not take in time: it is still in the phase's mailbox and
        would park the run at the end of the step while this record says running (a run that
        stalls, whose resume() is refused). A resume queued behind it lets the run go on;
        the phase records the short pause between them as one (``paused``/``unpaused``)."""
        ref = self.registry.whereis("phase")
        if ref is not None:
            try:
                ref.tell({"kind": "resume"})
            except ActorDeadError:
                pass  # gone: its pause went with it
        log.warning("pause not taken in time; withdrawn", experiment=self.id, timeout_s=PAUSE_TIMEOUT_S)

    def _attach_event_subscribers(self, on: bool) -> None:
        """Subscribe (or detach, for a pause) the actors that consume the events topic."""
        for name in METRIC_SUBSCRIBERS:
            if on:
                self.topics.subscribe_name("events", name, self.registry)
            else:
                self.topics.unsubscribe_name("events", name, self.registry)

    def _phase_time(self, reply: Any, asked: float) -> float:
        """When the phase's active time stopped (pause) or started again (resume), from its reply:
        on the Lab's clock, which the phase counts on too. The record's pauses are the phase's,
        so ``active_duration`` and the phase's ``active_s`` do not drift apart cycle by cycle
        (the time to ask, detach and write the record is no longer active on one side only).
        A reading outside the ask (a tree on another host, whose clock is its own) is not
        comparable: now is taken instead."""
        at = reply.get("at") if isinstance(reply, dict) else None
        now = self.clock()
        if isinstance(at, (int, float)) and not isinstance(at, bool) and asked <= at <= now:
            return float(at)
        return now

    def _close_pause(self, at: float | None = None) -> None:
        """Fold an open pause, ended at ``at`` (default now), into ``paused_duration`` (caller holds ``_state``)."""
        if self._paused_at is not None:
            end = self.clock() if at is None else at
            self.paused_duration += max(0.0, end - self._paused_at)
            self._paused_at = None

    def stop(self, timeout: float | None = 60.0) -> None:
        """Ask the phase to stop and wait (each step at most ``timeout``) for the tree to go down.

        The phase finishes (its last events and counters go out) and exits; the tree then stops
        its children in reverse start order, each after what it already holds, so everything
        emitted reaches the disk before the Recorder stops (see docs/experiments.md).

        Refused (NotRunning) only for a run that had ended when asked: a stop that waited
        behind another stop, or behind the budget, returns once the tree is down, as asked.
        ``timeout``: seconds, or None or ``math.inf`` for no limit; another value is a
        ValueError before anything changes (a stop half begun would be on the record).
        """
        timeout = check_timeout(timeout)
        self._check_live("stop")
        with self._lock:
            if self._ended:  # ended while this stop waited its turn: done, as asked
                return
            self._check_live("stop")
            self._shutdown_tree("stopped", timeout)

    def _shutdown_tree(self, reason: str, timeout: float | None = 60.0) -> None:
        with self._lock:
            if self._ended:
                return
            with self._state:
                if self._ended:  # the tree ended meanwhile: the record must not show a later stop
                    return
                self.stop_started_at = self.clock()
                self._wall["stop_requested_at"] = time.time()
                paused = self._status == RunStatus.PAUSED
            self._write_lifecycle()  # a stop under way: evidence if the process dies during it
            if paused:  # reattach so the final events and counters are recorded
                self._attach_event_subscribers(True)
            # restarting: wait a little for the replacement; finished: the tree is going down already
            phase = self._live_phase(min(10.0, timeout or 10.0))
            try:
                if phase is not None:
                    phase.ask({"kind": "stop", "reason": reason}, timeout=timeout, urgent=True)
            except (ActorDeadError, TimeoutError) as exc:
                log.warning("phase did not take the stop", experiment=self.id, error=str(exc))
                if isinstance(exc, TimeoutError):
                    self._stop_not_taken = (reason, timeout)
            if not self._stopped.wait(timeout):  # the phase could not end the tree: stop it from above
                log.error("experiment tree did not shut down; stopping it", experiment=self.id)
                if self.sup is not None and self.sup.is_alive():
                    self.sup.stop(timeout=timeout, reason="shutdown")
                    # the tree goes on stopping past that timeout (a stuck phase is let go after
                    # its own shutdown time, then the Recorder flushes): the end is recorded
                    # once it is down, so that what stop() leaves is all on disk
                    if self.sup.wait(None if timeout is None else TREE_GONE_S) is None:
                        log.error("experiment tree still not down; recording its end", experiment=self.id)
            end = self.checkpoints.finish_reason or self._killed_reason() or reason
            if self._end(RunStatus.STOPPED, end):  # the tree never said
                log.error("experiment ended without its tree", experiment=self.id, run_id=self.run_id)

    def _end(self, status: RunStatus, reason: str) -> bool:
        """Record the end (once: a tree that failed while stopping stays failed), on disk first."""
        with self._state:
            if self._ended:
                return False
            self._ended = True
            self._close_pause()
            self._status, self._reason = status, reason
            self.ended_at = self.clock()
            self._wall["ended_at"] = time.time()
        self._beat_stop.set()
        beat = self._beat
        if beat is not None and beat is not threading.current_thread():
            beat.join(HEARTBEAT_S * 2)  # gone before the final write: nothing rewrites the ended record
        try:
            if self._write_lifecycle():
                self.final_record_written.set()
            else:
                threading.Thread(target=self._write_final_record, name=f"lifecycle-{self.id}", daemon=True).start()
        finally:
            self._stopped.set()
        return True

    def _write_final_record(self) -> None:
        """The end's record could not be written (a full disk): try again, waiting longer each
        time, until it is. A record left saying ``running`` would have the next Lab on the
        folder take the run for a crash and resume it: a run answered ``failed`` would run
        after all, and its record would say it ran normally."""
        wait = FINAL_RECORD_RETRY_S[0]
        while not self.final_record_written.wait(wait):
            if self.lab.closed or not self.run_dir.is_dir():  # the Lab's shutdown made the last try; a folder gone
                return
            self.write_final_record()
            wait = min(wait * 2, FINAL_RECORD_RETRY_S[1])

    def write_final_record(self) -> bool:
        """Write the end's record now if it is still owed (see :meth:`_write_final_record`);
        whether it is on disk. Logged when it is written at last."""
        if self.final_record_written.is_set():
            return True
        if not self._write_lifecycle():
            return False
        log.info("lifecycle record of the end written at last", experiment=self.id, run_id=self.run_id)
        self.final_record_written.set()
        return True

    @property
    def ended(self) -> bool:
        """Whether the run's end is recorded (its record on disk, or owed: see :meth:`write_final_record`)."""
        return self._ended

    def _fail_start(self, exc: BaseException) -> None:
        """The tree never started: the run directory must not claim a live run, and its record
        says ``start_failed`` (a daemon's queue tells such a try from a start)."""
        self._start_failed = True
        self._end(RunStatus.FAILED, f"{START_FAILED}{type(exc).__name__}: {exc}")

    def restart_pass(self) -> dict[str, Any]:
        """Ask the workload to start a new pass from its best solution (if it has passes)."""
        self._check_live("restart a pass")
        reply = self._ask_phase(
            {"kind": "set_param", "key": "restart_pass", "value": True, "why": "restart requested", "event": "control"},
            "restart a pass",
        )
        if not reply.get("ok"):
            raise LifecycleError(f"experiment {self.id!r} cannot restart a pass: {reply.get('error')}")
        return reply

    def set_param(self, key: str, value: Any, why: str = "requested") -> dict[str, Any]:
        """Change a workload parameter (a key its ``set_param`` accepts, e.g. a declared control) at
        the phase's next safe point; it is recorded as a ``control`` event and checkpointed.
        Returns ``{"ok", "key", "before", "after"}``. A value the workload refuses raises
        ValueError (recorded as ``control_refused``; the run goes on); so does a value no
        message can carry (an integer past 64 bits, an object): the phase is told only that
        it was refused, and why."""
        self._check_live("set a parameter")
        if not isinstance(key, str) or not key or not key.isprintable() or len(key) > 200:
            raise ValueError(
                f"a control's key must be a non-empty printable string of at most 200 characters, got {key!r:.200}"
            )
        # a note: kept, made printable (a control character or a lone surrogate becomes its escape)
        why = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(why)[:500])[:500]
        msg = {"kind": "set_param", "key": key, "value": value, "why": why, "event": "control"}
        try:
            encode({"value": value})
        except TypeError as exc:  # what no message can carry (2**64, an object): refused, and recorded so
            msg.update(value=None, refused=f"no message can carry it ({exc})", shown=f"{value!r:.200}")
        else:
            if (problem := tree_problem(value, key)) is not None:  # NaN, an infinity: no control's value
                msg.update(value=None, refused=f"{problem[0]} {problem[1]}", shown=f"{value!r:.200}")
        reply = self._ask_phase(msg, "set a parameter")
        if not reply.get("ok"):
            raise ValueError(f"experiment {self.id!r}: {key:.200}={value!r:.200} refused: {reply.get('error')!s:.500}")
        return reply

    def archive(self) -> None:
        """Mark a finished experiment archived (stopping it first if it still runs)."""
        with self._lock:
            if not self._ended:
                self._shutdown_tree("stopped")
            with self._state:
                self._status = RunStatus.ARCHIVED
            self._write_lifecycle()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the experiment has ended (completed, budget, stopped or failed); whether
        it has. ``timeout``: seconds, or None or ``math.inf`` to wait for ever."""
        return self._stopped.wait(check_timeout(timeout))

    # --- the lifecycle record ------------------------------------------------------------------------------

    def _own_objective(self) -> dict[str, Any] | None:
        """The workload's objective as plain data, or None for a workload no class answers to
        (a spec refused at start): the record lets readers in other processes, which may not
        know the workload (one registered in a script), judge the run."""
        wl = self.spec.get("workload")
        name = wl.get("name") if isinstance(wl, dict) else None
        cls = workload_registry().get(name) if isinstance(name, str) else None
        obj = getattr(cls, "objective", None)
        return obj.to_dict() if isinstance(obj, Objective) else None

    def _maximize(self) -> list[str]:
        """The fields whose best is their maximum: ``telemetry.maximize``, and the objective's
        field when its direction is ``max`` (the summary's ``best`` then agrees with ``crucible
        list``, which judges by the objective)."""
        fields = list(self.spec["telemetry"]["maximize"])
        obj = self._objective
        if obj and obj["direction"] == "max" and obj["field"] not in fields:
            fields.append(obj["field"])
        elif obj and obj["direction"] == "min" and obj["field"] in fields:
            fields.remove(obj["field"])  # the workload's own direction wins, as in crucible list
        return fields

    def _record(self) -> dict[str, Any]:
        with self._state:
            return (
                {
                    "schema": LIFECYCLE_SCHEMA,
                    "experiment_id": self.id,
                    "run_id": self.run_id,
                    "status": str(self._status),
                    "reason": self._reason,
                    "owner": self._owner,
                    **self._wall,
                    "updated_at": time.time(),
                    "heartbeat_s": HEARTBEAT_S,
                    "undelivered": self.registry.undelivered(),
                    "sent_after_exit": self.registry.sent_after_exit(),
                    **self._durations(),
                }
                | ({"start_failed": True} if self._start_failed else {})
                | ({"objective": self._objective} if self._objective else {})
            )

    def _write_lifecycle(self) -> bool:
        """Rewrite lifecycle.json from the current state (atomic, fsynced; see telemetry.rundir);
        False when it could not be written (logged)."""
        with self._write_lock:
            try:
                write_json(self.run_dir / LIFECYCLE, self._record())
            except OSError as exc:
                log.error(
                    "cannot write the lifecycle record",
                    experiment=self.id,
                    file=str(self.run_dir / LIFECYCLE),
                    error=str(exc),
                )
                return False
        return True

    # --- reading ---------------------------------------------------------------------------------------------

    def _durations(self) -> dict[str, Any]:
        end = self.ended_at if self.ended_at is not None else self.clock()
        paused = self.paused_duration + (end - self._paused_at if self._paused_at is not None else 0.0)
        wall = end - self.started_at
        prior = self._prior
        return {
            "wall_clock_duration": prior["wall"] + wall,
            "active_duration": prior["active"] + wall - paused,
            "paused_duration": prior["paused"] + paused,
            "down_duration": prior["down"],
            "pause_count": self.pause_count,
            "resume_count": self.resume_count,
            "resumes": self.resumes,
        }

    def durations(self) -> dict[str, Any]:
        """Wall-clock, active and paused seconds (the Lab's clock), pause and resume counts."""
        with self._state:
            return self._durations()

    def _fetch(self, name: str, msg: dict[str, Any]) -> Callable[[], Any]:
        """An ask of the named child, for a snapshot's background refresh."""

        def fetch() -> Any:
            ref = self.registry.whereis(name)
            return None if ref is None else ref.ask(msg, timeout=FETCH_TIMEOUT_S)

        return fetch

    def _reading(self, snap: Snapshot, name: str, msg: dict[str, Any], max_age: float, wait: float) -> Reading:
        if self._ended:  # nothing newer will come: the last published value, for what it is
            return snap.latest()
        return snap.read(self._fetch(name, msg), max_age, wait)

    def summary(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """RunSummary figures plus lifecycle durations (seconds) and counts; never blocks for long.

        While the run is live the figures are the latest summary the Recorder gave; if that is
        older than ``max_age`` seconds a new one is asked for and awaited at most ``wait``
        seconds (see :mod:`actors.snapshot`). ``stale`` says the figures are older than
        ``max_age`` and ``age_s`` how old they are (None: read from ``summary.json`` because
        the Recorder has not answered yet). ``max_age=0`` with a generous ``wait`` gets
        figures the Recorder produced after the call began. Once ended: the final summary,
        ``stale`` False. ``undelivered``: per name, the messages sent to it that no actor of
        that name received (see :meth:`actors.registry.Registry.undelivered`).
        """
        base = self._final_summary
        flags: dict[str, Any] = {"stale": False, "age_s": 0.0}
        if base is None:
            r = self._reading(self._summary_snap, "recorder", {"kind": "summary"}, max_age, wait)
            base, flags = r.value, r.flags()
            if self._ended:  # the tree failed: the Recorder's last answer, or its files if they say more
                disk = read_summary(self.run_dir)
                if base is None or (disk.get("events_persisted") or 0) > (base.get("events_persisted") or 0):
                    base = disk
                self._final_summary = base  # final now: read once
                flags["stale"] = False
            elif base is None:  # no answer yet: what the Recorder last wrote
                base, flags = self._summary_file(), {"stale": True, "age_s": None}
        with self._state:
            return {
                **base,
                "experiment_id": self.id,
                "run_id": self.run_id,
                "status": str(self._status),
                "reason": self._reason,
                "undelivered": self.registry.undelivered(),
                "sent_after_exit": self.registry.sent_after_exit(),
                **self._durations(),
                **flags,
            }

    def _summary_file(self) -> dict[str, Any]:
        try:
            return read_json(self.run_dir / SUMMARY) or {}
        except (ValueError, OSError):
            return {}

    def metrics(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """The StreamingMetrics snapshot (the final one once stopped), with ``stale`` and ``age_s``.

        Same freshness rules as :meth:`summary`; ``{"stale": True, ...}`` alone if no snapshot
        could be had within ``wait``.
        """
        if self._final_metrics is not None:
            return {**self._final_metrics, "stale": False, "age_s": 0.0}
        r = self._reading(self._metrics_snap, "metrics", {"kind": "get"}, max_age, wait)
        return {**(r.value or {}), **(r.flags() if not self._ended else {"stale": True, "age_s": r.flags()["age_s"]})}

    def query_window(self, spec: Any, filters: dict[str, Any] | None = None, source: str = "live") -> list[Any]:
        """Time-window query (see telemetry.query); from the history store once stopped."""
        spec, filters = prepare_query(spec, filters)  # a bad query fails here, never in the Recorder
        if not self._stopped.is_set() and source == "live":
            ref = self.registry.whereis("recorder")
            if ref is not None:
                try:
                    return query_answer(ref.ask({"kind": "query_window", "spec": spec, "filters": filters}, timeout=30))
                except ActorDeadError:  # it stopped while asked: the run is ending; its store answers
                    self._stopped.wait(10)
        store = open_history(self.lab.history, artifacts=self.lab.artifacts, readonly=True)
        try:
            return store.query(self.id, spec, filters, run_id=self.run_id)
        finally:
            store.close()

    def phase_status(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """The phase's status (paused, finished, steps, active_s, params, counters) as it last
        published it, with ``stale`` and ``age_s``; {} once the experiment has ended."""
        if self._ended:
            return {}
        r = self._phase_snap.read(self._fetch("phase", {"kind": "status"}), max_age, wait)
        return {**r.value, **r.flags()} if r.value is not None else {}

    def __repr__(self) -> str:
        return f"<Experiment {self.id} run={self.run_id} {self._status}>"


def new_segment(run_dir: Path) -> None:
    """Close the run's active JSONL file as a segment (its torn last line cut): a resumed run
    writes a new segment, which begins with its ``resumed`` event."""
    writer = JsonlWriter(run_dir)
    try:
        if writer.size > 0:
            writer.rotate()
    finally:
        writer.close()


BACKENDS = ("embedded", "ray")
_backend_plugins: dict[str, Callable[[Lab, str | None], Any]] = {}


def register_backend(name: str, plugin: Callable[[Lab, str | None], Any]) -> None:
    """Install a backend other than ``embedded``: ``plugin(lab, address)`` returns the object that
    starts (``start_experiment(full_spec, experiment_id)``), recovers (``recover()``) and lets go
    (``close()``) the Lab's experiments elsewhere. experiments.remote registers ``ray``."""
    if name not in BACKENDS or name == "embedded":
        raise ValueError(f"cannot register backend {name!r}; expected one of {', '.join(BACKENDS[1:])}")
    _backend_plugins[name] = plugin


class Lab:
    """Runs experiments side by side for a long-lived host (a lab daemon, a notebook, the CLI)."""

    def __init__(
        self,
        artifacts_dir: str | Path = "artifacts",
        max_experiments: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        history: HistoryTarget = None,
        backend: str = "embedded",
        address: str | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        """``history`` names where every run's history goes (see :mod:`telemetry.history`): by
        default ``$CRUCIBLE_HISTORY`` or ``<artifacts>/history.sqlite3``; a PostgreSQL URL is
        connected to (and its schema migrated) here, so a bad one fails now, named.

        ``backend``: ``embedded`` (each tree on threads of this process) or ``ray`` (each tree
        in its own Ray actor, on the cluster at ``address``; see docs/ray.md).

        ``min_free_bytes``: the free disk space a new run needs to start (see
        :data:`MIN_FREE_BYTES`; 0 starts on any disk)."""
        min_free_bytes = check_min_free(min_free_bytes)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if backend == "embedded" and address is not None:
            raise ValueError(f"address {address!r} is for the ray backend; the embedded backend takes none")
        self.artifacts = check_artifacts_dir(artifacts_dir)
        self.history = prepare_history(history, self.artifacts)
        self.clock = clock
        self.min_free_bytes = min_free_bytes
        self._lock = threading.RLock()
        self.experiments: dict[str, Experiment] = {}
        self.sup = DynamicSupervisor.start(max_children=max_experiments, registry=Registry())
        self._closed = False
        self.backend = backend
        self.max_experiments = max_experiments  # the ray backend counts its live trees against it
        self._remote: Any = None  # the ray backend's driver side: it hosts the trees (see experiments.remote)
        # crashed runs whose experiment id another run of this Lab holds: resumed, in order, as it ends
        self._waiting: dict[str, list[Path]] = {}
        if backend != "embedded":
            plugin = _backend_plugins.get(backend)
            if plugin is None:
                self.sup.stop()
                raise ValueError(
                    f"backend {backend!r} is not loaded: import experiments.remote first (supervisor and the "
                    "crucible CLI do); it needs the ray extra: pip install 'crucible-lab[ray]'"
                )
            try:
                self._remote = plugin(self, address)
            except BaseException:
                self.sup.stop()
                raise

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has begun."""
        return self._closed

    def start_experiment(
        self, spec: str | Path | dict[str, Any], overrides: Any = None, experiment_id: str | None = None
    ) -> Experiment:
        """Validate the spec, build the tree, start it; the handle comes back running."""
        if self._closed:
            raise NotRunning("this Lab has been shut down")
        full = load_spec(spec, overrides, workload_registry())
        if self._remote is not None:
            return self._remote.start_experiment(full, experiment_id)
        self.check_free_space(experiment_id or full["name"])
        with self._lock:
            base = check_experiment_id(experiment_id or full["name"])
            exp_id, k = base, 1
            while exp_id in self.experiments:
                k += 1
                exp_id = f"{base}-{k}"
            live = [e.id for e in self.experiments.values() if e.status() in LIVE and not e.ended]
            if self.max_experiments is not None and len(live) >= self.max_experiments:
                raise LabFull(
                    f"this Lab runs at most {self.max_experiments} experiments at once (max_experiments), and "
                    f"{len(live)} are running: {', '.join(live)}; stop one, or wait for one to end"
                )
            exp = Experiment(self, full, exp_id, new_run_id())
            self.experiments[exp_id] = exp
        self._launch(exp)
        log.info("experiment started", experiment=exp_id, run_id=exp.run_id, workload=full["workload"]["name"])
        return exp

    def check_free_space(self, experiment_id: str | None = None) -> None:
        """Refuse a start, as a full disk would (ENOSPC), when the artifacts folder, the
        experiment's folder (a link to another disk) or the SQLite history (its real file) has
        less than ``min_free_bytes`` free (see :data:`MIN_FREE_BYTES`)."""
        if self.min_free_bytes == 0:
            return
        places = [self.artifacts]
        if experiment_id and "/" not in experiment_id and (self.artifacts / experiment_id).is_dir():
            places.append(self.artifacts / experiment_id)  # disk_usage follows a link to its disk
        if isinstance(self.history, Path):
            places.append(self.history.resolve().parent)
        for place in places:
            free = shutil.disk_usage(place).free  # an OSError here is the disk's answer: it stands
            if free < self.min_free_bytes:
                raise OSError(
                    errno.ENOSPC,
                    f"No space left on device: {free / 2**20:.1f} MiB free on the disk of {place}, and a new run "
                    f"needs {self.min_free_bytes / 2**20:.1f} MiB (min_free_bytes)",
                )

    def recover(self, first: Collection[str] = ()) -> list[Experiment]:
        """Resume every run under this Lab's artifacts folder whose owner died while it was
        running or paused (status ``crashed``), each in its own run directory, with its id,
        run id and saved spec; return their handles (running, or paused as they were).

        The phase restores the workload from ``checkpoint.json`` and emits ``resumed``; events
        go on numbered after those on disk (see :func:`resume_point`). A run whose owner is
        alive, one that ended, and one another Lab took over first are left alone. A run killed
        while a stop was under way is resumed and then stopped, so it ends as it was asked to,
        with its figures reconciled.

        Runs are resumed oldest first, those whose run id is in ``first`` before all others (a
        daemon's own submissions: see experiments.service). A Lab runs one experiment per id,
        so of several crashed runs of one experiment id (``crucible run`` called twice with one
        name in one folder, say) the first is resumed and the others wait, in order, each
        resumed by :meth:`resume_waiting` once the one before has ended (:meth:`waiting` lists
        them). See docs/experiments.md, *Resuming after a crash*.
        """
        if self._closed:
            raise NotRunning("this Lab has been shut down")
        if self._remote is not None:
            return self._remote.recover(first)
        out = []
        crashed = []
        for run_dir in reversed(find_runs(self.artifacts)):  # oldest first
            report = run_status(run_dir)
            if report.status == RunStatus.UNKNOWN:  # nothing proves its owner gone: said, never resumed
                log.warning(
                    "a run's status is unknown; not resumed",
                    run_dir=str(run_dir),
                    file=str(run_dir / LIFECYCLE),
                    reason=report.reason,
                )
            if report.status == RunStatus.CRASHED:
                crashed.append((run_dir, report))
        crashed.sort(key=lambda c: c[0].name not in first)  # stable: oldest first within each group
        seqs = HistorySeqs(self.history, self.artifacts)
        try:
            for run_dir, report in crashed:
                exp = self._try_resume(run_dir, report.record, seqs)
                if exp is not None:
                    out.append(exp)
        finally:
            seqs.close()
        return out

    def _try_resume(self, run_dir: Path, rec: dict[str, Any], seqs: HistorySeqs | None = None) -> Experiment | None:
        try:
            return self._resume_run(run_dir, rec, seqs, wait=True)
        except Exception as exc:  # a damaged run (or a full disk) must not keep the others from resuming
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("crashed run not resumed for want of disk space", run_dir=str(run_dir), error=str(exc))
            else:
                log.exception("could not resume a crashed run", run_dir=str(run_dir))
            self._note_unresumed(run_dir, rec, f"{type(exc).__name__}: {exc}")
            return None

    def waiting(self) -> dict[str, str]:
        """The crashed runs waiting for their experiment id (see :meth:`recover`): run id -> id."""
        with self._lock:
            return {d.name: exp_id for exp_id, dirs in self._waiting.items() for d in dirs}

    def resume_waiting(self, experiment_id: str) -> Experiment | None:
        """Resume the next crashed run waiting for ``experiment_id`` (see :meth:`recover`), if the
        run holding the id has ended (its handle is let go); None when none is waiting, the id
        is still live, or none of those waiting could be resumed (each logged, and left
        crashed). A run no longer crashed (another Lab took it, it was repaired by hand) is
        passed over."""
        while True:
            with self._lock:
                if self._closed or not self._waiting.get(experiment_id):
                    return None
                held = self.experiments.get(experiment_id)
                if held is not None and held.status() in LIVE:
                    return None
                run_dir = self._waiting[experiment_id].pop(0)
                if not self._waiting[experiment_id]:
                    del self._waiting[experiment_id]
                if held is not None:
                    del self.experiments[experiment_id]  # ended: on disk, and listed from there
            report = run_status(run_dir)
            if report.status != RunStatus.CRASHED:
                log.info("a waiting run is no longer crashed; passed over", run_dir=str(run_dir), status=report.status)
                continue
            if self._remote is not None:
                exp: Experiment | None = self._remote.resume_run(run_dir)  # type: ignore[assignment]
            else:
                exp = self._try_resume(run_dir, report.record)
            if exp is not None:
                return exp

    def _claim(self, run_dir: Path, resumes: int) -> Path | None:
        """Take the run over (the marker's path), or learn that another Lab did (None): one
        marker per resume, created exclusively, naming its owner. A marker whose owner is gone (a Lab killed while it
        resumed the run) is taken over by the same rule, one level down (``.resume.N.<pid>``),
        so two Labs that find it stale at once still agree on one winner."""
        name = f".resume.{resumes}"
        for _ in range(64):  # each level a claimer that died: bounded, whatever the folder holds
            try:
                fd = os.open(run_dir / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _marker_owner(run_dir / name)
                if owner is None or owner_alive(owner)[0] is not False:
                    return None  # alive, or we cannot tell: theirs
                name = f"{name}.{owner['pid']}"
                continue
            try:
                os.write(fd, orjson.dumps(owner_info()))
            finally:
                os.close(fd)
            return run_dir / name
        return None

    def note_no_spec(self, run_dir: Path, rec: dict[str, Any]) -> None:
        """A crashed run without its spec (its process died as the run was being created): it
        cannot be resumed, and its record says so."""
        log.error("crashed run has no spec; not resumed", run_dir=str(run_dir))
        self._note_unresumed(run_dir, rec, f"its {SPEC} was never written (its process died as the run was created)")

    def _note_unresumed(self, run_dir: Path, rec: dict[str, Any], why: str) -> None:
        """Say in the run's lifecycle record why it was not resumed (``crucible list`` shows it);
        the run stays crashed, and a later Lab tries again."""
        try:
            write_json(run_dir / LIFECYCLE, {**rec, "resume_error": why})
        except (OSError, ValueError, TypeError) as exc:
            log.warning("could not record why a run was not resumed", run_dir=str(run_dir), error=str(exc))

    def id_free_for(self, run_dir: Path, wait: bool) -> bool:
        """Whether the crashed run ``run_dir`` may take its experiment id now (the caller holds
        the Lab's lock; both backends ask). A run that ended holding the id lets it go (with
        ``wait``); a live one keeps it, and the crashed run then waits for it (``wait``: see
        :meth:`recover`) or is not resumed, logged either way."""
        exp_id, run_id = run_dir.parent.name, run_dir.name
        held = self.experiments.get(exp_id)
        if held is None:
            return True
        if wait and held.status() not in LIVE:
            del self.experiments[exp_id]  # its run ended: on disk, and listed from there
            return True
        if wait:
            self._waiting.setdefault(exp_id, []).append(run_dir)
            log.warning(
                "a crashed run's id is taken in this Lab; it resumes when that run ends",
                experiment=exp_id,
                run_id=run_id,
                after=held.run_id,
            )
        else:
            log.warning("a crashed run's id is taken in this Lab; not resumed", experiment=exp_id, run_id=run_id)
        return False

    def _resume_run(
        self, run_dir: Path, rec: dict[str, Any], seqs: HistorySeqs | None = None, wait: bool = False
    ) -> Experiment | None:
        """Take one crashed run over (None: another Lab did, it has no spec, or its id is taken:
        with ``wait``, it then waits for the id, see :meth:`recover`). Refused (ENOSPC) on a
        nearly full disk, as a start is: resumed there, it would end ``storage: ...`` for good."""
        exp_id, run_id = run_dir.parent.name, run_dir.name
        self.check_free_space(exp_id)
        spec = read_json(run_dir / SPEC)
        if spec is None:
            self.note_no_spec(run_dir, rec)
            return None
        full = spec  # the effective spec, as validated when the run began
        resumes = int(rec.get("resumes") or 0) + 1
        with self._lock:
            if not self.id_free_for(run_dir, wait):
                return None
            marker = self._claim(run_dir, resumes)
            if marker is None:
                log.info("crashed run taken over by another Lab", experiment=exp_id, run_id=run_id)
                return None
            try:
                new_segment(run_dir)
                exp = Experiment(self, full, exp_id, run_id, resume=rec)
                if seqs is None:
                    seqs = own_seqs = HistorySeqs(self.history, self.artifacts)
                else:
                    own_seqs = None
                try:
                    history_seq = seqs.last_seq(run_id)
                finally:
                    if own_seqs is not None:
                        own_seqs.close()
                point = resume_point(run_dir, exp.checkpoints.get(), resumes, history_seq)
                on_disk = point["resume"]["last_seq_on_disk"]
                if history_seq is not None and history_seq > on_disk:
                    log.warning(
                        "the history holds events of the run past its files (their tail was lost); "
                        "the resumed run is numbered after the history's",
                        experiment=exp_id,
                        run_id=run_id,
                        last_seq_on_disk=on_disk,
                        last_seq_in_history=history_seq,
                    )
                exp.checkpoints.update(
                    counters=point["counters"], resume=point["resume"], paused=exp.status() == RunStatus.PAUSED
                )
                exp.checkpoints.save()
            except BaseException:
                marker.unlink(missing_ok=True)  # not resumed: the claim is free for a later try
                raise
            self.experiments[exp_id] = exp
        self._launch(exp)
        log.info(
            "experiment resumed after a crash",
            experiment=exp_id,
            run_id=run_id,
            status=str(exp.status()),
            seq_start=point["resume"]["seq_start"],
            resumes=resumes,
        )
        if rec.get("stop_requested_at") is not None:  # killed while stopping: finish the stop it was asked for
            log.info("a stop was under way at the crash; stopping", experiment=exp_id, run_id=run_id)
            exp.stop()
        return exp

    def get(self, experiment_id: str) -> Experiment:
        with self._lock:
            exp = self.experiments.get(experiment_id)
        if exp is None:
            raise NotFound(
                f"no experiment {experiment_id!r} in this Lab; known: {', '.join(sorted(self.experiments)) or 'none'}"
            )
        return exp

    def _launch(self, exp: Experiment) -> None:
        """Start the experiment's tree under the Lab's supervisor; a tree that cannot start
        leaves no handle behind and its run directory says failed."""
        try:
            sup = self.sup.start_child(exp.child_spec())
        except BaseException as exc:
            with self._lock:
                self.experiments.pop(exp.id, None)
            try:
                if not isinstance(exc, Exception):  # Ctrl-C cut the wait short, not the start: take the tree down
                    self._unstart(exp)
            finally:
                exp._fail_start(exc)
            raise
        exp._attach(sup)  # type: ignore[arg-type]

    def _unstart(self, exp: Experiment) -> None:
        """Stop the tree of a start the caller gave up on (an interrupt in its wait): the
        supervisor may start it all the same, and a tree left running would write into a run
        recorded as failed, with no handle to stop it. The terminate queues behind the start
        in the supervisor's mailbox, so it finds the tree if there is one."""
        try:
            self.sup.terminate_child(exp.id)  # a second Ctrl-C here leaves at once: the caller insists
        except Exception:  # noqa: BLE001 - the tree never started (or the supervisor is gone): nothing runs
            pass

    def forget(self, experiment_id: str) -> None:
        """Drop the handle of an ended experiment (its run stays on disk, listed by
        :func:`telemetry.rundir.list_runs`): a host that runs experiments for months keeps
        its memory bounded (each handle holds its tree's registry, topics and snapshots).

        Raises:
            NotFound: no such experiment in this Lab.
            NotRunning: it has not ended; stop it first.
        """
        with self._lock:
            exp = self.get(experiment_id)
            if exp.status() in LIVE:
                raise NotRunning(f"experiment {experiment_id!r} is {exp.status()}; only an ended one can be forgotten")
            del self.experiments[experiment_id]

    def list(self) -> list[dict[str, Any]]:
        """One dict per experiment of this Lab (id, run_id, status, reason, workload, run_dir); no actor is asked."""
        with self._lock:
            exps = list(self.experiments.values())
        return [
            {
                "id": e.id,
                "run_id": e.run_id,
                "status": e.status(),
                "reason": e.reason,
                "workload": e.spec["workload"]["name"],
                "run_dir": str(e.run_dir),
            }
            for e in exps
        ]

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every experiment (phases stop, recorders flush) and return when all is on disk.

        The experiments stop concurrently, one thread each: every phase is told to stop at
        about the same moment, so no experiment keeps producing while another one drains,
        and the whole shutdown takes about as long as the slowest stop, not their sum.
        ``timeout`` bounds each step of each stop (see :meth:`Experiment.stop`).

        A first Ctrl-C (``KeyboardInterrupt``) while the stops run waits for them to end and
        is raised afterwards: cut short, the stop threads died with the process and left every
        run crashed. A second one leaves at once.
        """
        timeout = check_timeout(timeout)
        self._closed = True
        with self._lock:
            exps = [e for e in self.experiments.values() if e.status() in LIVE]
        # an Event per stop, not join(): an interrupted join marks the thread stopped (CPython
        # 3.11), and the wait below would end with the stops still under way
        done = [threading.Event() for _ in exps]
        interrupted: list[KeyboardInterrupt] = []

        def first_only(exc: KeyboardInterrupt) -> None:
            if interrupted:
                raise exc
            interrupted.append(exc)
            log.warning("interrupted: finishing the stops first (a second Ctrl-C leaves them crashed)")

        for e, ended in zip(exps, done, strict=True):
            stopper = threading.Thread(
                target=self._stop_one, args=(e, timeout, ended), name=f"lab-stop-{e.id}", daemon=True
            )
            try:
                stopper.start()
            except KeyboardInterrupt as exc:  # in start()'s wait for the thread, which runs by then
                first_only(exc)
        for ended in done:
            while not ended.is_set():
                try:
                    ended.wait()
                except KeyboardInterrupt as exc:
                    first_only(exc)
        try:
            self._shutdown_rest(timeout)
        finally:
            if interrupted:
                raise interrupted[0]

    def _shutdown_rest(self, timeout: float | None) -> None:
        """What :meth:`shutdown` does once every experiment has stopped."""
        self.sup.stop(timeout=timeout)
        for exp in list(self.experiments.values()):  # an end the disk refused: one last try, else said
            if isinstance(exp, Experiment) and exp.ended and not exp.write_final_record():
                log.error(
                    "the end of a run could not be recorded: its lifecycle.json still says it runs, and the "
                    "next Lab on the folder will resume it",
                    experiment=exp.id,
                    run_id=exp.run_id,
                )
        if self._remote is not None:
            self._remote.close()

    @staticmethod
    def _stop_one(exp: Experiment, timeout: float | None, ended: threading.Event) -> None:
        try:
            exp.stop(timeout=timeout)
        except NotRunning:
            pass  # it ended on its own meanwhile
        except Exception:
            log.exception("error stopping experiment at shutdown", experiment=exp.id)
        finally:
            ended.set()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
