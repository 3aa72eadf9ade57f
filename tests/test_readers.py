"""Readers of a run's JSONL files skip and count lines they cannot use, whatever is in them."""

import json

import orjson
import pyarrow.parquet as pq
import pytest

from experiments.monitor import Tailer, run_summary
from supervisor import main
from telemetry.export import export_run
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import SchemaError, parse_line


def good(seq, **extra):
    return {
        "v": 1,
        "seq": seq,
        "ts": 1_000_000 + seq,
        "experiment_id": "e",
        "run_id": "r",
        "pass": 0,
        "phase": "tabu",
        "name": "step",
        "values": {"conflicts": float(10 - seq), "chromatic_number": 28.0},
        **extra,
    }


BAD = [  # valid JSON, wrong types: each broke a reader before
    {**good(90), "ts": "x"},
    {**good(91), "seq": True},
    {**good(92), "seq": 1.5},
    {**good(93), "name": 5},
    {**good(94), "name": ""},
    {**good(95), "v": "one"},
    {**good(96), "values": [1, 2]},
    {**good(97), "values": {"conflicts": "many"}},
    {**good(98), "values": {"conflicts": True}},
    {**good(99), "pass": 2**40},
    {**good(100), "phase": ["tabu"]},
    {**good(101), "success": "yes"},
    {**good(102), "parameters": "tenure=3"},
    {**good(103), "notes": {"a": 1}},
    {**good(104), "anomaly": 3},
    {**good(105), "step": "4"},
    {**good(106), "experiment_id": 7},
    {**good(107), "ts": None},
    {**good(108), "v": None},
    {**good(109), "values": None},
    {**good(110), "pass": None},
]
NOT_EVENTS = [
    b"[1, 2]\n",
    b'"text"\n',
    b"{not json\n",
    b'{"seq": 1}\n',
    b"\xff\xfe\n",
    b'{"seq": 18446744073709551615, "ts": 1, "name": "x"}\n',
]


def write_run(tmp_path):
    run = tmp_path / "art" / "exp" / "run-1"
    run.mkdir(parents=True)
    lines = [orjson.dumps(good(i)) + b"\n" for i in range(5)]
    lines += [orjson.dumps(b) + b"\n" for b in BAD] + NOT_EVENTS
    lines += [orjson.dumps(good(5, values={"conflicts": None, "chromatic_number": 27.0})) + b"\n"]  # inf was written
    (run / "events.jsonl").write_bytes(b"".join(lines))
    return run


@pytest.mark.parametrize("record", BAD)
def test_parse_line_refuses_wrong_types_with_a_schema_error(record):
    with pytest.raises(SchemaError, match=r"event field|must not be empty"):
        parse_line(orjson.dumps(record))


def test_a_null_value_is_left_out():
    ev = parse_line(orjson.dumps(good(1, values={"x": None, "y": 2})))
    assert ev["values"] == {"y": 2}


def test_iter_run_skips_and_counts(tmp_path):
    run = write_run(tmp_path)
    counts = ReadCounts()
    events = list(iter_run(run, counts))
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4, 5]
    assert counts.events == 6 and counts.skipped == len(BAD) + len(NOT_EVENTS)
    assert events[-1]["values"] == {"chromatic_number": 27.0}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_survives_mistyped_lines(tmp_path, fmt):
    run = write_run(tmp_path)
    out = tmp_path / f"out.{fmt}"
    counts = ReadCounts()
    assert export_run(run, fmt, out, counts=counts) == 6
    assert counts.skipped == len(BAD) + len(NOT_EVENTS)
    if fmt == "parquet":
        assert pq.read_table(out).column("seq").to_pylist() == [0, 1, 2, 3, 4, 5]
    elif fmt == "jsonl":
        assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]


def test_monitor_summary_and_tail_survive_mistyped_lines(tmp_path, capsys):
    run = write_run(tmp_path)
    s = run_summary(run)
    assert s["phases"]["tabu"]["events"] == 6 and s["phases"]["tabu"]["best"]["conflicts"] == 6.0
    tail = Tailer(run)
    try:
        assert [e["seq"] for e in tail.poll()] == [0, 1, 2, 3, 4, 5]
        assert tail.skipped == len(BAD) + len(NOT_EVENTS)
    finally:
        tail.close()
    art = str(tmp_path / "art")
    assert main(["monitor", "run-1", "--no-wait", "--artifacts", art]) == 0
    assert main(["monitor", "run-1", "--summary", "--artifacts", art]) == 0
    assert main(["export", "run-1", "--format", "csv", "--out", str(tmp_path / "x.csv"), "--artifacts", art]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"exported 6 events of {run} to {tmp_path / 'x.csv'}; skipped {len(BAD) + len(NOT_EVENTS)} unreadable" in out


def test_export_to_a_place_that_cannot_be_written_is_a_usage_error(tmp_path, capsys):
    write_run(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "export",
                "run-1",
                "--out",
                str(blocker / "x.csv"),
                "--format",
                "csv",
                "--artifacts",
                str(tmp_path / "art"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_a_line_longer_than_any_event_is_skipped_without_being_held_whole(tmp_path, monkeypatch):
    """A file with megabytes of NUL bytes and no newline (damage after a crash) is one "line":
    read in pieces and skipped as a bad line, never held in memory whole; the events around
    it are read."""
    from telemetry import jsonl
    from telemetry.schema import dumps_line

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4096)
    lines = [
        dumps_line({"v": 1, "seq": i, "ts": 1_000 + i, "experiment_id": "e", "run_id": "r", "name": "s"})
        for i in range(4)
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_bytes(
        lines[0] + lines[1] + b"\0" * 50_000 + b"\n" + lines[2] + b"x" * 4095 + b"\n" + lines[3]
    )
    counts = ReadCounts()
    assert [e["seq"] for e in iter_run(run, counts, warn=False)] == [0, 1, 2, 3]
    assert counts.skipped == 2  # the NUL bytes, and a line just under the limit that is no event
    (run / "events.jsonl").write_bytes(lines[0] + b"\0" * 50_000)  # a last line cut short, past the limit
    counts = ReadCounts()
    assert [e["seq"] for e in iter_run(run, counts, warn=False)] == [0] and counts.skipped == 1


def test_the_tailer_drops_a_line_too_long_to_be_an_event_without_holding_it(tmp_path, monkeypatch):
    from telemetry import jsonl
    from telemetry.schema import dumps_line

    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 4096)
    run = tmp_path / "run"
    run.mkdir()
    line = [
        dumps_line({"v": 1, "seq": i, "ts": 1_000 + i, "experiment_id": "e", "run_id": "r", "name": "s"})
        for i in range(3)
    ]
    path = run / "events.jsonl"
    path.write_bytes(line[0] + b"\0" * 3000)
    tail = Tailer(run)
    assert [e["seq"] for e in tail.poll()] == [0]
    with path.open("ab") as fh:
        fh.write(b"\0" * 3000)  # past the limit, still no newline: let go of
    assert list(tail.poll()) == [] and tail._buf == b"" and tail.skipped == 1
    with path.open("ab") as fh:
        fh.write(b"\0" * 3000 + b"\n" + line[1] + line[2])  # its end, then events again
    assert [e["seq"] for e in tail.poll()] == [1, 2] and tail.skipped == 1
