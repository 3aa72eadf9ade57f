"""One home for the run directory: its files, reading its records, and the run's status.

A run lives in ``<artifacts>/<experiment>/<run_id>/``. The artifacts root holds the Lab's
own files beside the experiment folders (:data:`ROOT_FILES`: the history database, the
daemon's log, lock, queue and token, the hypertune state), so an experiment id may not take
one of their names (:func:`check_experiment_id`).

``spec.json``        the effective spec, written once at the start
``lifecycle.json``   the lifecycle record (below), rewritten as the run goes
``summary.json``     the Recorder's RunSummary, rewritten every few seconds and at the end
``recorder.json``    the Recorder's own state (incarnation, counters)
``checkpoint.json``  the phase's checkpoint
``events*.jsonl``    the events (see :mod:`telemetry.jsonl`)

**The lifecycle record.** The process that owns a run rewrites ``lifecycle.json``
atomically and fsynced (:func:`actors.files.atomic_write`: a reader sees the old record or
the new, never half) at every transition and on a heartbeat every :data:`HEARTBEAT_S`
seconds while the run is live. It names the owner (pid, host, boot id and the process's
start time, which tells a reused pid from the original) and the time of the last write
(``updated_at``).

**Status.** :func:`run_status` derives the status from that record and nothing else
(cheap enough to poll); it is always one of :class:`RunStatus`:

``running`` / ``paused``  the record says so and its owner is alive (checked by pid and
                          start time on the same host; by a fresh heartbeat on another)
``stopped``               ended cleanly: ``reason`` is ``completed``, ``budget`` or ``stopped``
``failed``                the tree gave up (over its restart intensity) or never started;
                          ``reason`` says why (``failed: ...``)
``archived``              set aside by :meth:`Experiment.archive` after it ended
``crashed``               the record says running or paused but its owner is gone (killed,
                          out of memory, power cut); ``reason`` carries the evidence: which
                          pid, how it was found gone, when the last heartbeat was written
``unknown``               no record, an unreadable one, or an owner on another host whose
                          heartbeat went quiet; ``reason`` says which

**Summaries that lag.** The Recorder rewrites ``summary.json`` every few seconds, so a run
that died keeps a summary older than its events. :func:`read_summary` notices (events
newer than the summary), counts the events on disk and reports the larger figure, with
``summary_stale`` and how many events the summary missed.
"""

from __future__ import annotations

import calendar
import enum
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from actors.files import atomic_write
from actors.log import get_logger
from telemetry.history import HistoryError, HistoryTarget, describe_history, open_history
from telemetry.jsonl import (
    ACTIVE,
    RunFileError,
    iter_run,
    open_for_reading,
    open_run_file,
    open_segments,
    run_segments,
)
from telemetry.schema import check_id, map_strings
from telemetry.store import DB_NAME

log = get_logger("telemetry.rundir")

SPEC = "spec.json"
LIFECYCLE = "lifecycle.json"
SUMMARY = "summary.json"
RECORDER_STATE = "recorder.json"
CHECKPOINT = "checkpoint.json"
RESERVE_NAME = "recorder.reserve"  # the Recorder's disk-space reserve (see actors.recorder)
EVENTS = ACTIVE  # the active JSONL file; rotated segments are events.NNNNNN.jsonl
LIFECYCLE_SCHEMA = 1

# the Lab's own files in the artifacts root, beside the experiment folders
LOCK_FILE = "lab.lock"  # the daemon's single-owner lock
QUEUE_FILE = "queue.json"  # the daemon's submission queue
DAEMON_LOG = "daemon.log"  # the daemon's log (rotated as daemon.log.1, ...)
TOKEN_FILE = "dashboard.token"  # the dashboard's token, mode 0600
HYPERTUNE_DIR = "hypertune"  # hypertune state shared across runs
ROOT_FILES = (DB_NAME, LOCK_FILE, QUEUE_FILE, DAEMON_LOG, TOKEN_FILE, HYPERTUNE_DIR)


class ArtifactsError(RuntimeError):
    """The artifacts folder cannot be used (missing permissions, not a directory...)."""


HEARTBEAT_S = 2.0
QUIET_HEARTBEATS = 5  # an owner we cannot check is presumed gone after this many missed heartbeats
MAX_HEARTBEAT_S = 3600.0  # a record's heartbeat_s is read within [0.1, this]: a damaged one cannot keep a run alive


