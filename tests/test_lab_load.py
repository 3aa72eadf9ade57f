"""The Lab under load: many busy experiments on few cores.

Reads (summary, metrics, phase status, the Lab's list, the dashboard's /metrics) must answer
promptly whatever the actors are doing, and say when their figures are stale; shutdown must
stop the experiments side by side, not one after another. Bounds are relative to a baseline
measured in the same run, with generous slack: these tests catch reads that wait on a busy
mailbox (seconds), not scheduling noise.
"""

import statistics
import threading
import time

import httpx
import pytest

from actors.base import call_local
from actors.snapshot import MAX_AGE_S, WAIT_S
from dashboard.server import Dashboard
from supervisor import Lab
from telemetry.rundir import count_events

N = 8
BUSY = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 50}


def spec(name, **extra):
    return {"name": name, "time_budget_s": 600, "workload": {"name": "latency", "params": BUSY}, **extra}


def timed(fn, *a, **k):
    t0 = time.monotonic()
    out = fn(*a, **k)
    return out, time.monotonic() - t0


def check_flags(reading, took):
    """The stale flag means what it says: figures older than MAX_AGE_S, with their age (a read
    that took ``took`` seconds may return figures published while it ran: fresh, that old)."""
    assert isinstance(reading["stale"], bool)
    if reading["stale"]:
        assert reading["age_s"] is None or reading["age_s"] > MAX_AGE_S
    else:
        assert reading["age_s"] is not None and reading["age_s"] <= MAX_AGE_S + took


def wait_for_events(exps, timeout=60):
    deadline = time.monotonic() + timeout
    for e in exps:
        while count_events(e.run_dir) == 0:
            assert time.monotonic() < deadline, f"{e.id} wrote no events"
            e.wait(0.05)


def test_reads_stay_prompt_and_shutdown_is_concurrent_under_load(tmp_path):
    lab = Lab(tmp_path / "art")
    dash = Dashboard(lab, port=0)
    try:
        quiet = lab.start_experiment(spec("quiet"))
        wait_for_events([quiet])
        quiet.pause()
        baseline = statistics.median(timed(quiet.summary, max_age=0, wait=30)[1] for _ in range(5))
        bound = WAIT_S + max(4.0, 50 * baseline)  # a read may wait WAIT_S for a refresh, and no longer
        exps = [lab.start_experiment(spec(f"busy{i}")) for i in range(N)]
        wait_for_events(exps)
        worst: dict[str, float] = {}
        auth = {"Authorization": f"Bearer {dash.token}"}
        with httpx.Client(base_url=dash.url, headers=auth, timeout=120) as client:
            for _ in range(2):
                for e in exps:
                    for name, read in (
                        ("summary", e.summary),
                        ("metrics", e.metrics),
                        ("phase_status", e.phase_status),
                    ):
                        out, took = timed(read)
                        worst[name] = max(worst.get(name, 0.0), took)
                        if name != "phase_status" or out:
                            check_flags(out, took)
                _, worst["list"] = timed(lab.list)
                resp, took = timed(client.get, "/metrics")
                worst["/metrics"] = max(worst.get("/metrics", 0.0), took)
                assert resp.status_code == 200
                assert all(f'crucible_events_persisted{{experiment="{e.id}"}}' in resp.text for e in exps)
        assert all(worst[k] < bound for k in ("summary", "metrics", "phase_status", "list")), (worst, bound)
        assert worst["/metrics"] < (N + 1) * bound, (worst, bound)  # one summary per experiment at most
        # the figures catch up: a fresh read asked for now includes at least what a prompt one showed
        prompt = exps[0].summary()
        fresh = exps[0].summary(max_age=0, wait=60)
        assert fresh["stale"] is False and fresh["events_persisted"] >= (prompt["events_persisted"] or 0)
        lab.shutdown()
        assert all(e.status() == "stopped" for e in [quiet, *exps])
        # concurrent: the stops overlapped, so the shutdown took well under the sum of their times
        # (one after another, it takes at least that sum, whatever each stop costs). Not "every stop
        # began before any ended": a loaded machine may start a stop's thread after another stop ended.
        starts, ends = [e.stop_started_at for e in exps], [e.ended_at for e in exps]
        took = max(ends) - min(starts)
        assert took < 0.6 * sum(end - start for start, end in zip(starts, ends, strict=True)), (starts, ends)
        for e in exps:
            s = e.summary()
            assert s["events_persisted"] == count_events(e.run_dir) > 0 and s["stale"] is False
    finally:
        lab.shutdown()
        dash.stop()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def test_a_stuck_recorder_gives_stale_figures_at_once_and_fresh_ones_after(lab):
    exp = lab.start_experiment(spec("stuck"))
    wait_for_events([exp])
    exp.pause()
    before = exp.summary(max_age=0, wait=30)
    assert before["stale"] is False and before["events_persisted"] > 0
    gate, entered = threading.Event(), threading.Event()

    def hold(actor):  # the recorder is busy with one long message
        entered.set()
        gate.wait(60)

    rec = exp.registry.whereis("recorder")
    threading.Thread(target=call_local, args=(rec, hold), kwargs={"timeout": 90}, daemon=True).start()
    assert entered.wait(120)  # queued behind whatever the Recorder holds
    try:
        s, took = timed(exp.summary, max_age=0, wait=0.2)
        assert took < 0.2 + 2.0
        assert s["stale"] is True and s["age_s"] > 0 and s["events_persisted"] == before["events_persisted"]
        again, took = timed(exp.summary, max_age=0, wait=0.2)
        assert took < 0.2 + 2.0 and again["stale"] is True  # the refresh under way is still stuck
        t0 = time.monotonic()
        for _ in range(20):  # the refresh under way began more than WAIT_S ago: reads do not wait for it
            assert exp.summary(max_age=0)["stale"] is True
        assert time.monotonic() - t0 < 20 * WAIT_S
        assert lab.list()[0]["status"] == "paused"
    finally:
        gate.set()
    after = exp.summary(max_age=0, wait=30)
    assert after["stale"] is False and after["age_s"] <= MAX_AGE_S
