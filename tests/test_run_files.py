"""A run's files read as one snapshot while the run writes them: no segment lost to a rotation
under way, no value lost to a field that came between an export's two passes, no segment
overwritten, no torn line left half cut, no event counted twice."""

from __future__ import annotations

import csv
import io
import shutil

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.monitor import run_summary
from telemetry.export import export_events
from telemetry.jsonl import ACTIVE, JsonlWriter, ReadCounts, iter_run, run_segments
from telemetry.rundir import count_events
from tests.test_readers import good


def line(seq: int, **values: float) -> bytes:
    return orjson.dumps({**good(seq), "values": values or {"x": float(seq)}}) + b"\n"


def write_run(run, segments: list[range], active: range) -> JsonlWriter:
    """Rotated segments holding ``segments``, then the active file holding ``active``."""
    w = JsonlWriter(run)
    for seqs in segments:
        for s in seqs:
            w.write(line(s))
        w.rotate()
    for s in active:
        w.write(line(s))
    w.flush()
    return w


def test_a_rotation_while_the_run_is_read_loses_no_segment(tmp_path):
    """The reader is in the first segment when the writer rotates the active file away and goes
    on in a new one: the rotated segment, listed by no one, is read all the same."""
    run = tmp_path / "r"
    w = write_run(run, [range(0, 10), range(10, 20)], range(20, 30))
    events = iter_run(run)
    assert [next(events)["seq"] for _ in range(5)] == [0, 1, 2, 3, 4]
    w.rotate()  # 20-29 become events.000003.jsonl
    for s in range(30, 40):
        w.write(line(s))
    w.flush()
    assert [ev["seq"] for ev in events] == list(range(5, 40))


def test_a_rotation_after_the_active_file_was_opened_is_read_once(tmp_path):
    """Rotated after the reader opened the active file: what it opened is read once, what was
    written in the new active file since is not in the snapshot (a tail, never a hole)."""
    run = tmp_path / "r"
    w = write_run(run, [range(0, 10)], range(10, 20))
    events = iter_run(run)
    assert [next(events)["seq"] for _ in range(12)] == list(range(12))  # into the active file
    w.rotate()
    w.write(line(20))
    w.flush()
    counts_before = [ev["seq"] for ev in events]
    assert counts_before == list(range(12, 20))
    assert count_events(run) == 21 and [ev["seq"] for ev in iter_run(run)] == list(range(21))


def test_a_copy_of_a_segment_or_a_repeated_line_is_not_counted_twice(tmp_path):
    run = tmp_path / "r"
    write_run(run, [range(0, 10)], range(10, 20)).close()
    shutil.copy(run / "events.000001.jsonl", run / "events.orig.jsonl")  # a backup beside the files
    with (run / ACTIVE).open("ab") as fh:
        fh.write(line(19))  # a line written twice
        fh.write(line(20))
    assert [p.name for p in run_segments(run)] == ["events.000001.jsonl", ACTIVE]
    counts = ReadCounts()
    assert [ev["seq"] for ev in iter_run(run, counts)] == list(range(21))
    assert (counts.events, counts.repeated, counts.skipped) == (21, 1, 0)
    assert run_summary(run)["phases"]["tabu"]["events"] == 21


def test_rotation_never_overwrites_a_segment(tmp_path):
    """Segment 1 moved away: segment 2 is kept, the next rotation writes segment 3."""
    run = tmp_path / "r"
    write_run(run, [range(0, 10), range(10, 20)], range(20, 25)).close()
    (run / "events.000001.jsonl").rename(tmp_path / "kept-elsewhere.jsonl")
    w = JsonlWriter(run)
    assert w.rotate().name == "events.000003.jsonl"
    w.close()
    assert [ev["seq"] for ev in iter_run(run)] == list(range(10, 25))


def test_a_torn_line_longer_than_a_mebibyte_is_cut_whole(tmp_path):
    """A 2 MB line torn by a crash: the writer reopening the file cuts all of it, so the next
    event is a line of its own and readable."""
    run = tmp_path / "r"
    run.mkdir()
    torn = line(1)[:-1].replace(b'"name":"step"', b'"name":"step","notes":"' + b"n" * (2 << 20) + b'"')
    (run / ACTIVE).write_bytes(line(0) + torn[: len(torn) // 2])
    w = JsonlWriter(run)
    assert w.torn_bytes == len(torn) // 2 and w.last_seq == 0
    w.write(line(1))
    w.close()
    counts = ReadCounts()
    assert [ev["seq"] for ev in iter_run(run, counts)] == [0, 1] and counts.skipped == 0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_export_writes_only_what_its_first_pass_read(fmt):
    """CSV and Parquet read the source twice (the columns first). An event written in between,
    with a field of its own (a run's last phase_end), is left to the next export: it used to
    be written with that value lost to a column that did not exist."""
    first = [orjson.loads(line(s)) for s in range(5)]
    late = orjson.loads(line(5, steps=7.0, active_s=2.5))
    calls = iter([first, [*first, late]])
    out = io.BytesIO()
    assert export_events(lambda: iter(next(calls)), fmt, out) == 5
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
        assert [r["seq"] for r in rows] == ["0", "1", "2", "3", "4"] and all(r["values.x"] for r in rows)
    else:
        table = pq.read_table(pa.BufferReader(out.getvalue()))
        assert table.column("seq").to_pylist() == [0, 1, 2, 3, 4] and table.column("values.x").null_count == 0