def check_experiment_id(value: Any) -> str:
    """An experiment id: a valid path component (:func:`check_id`) that is not, and does not
    extend, a name of the artifacts root's own files (``history.sqlite3-wal``, ``daemon.log.1``):
    an experiment folder there would break the history, the log or the daemon's next start."""
    value = check_id("experiment id", value)
    name = root_file_name(value)
    if name is not None:
        raise ValueError(
            f"experiment id {value!r} is reserved: the artifacts folder keeps its own {name!r} there;"
            " choose another name"
        )
    return value


def root_file_name(name: str) -> str | None:
    """The Lab's own root file that ``name`` is or extends (``history.sqlite3-wal`` ->
    ``history.sqlite3``), in any letter case, or None."""
    folded = name.casefold()
    for root in ROOT_FILES:
        if folded == root or (folded.startswith(root) and folded[len(root)] in ".-_"):
            return root
    return None


def _artifacts_root(folder: Path) -> bool:
    """Whether ``folder`` looks like a Lab's artifacts folder (it holds one of the Lab's own files)."""
    return any((folder / name).exists() for name in ROOT_FILES)


class RunStatus(enum.StrEnum):
    """Every status a run can be reported in (see the module docs for what each means)."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"
    ARCHIVED = "archived"
    CRASHED = "crashed"
    UNKNOWN = "unknown"


LIVE = frozenset({RunStatus.RUNNING, RunStatus.PAUSED})
RECORDED = frozenset(
    {RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.STOPPED, RunStatus.FAILED, RunStatus.ARCHIVED}
)  # what an owner writes; crashed and unknown are only derived


# --- files ---------------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON with :func:`actors.files.atomic_write` (fsynced, never half)."""
    atomic_write(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if there is no such file.

    Raises:
        ValueError: the file is not a JSON object, or cannot be read (:class:`RunFileError`:
            a folder in its place, no permission); the message names the file.
    """
    try:
        with open_run_file(path) as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    """One of the run's JSON records (``SPEC``, ``SUMMARY``, ``CHECKPOINT``, ...), or None with a
    warning when it is missing or unreadable: for readers that skip a damaged run rather
    than stop (tuning over many prior runs, a monitor)."""
    try:
        return read_json(run_dir / name)
    except (OSError, ValueError) as exc:
        log.warning("run record unreadable; ignoring it", file=str(run_dir / name), error=str(exc))
        return None


def _folders(parent: Path) -> list[Path]:
    """The sub-folders of ``parent`` (links to folders included).

    Raises:
        OSError: ``parent`` cannot be listed (missing, not a folder, no permission).
    """
    out = []
    with os.scandir(parent) as entries:
        for entry in entries:
            try:
                if entry.is_dir():
                    out.append(parent / entry.name)
            except OSError:  # a link that cannot be followed: not a folder we can read
                continue
    return out


def find_runs(artifacts: Path) -> list[Path]:
    """Run directories under an artifacts folder, newest first.

    A run counts once it has any of its records: a run killed before its first event
    still has ``lifecycle.json`` and is listed (as crashed). A missing folder holds no runs;
    one that cannot be read is an error (an empty listing would hide it), and an experiment
    folder that cannot be read is left out with a warning.

    Raises:
        RunNotFound: ``artifacts`` is there but cannot be read (no permission, a name too long).
    """
    try:
        experiments = _folders(artifacts)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise RunNotFound(f"cannot read the artifacts folder {str(artifacts)!r}: {exc.strerror or exc}") from None
    runs: list[Path] = []
    for exp in experiments:
        try:
            candidates = _folders(exp)
        except OSError as exc:
            log.warning("experiment folder unreadable; its runs are left out", folder=str(exp), error=str(exc))
            continue
        runs.extend(r for r in candidates if _has_records(r))
    return _newest_first(runs)


def _has_records(folder: Path) -> bool:
    """Whether ``folder`` is a run's: it has any of a run's records (see :func:`find_runs`)."""
    return any(os.path.exists(folder / name) for name in (EVENTS, SUMMARY, LIFECYCLE))


RUN_ID_TIME = "%Y%m%dT%H%M%SZ"
"""How a run id begins: its start time (UTC, ``time.strftime``), then ``-`` and random hex."""


def _newest_first(runs: list[Path]) -> list[Path]:
    """Latest started first: by the start time in the run id, then the folder's mtime (runs of
    one second; folders with ids of another form, by mtime alone). Not by mtime first: a
    folder's changes whenever a record in it is replaced, so an old run resumed, archived or
    still checkpointing would pass for the newest."""

    def started(p: Path) -> tuple[float, float]:
        try:
            mtime = p.stat().st_mtime
        except OSError:
            mtime = 0.0
        start, dash, _ = p.name.partition("-")
        try:
            return (float(calendar.timegm(time.strptime(start, RUN_ID_TIME))) if dash else mtime), mtime
        except ValueError:  # an id of another form
            return mtime, mtime

    return sorted(runs, key=started, reverse=True)


def folder_of_runs(folder: Path) -> NotARunFolder | None:
    """The error for a folder given as a run that holds runs instead: an experiment folder
    (its runs in it) or an artifacts folder (a level down); None for another folder, or one
    that cannot be read (quietly: this only words an error)."""
    try:
        if not folder.is_dir():
            return None
        runs = [r for r in _folders(folder) if _has_records(r)]
        kind = "experiment"
        if not runs:
            runs, kind = find_runs(folder), "artifacts"
    except (OSError, RunNotFound):
        return None
    if not runs:
        return None
    runs = _newest_first(runs)
    named = ", ".join(repr(str(r)) for r in runs[:3])
    more = f" ({len(runs)} runs in all)" if len(runs) > 3 else ""
    newest = f"its newest run is {named}" if len(runs) == 1 else f"its newest runs are {named}{more}"
    return NotARunFolder(
        f"{str(folder)!r} is an {kind} folder, not a run: {newest}; give a run's folder or id", folder, kind, runs
    )


def recorded_file(path: Path) -> str | None:
    """What recorded data ``path`` holds, if it is such a file: a file of a run folder (events,
    records, checkpoints), one of the Lab's own files in an artifacts folder (the daemon's
    queue, lock, token and log, hypertune's learned state) or a SQLite history. An output
    option naming one would destroy it."""
    p = Path(path)
    if not p.is_file():
        return None
    folder = p.resolve().parent
    if any((folder / name).is_file() for name in (EVENTS, SUMMARY, LIFECYCLE, SPEC)):
        return f"a file of the run folder {str(folder)!r}"
    if root_file_name(p.name) is not None and _artifacts_root(folder):
        return f"the Lab's own {p.name!r} in the artifacts folder {str(folder)!r}"
    if folder.name == HYPERTUNE_DIR and _artifacts_root(folder.parent):
        return f"hypertune's learned state in {str(folder)!r}"
    try:
        with open_for_reading(p) as fh:  # never blocks, should a FIFO take its name meanwhile
            if fh.read(16) == b"SQLite format 3\x00":
                return "a SQLite database (a history?)"
    except OSError:
        return None
    return None


# --- the owner of a run -----------------------------------------------------------------------------------------


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None elsewhere."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    rest = text[text.rfind(")") + 2 :].split()  # fields 3.. (the name in parentheses may hold spaces)
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def owner_info() -> dict[str, Any]:
    """Who owns runs started by this process: pid, host, boot id, process start time."""
    pid = os.getpid()
    st = _proc_stat(pid)
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "proc_start": st[1] if st else None,
    }


def owner_alive(owner: dict[str, Any]) -> tuple[bool | None, str]:
    """Is the process that wrote a record still there? True, False, or None (cannot tell), and why."""
    pid, host = owner.get("pid"), owner.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None, f"the record names no owner pid ({pid!r})"
    if host != socket.gethostname():
        return None, f"owner pid {pid} is on host {host!r}, not this one ({socket.gethostname()!r})"
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return False, f"owner pid {pid} on {host}: the host has rebooted since"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"owner pid {pid} on {host} no longer exists"
    except PermissionError:
        pass  # exists, another user's
    except (OverflowError, OSError) as exc:
        return None, f"owner pid {pid} cannot be checked ({exc})"
    st = _proc_stat(pid)
    if st is not None:
        if st[0] in ("Z", "X"):
            return False, f"owner pid {pid} on {host} has exited (a zombie not yet reaped)"
        if owner.get("proc_start") is not None and st[1] != owner["proc_start"]:
            return False, f"owner pid {pid} on {host} exited; the pid now belongs to another process"
    return True, f"owner pid {pid} on {host} is alive"


# --- status ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    """A run's derived status, why (``reason``), what it rests on (``evidence``) and the record."""

    status: RunStatus
    reason: str | None
    evidence: tuple[str, ...] = ()
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        """True while the run may still write events (running or paused, owner alive)."""
        return self.status in LIVE


