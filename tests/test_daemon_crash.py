"""The lab daemon is crash-only: ``kill -9`` it at a random moment, start it again on the same
folder, and every acknowledged experiment is still there: the running ones resume in their
own run, the queued ones are still queued, and every run's figures balance on disk."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from telemetry.rundir import SUMMARY, read_json
from tests.fault_helpers import latency_spec, seqs_on_disk
from tests.test_daemon import Daemon, wait_for

KILLS = 6


def events_on_disk(artifacts: Path) -> int:
    """Lines in every run's JSONL files (cheap enough to poll)."""
    return sum(p.read_bytes().count(b"\n") for p in artifacts.glob("*/*/events*.jsonl"))


def the_run(artifacts: Path, exp_id: str) -> Path:
    (run,) = [p for p in (artifacts / exp_id).iterdir() if p.is_dir()]
    return run


@pytest.mark.timeout(900)  # eight daemon starts, each seconds of imports (more under coverage on a loaded machine)
def test_a_daemon_killed_at_random_moments_loses_no_acknowledged_experiment(tmp_path):
    rng = random.Random(7)
    art = tmp_path / "art"
    d = Daemon(art, max_experiments=2)
    acknowledged: dict[str, str] = {}
    try:
        c = d.client()
        for name in ("a", "b", "c", "d"):  # two run, two wait
            acknowledged[name] = c.submit(latency_spec(name, budget=600))["status"]
        assert acknowledged == {"a": "running", "b": "running", "c": "queued", "d": "queued"}
        assert c.stop("d")["status"] == "cancelled"  # acknowledged too: it must outlive the kills
        runs = {}
        for k in range(KILLS):
            seen = events_on_disk(art)
            target = seen + rng.randrange(50, 2000)  # a random moment: after this many more events
            wait_for(lambda t=target: events_on_disk(art) >= t, f"events before kill {k}")
            d.kill()
            d = Daemon(art, max_experiments=2)
            c = d.client()
            listed = {e["id"]: e["status"] for e in c.list()}
            assert set(listed) == set(acknowledged), listed  # nothing acknowledged is lost
            assert (listed["c"], listed["d"]) == ("queued", "cancelled")
            for name in ("a", "b"):
                assert listed[name] == "running", listed
                run = the_run(art, name)
                runs.setdefault(name, run)
                assert run == runs[name]  # the same run, resumed: no new run directory
            # the resumed runs record again
            after = events_on_disk(art)
            wait_for(lambda a=after: events_on_disk(art) > a + 100, f"recording after restart {k}")
        c.stop("a")
        c.stop("b")
        wait_for(lambda: {e["id"]: e["status"] for e in c.list()}["c"] == "running", "c starts in a freed slot")
        c.stop("c")
        assert d.terminate() == 0
        d = Daemon(art, max_experiments=2)  # a later lifetime lists what earlier ones ran
        listed = {e["id"]: e["status"] for e in d.client().list()}
        assert listed == {"a": "stopped", "b": "stopped", "c": "stopped", "d": "cancelled"}
        assert d.terminate() == 0
    finally:
        d.kill()

    for name in ("a", "b"):
        run = the_run(art, name)
        summary = read_json(run / SUMMARY)
        a = summary["accounting"]
        assert a["balanced"], a  # emitted = persisted + dropped + sampled out, across every kill
        jsonl, hist = seqs_on_disk(art, name, run.name)
        assert jsonl == sorted(set(jsonl)) and sorted(hist) == jsonl  # in order, never twice, both stores
        assert summary["events_persisted"] == len(jsonl)
        events = [orjson.loads(line) for p in sorted(run.glob("events*.jsonl")) for line in p.read_bytes().splitlines()]
        resumed = [e for e in events if e["name"] == "resumed"]
        assert len(resumed) == KILLS, [e.get("values") for e in resumed]
        # each resume began a new segment of the run's files, with its resumed event first
        segments = sorted(run.glob("events.*.jsonl"))
        assert len(segments) == KILLS
        firsts = [orjson.loads(p.read_bytes().split(b"\n", 1)[0]) for p in [*segments[1:], run / "events.jsonl"]]
        assert all(e["name"] == "resumed" for e in firsts), [e["name"] for e in firsts]
        lifecycle = read_json(run / "lifecycle.json")
        assert lifecycle["status"] == "stopped" and lifecycle["resumes"] == KILLS


