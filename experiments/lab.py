"""Experiments as supervised actor trees, and the Lab that runs many of them.

One experiment = one ``rest_for_one`` supervisor over Recorder, StreamingMetrics,
AnomalyDetection, Sampler, Hypertune and Phase, with its own topics and names (nothing is
shared between experiments). Events flow one way::

    phase --events--> metrics
                  \\-> anomaly --> sampler --> recorder
    metrics --metrics--> hypertune;  anomaly --anomalies--> hypertune, sampler

The Lab is a DynamicSupervisor of experiment trees. Trees are ``temporary`` children: an
experiment whose own supervisor gives up is marked failed and never drags the Lab (or
another experiment) down. Everything here is thread-safe and usable from any thread of
the host program; two Labs in one process share nothing.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from actors.anomaly import AnomalyDetection
from actors.base import ActorDeadError, ActorRef, on_death
from actors.hypertune import Hypertune, instance_family
from actors.log import get_logger
from actors.phase import CheckpointStore, PhaseActor
from actors.recorder import Recorder, check_artifacts_dir
from actors.registry import Registry
from actors.sampler import Sampler
from actors.streaming_metrics import StreamingMetrics
from actors.supervision import ChildSpec, DynamicSupervisor, Supervisor, SupervisorRef
from actors.topics import NamedTarget, Topics
from experiments.spec import load_spec
from experiments.workloads import registry as workload_registry
from telemetry.schema import check_id
from telemetry.store import DB_NAME, HistoryStore

log = get_logger("experiments.lab")

STATUSES = ("running", "paused", "stopped", "archived")
METRIC_SUBSCRIBERS = ("metrics", "anomaly", "hypertune")  # detached from the events topic while paused


class LifecycleError(RuntimeError):
    """Base of the lifecycle errors."""


class AlreadyPaused(LifecycleError):
    """pause() on a paused experiment."""


class NotRunning(LifecycleError):
    """The experiment is stopped or archived."""


class NotPaused(LifecycleError):
    """resume() on an experiment that is not paused."""


class NotFound(LifecycleError, KeyError):
    """No experiment with that id in this Lab."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class Experiment:
    """A handle on one running (or finished) experiment; returned by :meth:`Lab.start_experiment`."""

    def __init__(self, lab: Lab, spec: dict[str, Any], exp_id: str, run_id: str) -> None:
        self.lab = lab
        self.spec = spec
        self.id = exp_id
        self.run_id = run_id
        self.clock = lab.clock
        self.topics = Topics()
        self.registry = Registry()
        self.run_dir = lab.artifacts / exp_id / run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoint.json")
        self._lock = threading.RLock()
        self._status = "running"
        self._reason: str | None = None
        self._stopped = threading.Event()
        self.started_at = self.clock()
        self.ended_at: float | None = None
        self._paused_at: float | None = None
        self.paused_duration = 0.0
        self.pause_count = 0
        self.resume_count = 0
        self.sup: SupervisorRef | None = None
        self._final_summary: dict[str, Any] | None = None
        self._final_metrics: dict[str, Any] | None = None
        (self.run_dir / "spec.json").write_bytes(orjson.dumps(spec, option=orjson.OPT_INDENT_2))

    # --- the tree ------------------------------------------------------------------------------------

    def child_spec(self) -> ChildSpec:
        s, t, a, h = self.spec, self.spec["telemetry"], self.spec["anomaly"], self.spec["hypertune"]
        reg, topics = self.registry, self.topics
        wl_cls = workload_registry()[s["workload"]["name"]]
        children = [
            ChildSpec("recorder", Recorder, args=(self.lab.artifacts, self.id, self.run_id), name="recorder",
                      kwargs={"rotate_bytes": int(t["rotate_mb"] * (1 << 20)), "fsync_interval": t["fsync_interval_s"],
                              "ring_size": t["ring_size"], "index_limit": t["index_limit"],
                              "maximize": t["maximize"]}),
            ChildSpec("metrics", StreamingMetrics, args=(self.id, topics), name="metrics",
                      kwargs={"windows": s["metrics"]["windows_s"],
                              "publish_interval": s["metrics"]["publish_interval_s"],
                              "compression": s["metrics"]["compression"]}),
            ChildSpec("anomaly", AnomalyDetection, args=(self.id, NamedTarget("sampler", reg), topics), name="anomaly",
                      kwargs={"enabled": a["enabled"], "methods": a["methods"], "metrics": a.get("metrics"),
                              "threshold": a.get("threshold"), "action": a["action"], "window": a["window"],
                              "warmup": a["warmup"], "ewma_lambda": a["ewma_lambda"],
                              "period_gap_s": a["period_gap_s"], "seed": s["seed"]}),
            ChildSpec("sampler", Sampler, args=(self.id, NamedTarget("recorder", reg), s["sampling"]["strategy"],
                                                s["sampling"]["config"], s["seed"]), name="sampler"),
            ChildSpec("phase", PhaseActor, name="phase",
                      args=(self.id, self.run_id, wl_cls, s["workload"]["params"], topics, self.checkpoints),
                      kwargs={"seed": s["seed"], "budget_s": s["time_budget_s"], "run_dir": self.run_dir,
                              "watch": (NamedTarget("sampler", reg), NamedTarget("recorder", reg)),
                              "emitter_opts": {"batch_size": t["batch_size"], "flush_interval": t["flush_interval_s"],
                                               "overflow": t["overflow"], "max_backlog": t["max_backlog"],
                                               "block_timeout": t["block_timeout_s"], "debug": t["debug"]}}),
            # last: under rest_for_one a hypertune crash then restarts only hypertune, never the phase
            ChildSpec("hypertune", Hypertune, args=(self.id, h["enabled"], reg), name="hypertune",
                      kwargs={"window_s": h["window_s"], "policy": h["policy"], "state_file": self._policy_file(),
                              "workload": s["workload"]["name"], "family": self._family(), "seed": s["seed"]}),
        ]
        self._attach_event_subscribers(True)
        topics.subscribe_name("metrics", "hypertune", reg)
        topics.subscribe_name("anomalies", "hypertune", reg)
        topics.subscribe_name("anomalies", "sampler", reg)
        sv = s["supervision"]
        return ChildSpec(self.id, Supervisor, restart="temporary", shutdown="infinity", kwargs={
            "children": children, "strategy": "rest_for_one", "max_restarts": sv["max_restarts"],
            "max_seconds": sv["max_seconds"], "registry": reg, "on_restart": self._note_restart})

    def _family(self) -> str:
        graph = (self.spec["workload"]["params"] or {}).get("graph") or {}
        if graph.get("file"):
            return instance_family(Path(graph["file"]).stem)
        return str(graph.get("generator", self.spec["workload"]["name"]))

    def _policy_file(self) -> str:
        """Per workload and instance family, shared by the runs of this artifacts folder."""
        explicit = self.spec["hypertune"].get("state_file")
        if explicit:
            return explicit
        return str(self.lab.artifacts / "hypertune" / f"{self.spec['workload']['name']}-{self._family()}.json")

    def _note_restart(self, child: str, reason: str) -> None:
        self.registry.send("recorder", {"kind": "note_restart", "child": child, "reason": reason})

    def _attach(self, sup: SupervisorRef) -> None:
        self.sup = sup
        on_death(sup, self._tree_died)
        threading.Thread(target=self._watch_phase, name=f"exp-{self.id}-watch", daemon=True).start()

    def _watch_phase(self) -> None:
        while not self._stopped.is_set():
            if self.checkpoints.finished.wait(0.2):
                try:
                    self._shutdown_tree(self.checkpoints.finish_reason or "completed")
                except Exception:
                    log.exception("error finishing experiment", experiment=self.id)
                return

    def _tree_died(self, reason: str) -> None:
        if reason not in ("normal", "shutdown") and not self._stopped.is_set():
            log.error("experiment tree gave up", experiment=self.id, reason=reason)
            with self._lock:
                self._close_pause()
                self._status, self._reason = "stopped", f"failed: {reason}"
                self.ended_at = self.clock()
                self._stopped.set()

    def _ref(self, name: str) -> ActorRef:
        ref = self.registry.whereis(name)
        if ref is None:
            ref = self.registry.await_name(name, timeout=10)
        if ref is None:
            raise NotRunning(f"experiment {self.id!r} has no live {name} (status {self._status})")
        return ref

    # --- lifecycle -----------------------------------------------------------------------------------------

    def status(self) -> str:
        return self._status

    @property
    def reason(self) -> str | None:
        """Why it stopped: ``completed``, ``budget``, ``stopped``, ``failed: ...``."""
        return self._reason

    def pause(self) -> None:
        """Detach the metric subscribers and park the phase at its next safe point."""
        with self._lock:
            if self._status == "paused":
                raise AlreadyPaused(f"experiment {self.id!r} is already paused")
            if self._status != "running":
                raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot pause")
            self._ref("phase").ask({"kind": "pause"}, timeout=30)
            self._attach_event_subscribers(False)
            self._paused_at = self.clock()
            self.pause_count += 1
            self._status = "paused"

    def resume(self) -> None:
        """Reattach the subscribers and let the phase continue."""
        with self._lock:
            if self._status == "running":
                raise NotPaused(f"experiment {self.id!r} is running, not paused")
            if self._status != "paused":
                raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot resume")
            self._attach_event_subscribers(True)
            self._close_pause()
            self.resume_count += 1
            self._status = "running"
            self._ref("phase").ask({"kind": "resume"}, timeout=30)

    def _attach_event_subscribers(self, on: bool) -> None:
        """Subscribe (or detach, for a pause) the actors that consume the events topic."""
        for name in METRIC_SUBSCRIBERS:
            if on:
                self.topics.subscribe_name("events", name, self.registry)
            else:
                self.topics.unsubscribe_name("events", name, self.registry)

    def _close_pause(self) -> None:
        if self._paused_at is not None:
            self.paused_duration += self.clock() - self._paused_at
            self._paused_at = None

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop the phase, flush the pipeline to disk, stop the tree."""
        with self._lock:
            if self._status in ("stopped", "archived"):
                raise NotRunning(f"experiment {self.id!r} is already {self._status}")
        self._shutdown_tree("stopped", timeout)

    def _shutdown_tree(self, reason: str, timeout: float | None = 60.0) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            if self._status == "paused":  # reattach so the final events and counters are recorded
                self._attach_event_subscribers(True)
                self._close_pause()
            try:
                phase = self.registry.whereis("phase")
                if phase is not None:
                    phase.ask({"kind": "stop", "reason": reason}, timeout=timeout)
                # drain the pipeline in its own order: everything before is handled when each answers
                for name, kind in (("metrics", "get"), ("anomaly", "anomaly_metrics"), ("sampler", "flush"),
                                   ("recorder", "flush")):
                    ref = self.registry.whereis(name)
                    if ref is not None:
                        answer = ref.ask({"kind": kind}, timeout=timeout)
                        if name == "metrics":
                            self._final_metrics = answer
                rec = self.registry.whereis("recorder")
                if rec is not None:
                    self._final_summary = rec.ask({"kind": "summary"}, timeout=timeout)
            except (ActorDeadError, TimeoutError) as exc:
                log.error("experiment did not drain cleanly", experiment=self.id, error=str(exc))
            if self.sup is not None and self.sup.is_alive():
                self.sup.stop(timeout=timeout, reason="shutdown")
            self._status = "stopped"
            self._reason = self.checkpoints.finish_reason or reason
            self.ended_at = self.clock()
            self._stopped.set()
            self._write_lifecycle()
        log.info("experiment stopped", experiment=self.id, run_id=self.run_id, reason=self._reason)

    def restart_pass(self) -> dict[str, Any]:
        """Ask the workload to start a new pass from its best solution (if it has passes)."""
        with self._lock:
            if self._status not in ("running", "paused"):
                raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot restart a pass")
        reply = self._ref("phase").ask({"kind": "set_param", "key": "restart_pass", "value": True,
                                        "why": "restart requested", "event": "control"}, timeout=30)
        if not reply.get("ok"):
            raise LifecycleError(f"experiment {self.id!r} cannot restart a pass: {reply.get('error')}")
        return reply

    def archive(self) -> None:
        """Mark a finished experiment archived (stopping it first if it still runs)."""
        if self._status in ("running", "paused"):
            self.stop()
        with self._lock:
            self._status = "archived"
            self._write_lifecycle()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the experiment has stopped (completed, budget, stopped or failed)."""
        return self._stopped.wait(timeout)

    # --- reading ---------------------------------------------------------------------------------------------

    def durations(self) -> dict[str, Any]:
        with self._lock:
            end = self.ended_at if self.ended_at is not None else self.clock()
            paused = self.paused_duration + (end - self._paused_at if self._paused_at is not None else 0.0)
            wall = end - self.started_at
            return {"wall_clock_duration": wall, "active_duration": wall - paused, "paused_duration": paused,
                    "pause_count": self.pause_count, "resume_count": self.resume_count}

    def summary(self) -> dict[str, Any]:
        """RunSummary figures plus lifecycle durations (seconds) and counts."""
        base: dict[str, Any] | None = None
        if not self._stopped.is_set():
            rec = self.registry.whereis("recorder")
            if rec is not None:
                try:
                    base = rec.ask({"kind": "summary"}, timeout=10)
                except (ActorDeadError, TimeoutError):
                    base = None
        if base is None:
            base = self._final_summary or self._summary_from_disk()
        return {**(base or {}), "experiment_id": self.id, "run_id": self.run_id, "status": self._status,
                "reason": self._reason, **self.durations()}

    def _summary_from_disk(self) -> dict[str, Any]:
        p = self.run_dir / "summary.json"
        return orjson.loads(p.read_bytes()) if p.exists() else {}

    def metrics(self) -> dict[str, Any]:
        """The StreamingMetrics snapshot (the last one, once stopped)."""
        if not self._stopped.is_set():
            ref = self.registry.whereis("metrics")
            if ref is not None:
                try:
                    return ref.ask({"kind": "get"}, timeout=10)
                except (ActorDeadError, TimeoutError):
                    pass
        return self._final_metrics or {}

    def query_window(self, spec: Any, filters: dict[str, Any] | None = None, source: str = "live") -> list[Any]:
        """Time-window query (see telemetry.query); from the history store once stopped."""
        if not self._stopped.is_set() and source == "live":
            ref = self.registry.whereis("recorder")
            if ref is not None:
                return ref.ask({"kind": "query_window", "spec": list(spec), "filters": filters}, timeout=30)
        store = HistoryStore(self.lab.artifacts / DB_NAME, readonly=True)
        try:
            return [e for e in store.query(self.id, spec, filters) if e["run_id"] == self.run_id]
        finally:
            store.db.close()

    def phase_status(self) -> dict[str, Any]:
        ref = self.registry.whereis("phase")
        if ref is None:
            return {}
        try:
            return ref.ask({"kind": "status"}, timeout=5)
        except (ActorDeadError, TimeoutError):
            return {}

    def _write_lifecycle(self) -> None:
        data = {"status": self._status, "reason": self._reason, **self.durations()}
        (self.run_dir / "lifecycle.json").write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def __repr__(self) -> str:
        return f"<Experiment {self.id} run={self.run_id} {self._status}>"


