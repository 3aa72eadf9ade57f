"""Experiment trees on Ray: the ``ray`` backend of the Lab (``Lab(backend="ray", address=...)``).

Each experiment's tree runs inside its own Ray actor, a :class:`TreeHost`: one process, on
any node of the cluster, holding the CPUs and GPUs of the spec's ``[resources]`` table. The
host builds the tree with the code that builds a local one: it keeps an embedded Lab of its
own with that one experiment in it. On the driver, a :class:`RemoteExperiment` has the API of
:class:`~experiments.lab.Experiment` and raises the same typed errors; every call and every
answer crosses as msgpack bytes (:mod:`actors.messages`).

The Lab supervises the hosts as its children. A host whose process (or node) dies is a
*down* with a reason (Ray's ``RayActorError``); :func:`~actors.supervision.within_intensity`
and :func:`~actors.supervision.decide` say what follows: a ``transient`` child within the
spec's ``[supervision]`` intensity is restarted in a new host, on any node with room, from
its run directory (checkpoint, events and counters), by the path ``Lab.recover`` takes for a
crashed run; over the intensity the run fails. The restart is in the run's events: the
phase's ``resumed`` event (the checkpoint it went on from, the work done again) and a
``process_restart`` event with the reason. See docs/ray.md.

The artifacts folder must be one folder for every node (the run directories are where a
restarted tree finds its checkpoint): a shared file system, or one machine.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from actors.base import is_abnormal
from actors.log import get_logger
from actors.messages import decode, decode_message, encode
from actors.snapshot import MAX_AGE_S, WAIT_S
from actors.supervision import GIVE_UP, MAX_INTENSITY, RESTART, TooManyChildren, decide, within_intensity
from actors.timers import check_timeout
from actors.topics import NamedTarget
from experiments.lab import (
    MIN_FREE_BYTES,
    AlreadyPaused,
    Experiment,
    Lab,
    LifecycleError,
    NotFound,
    NotPaused,
    NotRunning,
    register_backend,
)
from experiments.spec import DEFAULTS, SpecError, check_gpu_share
from telemetry.history import open_history
from telemetry.query import QueryError, QueryLimitError, prepare_query
from telemetry.rundir import (
    LIFECYCLE,
    SPEC,
    RunStatus,
    check_experiment_id,
    find_runs,
    owner_alive,
    read_json,
    read_summary,
    run_status,
    write_json,
)

log = get_logger("experiments.remote")

CONNECT_TIMEOUT_S = 30.0  # ray.init on an address that answered the probe; past it, one clear error
PROBE_TIMEOUT_S = 3.0  # the TCP + HTTP/2 probe of an address, before Ray is asked to join it
START_TIMEOUT_S = 120.0  # a host's process to start and its tree to come up (includes waiting for room)
CALL_TIMEOUT_S = 60.0  # a control call's answer
RESTART_WAIT_S = 60.0  # how long a control call waits for a host being restarted
OWNER_GONE_S = 30.0  # how long a restart waits for the dead host's process to be gone from this machine
CLOSE_WAIT_S = 60.0  # how long close waits for the watcher threads: none may touch Ray once it returns
RESTART_TYPE = "transient"  # a host is restarted after an abnormal exit (its process died), never after its end
HOST_CONCURRENCY = 16  # calls a host serves at once (a wait for the end holds one)
DEFAULT_RESOURCES = {k: float(v) for k, v in DEFAULTS["resources"].items()}
_ADDRESS = re.compile(r"^(?P<scheme>ray://)?(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})$")
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


_ENDED = object()  # a read found the run ended under it


class RayBackendError(RuntimeError):
    """Ray is missing, the cluster cannot be reached, or it has no room for an experiment."""


class RemoteError(RuntimeError):
    """An error in a tree's host that is not one of the Lab's typed errors (type and message kept)."""


class HostLost(NotRunning):
    """The process hosting the tree died during the call (the Lab restarts it if it may)."""


class HostDiedStarting(RayBackendError):
    """The new host's process died before its tree was up (a node lost as the restart landed on it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# the errors a host's answer may name, most specific first in each class's MRO
_ERRORS: dict[str, type[BaseException]] = {
    c.__name__: c
    for c in (
        AlreadyPaused,
        NotPaused,
        NotFound,
        NotRunning,
        LifecycleError,
        QueryLimitError,
        QueryError,
        SpecError,
        TimeoutError,
        KeyError,
        TypeError,
        ValueError,
    )
}


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayBackendError(
            f"the ray backend needs Ray: pip install 'crucible-lab[ray]' ({type(exc).__name__}: {exc})"
        ) from None
    return ray


def check_resources(spec: dict[str, Any]) -> dict[str, float]:
    """The spec's ``[resources]`` (cpus, gpus) with defaults; :class:`SpecError` naming the key."""
    raw = spec.get("resources") or {}
    if not isinstance(raw, dict):
        raise SpecError(f"resources: must be a table, got {raw!r}")
    out = dict(DEFAULT_RESOURCES)
    for key, value in raw.items():
        if key not in out:
            raise SpecError(f"resources.{key}: unknown key (known here: resources.cpus, resources.gpus)")
        hi = 1024 if key == "cpus" else 64
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
            raise SpecError(f"resources.{key}: must be a number from 0 to {hi}, got {value!r}")
        out[key] = float(value)
    try:
        check_gpu_share(out["gpus"])
    except ValueError as exc:
        raise SpecError(f"resources.gpus: {exc}") from None
    return out


