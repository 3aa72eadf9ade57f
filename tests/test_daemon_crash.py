"""The lab daemon is crash-only: ``kill -9`` it at a random moment, start it again on the same
folder, and every acknowledged experiment is still there: the running ones resume in their
own run, the queued ones are still queued, and every run's figures balance on disk."""

from __future__ import annotations

import random
from pathlib import Path

import orjson

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