class Lab:
    """Runs experiments side by side for a long-lived host (a lab daemon, a notebook, the CLI)."""

    def __init__(self, artifacts_dir: str | Path = "artifacts", dashboard: bool = False,
                 max_experiments: int | None = None, clock: Callable[[], float] = time.monotonic,
                 dash_host: str = "127.0.0.1", dash_port: int | None = None) -> None:
        self.artifacts = check_artifacts_dir(artifacts_dir)
        self.clock = clock
        self._lock = threading.RLock()
        self.experiments: dict[str, Experiment] = {}
        self.sup = DynamicSupervisor.start(max_children=max_experiments, registry=Registry())
        self._closed = False
        self.dashboard = None
        if dashboard:
            from dashboard.server import Dashboard

            try:
                self.dashboard = Dashboard(self, dash_host, dash_port)  # port: CRUCIBLE_DASH_PORT or 7878
            except OSError as exc:
                self.sup.stop(timeout=10)
                raise OSError(f"dashboard cannot listen on {dash_host}:{dash_port or 'CRUCIBLE_DASH_PORT/7878'}: "
                              f"{exc.strerror or exc}") from None

    def start_experiment(self, spec: str | Path | dict[str, Any], overrides: Any = None,
                         experiment_id: str | None = None) -> Experiment:
        """Validate the spec, build the tree, start it; the handle comes back running."""
        if self._closed:
            raise NotRunning("this Lab has been shut down")
        full = load_spec(spec, overrides, workload_registry())
        with self._lock:
            base = check_id("experiment id", experiment_id or full["name"])
            exp_id, k = base, 1
            while exp_id in self.experiments:
                k += 1
                exp_id = f"{base}-{k}"
            exp = Experiment(self, full, exp_id, new_run_id())
            self.experiments[exp_id] = exp
        try:
            sup = self.sup.start_child(exp.child_spec())
        except BaseException:
            with self._lock:
                self.experiments.pop(exp_id, None)
            raise
        exp._attach(sup)  # type: ignore[arg-type]
        log.info("experiment started", experiment=exp_id, run_id=exp.run_id, workload=full["workload"]["name"])
        return exp

    def get(self, experiment_id: str) -> Experiment:
        with self._lock:
            exp = self.experiments.get(experiment_id)
        if exp is None:
            raise NotFound(f"no experiment {experiment_id!r} in this Lab; known: "
                           f"{', '.join(sorted(self.experiments)) or 'none'}")
        return exp

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            exps = list(self.experiments.values())
        return [{"id": e.id, "run_id": e.run_id, "status": e.status(), "reason": e.reason,
                 "workload": e.spec["workload"]["name"], "run_dir": str(e.run_dir)} for e in exps]

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every experiment (phases stop, recorders flush) and return when all is on disk."""
        self._closed = True
        with self._lock:
            exps = list(self.experiments.values())
        for e in exps:
            if e.status() in ("running", "paused"):
                try:
                    e.stop(timeout=timeout)
                except NotRunning:
                    pass
        self.sup.stop(timeout=timeout)
        if self.dashboard is not None:
            self.dashboard.stop()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
