"""Sending a run's events from its files to the history: what the history lacks after a stop.

A Recorder whose history stayed away (a server down, a SQLite file locked by another
connection) until past its stop wait leaves the run's last events in its JSONL files only
(the reference) and counts them in the summary's ``history.events_unsent``; its run may be
missing from the ``runs`` table too. A Recorder that reopens the run back-fills them, but a
run that ended is never reopened: :func:`sync_run` (``crucible sync``) does it. It sends the
events past the last ``seq`` the history holds, a chunk per transaction (a sync cut short
is simply run again: nothing is stored twice), then records the run's summary, with
``events_unsent`` set to what is still missing (0), in the ``runs`` table and in
``summary.json``, unless the summary lags the events on disk (a run killed before its last
summary: its events are sent, its record waits for a Recorder to end it). A live run is left
alone: its own Recorder sends its events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from actors.files import atomic_write
from telemetry.batchstore import BatchStore
from telemetry.jsonl import iter_run
from telemetry.rundir import SUMMARY, read_json, read_summary, run_status
from telemetry.schema import check_id, rows_to_batch, stored_batch

CHUNK = 4096
"""Events per transaction."""


@dataclass
class SyncResult:
    """What :func:`sync_run` did for one run."""

    run_dir: Path
    sent: int = 0  # events the history lacked, now stored
    recorded: bool = False  # the run's summary was (re)written into the runs table
    left_alone: str | None = None  # why the run was not synced (it is live)


def sync_run(store: BatchStore, run_dir: Path, chunk: int = CHUNK) -> SyncResult:
    """Send what the history lacks of the run in ``run_dir`` (see the module docs).

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
    db_max = store.max_seq(run_id)
    rows: list[dict[str, Any]] = []
    for ev in iter_run(run_dir):
        if ev["seq"] > db_max:
            rows.append(ev)
        if len(rows) >= chunk:
            result.sent += _send(store, rows, experiment_id, run_id)
            rows = []
    if rows:
        result.sent += _send(store, rows, experiment_id, run_id)
    result.recorded = _record(store, run_dir, experiment_id, run_id)
    return result


def _send(store: BatchStore, rows: list[dict[str, Any]], experiment_id: str, run_id: str) -> int:
    b = rows_to_batch(rows, experiment_id, run_id)
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
    store.commit()
    return len(rows)


def _record(store: BatchStore, run_dir: Path, experiment_id: str, run_id: str) -> bool:
    """Put the run's summary in the ``runs`` table if it is missing there or differs, with
    nothing left unsent; False when the run has no readable summary, one that lags its events,
    or it is there already."""
    try:
        summary = read_json(run_dir / SUMMARY)
        stale = read_summary(run_dir).get("summary_stale")  # fewer events than the files hold
    except ValueError:
        return False
    if summary is None or stale:
        return False
    hist = summary.get("history")
    if isinstance(hist, dict) and hist.get("events_unsent"):
        summary = {**summary, "history": {**hist, "events_unsent": 0}}
        atomic_write(run_dir / SUMMARY, orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    stored = next((r["summary"] for r in store.runs(experiment_id) if r["run_id"] == run_id), None)
    if stored == summary:
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