def down_reason(exc: BaseException) -> str:
    """A one-line reason for a host's death, from Ray's exception (its type and the cause Ray gives)."""
    text = " ".join(str(exc).split())
    cause = ""
    for marker in ("The actor died because", "The actor is dead because", "The actor died unexpectedly"):
        at = text.find(marker)
        if at >= 0:
            cause = text[at:]
            break
    cause = cause or text
    for tail in (" Some common causes", " To troubleshoot", " Check the "):  # Ray's advice, not the cause
        cause = cause.split(tail, 1)[0]
    return f"process_died: {type(exc).__name__}: {cause[:240]}"


# --- joining the cluster ---------------------------------------------------------------------------------


def _auto_address() -> str | None:
    """What Ray's ``auto`` would join: ``RAY_ADDRESS``, else the cluster last started on this machine."""
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    for folder in (os.environ.get("RAY_TMPDIR"), "/tmp/ray"):
        if not folder:
            continue
        try:
            text = (Path(folder) / "ray_current_cluster").read_text().strip()
        except OSError:
            continue
        if text:
            return text.splitlines()[0].strip()
    return None


def parse_address(address: str) -> tuple[str, int, bool]:
    """``HOST:PORT`` or ``ray://HOST:PORT`` -> (host, port, is_client); ValueError naming it otherwise."""
    m = _ADDRESS.match(address.strip()) if isinstance(address, str) else None
    port = int(m["port"]) if m else 0
    if m is None or not 1 <= port <= 65535:
        raise ValueError(f"Ray address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT (port 1 to 65535)")
    return m["host"].strip("[]"), port, bool(m["scheme"])


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Prove that a gRPC server (Ray's GCS or its client server) answers at ``address``, within
    ``timeout``: a TCP connect, then the HTTP/2 preface, to which a gRPC server answers with its
    SETTINGS frame. Ray itself would retry an unreachable address for minutes."""
    host, port, _ = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
                return  # TLS: the plaintext preface would not be understood; the connect is the probe
            s.settimeout(timeout)
            s.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except TimeoutError:
        raise RayBackendError(f"no Ray cluster at {address!r}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise RayBackendError(f"no Ray cluster at {address!r}: {exc.strerror or exc}") from None
    if len(head) < 9 or head[3] != 4:
        raise RayBackendError(f"no Ray cluster at {address!r}: something answers there, but not Ray (no gRPC)")


def connect(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Join the Ray cluster at ``address`` (None: start one on this machine, unless this process
    has joined one already); True when this call started Ray (the Lab shuts it down at its end).

    Raises:
        ValueError: a malformed address.
        RayBackendError: Ray is not installed, nothing (or not Ray) answers at the address, this
            process already belongs to another cluster, or joining took longer than ``timeout``.
    """
    ray = _ray()
    target = address
    if address == "auto":
        target = _auto_address()
        if target is None:
            if ray.is_initialized():
                return False
            raise RayBackendError(
                "no Ray cluster to join at 'auto': RAY_ADDRESS is unset and none was started on this machine "
                "(ray start --head)"
            )
    if target is not None:
        if target.startswith("ray://") and target.count(":") == 1:
            target += ":10001"  # Ray client's default port
        probe(target)
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address or ""
            if not target.startswith("ray://") and current.rsplit(":", 1)[-1] != str(parse_address(target)[1]):
                raise RayBackendError(
                    f"this process already belongs to the Ray cluster at {current}; cannot join {target}"
                )
            return False
    elif ray.is_initialized():
        return False
    if target is None:
        # A Ray of our own, started from this thread: Ray ties the processes it starts to the
        # thread that started them (started from a helper thread, they die when it ends), and
        # "local" never joins a cluster that a `ray start` left on the machine.
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # Ray raises many kinds; one clear error
            raise RayBackendError(f"cannot start Ray on this machine: {type(exc).__name__}: {exc}") from exc
        return True
    failure: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=target, log_to_driver=False)
        except BaseException as exc:  # noqa: BLE001 - reported in the caller's thread
            failure.append(exc)

    t = threading.Thread(target=join, name="ray-connect", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise RayBackendError(f"the Ray cluster at {target} did not let us join within {timeout:g} s")
    if failure:
        exc = failure[0]
        raise RayBackendError(f"cannot join the Ray cluster at {target}: {type(exc).__name__}: {exc}")
    return False


# --- the worker side: one tree in one Ray actor ------------------------------------------------------------


class TreeHost:
    """Hosts one experiment tree in a Ray actor's process: an embedded Lab with one experiment.

    Every method takes and returns msgpack bytes. Answers are ``{"ok": True, "value": ...,
    "state": ...}`` or ``{"ok": False, "error": [class names, most specific first], "message":
    ...}``; the driver turns the latter back into the same typed error.
    """

    CALLS = frozenset(
        {
            "pause",
            "resume",
            "stop",
            "summary",
            "metrics",
            "phase_status",
            "durations",
            "query_window",
            "restart_pass",
            "set_param",
        }
    )

    def __init__(self, artifacts: str, history: str | None, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        self.lab = Lab(artifacts, history=history, min_free_bytes=min_free_bytes)
        self.exp: Experiment | None = None

    def _reply(self, fn: Callable[[], Any]) -> bytes:
        try:
            return encode({"ok": True, "value": fn(), "state": self._state()})
        except Exception as exc:  # noqa: BLE001 - every error travels back to the driver, typed
            names = [c.__name__ for c in type(exc).__mro__]
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            os_error = {"errno": exc.errno, "strerror": str(exc.strerror)} if isinstance(exc, OSError) else {}
            return encode({"ok": False, "error": names, "message": message, **os_error, "state": self._state()})

    def _state(self) -> dict[str, Any] | None:
        exp = self.exp
        return None if exp is None else {"status": str(exp.status()), "reason": exp.reason}

    def _info(self) -> dict[str, Any]:
        import ray

        exp = self.exp
        assert exp is not None
        return {
            "id": exp.id,
            "run_id": exp.run_id,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "resources": ray.get_runtime_context().get_assigned_resources(),  # what Ray reserved for it
        }

    def _live(self) -> Experiment:
        if self.exp is None:
            raise NotRunning("this host has no experiment yet")
        return self.exp

    def start(self, data: bytes) -> bytes:
        """Start a new run of the (already validated) spec under the driver's experiment id."""
        m = decode_message(data)

        def go() -> dict[str, Any]:
            self.exp = self.lab.start_experiment(m["spec"], experiment_id=m["id"])
            return self._info()

        return self._reply(go)

    def resume(self, data: bytes) -> bytes:
        """Take a run over from its directory (its last owner died), as Lab.recover does."""
        m = decode_message(data)

        def go() -> dict[str, Any]:
            run_dir = Path(m["run_dir"])
            rec = read_json(run_dir / LIFECYCLE) or {}
            exp = self.lab._resume_run(run_dir, rec)  # the recovery path: claim, new segment, resume point
            if exp is None:
                raise NotRunning(f"run {run_dir} could not be taken over (another Lab took it, or it has no spec)")
            self.exp = exp
            if m.get("reason"):
                self._announce_restart(exp, m)
            return self._info()

        return self._reply(go)

    def _announce_restart(self, exp: Experiment, m: dict[str, Any]) -> None:
        """The restart in the run's events and counters (the phase's ``resumed`` event says from
        which checkpoint and how much work is done again)."""
        import ray

        reason = str(m["reason"])
        exp.registry.send("recorder", {"kind": "note_restart", "child": "process", "reason": reason})
        down_s = max(0.0, time.time() - float(m.get("down_at") or time.time()))
        exp.registry.send(
            "phase",
            {
                "kind": "note",
                "name": "process_restart",
                "values": {"restarts": int(m.get("restarts") or 1), "down_s": down_s},
                "notes": f"{reason}; restarted on node {ray.get_runtime_context().get_node_id()[:12]}"
                f" (pid {os.getpid()}) from the run's checkpoint",
            },
        )

    def call(self, data: bytes) -> bytes:
        """One of the Experiment's own methods (:attr:`CALLS`), run in this process."""
        m = decode_message(data)

        def go() -> Any:
            method = m.get("method")
            if method not in self.CALLS:
                raise ValueError(f"no remote call {method!r}; expected one of {', '.join(sorted(self.CALLS))}")
            value = getattr(self._live(), method)(*(m.get("args") or ()), **(m.get("kwargs") or {}))
            return str(value) if isinstance(value, RunStatus) else value

        return self._reply(go)

    def ask(self, data: bytes) -> bytes:
        """Ask a named actor of the tree (None when no actor has the name now)."""
        m = decode_message(data)

        def go() -> Any:
            ref = self._live().registry.whereis(str(m["name"]))
            if ref is None:
                return None
            return ref.ask(m["msg"], timeout=float(m.get("timeout") or 30), urgent=m.get("urgent") is True)

        return self._reply(go)

    def send(self, data: bytes) -> bytes:
        """Send to a named actor of the tree; False when no actor took it (counted as undelivered)."""
        m = decode_message(data)
        if m.get("urgent") is True:
            return self._reply(lambda: NamedTarget(str(m["name"]), self._live().registry).tell(m["msg"], urgent=True))
        return self._reply(lambda: self._live().registry.send(str(m["name"]), m["msg"]))

    def inspect(self, data: bytes) -> bytes:
        """The tree's shape: its children, a topic's subscribers, the names alive, the undelivered counts."""
        m = decode_message(data)

        def go() -> Any:
            exp, what = self._live(), m.get("what")
            if what == "children":
                return [{k: v for k, v in c.items() if k != "urn"} for c in exp.sup.which_children()]  # type: ignore[union-attr]
            if what == "subscribers":
                return [getattr(t, "name", repr(t)) for t in exp.topics.subscribers(str(m["topic"]))]
            if what == "alive":
                return exp.registry.whereis(str(m["name"])) is not None
            if what == "undelivered":
                return exp.registry.undelivered()
            raise ValueError(f"cannot inspect {what!r}")

        return self._reply(go)

    def wait_end(self) -> bytes:
        """Return when the run has ended, with its final status, summary, metrics and durations."""
        exp = self._live()
        exp.wait()
        final = {
            "status": str(exp.status()),
            "reason": exp.reason,
            "summary": exp.summary(),
            "metrics": exp.metrics(),
            "durations": exp.durations(),
            "tree_exit": exp.sup.exit_reason if exp.sup is not None else None,
        }
        self.lab.shutdown()
        return encode(final)

    def pid(self) -> int:
        return os.getpid()


# --- the driver side ---------------------------------------------------------------------------------------


def _remote_error(reply: dict[str, Any]) -> BaseException:
    names = reply.get("error") or []
    message = str(reply.get("message"))
    code = reply.get("errno")
    if "OSError" in names and isinstance(code, int) and not isinstance(code, bool):
        # the machine's answer (a full disk in the host: a daemon holds its queue), as the embedded Lab gives it
        return OSError(code, str(reply.get("strerror") or message))
    for name in names:
        cls = _ERRORS.get(name)
        if cls is not None:
            return cls(message)
    return RemoteError(f"{names[0] if names else 'error'} in the tree's host: {message}")


class _Ref:
    """A named actor of a remote tree, as far as the driver can reach it (ask, tell)."""

    def __init__(self, exp: RemoteExperiment, name: str) -> None:
        self.exp, self.name = exp, name

    def ask(self, msg: dict[str, Any], timeout: float | None = 30, *, urgent: bool = False) -> Any:
        """As ``ActorRef.ask``, ``urgent`` included (the host marks it on its side)."""
        call = {"name": self.name, "msg": msg, "timeout": timeout, "urgent": urgent}
        return self.exp._host_call("ask", call, (timeout or 30) + 5)

    def tell(self, msg: dict[str, Any], *, urgent: bool = False) -> bool:
        return bool(self.exp._host_call("send", {"name": self.name, "msg": msg, "urgent": urgent}))

    def is_alive(self) -> bool:
        return bool(self.exp._host_call("inspect", {"what": "alive", "name": self.name}))


class RemoteRegistry:
    """The remote tree's names: ``whereis`` and ``send`` as on a local :class:`~actors.registry.Registry`."""

    def __init__(self, exp: RemoteExperiment) -> None:
        self.exp = exp

    def whereis(self, name: str) -> _Ref | None:
        return _Ref(self.exp, name) if self.exp._host_call("inspect", {"what": "alive", "name": name}) else None

    def send(self, name: str, msg: dict[str, Any]) -> bool:
        return bool(self.exp._host_call("send", {"name": name, "msg": msg}))

    def undelivered(self) -> dict[str, int]:
        return dict(self.exp._host_call("inspect", {"what": "undelivered"}))


class _Name:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class RemoteTopics:
    """The remote tree's topics, read-only: who is subscribed (by name)."""

    def __init__(self, exp: RemoteExperiment) -> None:
        self.exp = exp

    def subscribers(self, topic: str) -> tuple[_Name, ...]:
        return tuple(_Name(n) for n in self.exp._host_call("inspect", {"what": "subscribers", "topic": topic}))


class RemoteTree:
    """The remote tree's supervisor, read-only (``which_children``), and its exit once ended."""

    def __init__(self, exp: RemoteExperiment) -> None:
        self.exp = exp

    def which_children(self) -> list[dict[str, Any]]:
        return list(self.exp._host_call("inspect", {"what": "children"}))

    def is_alive(self) -> bool:
        return self.exp._host is not None and not self.exp._stopped.is_set()

    @property
    def exit_reason(self) -> str | None:
        final = self.exp._final
        return None if final is None else final.get("tree_exit")


class RemoteExperiment:
    """The driver's handle on an experiment whose tree runs in a Ray actor; the API of
    :class:`~experiments.lab.Experiment`, with the same typed errors.

    ``status()`` and ``reason`` never leave this process: they are what the host last said
    (every answer carries its state) and what the Lab's supervision learnt (an end, a down, a
    restart). Transitions are serialised here and in the host. While the host is being
    restarted, a transition waits for it (at most :data:`RESTART_WAIT_S`) and reads answer
    from the run's files, ``stale``. ``restarts`` lists the downs and where the tree went on.
    """

    def __init__(self, backend: RayBackend, spec: dict[str, Any], exp_id: str, run_id: str | None = None) -> None:
        self.backend = backend
        self.lab = backend.lab
        self.spec = spec
        self.id = exp_id
        self.run_id = run_id or ""
        self.resources = check_resources(spec)
        self.restart_type = RESTART_TYPE
        self.node_id: str | None = None
        self.pid: int | None = None
        self.assigned: dict[str, float] = {}  # what Ray reserved for the host (CPU, GPU)
        self.restarts: list[dict[str, Any]] = []
        self._restart_times: tuple[float, ...] = ()
        self._lock = threading.RLock()  # serialises transitions
        self._hosting = threading.Condition()  # guards _host, _status, _reason, _final
        self._host: Any = None
        self._status = RunStatus.RUNNING
        self._reason: str | None = None
        self._final: dict[str, Any] | None = None
        self._last_down: str | None = None
        self._last_durations: dict[str, Any] = {}
        self._stopped = threading.Event()
        self._calls = 0  # calls waiting on the host's answer (guarded by _hosting)
        self.started_at = self.lab.clock()  # the Lab's clock, as Experiment's
        self.ended_at: float | None = None  # when the driver learnt the end
        self.registry = RemoteRegistry(self)
        self.topics = RemoteTopics(self)
        self.sup = RemoteTree(self)

    @property
    def run_dir(self) -> Path:
        return self.lab.artifacts / self.id / self.run_id

    # --- hosting (called by the backend) ------------------------------------------------------------------

    def _rehost(self, host: Any, info: dict[str, Any]) -> None:
        with self._hosting:
            self._host = host
            self.run_id = str(info["run_id"])
            self.node_id, self.pid = info.get("node_id"), info.get("pid")
            self.assigned = dict(info.get("resources") or {})
            state = info.get("state") or {}
            if "status" in state:  # a run resumed paused comes back paused
                self._status, self._reason = RunStatus(state["status"]), state.get("reason")
            self._hosting.notify_all()

    def _lose_host(self, host: Any, reason: str) -> bool:
        with self._hosting:
            if self._host is not host or self._final is not None:
                return False
            self._host = None
            self._last_down = reason
            self._hosting.notify_all()
            return True

    def _finish(self, final: dict[str, Any]) -> None:
        with self._hosting:
            if self._final is not None:
                return
            self._final = final
            self._status = RunStatus(final["status"])
            self._reason = final.get("reason")
            self._host = None
            self.ended_at = self.lab.clock()
            self._hosting.notify_all()
        self._stopped.set()

    def _quiesce(self, timeout: float = CALL_TIMEOUT_S) -> None:
        """Wait until no call waits on the (ended) host's answer: a stop's own answer must not be
        lost to the host being let go as the run's end comes in."""
        with self._hosting:
            self._hosting.wait_for(lambda: self._calls == 0, timeout)

    def _give_up(self, reason: str, write: bool = True) -> None:
        """The run ends failed without its tree: the host is gone and may not be restarted."""
        with self._hosting:
            if self._final is not None:
                return
            summary = read_summary(self.run_dir) if self.run_id else {}
            self._final = {"summary": summary, "metrics": {}, "durations": self._last_durations, "tree_exit": None}
            self._status, self._reason = RunStatus.FAILED, reason
            self._host = None
            self.ended_at = self.lab.clock()
            self._hosting.notify_all()
        if write and self.run_id:
            try:
                rec = read_json(self.run_dir / LIFECYCLE) or {}
                now = time.time()
                rec.update(status=str(RunStatus.FAILED), reason=reason, ended_at=now, updated_at=now)
                write_json(self.run_dir / LIFECYCLE, rec)
            except (OSError, ValueError) as exc:
                log.error("cannot write the lifecycle record", experiment=self.id, error=str(exc))
        log.error("remote experiment failed", experiment=self.id, run_id=self.run_id, reason=reason)
        self._stopped.set()

    def _take_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        with self._hosting:
            if self._final is None:
                self._status = RunStatus(state["status"])
                self._reason = state.get("reason")

    # --- calls ---------------------------------------------------------------------------------------------

    def _current_host(self, action: str, wait: float = RESTART_WAIT_S) -> Any:
        """The live host, waiting (at most ``wait``) while it is being restarted."""
        deadline = time.monotonic() + wait
        with self._hosting:
            while self._host is None and self._final is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotRunning(
                        f"experiment {self.id!r} is being restarted on Ray ({self._last_down}); cannot {action} yet"
                    )
                self._hosting.wait(left)
            if self._host is None:
                raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot {action}")
            return self._host

    def _host_call(
        self, op: str, payload: dict[str, Any], timeout: float = CALL_TIMEOUT_S, host: Any = None, action: str = ""
    ) -> Any:
        """Send one call to the host (bytes both ways) and return its value or raise its typed error."""
        ray = _ray()
        host = host if host is not None else self._current_host(action or op)
        with self._hosting:
            self._calls += 1  # the actor is let go only once no call is waiting on it
        try:
            data = ray.get(getattr(host, op).remote(encode({"kind": op, **payload})), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"experiment {self.id!r}: its Ray actor did not answer {op} within {timeout:g} s"
            ) from None
        except ray.exceptions.RayTaskError as exc:  # the host's method itself failed (a bug, not a death)
            raise RemoteError(f"experiment {self.id!r}: {op} failed in its Ray actor: {exc}") from None
        except ray.exceptions.RayError as exc:  # the process died under the call: the backend restarts it
            if self._final is not None:  # the run ended and its actor was let go meanwhile
                raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot {action or op}") from None
            raise HostLost(f"experiment {self.id!r}: the process hosting its tree died ({down_reason(exc)})") from None
        finally:
            with self._hosting:
                self._calls -= 1
                self._hosting.notify_all()
        reply = decode(data)
        self._take_state(reply.get("state"))
        if not reply.get("ok"):
            raise _remote_error(reply)
        return reply.get("value")

    def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S, **kwargs: Any) -> Any:
        return self._host_call("call", {"method": method, "args": list(args), "kwargs": kwargs}, timeout, action=method)

    def _transition(self, method: str, settled: Callable[[], bool], *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """A transition; if the host dies under it, once more on the restarted host unless the
        restart already shows it done (a pause the old host had recorded comes back paused)."""
        try:
            return self._call(method, *args, timeout=timeout)
        except HostLost:
            if settled():
                return None
            self._current_host(method)  # wait for the restart (NotRunning if the run ends instead)
            if settled():
                return None
            return self._call(method, *args, timeout=timeout)

    def _read(self, method: str, fallback: Callable[[], Any], *args: Any) -> Any:
        """A read: from the host, or ``fallback()`` while it is being restarted (never waits for
        one); :data:`_ENDED` when the run ended meanwhile (the caller answers from the end)."""
        host = self._host
        if host is None:
            return _ENDED if self._final is not None else fallback()
        try:
            return self._host_call("call", {"method": method, "args": list(args), "kwargs": {}}, host=host)
        except NotRunning:  # HostLost, or the actor let go as the run's end came in
            if self._final is not None:
                return _ENDED
            return fallback()

    # --- the Experiment API ---------------------------------------------------------------------------------

    def status(self) -> str:
        """``running``, ``paused``, ``stopped``, ``failed`` or ``archived`` (a :class:`RunStatus`)."""
        return self._status

    @property
    def reason(self) -> str | None:
        """Why it ended: ``completed``, ``budget``, ``stopped``, ``failed: ...``."""
        return self._reason

    def pause(self) -> None:
        """Detach the metric subscribers and park the phase at its next safe point (in the host)."""
        with self._lock:
            self._transition("pause", lambda: self._status == RunStatus.PAUSED)

    def resume(self) -> None:
        """Reattach the subscribers and let the phase continue (in the host)."""
        with self._lock:
            self._transition("resume", lambda: self._status == RunStatus.RUNNING)

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop the tree as a local stop does (drained, on disk) and wait for its end here too;
        a stop that waited behind another one returns once the tree is down, as a local one does.
        ``timeout`` as a local stop's: checked before anything is asked."""
        timeout = check_timeout(timeout)
        if self._final is not None:
            raise NotRunning(f"experiment {self.id!r} is {self._status}; cannot stop")
        with self._lock:
            if self._final is not None:  # ended while this stop waited its turn: done, as asked
                return
            t = CALL_TIMEOUT_S if timeout is None else timeout
            self._transition("stop", self._stopped.is_set, timeout, timeout=3 * t + 5)
            self._stopped.wait(timeout)

    def archive(self) -> None:
        """Mark a finished experiment archived (stopping it first if it still runs)."""
        with self._lock:
            if self._final is None:
                try:
                    self.stop()
                except NotRunning:
                    self._stopped.wait(CALL_TIMEOUT_S)  # it ended on its own meanwhile
            with self._hosting:
                self._status = RunStatus.ARCHIVED
            rec = read_json(self.run_dir / LIFECYCLE) or {}
            rec.update(status=str(RunStatus.ARCHIVED), updated_at=time.time())
            write_json(self.run_dir / LIFECYCLE, rec)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the experiment has ended (completed, budget, stopped or failed); whether
        it has. ``timeout``: seconds, or None or ``math.inf`` to wait for ever."""
        return self._stopped.wait(check_timeout(timeout))

    def restart_pass(self) -> dict[str, Any]:
        """Ask the workload to start a new pass from its best solution (if it has passes)."""
        return self._call("restart_pass")

    def set_param(self, key: str, value: Any, why: str = "requested") -> dict[str, Any]:
        """As :meth:`Experiment.set_param`, applied in the host's tree."""
        return self._call("set_param", key, value, why)

    def _overlay(self, d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "status": str(self._status), "reason": self._reason}

    def summary(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """As :meth:`Experiment.summary`, asked of the host; while the host is being restarted, the
        run's ``summary.json`` (``stale``); once ended, the final summary."""
        final = self._final
        if final is not None:
            return self._overlay({**final["summary"], **(final.get("durations") or {}), "stale": False, "age_s": 0.0})

        def from_disk() -> dict[str, Any]:
            return self._overlay({**read_summary(self.run_dir), **self._last_durations, "stale": True, "age_s": None})

        got = self._read("summary", from_disk, max_age, wait)
        return self.summary() if got is _ENDED else got

    def metrics(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """As :meth:`Experiment.metrics`; ``{"stale": True, "age_s": None}`` while restarting."""
        final = self._final
        if final is not None:
            return {**(final.get("metrics") or {}), "stale": False, "age_s": 0.0}
        got = self._read("metrics", lambda: {"stale": True, "age_s": None}, max_age, wait)
        return self.metrics() if got is _ENDED else got

    def phase_status(self, max_age: float = MAX_AGE_S, wait: float = WAIT_S) -> dict[str, Any]:
        """As :meth:`Experiment.phase_status`; {} while restarting and once ended."""
        if self._final is not None:
            return {}
        got = self._read("phase_status", dict, max_age, wait)
        return {} if got is _ENDED else got

    def durations(self) -> dict[str, Any]:
        """Wall-clock, active and paused seconds, pause and resume counts (the host's, across restarts)."""
        final = self._final
        if final is not None:
            return dict(final.get("durations") or {})
        got = self._read("durations", lambda: dict(self._last_durations))
        if got is _ENDED:
            return self.durations()
        self._last_durations = got
        return got

    def query_window(self, spec: Any, filters: dict[str, Any] | None = None, source: str = "live") -> list[Any]:
        """Time-window query: the host's Recorder while live, the history store once stopped."""
        wire, checked = prepare_query(spec, filters)  # a bad query fails here, never in the host
        if self._final is None and source == "live" and self._host is not None:
            try:
                return self._call("query_window", wire, checked, source)
            except (HostLost, NotRunning):
                pass  # ended or restarting: what the history has
        store = open_history(self.lab.history, artifacts=self.lab.artifacts, readonly=True)
        try:
            return store.query(self.id, wire, checked, run_id=self.run_id)
        finally:
            store.close()

    def __repr__(self) -> str:
        return f"<RemoteExperiment {self.id} run={self.run_id} {self._status} node={(self.node_id or '?')[:12]}>"


class RayBackend:
    """The driver side of the ray backend: starts each experiment's host, supervises the hosts
    (a watcher thread per host waits on its end), restarts the dead ones, lets them go."""

    def __init__(self, lab: Lab, address: str | None, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.lab = lab
        self.address = address
        self.owns_ray = connect(address, connect_timeout)
        ray = _ray()
        self._host_cls = ray.remote(TreeHost)
        self._closed = False
        self._hosts: set[Any] = set()
        self._watchers: set[threading.Thread] = set()  # one per live host; close waits for them
        self._started: list[threading.Thread] = []  # every watcher not yet joined: close joins them all
        self._hosts_lock = threading.Lock()  # guards _closed, _hosts and _watchers
        self._artifacts = str(Path(lab.artifacts).resolve())
        h = lab.history
        self._history = None if h is None else str(Path(h).resolve()) if isinstance(h, Path) else str(h)
        log.info("ray backend ready", address=address or "local", started_ray=self.owns_ray)

    # --- starting --------------------------------------------------------------------------------------------

    def _check_fits(self, exp: RemoteExperiment) -> None:
        """Refuse at once what no node could ever hold (Ray would wait for it forever)."""
        r = exp.resources
        nodes = [n.get("Resources") or {} for n in _ray().nodes() if n.get("Alive")]
        if not any(n.get("CPU", 0) >= r["cpus"] and n.get("GPU", 0) >= r["gpus"] for n in nodes):
            most = max((n.get("CPU", 0) for n in nodes), default=0)
            gpus = max((n.get("GPU", 0) for n in nodes), default=0)
            raise RayBackendError(
                f"experiment {exp.id!r}: resources cpus={r['cpus']:g} gpus={r['gpus']:g}: no node of the Ray "
                f"cluster has that much (the most on one node: {most:g} CPUs, {gpus:g} GPUs)"
            )

    def _spawn(self, exp: RemoteExperiment, op: str, payload: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
        """A new host for ``exp`` on any node with room, told to ``start`` or ``resume``; returns
        the host, its info and the reference its end will come on."""
        ray = _ray()
        self._check_fits(exp)
        r = exp.resources
        host = self._host_cls.options(
            num_cpus=r["cpus"],
            num_gpus=r["gpus"],
            max_restarts=0,  # the Lab restarts it, from its run directory: Ray must not
            max_concurrency=HOST_CONCURRENCY,
            scheduling_strategy="SPREAD",
        ).remote(self._artifacts, self._history, self.lab.min_free_bytes)
        with self._hosts_lock:
            closing = self._closed
            self._hosts.add(host)
        try:
            if closing:  # a restart that raced close: the host must not outlive the backend
                raise NotRunning(f"experiment {exp.id!r}: this Lab is shutting down")
            ref = getattr(host, op).remote(encode(payload))
            ready, _ = ray.wait([ref], timeout=START_TIMEOUT_S)
            if not ready:
                raise RayBackendError(
                    f"experiment {exp.id!r}: no node of the Ray cluster had room for cpus={r['cpus']:g} "
                    f"gpus={r['gpus']:g} (or the tree did not start) within {START_TIMEOUT_S:g} s"
                )
            try:
                reply = decode(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                raise RemoteError(f"experiment {exp.id!r}: its Ray actor failed as it started: {exc}") from None
            except ray.exceptions.RayError as exc:
                reason = down_reason(exc)
                raise HostDiedStarting(
                    f"experiment {exp.id!r}: its Ray actor died as it started ({reason})", reason
                ) from None
            if not reply.get("ok"):
                raise _remote_error(reply)
        except BaseException:
            self._release(host)
            raise
        return host, {**reply["value"], "state": reply.get("state")}, host.wait_end.remote()

    def start_experiment(self, full: dict[str, Any], experiment_id: str | None) -> RemoteExperiment:
        """Start a new run of a validated spec in its own host; the handle comes back running."""
        if self._closed:
            raise NotRunning("this Lab has been shut down")
        spec = {k: v for k, v in full.items() if k != "source"}  # the host validates it again, as a dict
        with self.lab._lock:
            base = check_experiment_id(experiment_id or full["name"])
            exp_id, k = base, 1
            while exp_id in self.lab.experiments:
                k += 1
                exp_id = f"{base}-{k}"
            cap = self.lab.max_experiments
            live = sum(1 for e in self.lab.experiments.values() if not e.wait(0))
            if cap is not None and live >= cap:  # as the embedded Lab's DynamicSupervisor refuses
                raise TooManyChildren(
                    f"this Lab already runs max_experiments={cap} experiments; cannot start {exp_id!r}"
                )
            exp = RemoteExperiment(self, full, exp_id)
            self.lab.experiments[exp_id] = exp  # type: ignore[assignment]
        try:
            host, info, end = self._spawn(exp, "start", {"kind": "start", "spec": spec, "id": exp_id})
        except BaseException:
            with self.lab._lock:
                self.lab.experiments.pop(exp_id, None)
            raise
        exp._rehost(host, info)
        self._watch(exp, host, end)
        log.info("remote experiment started", experiment=exp_id, run_id=exp.run_id, node=info.get("node_id"))
        return exp

    def recover(self, first: Collection[str] = ()) -> list[RemoteExperiment]:
        """Lab.recover on Ray: every crashed run of the artifacts folder goes on in a host of its
        own, oldest first, those whose run id is in ``first`` before all others; a run whose id
        is taken waits for it (``Lab.waiting``, ``Lab.resume_waiting``), as on the embedded backend."""
        crashed = [d for d in reversed(find_runs(self.lab.artifacts)) if run_status(d).status == RunStatus.CRASHED]
        crashed.sort(key=lambda d: d.name not in first)  # stable: oldest first within each group
        out = []
        for run_dir in crashed:
            exp = self.resume_run(run_dir, wait=True)
            if exp is not None:
                out.append(exp)
        return out

    def resume_run(self, run_dir: Path, wait: bool = False) -> RemoteExperiment | None:
        """Resume one crashed run in a new host; None when it has no spec, could not be started
        (logged), or its id is taken (with ``wait``: it then waits for the id)."""
        report = run_status(run_dir)
        exp_id, run_id = run_dir.parent.name, run_dir.name
        spec = read_json(run_dir / SPEC)
        if spec is None:
            self.lab.note_no_spec(run_dir, report.record)
            return None
        with self.lab._lock:
            if not self.lab.id_free_for(run_dir, wait):
                return None
            exp = RemoteExperiment(self, spec, exp_id, run_id)
            self.lab.experiments[exp_id] = exp  # type: ignore[assignment]
        try:
            host, info, end = self._spawn(exp, "resume", {"kind": "resume", "run_dir": str(run_dir.resolve())})
        except Exception:
            log.exception("could not resume a crashed run on Ray", run_dir=str(run_dir))
            with self.lab._lock:
                self.lab.experiments.pop(exp_id, None)
            return None
        exp._rehost(host, info)
        self._watch(exp, host, end)
        return exp

    # --- supervision ------------------------------------------------------------------------------------------

    def _watch(self, exp: RemoteExperiment, host: Any, end: Any) -> None:
        t = threading.Thread(target=self._await_end, args=(exp, host, end), name=f"ray-watch-{exp.id}", daemon=True)
        with self._hosts_lock:  # started under the lock: close never joins a thread not yet started
            self._watchers.add(t)
            self._started = [x for x in self._started if x.is_alive()] + [t]
            t.start()

    def _await_end(self, exp: RemoteExperiment, host: Any, end: Any) -> None:
        """The host's end: its run ended (normal), or its process died (a down)."""
        ray = _ray()
        try:
            try:
                final = decode(ray.get(end))
            except Exception as exc:  # noqa: BLE001 - RayActorError and kin: the process or its node died
                self._down(exp, host, exc)
                return
            exp._finish(final)
            exp._quiesce()
            self._release(host)
            log.info("remote experiment ended", experiment=exp.id, run_id=exp.run_id, reason=exp.reason)
        finally:
            with self._hosts_lock:
                self._watchers.discard(threading.current_thread())

    def _down(self, exp: RemoteExperiment, host: Any, exc: BaseException) -> None:
        """A host died: restart it per its restart type and intensity (actors.supervision's rules),
        again if the new one dies before its tree is up."""
        reason = down_reason(exc)
        if not exp._lose_host(host, reason):
            return
        self._release(host)
        down_at = time.time()
        while True:
            log.warning("remote experiment down", experiment=exp.id, run_id=exp.run_id, node=exp.node_id, reason=reason)
            failure = self._decide(exp, reason)
            if failure is not None:
                exp._give_up(failure, write=not self._closed)
                return
            try:
                self._await_owner_gone(exp)
                payload = {
                    "kind": "resume",
                    "run_dir": str(exp.run_dir.resolve()),
                    "reason": reason,
                    "restarts": len(exp.restarts) + 1,
                    "down_at": down_at,
                }
                host, info, end = self._spawn(exp, "resume", payload)
            except HostDiedStarting as again:  # a second down, before the tree was up
                reason = again.reason
                continue
            except Exception as failed:  # noqa: BLE001 - the run fails, with why
                exp._give_up(f"failed: could not restart after {reason}: {type(failed).__name__}: {failed}")
                return
            break
        exp.restarts.append(
            {"reason": reason, "down_at": down_at, "node_id": info.get("node_id"), "from_node": exp.node_id}
        )
        exp._rehost(host, info)
        self._watch(exp, host, end)
        log.warning(
            "remote experiment restarted from its checkpoint",
            experiment=exp.id,
            run_id=exp.run_id,
            node=info.get("node_id"),
            restarts=len(exp.restarts),
        )

    def _decide(self, exp: RemoteExperiment, reason: str) -> str | None:
        """None: restart (the restart is counted); else the reason the run fails with."""
        if self._closed:
            return f"failed: {reason} (the Lab was shutting down: not restarted)"
        sv = exp.spec.get("supervision") or {}
        ok, window = within_intensity(
            exp._restart_times, self.lab.clock(), int(sv.get("max_restarts", 3)), float(sv.get("max_seconds", 5.0))
        )
        decision = decide("one_for_one", exp.restart_type, reason, False, "never", intensity_ok=ok)
        if decision.action == GIVE_UP:
            return f"failed: {MAX_INTENSITY} ({reason})"
        if decision.action != RESTART or not is_abnormal(reason):
            return f"failed: {reason}"
        exp._restart_times = window
        return None

    def _await_owner_gone(self, exp: RemoteExperiment) -> None:
        """Never two owners of a run: on this machine, wait for the dead host's process to be gone.
        An owner on another host cannot be checked from here: Ray's word that it died stands."""
        owner = (read_json(exp.run_dir / LIFECYCLE) or {}).get("owner") or {}
        deadline = time.monotonic() + OWNER_GONE_S
        while owner_alive(owner)[0] is True:
            if time.monotonic() > deadline:
                raise RayBackendError(
                    f"the dead host's process {owner.get('pid')} is still alive after {OWNER_GONE_S:g} s"
                )
            time.sleep(0.05)  # another process's exit: there is nothing to wait on

    def _release(self, host: Any) -> None:
        with self._hosts_lock:
            self._hosts.discard(host)
        try:
            _ray().kill(host, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray is shutting down
            pass

    def close(self, wait: float = CLOSE_WAIT_S) -> None:
        """Let every host go (the Lab stopped their experiments first), wait for the watcher
        threads to finish with Ray, then shut Ray down if the Lab started it.

        No thread of this backend touches Ray once this returns: a Ray call after
        ``ray.shutdown()`` (ours, or the caller's, who may join Ray again later) ends the
        whole process. A watcher that outlives ``wait`` is logged, and Ray is then left up.
        """
        with self._hosts_lock:
            self._closed = True
            hosts = list(self._hosts)
        for host in hosts:
            self._release(host)
        deadline = time.monotonic() + wait
        while True:
            with self._hosts_lock:
                watchers = [t for t in self._watchers if t is not threading.current_thread()]
            if not watchers:
                break
            watchers[0].join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline and watchers[0].is_alive():
                log.error("ray watchers still busy after close", threads=[t.name for t in watchers], waited_s=wait)
                return  # shutting Ray down under them would end the process
        with self._hosts_lock:
            started = [t for t in self._started if t is not threading.current_thread()]
        for t in started:  # a watcher that left the set may still be on its way out: gone once this returns
            t.join(max(0.0, deadline - time.monotonic()))
        if self.owns_ray:
            _ray().shutdown()


register_backend("ray", RayBackend)
