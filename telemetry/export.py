"""Export a run or an experiment to CSV, JSONL or Parquet, streamed in bounded chunks.

Sources are iterators of events (a run directory's JSONL files, or the history: SQLite or PostgreSQL),
so memory stays bounded by ``chunk`` events whatever the size. CSV and Parquet need the
set of value fields up front: the source is read twice (a cheap first pass collects the
field names, and for Parquet whether a field's values are all integers: such a column is
int64, exact, the others float64); of a run still writing, the second pass writes only the
events the first one read. Nested fields (``parameters``, ``anomaly``, ``nonfinite``) are written as
JSON text. The output is a path or a binary file (a pipe, a terminal): it is written in order,
never sought.
"""

from __future__ import annotations

import csv
import io
import numbers
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from telemetry.history import HistoryTarget, open_history
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import FIELDS, compact_event, dumps_line

FORMATS = ("csv", "jsonl", "parquet")
BASE_COLUMNS = tuple(f for f in FIELDS if f not in ("v", "values"))  # the schema's order; values.* follow
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _flat(ev: dict[str, Any], keys: list[str]) -> list[Any]:
    row = []
    for c in BASE_COLUMNS:
        v = ev.get(c)
        if c in ("parameters", "anomaly", "nonfinite") and v is not None:
            v = orjson.dumps(v).decode()
        row.append(v)
    vals = ev.get("values") or {}
    row.extend(vals.get(k) for k in keys)
    return row


def value_keys(events: Iterable[dict[str, Any]]) -> list[str]:
    """The value field names of ``events``, in the order they first appear."""
    return list(value_kinds(events))


def _exact_int(v: Any) -> bool:
    """An integer (not a bool) that an int64 column holds exactly."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


def value_kinds(events: Iterable[dict[str, Any]]) -> dict[str, bool]:
    """The value field names of ``events`` (in order of first appearance), each with whether all
    its values are integers that fit an int64 (a Parquet column kept exact, not a double)."""
    kinds: dict[str, bool] = {}
    for ev in events:
        for k, v in (ev.get("values") or {}).items():
            if v is None:
                kinds.setdefault(k, True)
            else:
                kinds[k] = kinds.get(k, True) and _exact_int(v)
    return kinds


def export_events(
    source: Callable[[], Iterator[dict[str, Any]]], fmt: str, out: str | Path | BinaryIO, chunk: int = 100_000
) -> int:
    """Write the events of ``source()`` (called once or twice) to ``out``; return the count.

    ``out``: a path (created, its folder too), or a binary file open for writing (a device or
    a pipe: written in order, never sought, and left open)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if isinstance(out, (str, Path)):
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as fh:
            return _export_to(source, fmt, fh, chunk)
    return _export_to(source, fmt, out, chunk)


def _export_to(source: Callable[[], Iterator[dict[str, Any]]], fmt: str, fh: BinaryIO, chunk: int) -> int:
    n = 0
    if fmt == "jsonl":
        buf: list[bytes] = []
        for ev in source():
            buf.append(dumps_line(compact_event(ev)))
            n += 1
            if len(buf) >= chunk:
                fh.write(b"".join(buf))
                buf = []
        fh.write(b"".join(buf))
        fh.flush()
        return n
    seen: dict[Any, Any] = {}
    kinds = value_kinds(_noting_last_seqs(source(), seen))
    keys = list(kinds)
    header = [*BASE_COLUMNS, *(f"values.{k}" for k in keys)]
    if fmt == "csv":
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="", write_through=True)
        try:
            w = csv.writer(text)
            w.writerow(header)
            for ev in _as_first_read(source(), seen):
                w.writerow(_flat(ev, keys))
                n += 1
            text.flush()
        finally:
            text.detach()  # ``fh`` stays the caller's to close
        return n
    return _write_parquet(_as_first_read(source(), seen), kinds, header, _Sink(fh), chunk)


def _noting_last_seqs(events: Iterable[dict[str, Any]], seen: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    """The events, noting in ``seen`` the last seq of each run read (and, under ``None``, how
    many events were read: events from elsewhere may carry no seq)."""
    n = 0
    for ev in events:
        n += 1
        seen[ev.get("run_id")] = ev.get("seq")
        yield ev
    seen[None] = n


def _as_first_read(events: Iterable[dict[str, Any]], seen: dict[Any, Any]) -> Iterator[dict[str, Any]]:
    """The second pass over a source that may have grown since the first (a live run): only the
    events the first pass read, whose value fields made the columns. An event written in
    between (the run's last ``phase_end``, with fields of its own) would lose its values to
    columns that do not exist; it is left to the next export."""
    n = 0
    for ev in events:
        seq, last = ev.get("seq"), seen.get(ev.get("run_id"))
        if isinstance(seq, int) and isinstance(last, int):
            if seq <= last:
                yield ev
        elif n < seen[None]:  # events without seqs: as many as the first pass read
            n += 1
            yield ev


class _Sink(io.RawIOBase):
    """A binary file as Parquet's writer sees it: its position counted here, never asked of the
    file, so a pipe or a terminal (which cannot ``lseek``) takes Parquet too."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self._fh = fh
        self._pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(memoryview(b).cast("B"))
        self._fh.write(b)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._fh.flush()


def _write_parquet(
    events: Iterator[dict[str, Any]], kinds: dict[str, bool], header: list[str], out: _Sink, chunk: int
) -> int:
    """Values are float64 columns, except a field whose values are all integers within int64:
    int64, so a count of ``2**62`` stays exact (a double holds integers exactly only up to
    ``2**53``). An integer in a float64 column is rounded to the nearest double."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"seq": pa.int64(), "ts": pa.int64(), "pass": pa.int32(), "step": pa.int64(), "success": pa.bool_()}
    fields = [pa.field(c, types.get(c, pa.string())) for c in BASE_COLUMNS]
    fields += [pa.field(f"values.{k}", pa.int64() if exact else pa.float64()) for k, exact in kinds.items()]
    schema = pa.schema(fields)
    as_float = [len(BASE_COLUMNS) + i for i, exact in enumerate(kinds.values()) if not exact]
    keys = list(kinds)
    n = 0
    with pq.ParquetWriter(out, schema) as writer:
        cols: list[list[Any]] = [[] for _ in header]
        for ev in events:
            row = _flat(ev, keys)
            for i in as_float:  # Arrow refuses an int it cannot hold exactly as a double; the nearest one is kept
                if row[i] is not None:
                    row[i] = float(row[i])
            for c, v in zip(cols, row, strict=True):
                c.append(v)
            n += 1
            if len(cols[0]) >= chunk:
                writer.write_table(pa.table(cols, schema=schema))
                cols = [[] for _ in header]
        if cols[0] or n == 0:
            writer.write_table(pa.table(cols, schema=schema))
    out.flush()
    return n


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path | BinaryIO, chunk: int = 100_000, counts: ReadCounts | None = None
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

    passes = 0

    def source() -> Iterator[dict[str, Any]]:
        nonlocal passes
        passes += 1
        if counts is not None:
            counts.events = counts.skipped = counts.repeated = 0  # each pass counts afresh
        return iter_run(run_dir, counts, warn=passes == 1)  # a second pass meets what the first reported

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
