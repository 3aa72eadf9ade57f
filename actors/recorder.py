"""The Recorder actor: persists event batches to JSONL + the history, keeps a live ring and index.

Files: ``<artifacts>/<experiment>/<run_id>/events.jsonl`` (size-based rotation) and the
shared history that ``history`` names (:func:`telemetry.history.open_history`: by default
the SQLite database ``<artifacts>/history.sqlite3``, WAL; or a PostgreSQL database), one
transaction per ``commit_every`` batches, 1 by default. Every batch is written to the JSONL
and flushed, then inserted into the history; when the transaction commits its events count
as *persisted* (what ``flush`` and ``summary`` answer: acknowledged). Files are fsynced at
least every ``fsync_interval`` seconds and on stop.

A restarted Recorder reopens the same run: it cuts a torn last line, takes the last ``seq``
on disk so that nothing is written twice, back-fills the history from the JSONL with every
event no stored batch holds (a tail a crash left behind, or a hole in the middle: batches
lost or deleted), and rebuilds its summary figures from the files.

Storage failure (a full disk, say): the failed batch and any uncommitted ones are rolled
back from both stores (the JSONL is cut back to the last commit), so the files hold
exactly the persisted events; the Recorder stops writing, counts what still arrives as
``events_dropped_storage``, writes its summary (into space it reserved at start) and asks
``on_storage_failure`` to stop the run with reason ``storage: <error>``.

A history that is damaged (SQLite's "database disk image is malformed", PostgreSQL's
corrupted data: :class:`~telemetry.batchstore.HistoryDamaged`) is no storage failure either:
the disk the run writes to is fine. It is handled as a history file deleted mid-run (see
:meth:`Recorder._history_lost`): the run goes on, its events into the JSONL (the reference),
counted as persisted and as ``history.events_unsent``, and the summary's ``history`` block says
``available: false`` with the error, which names the history.

A history server that goes away (PostgreSQL restarted, the network cut): the commit raises
:class:`~telemetry.batchstore.HistoryUnavailable`, which is no storage failure. The run goes
on: batches are still written to the JSONL and kept for the history, at most
``history_buffer`` events in memory; past that the kept copies are let go (*spilled*) and the
Recorder re-reads them from the JSONL, where everything not committed always sits at the end
of the active file. It retries with exponential backoff (``history_retry_s``: first and
longest delay), logs ``history unavailable`` / ``history back``, and when a commit gets
through again everything waiting goes in, in order: nothing is dropped. The summary's
``history`` block counts outages, retries, seconds down, events waiting (now and at most)
and spilled. A stop while the server is still away waits up to ``history_stop_wait_s`` for
it; then the waiting events, which are on disk in the run's JSONL (the reference, as after a
crash), count as persisted and as ``history.events_unsent``: a Recorder that reopens the run
back-fills them into the history.

Accounting: every emitted event is persisted, dropped or sampled out (or, mid-run, still
held by a reservoir sampler or waiting for the history)::

    emitted = persisted + dropped + sampled_out + held + waiting
    dropped = overflow drops + lost in transit + storage drops

``events_lost_in_transit`` is what was published and never arrived (a batch lost with a
crashed Recorder, or refused as malformed on the way). The summary's ``events_dropped``
keeps its older meaning, everything not persisted (``dropped + sampled_out``); the
``accounting`` block gives the identity above term by term.

Queries (``query_window``, ``windowed_metrics``, ``recent``) never crash the Recorder: a
bad or oversized query is answered with :func:`telemetry.query.query_error`, which
:func:`telemetry.query.query_answer` raises in the asker, and the limits of
:mod:`telemetry.query` bound the work one query may do.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.consumer import EventConsumer
from actors.files import atomic_write
from actors.log import get_logger
from actors.messages import Receiver
from actors.timers import Timer, check_delay
from telemetry.batchstore import BatchStore, HeldSeqs
from telemetry.history import (
    HistoryDamaged,
    HistoryError,
    HistoryGone,
    HistoryTarget,
    HistoryUnavailable,
    describe_history,
    open_history,
)
from telemetry.index import IndexIncomplete, LiveIndex
from telemetry.jsonl import JsonlWriter, iter_run
from telemetry.jsonl_format import format_batch
from telemetry.query import QueryError, query_error
from telemetry.rundir import RECORDER_STATE, RESERVE_NAME, SUMMARY, ArtifactsError, path_text, read_json, text_of
from telemetry.schema import (
    SCHEMA_VERSION,
    EventBatch,
    SchemaError,
    batch_rows,
    check_id,
    check_sampling_figures,
    full_event,
    parse_line,
    rows_to_batch,
    select_rows,
    stored_batch,
)

log = get_logger("actors.recorder")

# the defaults, here once: the experiment spec's defaults (experiments/spec.py) read them
ROTATE_BYTES = 256 << 20
FSYNC_INTERVAL_S = 1.0
RING_SIZE = 1000
INDEX_LIMIT = 1_000_000
HISTORY_BUFFER = 1_000_000
"""Events kept in memory for a history server that went away; past it they are re-read from the JSONL."""
HISTORY_RETRY_S = (0.1, 5.0)
"""First and longest delay between attempts to reach a history server that went away."""
HISTORY_STOP_WAIT_S = 10.0
"""How long a stop waits for a history server that is away."""
SHUTDOWN_S = HISTORY_STOP_WAIT_S + 50.0
"""How long a supervisor lets the Recorder stop before killing it: the wait for an absent
history, one last attempt (an unreachable host costs its connect timeout), the run's record
and the fsyncs. Killing it sooner would lose the summary that the wait exists to save."""
_REFILL_ROWS = 4096

RESERVE_BYTES = 256 << 10
RESERVE_TAIL = 64 << 10
"""Disk space the Recorder holds back from the start of a run (``RESERVE_BYTES``): on a storage
failure it frees all but ``RESERVE_TAIL`` for its final summary and state, and the tail when it
stops, after the history is closed (closing may checkpoint the WAL into whatever is free), for
the writes that follow (the phase's checkpoint, the Lab's lifecycle record)."""
_STORAGE_ERRORS = (OSError, sqlite3.Error, HistoryError)
_NEVER = 1 << 62


def check_artifacts_dir(path: str | Path) -> Path:
    """Create the artifacts folder if needed and prove it writable, with a clear error if not."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactsError(_cannot_create(p, exc)) from None
    try:
        probe = p / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ArtifactsError(f"artifacts folder {str(p)!r} is not writable: {exc.strerror or exc}") from None
    return p


