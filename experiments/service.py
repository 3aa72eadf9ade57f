"""The lab daemon's core: one Lab per artifacts folder, and a persisted FIFO submission queue.

A :class:`LabService` owns its artifacts folder while it lives: it holds an exclusive
``flock`` on the folder (its pid written in ``<artifacts>/lab.lock``), so a second service on
the same folder refuses to start and names the holder. It hosts one :class:`Lab` and runs at
most ``max_running`` experiments at a time; a submission is validated exactly as the CLI
validates a spec (:func:`experiments.spec.load_spec` with its overrides), written to
``<artifacts>/queue.json`` before it is acknowledged, and started in submission order as
soon as a slot is free. Each running experiment has a small thread waiting on its end, which
starts the next queued item: nothing polls. Queued items survive a crash or a restart of the
service and start, in order, when the next service starts on the folder. See docs/daemon.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from actors.files import atomic_write
from actors.log import get_logger
from actors.recorder import check_artifacts_dir
from actors.runtime import trim_heap
from actors.timers import check_timeout
from experiments.admission import Admission
from experiments.lab import MIN_FREE_BYTES, START_FAILED, Experiment, Lab, NotFound, NotRunning
from experiments.spec import SpecError, parse_toml
from experiments.validate import MAX_KEY_CHARS, check_key
from telemetry.batchstore import HistoryUnavailable
from telemetry.jsonl import run_segments
from telemetry.rundir import LIVE, LOCK_FILE, QUEUE_FILE, RunStatus, check_experiment_id, list_runs, run_status

log = get_logger("experiments.service")

QUEUE_SCHEMA = 1
RETIRED_BASES = 10_000  # names whose given-out ids are remembered after their records are dropped
KEYS_KEPT = 1000
MAX_QUEUED = 1000  # submissions waiting at once; past it (or MAX_QUEUE_BYTES) a submission is refused
MAX_QUEUE_BYTES = 8 << 20
"""The most ``queue.json`` may hold. Every change to the queue rewrites (and fsyncs) the whole
file, and the queue lives in memory too: without a bound, a token holder's loop of 64 KiB
specs made every submission slower and the file as large as the disk allowed."""
HOLD_RETRY_S = (5.0, 300.0)  # a queue held by a storage error tries again after this, doubling up to that
TRANSIENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN}
)
_TRANSIENT_TEXTS = ("disk I/O error", "database or disk is full", "database is locked", "No space left on device")


def transient_start_error(exc: BaseException) -> bool:
    """Whether a start failed for the machine's sake, for now (a full disk, an I/O error, no file
    descriptors left, a history away), not for the submission's: the queue waits for the
    machine, where marking the item failed would drain a night's queue in a second. The cause
    is looked for along the exception's chain (a history error wraps the OSError it met)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        if isinstance(e, HistoryUnavailable) or any(t in str(e) for t in _TRANSIENT_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


"""Idempotency keys remembered, the newest: a submission sent again with its key (a client's
retry after a lost answer) gets the first one's entry, not a second experiment."""


_LEGIBLE_ID = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9._-]{1,128})"')  # in what is left of a damaged queue file
_LEGIBLE_KEY = re.compile(  # an idempotency key's whole record, as _save_queue writes it (a JSON-escaped key)
    rb'"((?:[^"\\\x00-\x1f]|\\.){1,%d})"\s*:\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._-]{1,128})"\s*,'
    rb'\s*"digest"\s*:\s*"([0-9a-f]{0,64})"(?:\s*,\s*"(?:status|reason)"\s*:\s*"(?:[^"\\]|\\.)*")*\s*\}'
    % (2 * MAX_KEY_CHARS)
)


def _legible_id(value: object) -> bool:
    try:
        check_experiment_id(value)
    except ValueError:
        return False
    return True


def _legible_key(value: object) -> bool:
    """Whether a queue file's idempotency key is one :meth:`LabService.submit` takes."""
    try:
        return check_key(value) is not None
    except ValueError:
        return False


def _salvaged_keys(raw: bytes) -> dict[str, dict[str, str]]:
    """The idempotency keys whose records are still whole in a damaged queue file: a client's
    retry with one gets its first entry (run, or listed as lost), never a second experiment."""
    keys: dict[str, dict[str, str]] = {}
    for m in _LEGIBLE_KEY.finditer(raw):
        try:
            key = orjson.loads(b'"' + m[1] + b'"')
        except ValueError:
            continue
        if _legible_key(key) and _legible_id(m[2].decode()):
            keys.pop(key, None)  # re-inserted: the file's order, the newest last
            keys[key] = {"id": m[2].decode(), "digest": m[3].decode()}
    return dict(list(keys.items())[-KEYS_KEPT:])


def _queue_item(item: Any) -> bool:
    """Whether a queue file's entry has what a queued submission needs."""
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), str)
        and _legible_id(item["id"])
        and isinstance(item.get("spec"), (dict, str))
        and isinstance(item.get("set") or [], list)
        and isinstance(item.get("submitted_at"), (int, float))
    )


