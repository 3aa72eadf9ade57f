"""Sending a run's events from its files to the history: what the history lacks after a stop.

A Recorder whose history stayed away (a server down, a SQLite file locked by another
connection) until past its stop wait leaves the run's last events in its JSONL files only
(the reference) and counts them in the summary's ``history.events_unsent``; its run may be
missing from the ``runs`` table too. A Recorder that reopens the run back-fills them, but a
run that ended is never reopened: :func:`sync_run` (``crucible sync``) does it. It sends the
events the history lacks, a chunk per transaction (a sync cut short is simply run again:
nothing is stored twice), then records the run's summary, with
``events_unsent`` set to what is still missing (0), in the ``runs`` table and in
``summary.json``, unless the summary lags the events on disk (a run killed before its last
summary: its events are sent, its record waits for a Recorder to end it). A live run is left
alone: its own Recorder sends its events.

What the history lacks is told by seq range: an event is held when a stored batch of the run
spans its ``seq`` (:meth:`~telemetry.batchstore.BatchStore.seq_ranges`, read alongside the
files, a page at a time). So a hole in the middle of a run's stored events (batches missing
there, whatever removed them) is filled as well as a tail past the last stored ``seq``; the
events sent into a hole are counted apart (:attr:`SyncResult.filled`) and logged. A batch
that is there but damaged (its bytes no batch) looks covered by its range: ``verify``
(``crucible sync --verify``) reads every stored batch first and deletes the damaged ones whose
events the files hold, which the sync then sends again.

What the history must never get: a batch its readers skip. A stored batch's ``seq`` must
increase strictly; the run's reader (:func:`telemetry.jsonl.iter_run`) passes over an event
whose ``seq`` is not past the one before (a repeated line, a segment appended twice) and
warns of it; sync counts them (:attr:`SyncResult.out_of_order`). And the
history keys runs by id alone: a folder whose run id the history holds for another
experiment (a run copied under another experiment) is left alone, naming the other folder,
rather than mixed into that run's events and record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from actors.files import atomic_write
from actors.log import get_logger
from telemetry.batchstore import BatchStore, HeldSeqs
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.rundir import SUMMARY, read_json, read_summary, run_status
from telemetry.schema import check_batch, check_id, rows_to_batch, stored_batch

log = get_logger("telemetry.sync")

CHUNK = 4096
"""Events per transaction."""


@dataclass
class SyncResult:
    """What :func:`sync_run` did for one run."""

    run_dir: Path
    sent: int = 0  # events this sync stored (not those another writer stored first)
    recorded: bool = False  # the run's summary was (re)written into the runs table
    left_alone: str | None = None  # why the run was not synced (it is live; its id is another run's)
    filled: int = 0  # of ``sent``, events below the last seq the history held: a hole in its middle
    out_of_order: int = 0  # events whose seq was not past every seq read before it: not sent
    unreadable: int = 0  # lines of its files the JSONL readers skipped
    damaged: int = 0  # stored batches no reader can use (``verify`` only)
    replaced: int = 0  # of ``damaged``, those deleted, their events sent again from the files


def sync_run(store: BatchStore, run_dir: Path, chunk: int = CHUNK, verify: bool = False) -> SyncResult:
    """Send what the history lacks of the run in ``run_dir`` (see the module docs); with
    ``verify``, first read every stored batch of the run and replace the damaged ones.

    Raises:
        ValueError: the folder's names are not valid experiment / run ids.
        HistoryError, sqlite3.Error: the history refused a write (what was committed before
            stays: run it again).
    """
    result = SyncResult(run_dir)
    report = run_status(run_dir)
    if report.live:
        result.left_alone = f"{report.status}: its Recorder sends its own events"
        return result
    experiment_id = check_id("experiment id", run_dir.parent.name)
    run_id = check_id("run id", run_dir.name)
    if (other := _held_for_another(store, run_dir, experiment_id, run_id)) is not None:
        result.left_alone = other
        return result
    _warn_same_id(run_dir, run_id)
    if verify:
        result.damaged, result.replaced = _replace_damaged(store, run_dir, run_id)
    db_max = store.max_seq(run_id)
    held = HeldSeqs(store.seq_ranges(run_id))
    holes: list[int] = []  # the first seq of each hole found
    counts = ReadCounts()
    rows: list[dict[str, Any]] = []
    missing, was_in_hole = 0, False  # events found in a hole; whether the last one read was
    for ev in iter_run(run_dir, counts):  # each seq above the one before: iter_run passes repeats over
        seq = ev["seq"]
        in_hole = False
        if not held.holds(seq):
            in_hole = seq < db_max
            if in_hole and not was_in_hole:
                holes.append(seq)
            missing += in_hole
            rows.append(ev)
        was_in_hole = in_hole
        if len(rows) >= chunk:
            result.sent += _send(store, rows, experiment_id, run_id)
            rows = []
    if rows:
        result.sent += _send(store, rows, experiment_id, run_id)
    result.filled = min(missing, result.sent)
    result.unreadable = counts.skipped
    if holes:
        log.warning(
            "the history lacked events in the middle of the run; sent them from its files",
            run_dir=str(run_dir),
            events=missing,
            holes=len(holes),
            first_seq=holes[0],
        )
    result.out_of_order = counts.repeated  # iter_run warned of them
    result.recorded = _record(store, run_dir, experiment_id, run_id, counts.events)
    return result


def _replace_damaged(store: BatchStore, run_dir: Path, run_id: str) -> tuple[int, int]:
    """Delete the run's damaged stored batches that the run's files can replace, so that the
    sync sends those events again; returns (damaged, deleted). The bytes are the authority, not
    the row: a batch whose bytes hold events of this run is deleted only when the files hold
    every one of them (a mislabelled batch loses nothing), one with nothing readable only when
    the files hold as many events in its row's range as its row says, and at least one. What
    the files cannot replace stays as it is, and is logged. The files are read once more only
    when a batch is damaged."""
    damaged = list(store.damaged_batches(run_id))
    if not damaged:
        return 0, 0
    in_range = [0] * len(damaged)  # events of the files in each row's seq range
    wanted = [set(d.seqs) for d in damaged]  # the readable events of each that the files have not shown yet
    lo = min(min([d.seq_lo, *d.seqs]) for d in damaged)
    hi = max(max([d.seq_hi, *d.seqs]) for d in damaged)
    for ev in iter_run(run_dir, ReadCounts()):
        seq = ev["seq"]
        if seq > hi:
            break
        if seq < lo:
            continue
        for k, d in enumerate(damaged):
            in_range[k] += d.seq_lo <= seq <= d.seq_hi
            wanted[k].discard(seq)
    whole, left = [], []
    for d, count, missing in zip(damaged, in_range, wanted, strict=True):
        replaceable = not missing and (bool(d.seqs) or count >= max(d.n, 1))
        (whole if replaceable else left).append(d)
        if not replaceable:
            log.error(
                "a damaged history batch the run's files cannot replace: left as it is",
                run_dir=str(run_dir),
                seq_lo=d.seq_lo,
                seq_hi=d.seq_hi,
                events=d.n,
                in_files=count,
                readable_not_in_files=len(missing),
                error=d.why,
            )
    dropped = store.drop_batches(run_id, [d.seq_lo for d in whole]) if whole else 0
    if dropped:
        log.warning(
            "replacing damaged history batches with the run's files",
            run_dir=str(run_dir),
            batches=dropped,
            first_seq=whole[0].seq_lo,
            error=whole[0].why,
        )
    return len(damaged), dropped


def _held_for_another(store: BatchStore, run_dir: Path, experiment_id: str, run_id: str) -> str | None:
    """Why the run must not be synced when the history holds its id for another experiment's
    folder (one line naming that folder); None when the id is free or this run's."""
    owner = store.run_owner(run_id)
    if owner is None or owner[0] == experiment_id:
        return None
    sibling = run_dir.parent.parent / owner[0] / run_id  # here, if the copy is beside it
    other = str(sibling) if sibling.is_dir() or owner[1] is None else owner[1]
    return f"its run id is also {other}'s, the run the history holds under that id: {run_dir} not sent"