def _iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return "never"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
    except (OverflowError, OSError, ValueError):
        return f"at an impossible time ({ts!r})"


def _finite(v: Any, default: float | None) -> float | None:
    """``v`` as a float if it is a finite number (not a bool), else ``default``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return default


def status_from_record(rec: dict[str, Any] | None, now: float | None = None) -> StatusReport:
    """Derive the status from a lifecycle record (see the module docs); never raises."""
    if rec is None:
        return StatusReport(
            RunStatus.UNKNOWN,
            f"no {LIFECYCLE} (a run from an older version, or one whose process died before it wrote its first record)",
            (f"no {LIFECYCLE}",),
        )
    now = time.time() if now is None else now
    raw = rec.get("status")
    try:
        recorded = RunStatus(raw)
    except ValueError:
        recorded = None
    if recorded is None or recorded not in RECORDED:
        return StatusReport(RunStatus.UNKNOWN, f"{LIFECYCLE} has status {raw!r}", (f"recorded status {raw!r}",), rec)
    reason = rec.get("reason") if isinstance(rec.get("reason"), str) else None
    if recorded not in LIVE:
        return StatusReport(recorded, reason, (f"recorded {recorded} at {_iso(rec.get('updated_at'))}",), rec)
    owner = rec.get("owner") if isinstance(rec.get("owner"), dict) else {}
    alive, why = owner_alive(owner)
    updated = rec.get("updated_at")
    beat = min(max(_finite(rec.get("heartbeat_s"), HEARTBEAT_S), 0.1), MAX_HEARTBEAT_S)
    quiet_after = QUIET_HEARTBEATS * beat
    age = now - updated if _finite(updated, None) is not None else None
    evidence = [
        f"recorded {recorded}",
        why,
        f"last heartbeat {_iso(updated)}" + (f" ({age:.1f} s ago)" if age is not None else ""),
    ]
    if age is not None and age < -quiet_after:  # clocks apart, or a damaged record: no proof of life
        evidence.append(f"heartbeat dated {-age:.0f} s in the future: the clocks disagree or the record is wrong")
    if rec.get("stop_requested_at"):
        evidence.append(f"a stop was under way since {_iso(rec['stop_requested_at'])}")
    if alive is None:
        if age is not None and -quiet_after <= age <= quiet_after:
            return StatusReport(recorded, reason, tuple(evidence), rec)
        quiet = "dated in the future" if age is not None and age < 0 else "quiet"
        return StatusReport(
            RunStatus.UNKNOWN, f"{why}, and its heartbeat is {quiet} (last {_iso(updated)})", tuple(evidence), rec
        )
    if alive:
        if age is not None and age > quiet_after:
            evidence.append(f"no heartbeat for {age:.0f} s: the owner may be hung")
        return StatusReport(recorded, reason, tuple(evidence), rec)
    stopping = " and stopping" if rec.get("stop_requested_at") else ""
    unresumed = f"; a Lab could not resume it: {str(rec['resume_error'])[:300]}" if rec.get("resume_error") else ""
    return StatusReport(
        RunStatus.CRASHED,
        f"{why}; it was {recorded}{stopping}, last heartbeat {_iso(updated)}{unresumed}",
        tuple(evidence),
        rec,
    )


def run_status(run_dir: Path, now: float | None = None) -> StatusReport:
    """The status of the run in ``run_dir``, from its lifecycle record; never raises."""
    try:
        rec = read_json(run_dir / LIFECYCLE)
    except (ValueError, OSError) as exc:
        return StatusReport(RunStatus.UNKNOWN, f"{LIFECYCLE} unreadable: {exc}", (str(exc),))
    return status_from_record(rec, now)


# --- summary, reconciled with the events on disk ----------------------------------------------------------------


def count_events(run_dir: Path) -> int:
    """Complete lines on disk across the run's JSONL files (a torn last line is not one): the
    events the run wrote, as an upper bound. Counted as newline bytes, never parsed, so that
    a listing stays cheap on a run of millions of events (parsing costs about 7 us a line,
    counting about 0.2 ns a byte); a line that is not an event (garbage, a line written
    twice) counts too, where the readers (:func:`telemetry.jsonl.iter_run`, ``crucible
    monitor --summary``) skip it. Figures made from it say so (``events_approx``)."""
    n = 0
    for _, fh in open_segments(run_dir):  # one snapshot, also while the run rotates its file
        while chunk := fh.read(1 << 22):
            n += chunk.count(b"\n")
    return n


def _last_event_field(run_dir: Path, field: str) -> int | None:
    """``field`` (an integer) of the run's last complete event line that has one, or None;
    reads at most the last 64 KiB of each file, newest file first."""
    for seg in reversed(run_segments(run_dir)):
        try:
            with open_run_file(seg) as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - (64 << 10)))
                tail = fh.read()
        except FileNotFoundError:
            continue
        for line in reversed(tail[: tail.rfind(b"\n") + 1].splitlines()):
            try:
                v = orjson.loads(line).get(field)
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def last_event_ts(run_dir: Path) -> int | None:
    """The ``ts`` (µs since the epoch) of the run's last complete event line, or None."""
    return _last_event_field(run_dir, "ts")