BOTH_BUDGET_S = 600.0  # neither ends on its own: a loaded machine may take long to start the second

PLAIN_RUN = """
import sys, threading
from experiments.lab import Lab
from tests.fault_helpers import latency_spec
Lab(sys.argv[1]).start_experiment(latency_spec("lat", budget=float(sys.argv[2])), experiment_id="lat")
threading.Event().wait()
"""


@pytest.mark.timeout(400)  # two daemon starts and two stops
def test_a_daemon_resumes_its_own_run_first_and_the_other_crashed_runs_of_its_id_after(tmp_path):
    """A ``crucible run`` of the same name crashed in the daemon's folder beside the daemon's
    own run: the restarted daemon resumes its submission's run under the id, lists the other
    as crashed and waiting, and resumes it once the first has ended."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_daemon import ROOT

    art = tmp_path / "art"
    d = Daemon(art, max_experiments=2)
    plain = None
    try:
        # budgets that outlast the second process's start (its imports, under coverage): the test stops them
        own = d.client().submit(latency_spec("lat", budget=BOTH_BUDGET_S))
        assert own["id"] == "lat" and own["status"] == "running"
        plain = subprocess.Popen(
            [sys.executable, "-c", PLAIN_RUN, str(art), str(BOTH_BUDGET_S)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        other = wait_for(lambda: [p for p in (art / "lat").iterdir() if p.is_dir() and p.name != own["run_id"]], "2nd")
        (other,) = other
        wait_for(lambda: seqs_count(other) > 50 and seqs_count(art / "lat" / own["run_id"]) > 50, "events of both")
        for run in (art / "lat" / own["run_id"], other):  # both still running when the machine goes down
            assert read_json(run / "lifecycle.json")["status"] == "running", run
    finally:
        d.kill()  # the machine goes down: both processes die at once
        if plain is not None:
            plain.kill()
            plain.wait(30)
    now = time.time()
    os.utime(art / "lat" / own["run_id"], (now, now))  # the daemon's run the newer: the others go oldest first
    os.utime(other, (now - 100, now - 100))
    d = Daemon(art, max_experiments=2)
    try:
        c = d.client()
        rows = [e for e in c.list() if e["id"] == "lat"]
        by_run = {e["run_id"]: e for e in rows}
        assert set(by_run) == {own["run_id"], other.name}, rows  # both listed, by run
        assert by_run[own["run_id"]]["status"] == "running"  # the submission's own run, under its id
        assert by_run[other.name]["status"] == "crashed" and "waiting to resume" in by_run[other.name]["reason"]

        def statuses() -> dict[str, str]:
            return {e["run_id"]: e["status"] for e in c.list() if e["id"] == "lat"}

        assert c.stop("lat")["status"] in ("stopping", "stopped")  # the id's run: the submission's
        # its end lets the waiting run take the id: resumed, and running
        wait_for(lambda: statuses() == {own["run_id"]: "stopped", other.name: "running"}, "the other resumed", 150.0)
        assert c.stop("lat")["status"] in ("stopping", "stopped")  # the id's run now: the other
        wait_for(lambda: statuses() == {own["run_id"]: "stopped", other.name: "stopped"}, "both runs ended", 150.0)
        runs = (art / "lat" / own["run_id"], other)
        # the Lab says ended as it writes the final record: the files say so a moment later
        wait_for(lambda: all(read_json(r / "lifecycle.json")["status"] == "stopped" for r in runs), "the records", 60.0)
        for run in runs:
            record = read_json(run / "lifecycle.json")
            assert record["status"] == "stopped" and record["reason"] == "stopped" and record["resumes"] == 1
        assert d.terminate() == 0
    finally:
        d.kill()


def seqs_count(run: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in run.glob("events*.jsonl"))
