"""Export a run or an experiment to CSV, JSONL or Parquet, streamed in bounded chunks.

Sources are iterators of events (a run directory's JSONL files, or the history: SQLite or PostgreSQL),
so memory stays bounded by ``chunk`` events whatever the size. CSV and Parquet need the
set of value fields up front: the source is read twice (a cheap first pass collects the
field names). Nested fields (``parameters``, ``anomaly``) are written as JSON text.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from telemetry.history import HistoryTarget, open_history
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import FIELDS, compact_event, dumps_line

FORMATS = ("csv", "jsonl", "parquet")
BASE_COLUMNS = tuple(f for f in FIELDS if f not in ("v", "values"))  # the schema's order; values.* follow


def _flat(ev: dict[str, Any], keys: list[str]) -> list[Any]:
    row = []
    for c in BASE_COLUMNS:
        v = ev.get(c)
        if c in ("parameters", "anomaly") and v is not None:
            v = orjson.dumps(v).decode()
        row.append(v)
    vals = ev.get("values") or {}
    row.extend(vals.get(k) for k in keys)
    return row


def value_keys(events: Iterable[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for ev in events:
        for k in ev.get("values") or ():
            keys.setdefault(k, None)
    return list(keys)


def export_events(
    source: Callable[[], Iterator[dict[str, Any]]], fmt: str, out: str | Path, chunk: int = 100_000
) -> int:
    """Write the events of ``source()`` (called once or twice) to ``out``; return the count."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    if fmt == "jsonl":
        with out.open("wb") as fh:
            buf: list[bytes] = []
            for ev in source():
                buf.append(dumps_line(compact_event(ev)))
                n += 1
                if len(buf) >= chunk:
                    fh.write(b"".join(buf))
                    buf = []
            fh.write(b"".join(buf))
        return n
    keys = value_keys(source())
    header = [*BASE_COLUMNS, *(f"values.{k}" for k in keys)]
    if fmt == "csv":
        with out.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for ev in source():
                w.writerow(_flat(ev, keys))
                n += 1
        return n
    return _write_parquet(source(), keys, header, out, chunk)


def _write_parquet(events: Iterator[dict[str, Any]], keys: list[str], header: list[str], out: Path, chunk: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"seq": pa.int64(), "ts": pa.int64(), "pass": pa.int32(), "step": pa.int64(), "success": pa.bool_()}
    fields = [pa.field(c, types.get(c, pa.string())) for c in BASE_COLUMNS]
    fields += [pa.field(f"values.{k}", pa.float64()) for k in keys]
    schema = pa.schema(fields)
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        cols: list[list[Any]] = [[] for _ in header]
        for ev in events:
            for c, v in zip(cols, _flat(ev, keys), strict=True):
                c.append(v)
            n += 1
            if len(cols[0]) >= chunk:
                writer.write_table(pa.table(cols, schema=schema))
                cols = [[] for _ in header]
        if cols[0] or n == 0:
            writer.write_table(pa.table(cols, schema=schema))
    return n


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, chunk: int = 100_000, counts: ReadCounts | None = None
) -> int:
    """Export one run directory (its JSONL files); return the number of events written.

    Corrupt, torn or mistyped lines are skipped with a warning and counted in
    ``counts.skipped`` (the last pass's count when the format reads the files twice). A run
    killed before its first event has no events file: its export is empty (0 events), as
    ``crucible list`` and ``monitor`` count it.

    Raises:
        FileNotFoundError: there is no such folder.
        OSError: ``out`` cannot be written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")

    def source() -> Iterator[dict[str, Any]]:
        if counts is not None:
            counts.events = counts.skipped = 0  # each pass counts afresh
        return iter_run(run_dir, counts)

    return export_events(source, fmt, out, chunk)


def export_experiment(
    artifacts_dir: str | Path,
    experiment_id: str,
    fmt: str,
    out: str | Path,
    chunk: int = 100_000,
    history: HistoryTarget = None,
) -> int:
    """Export every run of an experiment from the history (``history``: see :mod:`telemetry.history`)."""
    store = open_history(history, artifacts=artifacts_dir, readonly=True)
    try:
        return export_events(lambda: store.iter_events(experiment_id=experiment_id), fmt, out, chunk)
    finally:
        store.close()


def export_history_run(
    run_id: str, fmt: str, out: str | Path, chunk: int = 100_000, history: HistoryTarget = None
) -> int:
    """Export one run's events as the history holds them (no run folder needed: the history
    may be a server that runs on other hosts wrote to)."""
    store = open_history(history, readonly=True)
    try:
        return export_events(lambda: store.iter_events(run_id=run_id), fmt, out, chunk)
    finally:
        store.close()
