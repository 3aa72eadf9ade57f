"""``kill -9`` of a ``crucible run`` at random moments: afterwards ``crucible list --json``,
``crucible monitor RUN --summary`` and ``crucible export RUN`` all work, and agree with each
other and with the files on disk (a torn last line is skipped by every reader alike)."""

from __future__ import annotations

import csv
import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from supervisor import main
from telemetry.jsonl import iter_run
from telemetry.store import DB_NAME, HistoryStore

SPEC = (
    'name = "k9"\ntime_budget_s = 600\nseed = 4\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'
    "calls_per_step = 10\n[telemetry]\nbatch_size = 32\nflush_interval_s = 0.01\n"
    '[sampling]\nstrategy = "{strategy}"\n{config}'
)
CONFIGS = {"all": "", "uniform": "[sampling.config]\nrate = 0.5\n"}
ROOT = Path(__file__).resolve().parent.parent


def start_and_kill(tmp_path: Path, delay: float, strategy: str) -> tuple[Path, Path, int]:
    """Start a run, kill it with SIGKILL ``delay`` seconds after it exists; return (artifacts, run, pid)."""
    art = tmp_path / "art"
    spec = tmp_path / "k9.toml"
    spec.write_text(SPEC.format(strategy=strategy, config=CONFIGS[strategy]))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "supervisor.py"), "run", str(spec), "--artifacts", str(art), "--no-live"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(art.glob("k9/*/lifecycle.json")):  # the run exists: kill it at any moment from now on
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.01)
        time.sleep(delay)  # the moment of the kill
    finally:
        proc.kill()
        proc.wait(30)
    (run,) = [p.parent for p in art.glob("k9/*/lifecycle.json")]
    return art, run, proc.pid


def history_seqs(art: Path, run_id: str) -> list[int]:
    """The run's seqs in the SQLite history (none if the kill came before its tables)."""
    try:
        store = HistoryStore(art / DB_NAME, readonly=True)
    except FileNotFoundError:
        return []
    try:
        return [e["seq"] for e in store.iter_events(run_id=run_id)]
    except sqlite3.OperationalError as exc:
        assert "no such table" in str(exc)
        return []
    finally:
        store.db.close()


def cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def exported_rows(path: Path, fmt: str) -> int:
    if fmt == "jsonl":
        return sum(1 for line in path.read_text().splitlines() if line)
    if fmt == "csv":
        with path.open(newline="") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    return pq.read_table(path).num_rows


def moment(seed: int) -> float:
    return round(random.Random(seed).uniform(0.2, 2.0), 3)


@pytest.mark.parametrize(
    ("delay", "strategy", "fmt"),
    [
        (0.0, "all", "jsonl"),  # at once: before the first event, perhaps before the events file
        (moment(1), "uniform", "csv"),
        (moment(2), "all", "parquet"),
        (moment(3), "all", "jsonl"),
    ],
)
def test_a_killed_run_reads_the_same_everywhere(tmp_path, capsys, delay, strategy, fmt):
    art, run, pid = start_and_kill(tmp_path, delay, strategy)
    on_disk = [e["seq"] for e in iter_run(run)]
    assert on_disk == sorted(set(on_disk))  # whatever the moment: in order, never twice
    assert set(history_seqs(art, run.name)) <= set(on_disk)  # the history commits after the JSONL

    listed = [json.loads(line) for line in cli(capsys, "list", "--json", "--artifacts", str(art)).splitlines()]
    (info,) = [i for i in listed if i["run_id"] == run.name]
    assert info["status"] == "crashed" and f"owner pid {pid}" in info["reason"]
    assert info["events"] == len(on_disk)

    text = " ".join(cli(capsys, "monitor", run.name, "--summary", "--artifacts", str(art)).split())
    assert "(crashed)" in text and f"persisted {len(on_disk)}," in text

    out = tmp_path / f"export.{fmt}"
    said = cli(capsys, "export", run.name, "--format", fmt, "--out", str(out), "--artifacts", str(art))
    assert f"exported {len(on_disk):,} events" in said
    assert exported_rows(out, fmt) == len(on_disk)


def test_a_run_that_died_before_its_first_event_reads_as_empty_everywhere(tmp_path, capsys, monkeypatch):
    """No events file at all (as after a kill in the first instant): list, monitor and export
    agree on 0 events."""
    from experiments import lab as lab_mod
    from supervisor import Lab

    def broken(*a, **k):
        raise RuntimeError("no recorder today")

    monkeypatch.setattr(lab_mod.Recorder, "__init__", broken)  # the tree dies before anything is written
    art = tmp_path / "art"
    with Lab(art) as lab, pytest.raises(RuntimeError, match="no recorder today"):
        lab.start_experiment({"name": "k9", "workload": {"name": "latency", "params": {"target": "math:sqrt"}}})
    (run,) = [p.parent for p in art.glob("k9/*/lifecycle.json")]
    assert not list(run.glob("events*.jsonl"))
    (info,) = [json.loads(line) for line in cli(capsys, "list", "--json", "--artifacts", str(art)).splitlines()]
    assert info["status"] == "failed" and info["events"] == 0
    assert "persisted 0," in " ".join(cli(capsys, "monitor", run.name, "--summary", "--artifacts", str(art)).split())
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"empty.{fmt}"
        said = cli(capsys, "export", run.name, "--format", fmt, "--out", str(out), "--artifacts", str(art))
        assert "exported 0 events" in said and exported_rows(out, fmt) == 0


KILLED_MID_TRANSACTION = """
import sqlite3, sys, time
from telemetry.store import _SCHEMA
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.executescript(_SCHEMA)  # committed, in SQLite's rollback-journal mode (as before WAL is set)
db.execute("PRAGMA cache_size = 1")  # the open transaction spills to the file: its journal is hot
db.execute("BEGIN")
for i in range(2000):
    db.execute("INSERT INTO batches VALUES ('r', ?, ?, 'e', 0, 0, 1, ?)", (i, i, bytes(200)))
print("in the transaction", flush=True)
time.sleep(600)
"""


def test_a_reader_rolls_back_the_hot_journal_of_a_killed_writer(tmp_path):
    """A writer killed inside a transaction (``crucible run`` killed while its history is being
    created) leaves a hot journal: readers must still read what was committed, not fail with
    "attempt to write a readonly database"; and a reader still refuses to write."""
    db = tmp_path / DB_NAME
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_TRANSACTION, str(db)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "in the transaction"
    finally:
        proc.kill()
        proc.wait(30)
    assert db.with_name(DB_NAME + "-journal").stat().st_size > 0  # hot: the kill came mid-transaction
    store = HistoryStore(db, readonly=True)
    try:
        assert list(store.iter_events(run_id="r")) == []  # the uncommitted batches are gone
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.insert_batch("e", "r", [5000], 0, 0, bytes(8))
            store.commit()  # batches are kept until the commit, which is where the write is refused
    finally:
        store.db.close()