def _cannot_create(p: Path, exc: OSError) -> str:
    """Why the artifacts folder cannot be made, named by what stands in the way: mkdir's own
    words (``File exists``, ``Not a directory``) say nothing of which path is the problem."""
    what = f"artifacts folder {str(p)!r}"
    for part in (p, *p.parents):  # the nearest path that exists is what is in the way
        try:
            mode = part.lstat().st_mode
            if stat.S_ISLNK(mode) and part.exists():
                mode = part.stat().st_mode  # a link to a folder is that folder
        except (FileNotFoundError, NotADirectoryError):  # not there, or under a file: look further up
            continue
        except OSError:  # not searchable, a loop of links: mkdir's reason is the best there is
            break
        if stat.S_ISDIR(mode):
            return f"{what} cannot be created in {str(part)!r}: {exc.strerror or exc}"
        name = "it" if part == p else repr(str(part))
        if stat.S_ISLNK(mode):
            why = f"{name} is a broken link (to {os.readlink(part)!r})"
        else:
            why = f"{name} is a file, not a folder" if stat.S_ISREG(mode) else f"{name} is not a folder"
        # "not writable" for the folder itself: the words its callers (and their tests) look for
        return f"{what} {'is not writable' if part == p else 'cannot be created'}: {why}"
    return f"{what} cannot be created: {exc.strerror or exc}"


class _PhaseStats:
    __slots__ = ("busy_us", "count", "first_ts", "last", "last_ts", "max", "max_ok", "min", "min_ok")

    def __init__(self) -> None:
        self.count = 0
        self.busy_us = 0.0  # the gaps between its consecutive events: its time, passes interleaved or not
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        self.min: dict[str, float] = {}
        self.max: dict[str, float] = {}
        self.min_ok: dict[str, float] = {}  # over the events not marked failed (success=false): a best
        self.max_ok: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def widen(self, field: str, lo: float, hi: float, lo_ok: float | None, hi_ok: float | None) -> None:
        """Take in values of ``field`` from ``lo`` to ``hi`` (``lo_ok``..``hi_ok`` of them not
        marked failed; None: none was)."""
        self.min[field] = min(self.min.get(field, lo), lo)
        self.max[field] = max(self.max.get(field, hi), hi)
        if lo_ok is not None and hi_ok is not None:
            self.min_ok[field] = min(self.min_ok.get(field, lo_ok), lo_ok)
            self.max_ok[field] = max(self.max_ok.get(field, hi_ok), hi_ok)