def _warn_same_id(run_dir: Path, run_id: str) -> None:
    """Say so when other folders of the artifacts folder share this run's id: only one of them
    can be in the history (the others are left alone when synced)."""
    try:
        others = sorted(str(p) for p in run_dir.parent.parent.glob(f"*/{run_id}") if p != run_dir and p.is_dir())
    except OSError:
        return
    if others:
        log.warning("several run folders share a run id; the history holds one", run_dir=str(run_dir), others=others)


def _send(store: BatchStore, rows: list[dict[str, Any]], experiment_id: str, run_id: str) -> int:
    """Store one chunk in one transaction; return the events stored (none of a chunk another
    writer stored first). A failed commit drops the chunk, so closing the store cannot fail again."""
    b = rows_to_batch(rows, experiment_id, run_id)
    check_batch(b)  # what every reader checks: never commit a batch they would skip
    ts = b["ts"]
    store.insert_batch(
        experiment_id,
        run_id,
        [int(b["seq"][0]), int(b["seq"][-1])],
        int(ts.min()),
        int(ts.max()),
        stored_batch(b),
        n=len(rows),
    )
    try:
        return store.commit()
    except BaseException:
        store.rollback()
        raise


def _record(store: BatchStore, run_dir: Path, experiment_id: str, run_id: str, events: int) -> bool:
    """Put the run's summary in the ``runs`` table if it is missing there or differs, with
    nothing left unsent; False when the run has no readable summary, one that lags its events,
    or it is there already. ``events``: the run's events this sync read, each seq once (lines
    repeated after the summary do not make it lag)."""
    try:
        summary = read_json(run_dir / SUMMARY)
        stale = read_summary(run_dir).get("summary_stale")  # fewer events than the files hold
    except ValueError:
        return False
    if summary is None:
        return False
    said = summary.get("events_persisted")
    if stale and not (isinstance(said, int) and events <= said):
        return False
    hist = summary.get("history")
    if isinstance(hist, dict) and hist.get("events_unsent"):
        summary = {**summary, "history": {**hist, "events_unsent": 0}}
        atomic_write(run_dir / SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    stored = next((r["summary"] for r in store.runs(experiment_id) if r["run_id"] == run_id), None)
    if stored == store.as_stored(summary):
        return False
    started, ended = summary.get("started_ts"), summary.get("ended_ts")
    store.record_run(
        run_id,
        experiment_id,
        str(run_dir),
        started if isinstance(started, int) else None,
        ended if isinstance(ended, int) else None,
        summary,
    )
    return True