def last_event_seq(run_dir: Path) -> int:
    """The ``seq`` of the run's last complete event line; -1 when there is none.

    A run resumed after a crash numbers its new events from here on: the Recorder skips
    rows whose seq is not above what it finds on disk (as replays)."""
    seq = _last_event_field(run_dir, "seq")
    return -1 if seq is None else seq


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json``, reconciled with the events on disk ({} for a run with neither).

    When an events file is at least as new as the summary (the run is live, or died before
    its final summary), the events are counted; if there are more than ``events_persisted``
    says, ``events_persisted`` becomes the count and ``summary_stale`` / ``summary_lag_events``
    / ``summary_events_persisted`` say by how much the summary lagged.
    """
    try:
        summ = read_json(run_dir / SUMMARY) or {}
    except ValueError:
        summ = {}
    s_mtime = _mtime(run_dir / SUMMARY)
    e_mtimes = [m for m in (_mtime(p) for p in run_segments(run_dir)) if m is not None]
    if not e_mtimes or (s_mtime is not None and max(e_mtimes) < s_mtime):
        return summ  # written after the last event: it is current
    on_disk = count_events(run_dir)
    said = summ.get("events_persisted")
    said = said if isinstance(said, int) else 0
    if on_disk > said:
        summ = {
            **summ,
            "events_persisted": on_disk,
            "summary_stale": True,
            "summary_lag_events": on_disk - said,
            "summary_events_persisted": summ.get("events_persisted"),
        }
    return summ


def recorded_objective(record: dict[str, Any]) -> dict[str, Any] | None:
    """The objective a run's lifecycle record carries (``field``, ``direction``, ``label``,
    ``progress``), written from its workload's class: a reader that does not know the workload
    (one registered in another process's script) still knows which field judges the run.
    None when the record has none (an older run) or a malformed one."""
    obj = record.get("objective")
    if not isinstance(obj, dict):
        return None
    name, direction, progress = obj.get("field"), obj.get("direction"), obj.get("progress")
    label = obj.get("label") or name
    if not (isinstance(name, str) and name and direction in ("min", "max") and isinstance(label, str)):
        return None
    return {
        "field": name,
        "direction": direction,
        "label": label,
        "progress": progress if isinstance(progress, str) and progress else None,
    }


def run_info(
    run_dir: Path, summary: dict[str, Any] | None = None, best_of: Iterable[tuple[str, str]] = ()
) -> dict[str, Any]:
    """One line of ``crucible list``: status (derived), reason, events (reconciled), duration,
    and ``best``, the best of each ``best_of`` ``(field, direction)`` the run recorded.

    ``summary``: the final summary the history recorded for a run that ended; then only the
    run's (small) lifecycle record is read from its folder, for the status."""
    report = run_status(run_dir)
    summ = read_summary(run_dir) if summary is None else summary
    rec = report.record
    duration = rec.get("wall_clock_duration", summ.get("total_duration_s"))
    evidence = list(report.evidence)
    if report.status in (RunStatus.CRASHED, RunStatus.UNKNOWN):  # the records stop short: the events say more
        last = last_event_ts(run_dir)
        if last is not None:
            evidence.append(f"last event {_iso(last / 1e6)}")
            start = rec.get("started_at")
            if isinstance(start, (int, float)) and not isinstance(start, bool):
                duration = max(duration if isinstance(duration, (int, float)) else 0.0, last / 1e6 - start)
    events = summ.get("events_persisted")
    approx = bool(summ.get("summary_stale"))  # the summary lagged: its figure is the files' lines (count_events)
    own = recorded_objective(rec)
    best_of = list(best_of)  # read twice for a run with no summary (events_bests, then summary_bests)
    if own is not None:  # its own direction for its field, whatever another workload's field of that name says
        best_of = [*(b for b in best_of if b[0] != own["field"]), (own["field"], own["direction"])]
    if not isinstance(events, int) or isinstance(events, bool):
        events = count_events(run_dir)  # no summary yet (killed early): the files say how many, perhaps none
        approx = True
    if not isinstance(summ.get("phases"), dict):  # no summary's bests (killed early): a small run's events say
        summ = {**summ, **events_bests(run_dir, best_of)}
    elif summ.get("summary_stale") and report.status in (RunStatus.CRASHED, RunStatus.UNKNOWN):
        # killed between two summaries: the events after the last may be better (a live run's
        # next summary comes within seconds: its growing files are not read at every listing)
        later = (events_bests(run_dir, best_of).get("phases") or {}).get("-")
        if later:  # beside the summary's phases (which also hold what sampling left off the disk)
            summ = {**summ, "phases": {**summ["phases"], STALE_SUMMARY_EVENTS: later}}
    return {
        "experiment": run_dir.parent.name,
        "run_id": run_dir.name,
        "status": str(report.status),
        "reason": report.reason,
        "events": events,
        "events_approx": approx,  # counted as lines of the files: a bad line counts too (see count_events)
        "duration_s": duration,
        "summary_stale": bool(summ.get("summary_stale")),
        "best": summary_bests(summ, best_of),
        "objective": own,
        "evidence": evidence,
        "path": path_text(run_dir),
    }


# --- paths as text -------------------------------------------------------------------------------------------


def text_of(text: str) -> str:
    """``text`` as valid UTF-8: the bytes of a file name that are not UTF-8 (which Python reads
    as lone surrogates, and JSON, SQLite and PostgreSQL refuse) written as ``\\xNN``; valid
    text as it is. A folder ``caf\\xe9`` (Latin-1) shows as ``caf\\xe9``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name gave: written as \udcXX
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as text fit for a record, a summary or the history (:func:`text_of`)."""
    return text_of(os.fspath(path))


def text_safe(value: Any) -> Any:
    """``value`` (JSON-like) with every string, keys too, made valid text (:func:`text_of`)."""
    return map_strings(value, text_of)


# --- finding runs ----------------------------------------------------------------------------------------------


class RunNotFound(LookupError):
    """No run matches what was asked for; the message says what was asked and what there is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such run"


class NotARunFolder(RunNotFound):
    """A folder given as a run holds runs instead: an experiment folder (``kind``
    "experiment") or an artifacts folder ("artifacts"); ``runs`` newest first. A command that
    can take the newest run otherwise (``monitor --latest``) says so."""

    def __init__(self, message: str, folder: Path, kind: str, runs: list[Path]) -> None:
        super().__init__(message)
        self.folder, self.kind, self.runs = folder, kind, runs


def resolve_run(arg: str, artifacts: Path) -> Path:
    """A run directory from a path to one, or from a run id looked up under ``artifacts``.

    An id is validated first (:func:`telemetry.schema.check_id`), so a lookup never leaves
    the artifacts folder.

    Raises:
        NotARunFolder: ``arg`` is an experiment or artifacts folder, which no run has as id;
            the message names its newest runs.
        RunNotFound: ``arg`` is neither a run directory nor a valid run id, or no run has that id
            (or several do: copied folders); ``arg`` or ``artifacts`` cannot be looked into (a
            name too long, no permission).
    """
    p = Path(arg)
    looked: OSError | None = None
    try:
        if p.is_dir() and ((p / EVENTS).exists() or list(p.glob("events.*.jsonl"))):
            return p
    except OSError as exc:  # a name too long, a folder this user may not look into
        looked = exc
    try:
        check_id("run id", arg)
    except ValueError as exc:
        if looked is not None:
            raise RunNotFound(f"{arg!r}: cannot look into it: {looked.strerror or looked}") from None
        if (holds := folder_of_runs(p)) is not None:  # the folder of a run, named for the run
            raise holds from None
        raise RunNotFound(f"{arg!r} is neither a run directory nor a valid run id: {exc}") from None
    runs = find_runs(artifacts)
    hits = [r for r in runs if r.name == arg]
    if not hits:
        if looked is None and (holds := folder_of_runs(p)) is not None:  # "latency", an experiment's folder here
            raise holds
        recent = ", ".join(r.name for r in runs[:5]) or "none"
        raise RunNotFound(f"no run {arg!r} under {artifacts}; recent runs: {recent}")
    if len(hits) > 1:  # a copied folder: which one is meant is the user's to say
        where = ", ".join(repr(str(h)) for h in hits[:5])
        raise RunNotFound(f"run id {arg!r} names {len(hits)} run folders ({where}): give the folder's path")
    return hits[0]


def latest_run(artifacts: Path) -> Path:
    """The newest run under ``artifacts``.

    Raises:
        RunNotFound: there is no run there.
    """
    runs = find_runs(artifacts)
    if not runs:
        raise RunNotFound(f"no runs under {artifacts}")
    return runs[0]


def recorded_runs(artifacts: Path, history: HistoryTarget = None) -> dict[tuple[str, str], dict[str, Any]] | None:
    """The history's ``runs`` table, by (experiment id, run id); None without a readable history
    (``history``: see :mod:`telemetry.history`; by default the SQLite file in ``artifacts``).

    The Recorder adds its run to the table when it stops, with the final summary: the table
    holds the runs that ended, not the live ones nor those killed before they could end.
    Rows whose ids are not valid path components are left out (they name no folder here).
    """
    try:
        store = open_history(history, artifacts=artifacts, readonly=True)
    except FileNotFoundError:
        return None
    except (sqlite3.Error, OSError, ValueError, HistoryError) as exc:  # corrupt, locked, unreachable
        where = describe_history(history, artifacts)
        log.warning("history unreadable; listing the runs from their folders", path=where, error=str(exc))
        return None
    try:
        rows = store.runs()
    except (sqlite3.Error, OSError, ValueError, HistoryError) as exc:  # a summary that is not JSON, say
        where = describe_history(history, artifacts)
        log.warning("history unreadable; listing the runs from their folders", path=where, error=str(exc))
        return None
    finally:
        store.close()
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        try:
            key = (check_id("experiment id", row["experiment_id"]), check_id("run id", row["run_id"]))
        except ValueError:
            continue
        out[key] = row
    return out


def list_runs(
    artifacts: Path, history: HistoryTarget = None, best_of: Iterable[tuple[str, str]] = ()
) -> list[dict[str, Any]]:
    """One :func:`run_info` dict per run under ``artifacts``, newest first, for ``crucible list``
    (``best_of``: the ``(field, direction)`` pairs whose bests each row carries).

    Runs the history's ``runs`` table holds (those that ended) take their figures from it, so
    their event files are never opened; the others (live, killed before they ended, or all of
    them when the database is missing or unreadable) are read from their folders. ``source``
    says which: ``"history"`` or ``"files"``. A row whose folder is gone is not listed.
    """
    runs = find_runs(artifacts)  # first: a folder that cannot be read is said before the history is opened
    recorded = recorded_runs(artifacts, history) or {}
    best_of = tuple(best_of)
    out = []
    for run in runs:
        row = recorded.get((run.parent.name, run.name))
        try:
            if row is not None and isinstance(row.get("summary"), dict):
                out.append({**run_info(run, row["summary"], best_of), "source": "history"})
            else:
                out.append({**run_info(run, None, best_of), "source": "files"})
        except RunFileError as exc:  # one broken run folder: listed as such, the others still are
            out.append({**unreadable_info(run, exc), "source": "files"})
    return out


def unreadable_info(run_dir: Path, exc: BaseException) -> dict[str, Any]:
    """The :func:`run_info` line of a run whose files cannot be read: its recorded status, no
    event count, and the error as evidence."""
    report = run_status(run_dir)
    return {
        "experiment": run_dir.parent.name,
        "run_id": run_dir.name,
        "status": str(report.status),
        "reason": report.reason,
        "events": None,
        "events_approx": False,
        "duration_s": report.record.get("wall_clock_duration"),
        "summary_stale": False,
        "best": {},
        "objective": recorded_objective(report.record),
        "evidence": [*report.evidence, str(exc)],
        "path": path_text(run_dir),
    }


def events_missing(run_dir: Path, read: int) -> int:
    """How many events the run's ``summary.json`` says it recorded beyond the ``read`` a reader
    of its files got: lines cut off or deleted since (the history may still hold them). 0 when
    the files hold at least as many, or no summary says."""
    try:
        summ = read_json(run_dir / SUMMARY) or {}
    except (ValueError, OSError):
        return 0
    said = summ.get("events_persisted") if isinstance(summ, dict) else None
    return said - read if isinstance(said, int) and not isinstance(said, bool) and said > read else 0


BEST_SCAN_BYTES = 16 << 20
"""The largest run (its event files together) whose bests a listing reads from the events when
no summary gives them: a run killed before its first summary (written every few seconds) is
far smaller; a bigger one without a summary keeps ``-`` rather than cost a listing seconds."""


STALE_SUMMARY_EVENTS = "\x00events"  # a phase no event has: the events' bests beside a lagging summary's


def events_bests(run_dir: Path, fields: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """A RunSummary's ``phases`` bests made from the run's events, for a run killed before its
    first summary (:func:`summary_bests` reads them): the lowest and highest finite value of
    each field in ``fields`` over the events not marked failed, as the Recorder counts them.
    ``{}`` for a run over :data:`BEST_SCAN_BYTES` or whose files cannot be read."""
    names = {name for name, _ in fields}
    if not names:
        return {}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    try:
        if sum(os.path.getsize(seg) for seg in run_segments(run_dir)) > BEST_SCAN_BYTES:
            return {}
        for ev in iter_run(run_dir, warn=False):
            values = ev.get("values")
            if ev.get("success") is False or not isinstance(values, dict):
                continue  # a failed attempt's values are never a best
            for k in names.intersection(values):
                v = values[k]
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    lo[k] = min(lo.get(k, v), v)
                    hi[k] = max(hi.get(k, v), v)
    except (OSError, RunFileError):
        return {}
    return {"phases": {"-": {"min_ok": lo, "max_ok": hi}}} if lo else {}


def summary_bests(summary: dict[str, Any], fields: Iterable[tuple[str, str]]) -> dict[str, float]:
    """The best of each ``(field, direction)`` over a RunSummary's phases
    (:func:`summary_best`), by field, for those the run recorded: a listing gives the fields
    (its workloads' objectives), so this module needs to know no workload."""
    out = {}
    for name, direction in fields:
        best = summary_best(summary, name, direction)
        if best is not None:
            out[name] = best
    return out


def summary_fields(summary: dict[str, Any]) -> set[str]:
    """The value fields any phase of a RunSummary recorded (empty for another shape)."""
    phases = summary.get("phases")
    out: set[str] = set()
    for ph in phases.values() if isinstance(phases, dict) else ():
        for side in ("min", "max", "best") if isinstance(ph, dict) else ():
            if isinstance(table := ph.get(side), dict):
                out.update(k for k in table if isinstance(k, str))
    return out


def summary_best(summary: dict[str, Any], field: str, direction: str | None = None) -> float | None:
    """The best value of ``field`` over a RunSummary's phases: the highest when ``direction``
    is "max" (by default: when the run declared ``field`` in ``telemetry.maximize``), else the
    lowest. None when no phase has a finite number for it, or the summary has another shape."""
    if direction is None:
        direction = "max" if field in (summary.get("maximize") or ()) else "min"
    side = "max" if direction == "max" else "min"
    phases = summary.get("phases")
    found = []
    for ph in phases.values() if isinstance(phases, dict) else ():
        if not isinstance(ph, dict):
            continue  # a damaged phase: the others still count
        # over the events not marked failed (a summary written before those figures: over all)
        table = ph.get(f"{side}_ok", ph.get(side))
        fallback = ph.get("best")
        value = table.get(field) if isinstance(table, dict) else None
        if value is None and isinstance(fallback, dict):
            value = fallback.get(field)
        found.append(value)
    found = [b for b in found if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)]
    if not found:
        return None
    return max(found) if side == "max" else min(found)


def summary_losses(summary: dict[str, Any]) -> tuple[int | None, int]:
    """A RunSummary's events not persisted, split: ``(dropped, sampled_out)``, where dropped
    counts the real losses (overflow, transit, storage: ``accounting.dropped``) and
    sampled_out what the Sampler left out on purpose. ``events_dropped`` adds the two, so a
    view showing it alone reads a sampled run as a lossy one. dropped is None when the
    summary says neither (another shape, or none written yet)."""

    def count(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    acc = summary.get("accounting")
    acc = acc if isinstance(acc, dict) else {}
    sampled = count(acc.get("sampled_out"))
    sampled = sampled if sampled is not None else count(summary.get("events_sampled_out")) or 0
    dropped = count(acc.get("dropped"))
    if dropped is None and (total := count(summary.get("events_dropped"))) is not None:
        dropped = max(0, total - sampled)  # a summary without the accounting block
    return dropped, sampled