class KeyReused(ValueError):
    """An idempotency key sent again with a different submission (HTTP 422)."""


def _digest(raw: dict[str, Any], overrides: list[str], experiment_id: str | None) -> str | None:
    """What a repeated submission must match: the spec, its overrides and the id asked for, as
    they were sent. None when they cannot even be serialised (an integer past 64 bits, nesting
    past orjson's limit): such a submission is invalid, and validating it says why."""
    try:
        body = orjson.dumps([raw, overrides, experiment_id], option=orjson.OPT_SORT_KEYS, default=str)
    except (TypeError, orjson.JSONEncodeError):
        return None
    return hashlib.sha256(body).hexdigest()


class LabLocked(RuntimeError):
    """Another service holds the artifacts folder."""


class QueueFull(RuntimeError):
    """The queue holds :data:`MAX_QUEUED` submissions, or :data:`MAX_QUEUE_BYTES`: submit when some have started."""


class ServiceClosed(NotRunning):
    """The service is shutting down and takes no more submissions or starts."""


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class LabService:
    """A Lab behind a lock and a persisted queue; thread-safe, for a long-lived daemon.

    Raises:
        LabLocked: another service (this process or another) holds ``artifacts``.
        ArtifactsError: the folder cannot be created or written.
    """

    def __init__(
        self,
        artifacts: str | Path = "artifacts",
        max_running: int = 1,
        keep_ended: int = 100,
        history: str | Path | None = None,
        backend: str = "embedded",
        address: str | None = None,
        data_dirs: Sequence[str | Path] = (),
        allow_targets: Sequence[str] = (),
        start: bool = True,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        """``start=False`` takes the folder (lock, history, queue) but resumes and starts
        nothing until :meth:`start`: a daemon binds its port first, so a start that fails
        there (the port taken) leaves crashed runs crashed and the queue as it was, instead of
        starting them only to stop them for good.

        ``min_free_bytes``: a queued item starts only with this much free disk (see
        :data:`experiments.lab.MIN_FREE_BYTES`); with less, the queue is held as on a full disk."""
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        # what a submission may read and call (experiments.admission): checked at submission and at start
        self.admission = Admission(data_dirs, allow_targets)
        self.artifacts = check_artifacts_dir(artifacts)
        self.max_running = max_running
        self.keep_ended = keep_ended  # ended experiments whose handles stay in memory (see _forget_ended)
        self.lock_file = self.artifacts / LOCK_FILE
        self.queue_file = self.artifacts / QUEUE_FILE
        self._pid_fd = -1  # lab.lock, which names the holder (see _acquire_lock)
        self._lock_fd = self._acquire_lock()
        self._lock = threading.RLock()
        self._closed = False
        self._queue: list[dict[str, Any]] = []
        self._ended: dict[str, dict[str, Any]] = {}  # cancelled or failed-to-start submissions
        self._retired: dict[str, int] = {}  # ids of forgotten submissions: base -> highest suffix (see _retire)
        self._keys: dict[str, dict[str, str]] = {}  # idempotency key -> {"id", "digest"}, the newest last
        self._runs: dict[str, str] = {}  # id -> run id of the submissions this service started, the newest last
        self._started_unsaved: set[str] = set()  # queued items found started at load (see _own_runs)
        self._held: dict[str, Any] | None = None  # the queue's head waiting out a storage error (see _hold)
        self._hold_timer: threading.Timer | None = None
        # crashed runs left crashed at start for want of disk space: resumed first once there is room
        self._recover_pending = False
        self._recovering = False
        self._no_room: str | None = None  # why the queue waits with them
        self._recover_timer: threading.Timer | None = None
        self._started = False  # recover() done and the queue going (see start)
        self._queue_bytes = 0  # queue.json's size at its last write (see MAX_QUEUE_BYTES)
        self._starting: dict[str, Any] | None = None  # the queue's head while it starts, outside the lock (_fill)
        self._start_done = threading.Condition(self._lock)
        self._should_stop: Callable[[], bool] = lambda: False  # a daemon's signal (see start)
        try:
            # history: see telemetry.history; backend and address: Lab (docs/ray.md)
            self.lab = Lab(
                self.artifacts, history=history, backend=backend, address=address, min_free_bytes=min_free_bytes
            )
            self._queue = self._load_queue()  # first: it names the runs of our submissions, resumed first
            with contextlib.suppress(OSError):
                self._queue_bytes = self.queue_file.stat().st_size
        except BaseException:
            self._release_lock()
            raise
        if start:
            try:
                self.start()
            except BaseException:
                self.shutdown()
                raise

    def start(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Resume the runs a crashed previous owner left, then start queued items while slots
        are free. Submissions taken before it wait in the queue. Once only.

        ``should_stop``: a daemon's signal, asked before each queued start: a stop asked while
        the queue is being started (a SIGTERM at boot) starts no more of it (each start of a
        slow tree takes its time; the rest stay queued for the next start)."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            if should_stop is not None:
                self._should_stop = should_stop
        recover = getattr(self.lab, "recover", None)  # resumes a crashed previous owner's runs, where supported
        recovered: list[Experiment] = list(recover(self._own_runs()) or []) if callable(recover) else []
        for exp in recovered:
            self._watch(exp)
        if callable(recover) and not self._room():  # crashed runs were left crashed: resumed once there is room
            with self._lock:
                self._recover_pending = True
            self._schedule_recover(HOLD_RETRY_S[0])
        log.info(
            "lab service started",
            artifacts=str(self.artifacts),
            pid=os.getpid(),
            max_running=self.max_running,
            queued=len(self._queue),
            recovered=[e.id for e in recovered],
        )
        with self._lock:
            blocked = self._paused_block()
        if blocked is not None:
            log.warning("the queue waits: every slot is held by a paused run", reason=blocked, queued=len(self._queue))
        self._fill()

    def _queue_reason(self, exp_id: str, pos: int) -> str | None:
        """Why a queued item waits beyond its place in the queue, or None (the caller holds the
        lock): a start held by a storage error, or, for the head, crashed runs waiting for disk
        room to be resumed first, or every slot held by a paused run."""
        if self._held is not None and self._held["id"] == exp_id:
            return self._held["reason"]
        if pos != 1:
            return None
        if self._recover_pending and self._no_room:
            return self._no_room
        return self._paused_block()

    def _paused_block(self) -> str | None:
        """Why the queue's head waits when every slot is held by a paused experiment (a run
        that came back paused after a crash holds its slot until resumed), or None (the caller
        holds the lock)."""
        if not self._queue:
            return None
        live = [(e.id, e.status()) for e in list(self.lab.experiments.values())]
        live = [(i, st) for i, st in live if st in LIVE]
        if len(live) < self.max_running or any(st != RunStatus.PAUSED for _, st in live):
            return None
        return (
            f"waiting: every slot ({self.max_running}) is held by a paused experiment "
            f"({', '.join(i for i, _ in live)}): resume or stop one"
        )

    # --- the lock ------------------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        """The ``flock`` is taken on the artifacts folder itself, which no one tidies away while
        a daemon runs in it; ``lab.lock`` only names the holder's pid. (A lock on the file
        alone held nothing once the file was deleted as stale: a second daemon made a new one,
        locked it, and ran the same queued submissions.)"""
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a folder in its place, no permission
            raise LabLocked(
                f"cannot open the lock file {str(self.lock_file)!r} ({exc.strerror or exc}); "
                "it must be a file this user can write"
            ) from None
        try:
            folder = os.open(self.artifacts, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(fd)
            why = exc.strerror or exc
            raise LabLocked(f"cannot open the artifacts folder {str(self.artifacts)!r}: {why}") from None
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            os.close(folder)
            raise LabLocked(
                f"artifacts folder {str(self.artifacts)!r} is in use by another lab daemon "
                f"(pid {_read_pid(self.lock_file)}, lock {self.lock_file}); stop it or use another --artifacts"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._pid_fd = fd
        return folder

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        pid_fd, self._pid_fd = self._pid_fd, -1
        if fd >= 0:
            try:
                if pid_fd >= 0:
                    os.ftruncate(pid_fd, 0)  # no holder named any more
            finally:
                if pid_fd >= 0:
                    os.close(pid_fd)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    # --- the queue on disk -----------------------------------------------------------------------------

    def _load_queue(self) -> list[dict[str, Any]]:
        """The queue a previous lifetime left. A damaged file is moved aside (kept, never
        overwritten) and the daemon starts with an empty queue: the ids still legible in it are
        listed as failed (lost with the file), so they are neither silent nor given again, and
        the idempotency keys still whole in it are kept (a retry gets its first entry).
        Malformed entries are dropped. An item whose experiment folder exists had started (the
        daemon died between its start and the queue's rewrite): it was resumed or has ended,
        and is not started again."""
        raw = b""
        try:
            raw = self.queue_file.read_bytes()
            data = orjson.loads(raw)
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:  # orjson's decode error is a ValueError
            aside = self.queue_file.with_name(f"{QUEUE_FILE}.damaged.{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                os.replace(self.queue_file, aside)
            except OSError as move_exc:
                raise LabLocked(
                    f"the queue file {str(self.queue_file)!r} is unreadable ({exc}) and cannot be moved aside "
                    f"({move_exc.strerror or move_exc}); move it yourself to start with an empty queue"
                ) from None
            lost = [i for i in dict.fromkeys(m.decode() for m in _LEGIBLE_ID.findall(raw)) if _legible_id(i)]
            lost = [i for i in lost if not (self.artifacts / i).is_dir()]
            reason = f"lost: the queue file was unreadable at a restart; kept as {aside.name}"
            self._ended = {i: {"status": "failed", "reason": reason} for i in lost}
            self._keys = _salvaged_keys(raw)
            log.error(
                "queue file unreadable; moved aside, starting with an empty queue",
                path=str(self.queue_file),
                kept_as=str(aside),
                error=str(exc),
                lost=lost,
                keys_kept=len(self._keys),
            )
            return []
        retired = data.get("retired")
        self._retired = {
            k: v
            for k, v in (retired if isinstance(retired, dict) else {}).items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1
        }
        keys = data.get("keys")
        kept = list((keys if isinstance(keys, dict) else {}).items())[-KEYS_KEPT:]  # a hand-made file: bounded
        self._keys = {  # only what submit could have written: a key it takes, an id it gives out
            k: {"id": v["id"], "digest": v["digest"]}
            | {f: v[f] for f in ("status", "reason") if isinstance(v.get(f), str)}  # how a let-go one ended
            for k, v in kept
            if _legible_key(k) and isinstance(v, dict) and _legible_id(v.get("id")) and isinstance(v.get("digest"), str)
        }
        ended = data.get("ended")
        self._ended = {
            k: v
            for k, v in (ended if isinstance(ended, dict) else {}).items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("status"), str)
        }
        runs = data.get("runs")
        self._runs = {
            k: v
            for k, v in list((runs if isinstance(runs, dict) else {}).items())[-KEYS_KEPT:]
            if _legible_id(k) and isinstance(v, str) and _legible_id(v)
        }
        items = data.get("queue")
        out = []
        for i in items if isinstance(items, list) else []:
            if not _queue_item(i):
                log.error("malformed queue entry dropped", entry=repr(i)[:200], path=str(self.queue_file))
            elif self._had_started(i["id"]):
                log.warning("queued experiment had started before the restart; not started again", experiment=i["id"])
                self._started_unsaved.add(i["id"])
            else:
                out.append(i)
        return out

    def _own_runs(self) -> set[str]:
        """The run ids of this service's submissions: those it started (kept in the queue file),
        and every run in the folder of an item that had started when the file was last written
        (the daemon died between the start and the rewrite)."""
        own = set(self._runs.values())
        for exp_id in self._started_unsaved:
            with contextlib.suppress(OSError):
                own.update(p.name for p in (self.artifacts / exp_id).iterdir() if p.is_dir())
        return own

    def _had_started(self, exp_id: str) -> bool:
        """Whether a queued item's folder holds a run that started (the daemon died between its
        start and the queue's rewrite); the runs of starts that failed (a queue held by a full
        disk leaves one per try) do not count."""
        folder = self.artifacts / exp_id
        if not folder.is_dir():
            return False
        for run in (p for p in folder.iterdir() if p.is_dir()):
            report = run_status(run)
            if report.status == RunStatus.FAILED and report.record.get("start_failed") is True:
                continue
            if report.status == RunStatus.UNKNOWN and not run_segments(
                run
            ):  # no record, no event: a try the disk cut short
                continue
            return True
        return False

    def _save_queue(self) -> None:
        """The queue, and the submissions that never ran (cancelled, failed to start): both are
        acknowledged, so both outlive a restart of the daemon."""
        for old in list(self._ended)[: max(0, len(self._ended) - self.keep_ended)]:
            end = self._ended.pop(old)  # the oldest first (insertion order): bounded like ended handles
            self._retire(old)
            for seen in self._keys.values():  # a retry with its key still gets how it ended
                if seen["id"] == old:
                    seen["status"], seen["reason"] = str(end.get("status")), str(end.get("reason") or "")
        for old in list(self._keys)[: max(0, len(self._keys) - KEYS_KEPT)]:
            del self._keys[old]
        for old in list(self._runs)[: max(0, len(self._runs) - KEYS_KEPT)]:
            del self._runs[old]
        data = {  # the bounded records first: what a torn file still holds of them survives (_load_queue)
            "schema": QUEUE_SCHEMA,
            "keys": self._keys,
            "retired": self._retired,
            "ended": self._ended,
            "runs": self._runs,
            "queue": self._queue,
        }
        raw = orjson.dumps(data)
        atomic_write(self.queue_file, raw, mode=0o600)  # specs may be private: the owner's only
        self._queue_bytes = len(raw)

    # --- submissions ---------------------------------------------------------------------------------------

    def _taken(self) -> set[str]:
        """Ids in use: live or remembered experiments, queued ones, and every experiment folder
        of the artifacts folder (runs of earlier lifetimes keep their id)."""
        on_disk = {p.name for p in self.artifacts.iterdir() if p.is_dir()}
        return {*self.lab.experiments, *(i["id"] for i in self._queue), *self._ended, *on_disk}

    def _retire(self, exp_id: str) -> None:
        """Remember, compactly, that ``exp_id`` was given out: a submission that never ran and
        whose record is dropped leaves no folder, and its id must not be given again (a client
        holding it would stop someone else's experiment). ``base-k`` raises ``base``'s floor to
        ``k``; ``base`` itself to 1. At most :data:`RETIRED_BASES` names are kept."""
        m = re.fullmatch(r"(.+)-(\d{1,9})", exp_id)
        for base, k in ((exp_id, 1), *(((m[1], int(m[2])),) if m and int(m[2]) >= 2 else ())):
            self._retired[base] = max(self._retired.pop(base, 0), k)  # re-inserted: the newest last
        for old in list(self._retired)[: max(0, len(self._retired) - RETIRED_BASES)]:
            del self._retired[old]

    def _new_id(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``...: the first free one above any given out before
        (see :meth:`_retire`), cut to the id's 128 characters (an id that could not run must
        never be acknowledged)."""
        taken, k = self._taken(), self._retired.get(base, 0) + 1
        while True:
            suffix = "" if k == 1 else f"-{k}"
            exp_id = base[: 128 - len(suffix)] + suffix
            if exp_id not in taken and self._retired.get(exp_id) is None:
                return exp_id
            k += 1

    def submit(
        self,
        spec: str | dict[str, Any],
        overrides: list[str] | None = None,
        experiment_id: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Validate and queue a spec (a dict, or TOML text); on disk before this returns.

        Returns ``{"id", "status"}`` (``running`` when a slot was free, else ``queued`` with its
        ``position``, 1 = next). A ``key`` (idempotency key) already given with the same
        submission returns that submission's entry, with ``"repeated": True``, and queues
        nothing: a retry after a lost answer starts no second experiment. Keys are kept with
        the queue (they outlive a restart), the newest :data:`KEYS_KEPT`.

        Raises:
            SpecError: the spec, an override, the id or the key is not valid (the message names it).
            KeyReused: ``key`` came before with a different spec, overrides or id.
            ServiceClosed: the service is shutting down.
        """
        try:
            key = check_key(key)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        raw = parse_toml(spec) if isinstance(spec, str) else spec
        if not isinstance(raw, dict):
            raise SpecError(f"submitted spec: must be a table, got {type(raw).__name__}")
        overrides = list(overrides or [])
        if not all(isinstance(o, str) for o in overrides):
            raise SpecError(f"--set: each override must be a 'key=value' string, got {overrides!r}")
        digest = _digest(raw, overrides, experiment_id) if key is not None else ""
        if key is not None and digest is not None:
            # a retry is answered before it is validated again: a data file removed since, or a
            # daemon restarted with other folders or targets, must not turn its answer into a 400
            with self._lock:
                if key in self._keys:
                    return self._repeated(key, self._keys[key], digest)
        full = self.admission.load(raw, overrides or None, "submitted spec")
        if digest is None:  # what the checks pass (64-bit integers, bounded depth) serialises
            digest = _digest(raw, overrides, experiment_id) or ""
        try:
            base = check_experiment_id(experiment_id if experiment_id is not None else full["name"])
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        with self._lock:
            if key is not None and key in self._keys:  # a retry, or the same key sent twice at once
                return self._repeated(key, self._keys[key], digest)
            if self._closed:
                raise ServiceClosed("the lab service is shutting down; submit again after it restarts")
            size = len(orjson.dumps({"spec": raw, "set": overrides}))
            if len(self._queue) >= MAX_QUEUED or self._queue_bytes + size > MAX_QUEUE_BYTES:
                raise QueueFull(
                    f"the queue is full ({len(self._queue)} submissions waiting, {self._queue_bytes:,} bytes of "
                    f"{MAX_QUEUE_BYTES:,} in queue.json; at most {MAX_QUEUED}): submit again once some have "
                    "started, or stop (cancel) queued ones"
                )
            item = {"id": self._new_id(base), "spec": raw, "set": overrides, "submitted_at": time.time()}
            self._queue.append(item)
            if key is not None:
                self._keys[key] = {"id": item["id"], "digest": digest}
            try:
                self._save_queue()
            except Exception:  # a full disk, or what the file cannot hold: as if never submitted
                self._queue.pop()
                self._keys.pop(key or "", None)
                raise
            log.info("submission queued", experiment=item["id"], position=len(self._queue))
        # outside the lock: a slow start (a big graph to build) holds up no other request; and this
        # answer waits for no start after its own (the rest of the queue goes on in the background)
        self._fill(only=item)
        with self._lock:
            return self._entry(item["id"])

    def _repeated(self, key: str, seen: dict[str, str], digest: str) -> dict[str, Any]:
        """The answer to a key given before (the caller holds the lock)."""
        if seen["digest"] != digest:
            raise KeyReused(
                f"idempotency key {key!r} came before with another submission (experiment {seen['id']!r}); "
                "a retry must repeat the spec, the overrides and the id exactly, and a new submission needs a new key"
            )
        log.info("repeated submission answered with the first", experiment=seen["id"])
        entry = self._entry(seen["id"])
        if entry["status"] == "unknown" and "status" in seen:  # never ran, and its record since let go
            entry = {"id": seen["id"], "status": seen["status"], "reason": seen.get("reason") or None}
        return {**entry, "repeated": True}

    def _entry(self, exp_id: str) -> dict[str, Any]:
        starting = self._starting
        if starting is not None and starting["id"] == exp_id:
            return {"id": exp_id, "status": "starting"}
        for pos, item in enumerate((i for i in self._queue if i is not starting), 1):
            if item["id"] == exp_id:
                why = self._queue_reason(exp_id, pos)
                return {"id": exp_id, "status": "queued", "position": pos} | ({"reason": why} if why else {})
        if exp_id in self._ended:
            return {"id": exp_id, **self._ended[exp_id]}
        try:
            exp = self.lab.get(exp_id)
        except NotFound:  # ended, and its handle let go since: what its folder says
            runs = sorted((p for p in (self.artifacts / exp_id).glob("*") if p.is_dir()), reverse=True)
            status = run_status(runs[0]).status.value if runs else "unknown"
            return {"id": exp_id, "status": status, "run_id": runs[0].name if runs else None}
        return {"id": exp_id, "status": exp.status(), "run_id": exp.run_id}

    def _running(self) -> int:
        return sum(1 for e in list(self.lab.experiments.values()) if e.status() in LIVE)

    def _room(self) -> bool:
        """Whether the disk has the room a run needs (see :data:`experiments.lab.MIN_FREE_BYTES`);
        while it has not, the queue's head says why it waits (``_no_room``)."""
        try:
            self.lab.check_free_space()
        except OSError as exc:
            self._no_room = f"waiting: could not start: {exc}"
            return False
        self._no_room = None
        return True

    def _schedule_recover(self, wait: float) -> None:
        with self._lock:
            if self._closed or not self._recover_pending:
                return
            self._recover_timer = threading.Timer(wait, self._recover_later, args=(wait,))
            self._recover_timer.daemon = True
            self._recover_timer.start()

    def _recover_later(self, waited: float) -> None:
        self._fill()
        self._schedule_recover(min(waited * 2, HOLD_RETRY_S[1]))  # only while still pending

    def _recover_if_pending(self) -> bool:
        """Resume the crashed runs a start on a nearly full disk left crashed, once there is
        room, before any queued item (the daemon's earlier work goes first, as at start-up);
        False while they wait for room (the queue waits with them)."""
        with self._lock:
            if not self._recover_pending:
                return True
            if self._recovering or self._closed:
                return False
            self._recovering = True
        try:
            if not self._room():
                return False
            log.info("disk room again: resuming the crashed runs left at start")
            for exp in list(self.lab.recover(self._own_runs()) or []):
                self._watch(exp)
            with self._lock:
                self._recover_pending = False
            return True
        except Exception:  # logged; tried again later
            log.exception("could not resume the crashed runs left at start")
            return False
        finally:
            with self._lock:
                self._recovering = False

    def _fill(self, only: dict[str, Any] | None = None) -> None:
        """Start queued items, oldest first, while a slot is free. Called without the lock: each
        start (which may take long: a tree building a big graph) runs outside it, so reads and
        the control of other experiments never wait for one. One start at a time, the item
        staying first in the queue (and on disk) until it has started; a call that finds a
        start under way leaves the rest to the thread doing it, which goes on afterwards.

        ``only``: a submission's item. Its caller (the submission's answer) waits for no start
        after that item's: once it has started, the rest of the queue is started by a thread of
        its own. (Those ahead of it start first, as the queue's order says.)"""
        if not self._recover_if_pending():
            return
        waited_for_own = False
        while True:
            with self._lock:
                if self._starting is not None or not (
                    self._queue and self._started and not self._closed and self._running() < self.max_running
                ):
                    return
                if self._should_stop():
                    return
                if waited_for_own:  # its caller's start is done: the rest are not its answer's to wait for
                    threading.Thread(target=self._fill, name="service-fill", daemon=True).start()
                    return
                item = self._starting = self._queue[0]
                waited_for_own = only is not None and item is only
            exp: Experiment | None = None
            error: Exception | None = None
            try:
                # checked again: a link in a data folder may point elsewhere now, the rules may have changed
                self.admission.load(item["spec"], item["set"] or None, "submitted spec")
                exp = self.lab.start_experiment(item["spec"], item["set"] or None, experiment_id=item["id"])
            except Exception as exc:  # noqa: BLE001 - a spec that no longer validates, a workload refusing: not fatal
                error = exc
            except BaseException:
                with self._lock:
                    self._starting = None
                    self._start_done.notify_all()
                raise
            with self._lock:
                self._starting = None
                self._start_done.notify_all()
                if not self._started_one(item, exp, error):
                    return

    def _started_one(self, item: dict[str, Any], exp: Experiment | None, error: Exception | None) -> bool:
        """Record how the start of the queue's head ``item`` went (the caller holds the lock);
        False when the queue is held (a transient error: it stays first, tried again later)."""
        if error is not None:
            if transient_start_error(error):
                self._hold(item, error)
                return False
            log.error("queued experiment could not start", experiment=item["id"], error=str(error))
            self._ended[item["id"]] = {"status": "failed", "reason": f"could not start: {error}"}
        if self._held is not None:
            log.info("queue going on: the storage error has passed", experiment=item["id"])
            self._held = None
            self._cancel_hold_timer()
        self._queue = [i for i in self._queue if i is not item]
        if exp is not None:  # its run, resumed first after a crash (see _own_runs)
            self._runs.pop(exp.id, None)
            self._runs[exp.id] = exp.run_id
        try:
            self._save_queue()  # after the start: a crash in between finds its folder (see _load_queue)
        except Exception as exc:  # noqa: BLE001 - a full disk: the queue in memory is right; the next save writes it
            log.error("queue file not rewritten", path=str(self.queue_file), error=str(exc))
        if exp is not None:
            log.info("queued experiment started", experiment=exp.id, run_id=exp.run_id)
            self._watch(exp)
        return True

    def _hold(self, item: dict[str, Any], exc: BaseException) -> None:
        """The queue's head could not start for the machine's sake (see
        :func:`transient_start_error`): it stays first in the queue, and the queue tries again
        later (then at every end and submission), waiting longer each time it fails (the caller
        holds the lock)."""
        first = self._held is None or self._held["id"] != item["id"]
        if not first and self._hold_timer is not None:  # an end or a submission tried meanwhile: the timer stands
            self._held["reason"] = f"waiting: could not start: {exc}"
            return
        wait = HOLD_RETRY_S[0] if first else min(self._held["retry_s"] * 2, HOLD_RETRY_S[1])
        self._held = {"id": item["id"], "reason": f"waiting: could not start: {exc}", "retry_s": wait}
        (log.error if first else log.warning)(
            "queue held: the next experiment could not start for now; trying again",
            experiment=item["id"],
            error=str(exc),
            retry_s=wait,
        )
        self._cancel_hold_timer()
        if not self._closed:
            self._hold_timer = threading.Timer(wait, self._retry_held)
            self._hold_timer.daemon = True
            self._hold_timer.start()

    def _cancel_hold_timer(self) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _retry_held(self) -> None:
        with self._lock:
            if threading.current_thread() is not self._hold_timer:  # cancelled while it waited for the lock
                return
            self._hold_timer = None
            if self._closed:
                return
        try:
            self._fill()
        except Exception:  # the next end or submission tries again
            log.exception("could not start the next queued experiment")

    def _watch(self, exp: Experiment) -> None:
        """Start the next queued item when ``exp`` ends (a thread waiting on its end event)."""

        def on_end() -> None:
            exp.wait()
            waiting = getattr(self.lab, "resume_waiting", None)  # a crashed run that waited for this id
            try:
                nxt = waiting(exp.id) if callable(waiting) and not self._closed else None
            except Exception:  # logged; it stays crashed, and the next start of a daemon resumes it
                log.exception("could not resume a crashed run waiting for its id", experiment=exp.id)
                nxt = None
            if nxt is not None:
                self._watch(nxt)
            try:
                self._fill()
                with self._lock:
                    self._forget_ended()
            except Exception:  # the next experiment's end, or the next submission, tries again
                log.exception("could not start the next queued experiment", after=exp.id)

        threading.Thread(target=on_end, name=f"service-watch-{exp.id}", daemon=True).start()

    def _forget_ended(self) -> None:
        """Keep the handles of the last ``keep_ended`` ended experiments; older ones are only
        on disk (``list`` still shows them): memory stays bounded over months of submissions."""
        ended = [e for e in list(self.lab.experiments.values()) if e.status() not in LIVE]
        ended.sort(key=lambda e: e.ended_at or 0.0)
        forgot = 0
        for exp in ended[: max(0, len(ended) - self.keep_ended)]:
            try:
                self.lab.forget(exp.id)
                forgot += 1
            except (NotFound, NotRunning):
                pass  # gone already, or (archived) not ended in the Lab's sense
        if forgot:
            trim_heap()  # what the forgotten trees' threads freed goes back to the system

    # --- reads and control -------------------------------------------------------------------------------

    def list(self, history: bool = True) -> list[dict[str, Any]]:
        """Every experiment this service knows: the Lab's (running, paused, ended), then those
        that never ran (cancelled, failed to start), then the queue with positions (1 = next);
        with ``history``, also the runs of earlier lifetimes found in the folder (read from
        disk: not for a loop)."""
        with self._lock:
            starting = self._starting  # the queue's head while it starts: listed once, as starting
            sid = starting["id"] if starting is not None else None
            # the Lab may hold its handle already (running, its tree not up yet: on Ray, no node yet)
            out = [
                {**e, "position": None} | ({"status": "starting"} if e["id"] == sid else {}) for e in self.lab.list()
            ]
            if starting is not None and all(e["id"] != sid for e in out):
                workload = (starting["spec"].get("workload") or {}).get("name")
                out.append({"id": sid, "status": "starting", "position": None, "workload": workload})
            out += [{"id": k, "position": None, **v} for k, v in self._ended.items()]
            queued = [
                {
                    "id": i["id"],
                    "status": "queued",
                    "position": pos,
                    "workload": (i["spec"].get("workload") or {}).get("name"),
                    "submitted_at": i["submitted_at"],
                }
                | ({"reason": why} if (why := self._queue_reason(i["id"], pos)) else {})
                for pos, i in enumerate((i for i in self._queue if i is not starting), 1)
            ]
        if history:  # runs of earlier lifetimes of the daemon (or of other tools), read outside the lock
            # by run: another run of an id the Lab holds (ended before, or crashed and waiting) is listed too;
            # a queued or never-run submission has no run of its own, and a start that failed (a queue held
            # by a full disk leaves one per try) is no run of a submission that since started
            known = {e["run_id"] for e in out if e.get("run_id")}
            unrun = {e["id"] for e in out + queued if not e.get("run_id")}
            ours = {e["id"] for e in out}
            waiting = getattr(self.lab, "waiting", dict)()
            out += [
                {
                    "id": r["experiment"],
                    "run_id": r["run_id"],
                    "status": r["status"],
                    "reason": (
                        f"waiting to resume once the running run of this id ends; {r['reason']}"
                        if r["run_id"] in waiting and r["status"] == RunStatus.CRASHED
                        else r["reason"]
                    ),
                    "run_dir": r["path"],
                    "position": None,
                }
                for r in list_runs(self.artifacts, self.lab.history)
                if r["run_id"] not in known
                and r["experiment"] not in unrun
                and not (r["experiment"] in ours and str(r["reason"] or "").startswith(START_FAILED))
            ]
        return out + queued

    def queued(self) -> list[dict[str, Any]]:
        """The queue alone, in start order."""
        return [e for e in self.list(history=False) if e["status"] == "queued"]

    def _queued_index(self, exp_id: str) -> int | None:
        return next((k for k, i in enumerate(self._queue) if i["id"] == exp_id), None)

    def live(self, exp_id: str, action: str) -> Experiment:
        """The Lab's experiment ``exp_id``, to ``action`` it: NotRunning when it is queued or
        never ran (saying so), NotFound when unknown."""
        with self._lock:
            if self._starting is not None and self._starting["id"] == exp_id:
                raise NotRunning(f"experiment {exp_id!r} is starting: it cannot {action} yet (try again in a moment)")
            if self._queued_index(exp_id) is not None:
                raise NotRunning(f"experiment {exp_id!r} is queued, not running: it cannot {action} (stop cancels it)")
            if exp_id in self._ended:
                raise NotRunning(f"experiment {exp_id!r} never ran ({self._ended[exp_id]['status']})")
            try:
                return self.lab.get(exp_id)
            except NotFound:  # the Lab knows its own; this daemon's queue is known here
                queued = ", ".join(i["id"] for i in self._queue) or "none"
                known = ", ".join(sorted(self.lab.experiments.copy())) or "none"
                raise NotFound(f"no experiment {exp_id!r} on this daemon; known: {known}; queued: {queued}") from None

    def pause(self, exp_id: str) -> dict[str, Any]:
        """Pause a running experiment (LifecycleError: queued, unknown, or not running)."""
        exp = self.live(exp_id, "pause")
        exp.pause()
        return {"id": exp_id, "status": exp.status()}

    def resume(self, exp_id: str) -> dict[str, Any]:
        """Resume a paused experiment (LifecycleError: queued, unknown, or not paused)."""
        exp = self.live(exp_id, "resume")
        exp.resume()
        return {"id": exp_id, "status": exp.status()}

    def stop(self, exp_id: str) -> dict[str, Any]:
        """Stop a running experiment (its data flushed), or cancel a queued one. One that is
        starting is stopped once it has started (or said to have failed to)."""
        refill = False
        with self._lock:
            while self._starting is not None and self._starting["id"] == exp_id:
                self._start_done.wait()
            k = self._queued_index(exp_id)
            if k is not None:
                item = self._queue.pop(k)
                self._ended[exp_id] = {"status": "cancelled", "reason": "stopped while queued"}
                try:
                    self._save_queue()
                except Exception:  # a full disk: still queued, as it was
                    self._queue.insert(k, item)
                    del self._ended[exp_id]
                    raise
                log.info("queued submission cancelled", experiment=exp_id)
                if self._held is not None and self._held["id"] == exp_id:  # the held head went: the next may start
                    self._held = None
                    self._cancel_hold_timer()
                    refill = True
        if refill:
            self._fill()
        if k is not None:
            return {"id": exp_id, "status": "cancelled"}
        exp = self.live(exp_id, "stop")
        exp.stop()  # the watcher starts the next queued item
        return {"id": exp_id, "status": exp.status()}

    def get(self, exp_id: str) -> Experiment:
        """The Lab's experiment (NotFound for a queued or unknown id)."""
        return self.lab.get(exp_id)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop every running experiment (flushed, on disk), keep the queue for the next start, release the lock.
        ``timeout`` as :meth:`Lab.shutdown`'s: checked before anything is closed."""
        timeout = check_timeout(timeout)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cancel_hold_timer()
            if self._recover_timer is not None:
                self._recover_timer.cancel()
            # a start under way finishes first: the Lab then stops a tree it holds whole
            self._start_done.wait_for(lambda: self._starting is None, timeout)
        log.info("lab service shutting down", artifacts=str(self.artifacts), queued=len(self._queue))
        try:
            self.lab.shutdown(timeout)
        finally:
            self._release_lock()
        log.info("lab service stopped", artifacts=str(self.artifacts))

    def __enter__(self) -> LabService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


__all__ = ["LOCK_FILE", "QUEUE_FILE", "LabLocked", "LabService", "NotFound", "QueueFull", "ServiceClosed"]