class _Lacking:
    """The events of a reopened run that the history lacks, asked chunk by chunk in ``seq``
    order: those no stored batch spans (:class:`~telemetry.batchstore.HeldSeqs`), so a hole in
    the middle of the stored events (batches lost to a crash of the disk, deleted by hand) is
    back-filled as well as the tail past the last stored ``seq``."""

    def __init__(self, store: BatchStore, run_id: str) -> None:
        self._store, self._run_id = store, run_id
        self._held: HeldSeqs | None = None
        self._last = -1  # the last stored seq, read with the first chunk
        self.filled = 0  # events sent into a hole (below the last stored seq)

    def missing(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._held is None:
            self._last = self._store.max_seq(self._run_id)
            self._held = HeldSeqs(self._store.seq_ranges(self._run_id))
        out = [r for r in rows if not self._held.holds(r["seq"])]
        self.filled += sum(1 for r in out if r["seq"] < self._last)
        return out


class Recorder(EventConsumer):
    """Persists one experiment run; answers live queries. See the module docs."""

    def __init__(
        self,
        artifacts_dir: str | Path,
        experiment_id: str,
        run_id: str,
        *,
        rotate_bytes: int = ROTATE_BYTES,
        fsync_interval: float = FSYNC_INTERVAL_S,
        ring_size: int = RING_SIZE,
        index_limit: int = INDEX_LIMIT,
        maximize: tuple[str, ...] | list[str] = (),
        summary_interval: float = 5.0,
        commit_every: int = 1,
        on_storage_failure: Receiver | None = None,
        reserve_bytes: int = RESERVE_BYTES,
        history: HistoryTarget = None,
        history_buffer: int = HISTORY_BUFFER,
        history_retry_s: tuple[float, float] = HISTORY_RETRY_S,
        history_stop_wait_s: float = HISTORY_STOP_WAIT_S,
    ) -> None:
        super().__init__()
        self.experiment_id = check_id("experiment id", experiment_id)
        self.run_id = check_id("run id", run_id)
        self.fsync_interval = check_delay(fsync_interval, "fsync_interval")  # checked before any folder is made
        self.summary_interval = check_delay(summary_interval, "summary_interval")
        retry = tuple(history_retry_s) if isinstance(history_retry_s, (tuple, list)) else ()
        if len(retry) != 2 or check_delay(retry[0], "history_retry_s[0]") > check_delay(retry[1], "history_retry_s[1]"):
            raise ValueError(f"history_retry_s must be (first, longest) seconds, first <= longest: {history_retry_s!r}")
        if retry[0] == 0:  # the backoff doubles the first wait: from 0 it would retry a dead history in a hot loop
            raise ValueError(f"history_retry_s[0] must be more than 0 seconds, got {retry[0]!r}")
        stop_wait = check_delay(history_stop_wait_s, "history_stop_wait_s")
        self.artifacts = check_artifacts_dir(artifacts_dir)
        self.run_dir = self.artifacts / experiment_id / run_id
        self.commit_every = max(1, commit_every)
        self.rotate_bytes = rotate_bytes
        self.on_storage_failure = on_storage_failure  # told to stop the run
        self.maximize = set(maximize)
        self.jsonl = JsonlWriter(self.run_dir, rotate_bytes)
        self.jsonl.rotate_bytes = _NEVER  # the Recorder rotates, at commit points (see _commit)
        self.history = text_of(describe_history(history, self.artifacts))  # a folder's name may not be UTF-8
        self.store = open_history(history, artifacts=self.artifacts)
        self.history_buffer = max(1, int(history_buffer))
        self.history_retry_s = (float(retry[0]), float(retry[1]))
        self.history_stop_wait_s = stop_wait
        self._down: str | None = None  # why the history server is away, while it is
        self._lost: str | None = None  # why the history gets none of this run's events any more (see _history_lost)
        self._down_since = 0.0
        self._retry_delay = self.history_retry_s[0]
        self._retry_timer: Timer | None = None
        self._spilled = False  # waiting events let go from memory: re-read from the JSONL
        self._pending_n = 0  # events in self._pending
        self.hist = {"outages": 0, "retries": 0, "down_s": 0.0, "events_waiting_max": 0, "events_spilled": 0}
        self.history_unsent = 0
        self.ring_size = ring_size
        self._ring: deque[dict[str, Any]] = deque()  # recent batches, expanded to rows on demand
        self._ring_n = 0
        self.index = LiveIndex(experiment_id, limit=index_limit)
        self.phases: dict[str | None, _PhaseStats] = {}
        self._dropped: dict[str | None, _PhaseStats] = {}  # the extremes of sampled-out events (their min, max)
        self.nonfinite: dict[str, int] = {}  # values given as NaN or an infinity, per field (events' nonfinite)
        self._last_phase: tuple[str | None, int] | None = None  # the last event's phase and ts (busy_us)
        self._in_pause = False  # between a paused mark and its unpaused one, as of the last event
        self.counters: dict[str, int] = {}
        self.restarts: dict[str, int] = {}
        self.persisted = 0
        self.received = 0
        self.sampled_out = 0
        self._sampled: dict[str, int] = {}  # Sampler incarnation -> its latest cumulative sampled_out
        self.held = 0
        self.storage_dropped = 0
        self.storage_error: str | None = None
        self.started_ts: int | None = None
        self._pending: list[dict[str, Any]] = []  # written to both stores, not yet committed
        self._told = False  # whether on_storage_failure has been told
        self._fsync_timer: Timer | None = None
        self._last_summary = 0.0
        self.last_seq = self.jsonl.last_seq
        self._reserve = self.run_dir / RESERVE_NAME
        self._reserve_bytes = reserve_bytes
        self.incarnation = self._recover()
        self._mark = (self.jsonl.size, self.last_seq)  # the JSONL end and last seq at the last commit
        self._make_reserve()

    # --- recovery --------------------------------------------------------------------------------

    def _recover(self) -> int:
        state_path = self.run_dir / RECORDER_STATE
        try:
            state = read_json(state_path) or {}
            incarnation = int(state.get("incarnation", 0)) + 1
            counters, restarts = dict(state.get("counters", {})), dict(state.get("restarts", {}))
            sampled = {str(k): int(v) for k, v in (state.get("sampled") or {"": state.get("sampled_out", 0)}).items()}
            storage_dropped, history_unsent = int(state.get("storage_dropped", 0)), int(state.get("history_unsent", 0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # damaged: what it held is rebuilt
            log.warning("recorder state unreadable; rebuilding from events", file=str(state_path), error=str(exc))
            state, incarnation, counters, restarts, sampled, storage_dropped, history_unsent = {}, 1, {}, {}, {}, 0, 0
        self.counters, self.restarts, self._sampled = counters, restarts, sampled
        self.sampled_out = sum(self._sampled.values())
        self.storage_dropped = storage_dropped
        self.storage_error = state.get("storage_error")
        self.history_unsent = history_unsent
        if self.last_seq >= 0:
            if self.storage_error is None:
                self.history_unsent = 0  # counted again below: what the history still lacks
            held = _Lacking(self.store, self.run_id) if self.storage_error is None else None
            chunk: list[dict[str, Any]] = []
            for ev in iter_run(self.run_dir):
                chunk.append(ev)
                if len(chunk) >= 50_000:
                    self._absorb_recovered(chunk, held)
                    chunk = []
            self._absorb_recovered(chunk, held)
            if held is not None and held.filled:
                log.warning(
                    "the history lacked events in the middle of the run; back-filled them from its files",
                    run_id=self.run_id,
                    events=held.filled,
                )
            self.received = self.persisted + self.storage_dropped
            log.info(
                "recorder resumed run",
                run_id=self.run_id,
                persisted=self.persisted,
                last_seq=self.last_seq,
                incarnation=incarnation,
            )
        try:  # the extremes of the events the Sampler dropped: they are in no file
            check_sampling_figures({"extremes": state.get("dropped_extremes") or []})
            self._fold_extremes(state.get("dropped_extremes") or [])
        except SchemaError as exc:  # damaged: the figures of the files alone
            log.warning("recorder state's extremes unreadable", file=str(state_path), error=str(exc))
        self._incarnation = incarnation
        self._save_state()
        return incarnation

    def _absorb_recovered(self, rows: list[dict[str, Any]], held: _Lacking | None) -> None:
        """Count events found in the JSONL (acknowledged: the JSONL is the reference) and back-fill
        the history with those it lacks (a hole in the middle as well as a tail: ``held``, None
        when recording has stopped); if the back-fill fails, recording stops (storage failure)
        and a later start back-fills what is missing."""
        if not rows:
            return
        if self._lost is not None:  # the history takes none of this run's events: these stay unsent
            self.history_unsent += len(rows)
            self._apply(rows_to_batch(rows, self.experiment_id, self.run_id))
            return
        missing = rows  # until the history says which it holds: a read that fails counts them all unsent
        try:
            missing = held.missing(rows) if held is not None and self.storage_error is None else []
            for i in range(0, len(missing), 1024):
                part = missing[i : i + 1024]
                self._insert(rows_to_batch(part, self.experiment_id, self.run_id))
            self.store.commit()
        except HistoryGone as exc:  # damaged, deleted: the files hold them; `crucible sync` sends them
            self.history_unsent += len(missing)
            self._history_lost(exc)
        except HistoryUnavailable as exc:  # locked, or its server away: the files hold them; a later start sends them
            self.store.rollback()
            self.history_unsent += len(missing)
            log.warning(
                "history unavailable at resume; events stay in the run's events file only",
                run_id=self.run_id,
                unsent=len(missing),
                error=str(exc),
            )
        except _STORAGE_ERRORS as exc:
            self.store.rollback()
            self.storage_error = text_of(f"storage: {exc}")
            log.error("history back-fill failed; recording stops", run_id=self.run_id, error=str(exc))
        self._apply(rows_to_batch(rows, self.experiment_id, self.run_id))

    # --- persisting --------------------------------------------------------------------------------

    def on_events(self, msg: EventBatch) -> None:
        self._take_counters(msg)
        if "sampling" in msg:
            self._take_sampling(msg["sampling"])
        if self.storage_error is not None and not self._told:
            self._tell_failure()  # a failure found at start: the phase exists once events come
        b = msg
        seq = msg["seq"]
        if msg["n"] and int(seq[0]) <= self.last_seq:
            b = select_rows(msg, seq > self.last_seq)  # a replay after a restart: skip what is on disk
        m = int(b["n"])
        if m == 0:
            return  # everything sampled out (the figures came along), or all replayed
        self.received += m
        if self.storage_error is not None:
            self.storage_dropped += m  # the run is stopping: counted, never half-written
            return
        try:
            self._write(b)
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return
        self._schedule_fsync()

    def _write(self, b: dict[str, Any]) -> None:
        """Append the batch to the JSONL and the history; commit every ``commit_every`` batches
        (while the history server is away, the retry timer commits)."""
        self.jsonl.write(format_batch(b))
        self.jsonl.flush()
        self.last_seq = int(b["seq"][-1])
        n = int(b["n"])
        if self._down is not None and not self._spilled and self._pending_n + n > self.history_buffer:
            self._spill()
        if self._down is not None:  # the peak counts spilled events too, retry or none
            self.hist["events_waiting_max"] = max(self.hist["events_waiting_max"], self._waiting())
        if self._spilled:
            self.hist["events_spilled"] += n
            return
        if self._lost is None:
            self._insert(b)
        self._pending.append(b)
        self._pending_n += n
        if self._down is not None:
            return
        if len(self._pending) >= self.commit_every or self.jsonl.size >= self.rotate_bytes:
            self._commit()

    def _insert(self, b: dict[str, Any]) -> None:
        seq, ts = b["seq"], b["ts"]
        self.store.insert_batch(
            self.experiment_id,
            self.run_id,
            [int(seq[0]), int(seq[-1])],
            int(ts.min()),
            int(ts.max()),
            stored_batch(b),
            n=int(b["n"]),
        )

    def _commit(self) -> None:
        """End the history transaction; only then do its batches count as persisted.

        Rotation happens here, after a commit, so that everything not yet committed is
        always at the end of the active JSONL file, where a failed write can cut it off (and
        whence waiting events that were spilled are re-read). A history server that is away
        is no failure: the batches wait and a retry is scheduled (see the module docs).
        """
        if self._lost is None:
            try:
                if self._spilled:
                    self._refill(send=True)
                self.store.commit()
            except HistoryGone as exc:
                self._history_lost(exc)
            except HistoryUnavailable as exc:
                self._history_down(exc)
                return
        if self._lost is not None:  # the files alone get them: counted as persisted, and unsent
            self.history_unsent += self._waiting()
            if self._spilled:
                self._refill(send=False)
        pending, self._pending, self._pending_n = self._pending, [], 0
        for b in pending:
            self._apply(b)
        self._mark = (self.jsonl.size, self.last_seq)
        if self._down is not None:
            self._history_back()
        if self.jsonl.size >= self.rotate_bytes:
            self.jsonl.rotate()
            self._mark = (0, self.last_seq)

    # --- a history server that went away ---------------------------------------------------------------

    def _history_down(self, exc: BaseException) -> None:
        if self._down is None:
            self._down_since = time.monotonic()
            self._retry_delay = self.history_retry_s[0]
            self.hist["outages"] += 1
            log.warning(
                "history unavailable; events wait for it",
                run_id=self.run_id,
                history=self.history,
                error=str(exc),
                waiting=self._waiting(),
            )
        else:
            self._retry_delay = min(self._retry_delay * 2, self.history_retry_s[1])
        self._down = text_of(str(exc))
        self.hist["events_waiting_max"] = max(self.hist["events_waiting_max"], self._waiting())
        self._schedule_retry()

    def _history_back(self) -> None:
        down = time.monotonic() - self._down_since
        self.hist["down_s"] += down
        log.info("history back; waiting events sent", run_id=self.run_id, history=self.history, down_s=round(down, 3))
        self._down = None
        self._cancel_retry()

    def _history_lost(self, exc: BaseException) -> None:
        """The history is no longer the one this run opened (its SQLite file deleted or replaced
        mid-run), or it is damaged: what the store writes goes nowhere anyone reads, or is
        refused. From now on the events go to the run's files only, counted as persisted (as at
        every commit) and as unsent, and the summary's ``history`` block says so; ``crucible
        sync`` rebuilds the history from the files (a damaged one once repaired or moved aside)."""
        self._lost = text_of(str(exc))
        if isinstance(exc, HistoryDamaged):
            what = (
                "history damaged; events from now on stay in the run's events files only: repair the history "
                "or move it aside, then run `crucible sync` to fill it from them"
            )
        else:
            what = (
                "history deleted or replaced during the run; events from now on stay in the run's events files "
                "only: run `crucible sync` once the run ended to rebuild the history from them"
            )
        log.warning(what, run_id=self.run_id, history=self.history, error=self._lost)
        self.store.rollback()
        if self._down is not None:
            self.hist["down_s"] += time.monotonic() - self._down_since
            self._down = None
        self._cancel_retry()

    def _schedule_retry(self) -> None:
        if self._retry_timer is None:
            self._retry_timer = self.ref.tell_later(self._retry_delay, {"kind": "history_retry"})

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def handle_history_retry(self, msg: dict[str, Any]) -> None:
        self._retry_timer = None
        if self._down is None or self.storage_error is not None:
            return
        self.hist["retries"] += 1
        self._sync_history()

    def _sync_history(self) -> None:
        try:
            self._commit()
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)

    def _waiting(self) -> int:
        """Events received and neither committed nor dropped: those waiting for the history."""
        return self.received - self.persisted - self.storage_dropped

    def _spill(self) -> None:
        """Let the waiting events go from memory: the JSONL holds them (past the last commit)."""
        log.warning(
            "history still away; waiting events spilled from memory, to be re-read from the events file",
            run_id=self.run_id,
            waiting=self._pending_n,
            limit=self.history_buffer,
        )
        self.hist["events_spilled"] += self._pending_n
        self.store.rollback()
        self._pending, self._pending_n = [], 0
        self._spilled = True

    def _refill(self, send: bool) -> None:
        """Read the events past the last commit back from the active JSONL, in chunks: each is
        sent to the history and committed (``send``), then counted; the commit mark follows."""
        self.jsonl.flush()
        if send:
            self.store.rollback()  # a chunk sent before a failed commit is read again below
        start = self._mark[0]
        with self.jsonl.path.open("rb") as fh:
            fh.seek(start)
            rows: list[dict[str, Any]] = []
            end = start
            for line in fh:
                end += len(line)
                rows.append(parse_line(line))
                if len(rows) >= _REFILL_ROWS:
                    self._refill_chunk(rows, end, send)
                    rows = []
            if rows:
                self._refill_chunk(rows, end, send)
        self._spilled = False

    def _refill_chunk(self, rows: list[dict[str, Any]], end: int, send: bool) -> None:
        b = rows_to_batch(rows, self.experiment_id, self.run_id)
        if send:
            self._insert(b)
            self.store.commit()
        self._apply(b)
        self._mark = (end, int(rows[-1]["seq"]))

    def _give_up_history(self) -> None:
        """At a stop with the server still away: the waiting events are on disk in the JSONL
        (fsynced), the reference; they count as persisted and as unsent to the history."""
        unsent = self._waiting()
        log.error(
            "history still unavailable at stop; waiting events stay in the run's events file only",
            run_id=self.run_id,
            history=self.history,
            unsent=unsent,
            error=self._down,
        )
        self.store.rollback()
        if self._spilled:
            self._refill(send=False)
        for b in self._pending:
            self._apply(b)
        self._pending, self._pending_n = [], 0
        self._mark = (self.jsonl.size, self.last_seq)  # counted now: never cut back
        self.history_unsent += unsent
        self.hist["down_s"] += time.monotonic() - self._down_since
        self._lost, self._down = self._down, None  # the summary still says the history was away, and why
        self._cancel_retry()

    def _wait_history_at_stop(self) -> None:
        """A stop while the server is away: retry (backoff) up to ``history_stop_wait_s``, then give up."""
        deadline = time.monotonic() + self.history_stop_wait_s
        delay = self.history_retry_s[0]
        pause = threading.Event()
        while self._down is not None and self.storage_error is None:
            if time.monotonic() >= deadline:
                self._give_up_history()
                return
            pause.wait(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, self.history_retry_s[1])
            self.hist["retries"] += 1
            self._cancel_retry()
            self._sync_history()

    def _apply(self, b: dict[str, Any]) -> None:
        """Count a committed batch: figures, live ring, index, phase statistics."""
        self.persisted += int(b["n"])
        self._ring_push(b)
        self.index.append_batch(b)
        self._update_stats(b)
        if self.started_ts is None:
            self.started_ts = int(b["ts"][0])

    def _storage_failed(self, exc: BaseException) -> None:
        """A write failed (a full disk, a lost volume): make the disk agree, then stop the run.

        The open history transaction is rolled back and the JSONL cut back to the last
        commit, so both stores hold exactly the ``persisted`` events; what was received and
        not persisted is counted in ``storage_dropped``. Later batches are counted, not
        written. The reserve file is shrunk so that the final summary fits, and the
        ``on_storage_failure`` target is told to stop the run with reason ``storage: <error>``.
        """
        first = self.storage_error is None
        if first:
            self.storage_error = text_of(f"storage: {exc}")
        self._pending, self._pending_n, self._spilled = [], 0, False
        if self._down is not None:
            self.hist["down_s"] += time.monotonic() - self._down_since
            self._down = None
            self._cancel_retry()
        self.storage_dropped = self.received - self.persisted  # received, and not committed: rolled back
        log.error(
            "storage failed; recording stops",
            run_id=self.run_id,
            error=str(exc),
            persisted=self.persisted,
            dropped=self.storage_dropped,
        )
        try:
            self.store.rollback()
        except (sqlite3.Error, HistoryError) as err:
            log.error("history roll-back failed", run_id=self.run_id, error=str(err))
        try:
            self.jsonl.abandon(self._mark[0])
        except OSError as err:
            log.error("events file could not be cut back", run_id=self.run_id, error=str(err))
        self.last_seq = self._mark[1]
        self._shrink_reserve()
        self._write_summary(quiet=True)
        if first:
            self._tell_failure()

    def _tell_failure(self) -> None:
        self._told = True
        if self.on_storage_failure is not None:
            # urgent: a phase in a long step ends it now, not after the events it can no longer keep
            self.on_storage_failure.tell({"kind": "stop", "reason": self.storage_error}, urgent=True)

    def _make_reserve(self) -> None:
        """Hold a little disk space back, freed on a storage failure for the final summary."""
        if self.storage_error is not None or self._reserve_bytes <= 0 or self._reserve.exists():
            return
        try:
            atomic_write(self._reserve, os.urandom(self._reserve_bytes))
        except OSError as exc:
            log.warning("no disk space reserve for the final summary", run_id=self.run_id, error=str(exc))

    def _shrink_reserve(self) -> None:
        """Free most of the reserve now (the summary, the state); keep a tail for after the stop."""
        try:
            if self._reserve.exists() and self._reserve.stat().st_size > RESERVE_TAIL:
                os.truncate(self._reserve, RESERVE_TAIL)
        except OSError as exc:
            log.warning("reserve file not shrunk", file=str(self._reserve), error=str(exc))

    def _drop_reserve(self) -> None:
        try:
            self._reserve.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("reserve file not removed", file=str(self._reserve), error=str(exc))

    def _ring_push(self, b: dict[str, Any]) -> None:
        self._ring.append(b)
        self._ring_n += int(b["n"])
        while self._ring and self._ring_n - int(self._ring[0]["n"]) >= self.ring_size:
            self._ring_n -= int(self._ring.popleft()["n"])

    def recent(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` persisted events (at most ``ring_size``), oldest first."""
        n = min(n, self.ring_size)
        out: list[dict[str, Any]] = []
        for b in reversed(self._ring):
            if len(out) >= n:
                break
            out = batch_rows(b) + out
        return [full_event(r) for r in out[-n:]] if n > 0 else []

    def _take_counters(self, msg: dict[str, Any]) -> None:
        for k, v in (msg.get("counters") or {}).items():
            if v > self.counters.get(k, -1):
                self.counters[k] = v

    def _take_sampling(self, figures: dict[str, Any]) -> None:
        """A Sampler's cumulative figures; a restarted Sampler counts from zero again, so the
        run's ``sampled_out`` is the sum of each incarnation's (``source``) latest figure."""
        source = str(figures.get("source", ""))
        self._sampled[source] = max(self._sampled.get(source, 0), int(figures.get("sampled_out", 0)))
        self.sampled_out = sum(self._sampled.values())
        self.held = int(figures.get("held", 0))
        self._fold_extremes(figures.get("extremes", ()))

    def _fold_extremes(self, rows: Any) -> None:
        """Fold the extremes of events the Sampler dropped (see
        :func:`telemetry.schema.batch_extremes`) into the phases' figures, and into
        ``_dropped``, which recorder.json keeps for a restarted Recorder (it rebuilds the rest
        from the run's files, where these events are not)."""
        for name, field, lo, hi, lo_ok, hi_ok in rows:
            for stats in (self.phases, self._dropped):
                stats.setdefault(name, _PhaseStats()).widen(field, lo, hi, lo_ok, hi_ok)

    def handle_counters(self, msg: dict[str, Any]) -> None:
        if self.counters_ok(msg):
            self._take_counters(msg)
            self._save_state()

    def handle_sampling(self, msg: dict[str, Any]) -> None:
        """Cumulative figures from the Sampler (events it dropped, events it still holds), and the
        emitter counters of a batch it sampled out whole."""
        if not self.accept(check_sampling_figures, msg, "sampling") or not self.counters_ok(msg):
            return
        self._take_sampling(msg)
        self._take_counters(msg)

    def handle_note_restart(self, msg: dict[str, Any]) -> None:
        child = str(msg.get("child", "?"))
        self.restarts[child] = self.restarts.get(child, 0) + 1
        self._save_state()

    def _update_stats(self, b: dict[str, Any]) -> None:
        phase_c, ts, vals = b["phase"], b["ts"], b["values"]
        for code in np.unique(phase_c).tolist():
            name = b["phases"][code] if code >= 0 else None
            st = self.phases.get(name)
            if st is None:
                st = self.phases[name] = _PhaseStats()
            m = phase_c == code
            ok = m & (b["success"] != 0)  # a failed attempt's values are never a best
            pts = ts[m]
            st.count += int(pts.size)
            st.first_ts = int(pts[0]) if st.first_ts is None else min(st.first_ts, int(pts[0]))
            st.last_ts = int(pts[-1]) if st.last_ts is None else max(st.last_ts, int(pts[-1]))
            for k, col in vals.items():
                x = col[m]
                x = x[~np.isnan(x)]
                if x.size == 0:
                    continue
                st.last[k] = float(x[-1])
                y = col[ok]
                y = y[~np.isnan(y)]
                ok_pair = (float(y.min()), float(y.max())) if y.size else (None, None)
                st.widen(k, float(x.min()), float(x.max()), *ok_pair)
        self._add_busy(b, phase_c, ts)
        for _, marks in b.get("sparse", {}).get("nonfinite", ()):
            for field in marks:
                self.nonfinite[field] = self.nonfinite.get(field, 0) + 1

    def _add_busy(self, b: dict[str, Any], phase_c: np.ndarray, ts: np.ndarray) -> None:
        """Each phase's time: the gap from an event to the next is the phase's when both are
        its own, unless it starts inside a pause (from a ``paused`` mark to the ``unpaused``
        one: events held through the pause, a control, a ``resumed``, fall inside it) or ends at
        a ``resumed`` event (a crash's downtime). A pipeline that goes back and forth between
        phases (passes) gets each phase its share, where first-to-last would give each of them
        nearly the whole run."""
        names = b["phases"]
        n = int(ts.size)
        if n == 0:
            return
        event_names = b["names"]
        mark = np.zeros(n, dtype=np.int8)  # +1 a pause begins, -1 it ends
        mark[np.isin(b["name"], [i for i, x in enumerate(event_names) if x == "paused"])] = 1
        mark[np.isin(b["name"], [i for i, x in enumerate(event_names) if x == "unpaused"])] = -1
        latest = np.maximum.accumulate(np.where(mark != 0, np.arange(n), -1))
        in_pause = np.where(latest >= 0, mark[np.maximum(latest, 0)] == 1, self._in_pause)  # after each row
        before = np.isin(b["name"], [i for i, x in enumerate(event_names) if x == "resumed"])
        gaps = np.maximum(np.diff(ts), 0).astype(np.float64)
        same = (phase_c[1:] == phase_c[:-1]) & ~in_pause[:-1] & ~before[1:]
        per_code = np.bincount(phase_c[1:][same] + 1, weights=gaps[same], minlength=len(names) + 1)
        for code in np.nonzero(per_code)[0].tolist():
            self.phases[names[code - 1] if code else None].busy_us += float(per_code[code])
        first = names[phase_c[0]] if phase_c[0] >= 0 else None
        if self._last_phase is not None and self._last_phase[0] == first and not self._in_pause and not before[0]:
            self.phases[first].busy_us += max(0, int(ts[0]) - self._last_phase[1])
        last = int(phase_c[-1])
        self._last_phase = (names[last] if last >= 0 else None, int(ts[-1]))
        self._in_pause = bool(in_pause[-1])

    def _schedule_fsync(self) -> None:
        if self._fsync_timer is None:
            self._fsync_timer = self.ref.tell_later(self.fsync_interval, {"kind": "fsync"})

    def _sync(self) -> None:
        """fsync the JSONL and commit the history (unless its server is away: the retry timer
        commits then); a failure is a storage failure."""
        if self.storage_error is not None:
            return
        try:
            self.jsonl.fsync()
            if self._down is None:
                self._commit()
        except _STORAGE_ERRORS as exc:
            self._storage_failed(exc)

    def handle_fsync(self, msg: dict[str, Any]) -> None:
        self._fsync_timer = None
        self._sync()
        if time.monotonic() - self._last_summary >= self.summary_interval:
            self._write_summary()

    def handle_flush(self, msg: dict[str, Any]) -> dict[str, Any]:
        """fsync now; answer what is acknowledged (persisted)."""
        self._sync()
        self._write_summary()
        return {"persisted": self.persisted, "last_seq": self.last_seq}

    # --- summary and queries ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        phases = {}
        ends = [s.last_ts for s in self.phases.values() if s.last_ts is not None]
        for name, st in self.phases.items():
            best = {k: (st.max_ok[k] if k in self.maximize else st.min_ok[k]) for k in st.min_ok}
            phases[name or "-"] = {
                "events": st.count,
                "first_ts": st.first_ts,
                "last_ts": st.last_ts,
                "duration_s": st.busy_us / 1e6,
                "best": best,
                "min": st.min,
                "max": st.max,
                "min_ok": st.min_ok,
                "max_ok": st.max_ok,
                "last": st.last,
            }
        c = self.counters
        published = c.get("published", self.received + self.sampled_out + self.held)
        overflow = c.get("dropped", 0)
        lost = max(0, published - self.received - self.sampled_out - self.held)
        emitted = c.get("emitted", published + overflow)
        dropped = overflow + lost + self.storage_dropped  # lost for a reason other than sampling
        waiting = self._waiting()
        return {
            "schema": SCHEMA_VERSION,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "run_dir": path_text(self.run_dir),
            "started_ts": self.started_ts,
            "ended_ts": max(ends) if ends else None,
            "total_duration_s": (max(ends) - self.started_ts) / 1e6 if ends and self.started_ts else 0.0,
            "phases": phases,
            "maximize": sorted(self.maximize),
            "events_emitted": emitted,
            "events_published": published,
            "events_persisted": self.persisted,
            "events_dropped": dropped + self.sampled_out,
            "events_dropped_overflow": overflow,
            "values_nonfinite": dict(self.nonfinite),
            "events_lost_in_transit": lost,
            "events_dropped_storage": self.storage_dropped,
            "events_sampled_out": self.sampled_out,
            "events_held_by_sampler": self.held,
            "events_rejected": c.get("rejected", 0),
            "accounting": {
                "emitted": emitted,
                "persisted": self.persisted,
                "dropped": dropped,
                "sampled_out": self.sampled_out,
                "held": self.held,
                "waiting": waiting,
                "balanced": emitted == self.persisted + dropped + self.sampled_out + self.held + waiting,
            },
            "history": {
                "target": self.history,
                "available": self._down is None and self._lost is None,
                "error": self._down if self._down is not None else self._lost,
                "events_waiting": waiting,
                **self.hist,
                "down_s": round(
                    self.hist["down_s"] + (time.monotonic() - self._down_since if self._down is not None else 0.0), 3
                ),
                "events_unsent": self.history_unsent,
            },
            "storage_error": self.storage_error,
            "bad_batches": self.bad_batches,
            "restarts": self.restarts,
            "recorder_incarnation": self._incarnation,
        }

    def _write_summary(self, quiet: bool = False) -> None:
        """summary.json and recorder.json; a write failure is a storage failure (``quiet``: logged only)."""
        self._last_summary = time.monotonic()
        try:
            atomic_write(self.run_dir / SUMMARY, orjson.dumps(self.summary(), option=orjson.OPT_INDENT_2))
            self._write_state()
        except OSError as exc:
            if quiet or self.storage_error is not None:
                log.error("summary not written", run_id=self.run_id, error=str(exc))
            else:
                self._storage_failed(exc)

    def _write_state(self) -> None:
        state = {
            "incarnation": self._incarnation,
            "counters": self.counters,
            "restarts": self.restarts,
            "sampled_out": self.sampled_out,
            "sampled": self._sampled,
            "storage_dropped": self.storage_dropped,
            "storage_error": self.storage_error,
            "history_unsent": self.history_unsent,
            "dropped_extremes": [
                [ph, f, st.min[f], st.max[f], st.min_ok.get(f), st.max_ok.get(f)]
                for ph, st in self._dropped.items()
                for f in st.min
            ],
        }
        atomic_write(self.run_dir / RECORDER_STATE, orjson.dumps(state))

    def _save_state(self) -> None:
        try:
            self._write_state()
        except OSError as exc:
            log.error("recorder state not written", run_id=self.run_id, error=str(exc))

    def handle_summary(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.summary()

    def _answer(self, msg: dict[str, Any], ask: Callable[[dict[str, Any]], Any]) -> Any:
        """Run a query; a failure comes back to the asker as an error reply, never as a crash."""
        try:
            return ask(msg)
        except Exception as exc:  # noqa: BLE001 - a query must never take recording down
            log.warning("query refused", run_id=self.run_id, kind=msg.get("kind"), error=str(exc))
            return query_error(exc)

    def handle_recent(self, msg: dict[str, Any]) -> Any:
        def ask(m: dict[str, Any]) -> list[dict[str, Any]]:
            n = m.get("n", self.ring_size)
            if isinstance(n, bool) or not isinstance(n, int):
                raise QueryError(f"recent: n must be an integer, got {n!r}")
            return self.recent(n)

        return self._answer(msg, ask)

    def handle_query_window(self, msg: dict[str, Any]) -> Any:
        """Live from the index; from the history (this run only) when asked, or when the bounded
        index has dropped events the answer needs: either way the same answer."""

        def ask(m: dict[str, Any]) -> list[Any]:
            spec, filters, now_us = m.get("spec"), m.get("filters"), m.get("now_us")
            if _source(m) == "live":
                try:
                    return self.index.query(spec, filters, now_us, complete=True)
                except IndexIncomplete:
                    pass
            return self.store.query(self.experiment_id, spec, filters, now_us, run_id=self.run_id)

        return self._answer(msg, ask)

    def handle_windowed_metrics(self, msg: dict[str, Any]) -> Any:
        def ask(m: dict[str, Any]) -> list[dict[str, Any]]:
            args = (m.get("window_s"), m.get("step_s"), m.get("fields"), m.get("filters"))
            if _source(m) == "live":
                try:
                    return self.index.windowed_metrics(*args, complete=True)
                except IndexIncomplete:
                    pass
            return self.store.windowed_metrics(self.experiment_id, *args, run_id=self.run_id)

        return self._answer(msg, ask)

    def terminate(self, reason: str) -> None:
        if self._fsync_timer is not None:
            self._fsync_timer.cancel()
        self._cancel_retry()
        try:
            self._sync()
            if self._down is not None:
                self._wait_history_at_stop()
            if self.storage_error is None:
                try:
                    self.jsonl.close()
                except OSError as exc:
                    self._storage_failed(exc)
            self._write_summary(quiet=True)
            s = self.summary()
            try:
                self.store.record_run(self.run_id, self.experiment_id, s["run_dir"], s["started_ts"], s["ended_ts"], s)
            except _STORAGE_ERRORS as exc:
                log.error("run not recorded in the history", run_id=self.run_id, error=str(exc))
        finally:
            try:
                self.store.close()  # may checkpoint the WAL into the database: it takes what space is free
            except _STORAGE_ERRORS as exc:
                log.error("history not closed cleanly", run_id=self.run_id, error=str(exc))
            self._drop_reserve()  # the rest of the reserve: room for the writes that follow the stop


def _source(msg: dict[str, Any]) -> str:
    source = msg.get("source", "live")
    if source not in ("live", "history"):
        raise QueryError(f"source must be 'live' or 'history', got {source!r}")
    return source
