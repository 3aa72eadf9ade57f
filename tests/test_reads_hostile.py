"""Readers of a run's files, of a spec and of an artifacts folder, against a hostile tester.

A FIFO where a run's file or a spec should be is an error naming it, never a hang (every
test that opens one does it on a thread with a deadline, or in a subprocess with a timeout,
so a regression fails instead of hanging the suite); a name too long or a folder that cannot
be read is one line, exit 2; a run folder deleted under ``monitor`` is an error, not a clean
end; a file of garbage gives a few warnings and a count, not one warning per line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from structlog.testing import capture_logs

from cli import main
from experiments.monitor import RunFolderGone, check_still_there, run_objectives, run_summary
from experiments.validate import read_text
from telemetry.export import FORMATS, export_run
from telemetry.jsonl import WARN_LINES, ReadCounts, RunFileError, iter_run, open_run_file
from telemetry.rundir import (
    LIFECYCLE,
    SPEC,
    SUMMARY,
    RunNotFound,
    find_runs,
    latest_run,
    list_runs,
    owner_info,
    read_json,
    resolve_run,
    write_json,
)
from telemetry.schema import dumps_line
from tests.fault_helpers import ends_within, feed_fifo_eof

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 20.0
CLI_TIMEOUT_S = 60
EXP = "hx"
RUN_ID = "20260101T000000Z-aaaaaa"


def event(seq: int) -> bytes:
    return dumps_line(
        {
            "v": 1,
            "seq": seq,
            "ts": 1_000_000 + seq * 1000,
            "experiment_id": EXP,
            "run_id": RUN_ID,
            "pass": 0,
            "name": "step",
            "values": {"conflicts": float(100 - seq)},
        }
    )


def make_run(art: Path, status: str = "stopped", n: int = 3) -> Path:
    """A run folder as a Recorder leaves it: events, lifecycle record, summary, spec."""
    run = art / EXP / RUN_ID
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(b"".join(event(i) for i in range(n)))
    write_json(
        run / LIFECYCLE,
        {
            "schema": 1,
            "experiment_id": EXP,
            "run_id": RUN_ID,
            "status": status,
            "reason": None if status == "running" else "completed",
            "owner": owner_info(),  # this process: alive, so a "running" record reads running
            "updated_at": time.time(),
            "heartbeat_s": 3600.0,
        },
    )
    write_json(run / SUMMARY, {"events_persisted": n, "phases": {}})
    write_json(run / SPEC, {"name": EXP, "workload": {"name": "latency"}})
    return run


def fifo_in_place(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def crucible(*argv: str, prefix: tuple[str, ...] = (), cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``crucible ARGV`` in a subprocess with a timeout (a hang fails the test, not the suite)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
    cmd = [*prefix, sys.executable, "-m", "supervisor", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=cwd, env=env)


def one_line_error(r: subprocess.CompletedProcess[str], *said: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for s in said:
        assert s in lines[0], r.stderr


# --- 1. FIFOs in a run folder, and as a spec ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["events.jsonl", LIFECYCLE, SUMMARY, SPEC])
def test_the_run_file_readers_name_a_fifo_and_never_wait_on_it(tmp_path, name):
    fifo = fifo_in_place(make_run(tmp_path) / name)
    with pytest.raises(RunFileError, match=rf"{name}' cannot be read: it is a FIFO, not a regular file"):
        ends_within(lambda: open_run_file(fifo), DEADLINE_S, lambda: feed_fifo_eof(fifo))
    with pytest.raises(ValueError, match="it is a FIFO"):
        ends_within(lambda: read_json(fifo), DEADLINE_S, lambda: feed_fifo_eof(fifo))


def test_list_shows_a_run_with_a_fifo_as_unreadable_and_goes_on(tmp_path):
    run = make_run(tmp_path)
    fifo = fifo_in_place(run / LIFECYCLE)
    (info,) = ends_within(lambda: list_runs(tmp_path), DEADLINE_S, lambda: feed_fifo_eof(fifo))
    assert info["status"] == "unknown" and f"{LIFECYCLE}' cannot be read: it is a FIFO" in info["reason"]
    fifo_in_place(run / "events.jsonl")
    (info,) = ends_within(lambda: list_runs(tmp_path), DEADLINE_S, lambda: feed_fifo_eof(run / "events.jsonl"))
    assert info["events"] is None and "events.jsonl' cannot be read: it is a FIFO" in info["evidence"][-1]


def test_monitor_reads_around_a_fifo_spec_or_summary_with_a_warning(tmp_path):
    run = make_run(tmp_path)
    for name in (SPEC, SUMMARY):
        fifo_in_place(run / name)
    with capture_logs() as logs:
        summary = ends_within(lambda: run_summary(run), DEADLINE_S, lambda: feed_fifo_eof(run / SUMMARY))
        objectives = ends_within(lambda: run_objectives(run), DEADLINE_S, lambda: feed_fifo_eof(run / SPEC))
    assert summary["events_persisted"] == 3 and len(objectives) > 1  # the events; every workload's objective
    named = {e["file"] for e in logs if e["log_level"] == "warning" and "FIFO" in e.get("error", "")}
    assert named == {str(run / SPEC), str(run / SUMMARY)}
    fifo_in_place(run / "events.jsonl")
    with pytest.raises(RunFileError, match=r"events\.jsonl' cannot be read: it is a FIFO"):
        ends_within(lambda: list(iter_run(run)), DEADLINE_S, lambda: feed_fifo_eof(run / "events.jsonl"))


def test_a_fifo_spec_is_refused_and_an_anonymous_pipe_still_read(tmp_path):
    fifo = fifo_in_place(tmp_path / "f.toml")
    with pytest.raises(ValueError, match=r"f\.toml: cannot read the spec \(it is a FIFO, not a regular file\)"):
        ends_within(lambda: read_text(fifo, "spec"), DEADLINE_S, lambda: feed_fifo_eof(fifo))
    with pytest.raises(ValueError, match="it is a character device"):  # not read as an empty spec
        read_text("/dev/null", "spec")
    r, w = os.pipe()  # what `crucible run /dev/stdin` reads when a pipe feeds it
    try:
        os.write(w, b'name = "piped"\n')
        os.close(w)
        assert read_text(f"/dev/fd/{r}", "spec") == 'name = "piped"\n'
    finally:
        os.close(r)


@pytest.mark.parametrize(
    ("argv", "fifo", "said"),
    [
        (["export", RUN_ID, "--format", "csv", "--out", "{tmp}/o.csv"], "events.jsonl", "events.jsonl' cannot be read"),
        (["monitor", RUN_ID, "--summary"], "events.jsonl", "events.jsonl' cannot be read"),
        (["compare", RUN_ID, RUN_ID, "--metric", "conflicts"], "events.jsonl", "events.jsonl' cannot be read"),
        (["show", "{tmp}/f.toml"], "f.toml", "f.toml: cannot read the spec"),
        (["set", "{tmp}/f.toml", "seed=3"], "f.toml", "f.toml"),
    ],
)
def test_commands_on_a_fifo_are_one_line_naming_it(tmp_path, argv, fifo, said):
    art = tmp_path / "art"
    run = make_run(art)
    fifo_in_place(tmp_path / fifo if fifo.endswith(".toml") else run / fifo)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] not in ("show", "set"):
        argv += ["--artifacts", str(art)]
    one_line_error(crucible(*argv), said, "FIFO")


def test_list_with_a_fifo_lifecycle_record_lists_the_run_as_unknown(tmp_path):
    run = make_run(tmp_path / "art")
    fifo_in_place(run / LIFECYCLE)
    r = crucible("list", "--json", "--artifacts", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    (info,) = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert info["status"] == "unknown" and "lifecycle.json' cannot be read: it is a FIFO" in info["reason"]


# --- 2. a name too long, a folder that cannot be looked into ---------------------------------------------------


def test_a_name_too_long_is_a_run_not_found_naming_it(tmp_path):
    long = "x" * 300
    with pytest.raises(RunNotFound, match=f"'{long}': cannot look into it: File name too long"):
        resolve_run(long, tmp_path)
    with pytest.raises(RunNotFound, match="cannot read the artifacts folder"):
        find_runs(tmp_path / long)
    make_run(tmp_path)
    assert resolve_run(RUN_ID, tmp_path) == tmp_path / EXP / RUN_ID  # the ordinary lookups still work
    assert find_runs(tmp_path / "missing") == [] and find_runs(tmp_path / EXP / RUN_ID / SPEC) == []


def unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply (root without its capabilities)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop the capabilities that bypass permissions")
    return (setpriv, "--bounding-set=-all", "--inh-caps=-all")


@pytest.fixture
def locked(tmp_path) -> Iterator[Path]:
    """A folder that holds runs but cannot be read or looked into (mode 000)."""
    folder = tmp_path / "locked"
    make_run(folder)
    folder.chmod(0)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def test_a_folder_that_cannot_be_read_is_one_line_exit_2(tmp_path, locked):
    prefix = unprivileged()
    one_line_error(crucible("list", "--artifacts", str(locked), prefix=prefix), str(locked), "Permission denied")
    inside = str(locked / "x")
    for argv in (["monitor", "--latest"], ["compare", "a", "b", "--metric", "m"], ["export", "a"]):
        r = crucible(*argv, "--artifacts", inside, prefix=prefix, cwd=tmp_path)
        one_line_error(r, inside, "Permission denied")
    r = crucible("monitor", str(locked / EXP / RUN_ID), "--artifacts", str(tmp_path), prefix=prefix)
    one_line_error(r, str(locked / EXP / RUN_ID), "Permission denied")


def test_an_experiment_folder_that_cannot_be_read_is_left_out_with_a_warning(tmp_path):
    make_run(tmp_path)
    code = (
        "import sys; from pathlib import Path; from telemetry.rundir import find_runs;"
        "print(len(find_runs(Path(sys.argv[1]))))"
    )
    (tmp_path / EXP).chmod(0)
    try:
        r = subprocess.run(
            [*unprivileged(), sys.executable, "-c", code, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            cwd=REPO,
        )
    finally:
        (tmp_path / EXP).chmod(0o755)
    said = r.stdout + r.stderr  # the warning: wherever an unconfigured structlog puts it
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "0", said
    assert "experiment folder unreadable" in said and str(tmp_path / EXP) in said
    assert latest_run(tmp_path) == tmp_path / EXP / RUN_ID


# --- 4. a run folder deleted while monitor follows it --------------------------------------------------------


def test_monitor_says_the_run_folder_is_gone_when_it_is_deleted(tmp_path):
    art = tmp_path / "art"
    run = make_run(art, status="running")  # owned by this process: live until the folder goes
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "supervisor", "monitor", RUN_ID, "--artifacts", str(art)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) as p:
        try:
            assert p.stdout is not None and "conflicts=" in p.stdout.readline()  # it follows the run
            shutil.rmtree(run)
            _, err = p.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            p.kill()
    assert p.returncode == 2 and "is gone" in err and str(run) in err, (p.returncode, err)


def test_a_lost_lifecycle_record_is_a_gone_run_and_an_ended_run_is_not(tmp_path):
    run = make_run(tmp_path)
    check_still_there(run, had_record=True)  # there: nothing to say
    (run / LIFECYCLE).unlink()
    check_still_there(run, had_record=False)  # a run that never had one (an older version)
    with pytest.raises(RunFolderGone, match=f"lost its {LIFECYCLE}"):
        check_still_there(run, had_record=True)


# --- 5. a file of garbage ----------------------------------------------------------------------------------------


def test_garbage_lines_give_a_few_warnings_and_one_count(tmp_path):
    run = make_run(tmp_path)
    with (run / "events.jsonl").open("ab") as fh:
        fh.write(b"\xff\xfenot json\n" * 1000 + event(3))
    counts = ReadCounts()
    with capture_logs() as logs:
        events = list(iter_run(run, counts))
    assert len(events) == 4 and counts.skipped == 1000
    each = [e for e in logs if e["event"] == "skipping bad JSONL line"]
    total = [e for e in logs if e["event"].startswith("bad JSONL lines skipped")]
    assert [e["line"] for e in each] == list(range(4, 4 + WARN_LINES))
    assert [(e["skipped"], e["file"]) for e in total] == [(1000, str(run / "events.jsonl"))]
    with capture_logs() as logs:  # a reader that stops before the end still gets the count
        it = iter_run(run)
        assert [next(it)["seq"] for _ in range(4)] == [0, 1, 2, 3]
        it.close()
    assert [e["skipped"] for e in logs if e["event"].startswith("bad JSONL lines skipped")] == [1000]


def test_compare_on_a_metric_no_event_has_names_what_the_runs_record(tmp_path, capsys):
    """A label for its field (``colors`` for ``chromatic_number``) is pointed at the field; any
    other miss lists the numeric fields the runs hold, escaped, at most 20 of them."""
    run = make_run(tmp_path)
    rows = [{"chromatic_number": 30 - i, "conflicts": float(i), "odd\x1b]0;x\x07": 1.0} for i in range(3)]
    with (run / "events.jsonl").open("ab") as fh:
        for i, values in enumerate(rows, 3):
            fh.write(dumps_line({**orjson.loads(event(i)), "values": values}))
    for metric, needle in (
        ("colors", "'colors' is how tables label 'chromatic_number': give --metric chromatic_number"),
        ("latency", "numeric fields recorded: chromatic_number, conflicts, odd\\x1b]0;x\\x07"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["compare", RUN_ID, RUN_ID, "--metric", metric, "--artifacts", str(tmp_path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and "\x1b" not in err, err
    argv = ["compare", RUN_ID, RUN_ID, "--metric", "chromatic_number", "--json", "--artifacts", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:  # the field found: what is left is that it is one run twice
        main(argv)
    assert exit_.value.code == 2 and "are the same run" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_of_garbage_warns_once_whatever_its_passes(tmp_path, fmt):
    """CSV and Parquet read the run twice (the columns, then the rows): the warnings come once."""
    run = make_run(tmp_path)
    with (run / "events.jsonl").open("ab") as fh:
        fh.write(b"garbage\n" * 50 + event(3))
    counts = ReadCounts()
    with capture_logs() as logs:
        n = export_run(run, fmt, tmp_path / f"out.{fmt}", counts=counts)
    assert n == 4 and (counts.events, counts.skipped) == (4, 50)
    each = [e for e in logs if e["event"] == "skipping bad JSONL line"]
    total = [e for e in logs if e["event"].startswith("bad JSONL lines skipped")]
    assert len(each) == WARN_LINES and [e["skipped"] for e in total] == [50]
