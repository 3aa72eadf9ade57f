import os
import stat
import threading
import time

import httpx
import orjson
import pytest

from dashboard.server import Dashboard, PushSource
from experiments.workloads import objective_of
from supervisor import Lab
from tests.fault_helpers import until

SPEC = {
    "name": "dash",
    "time_budget_s": 600,
    "hypertune": {"enabled": True, "window_s": 0.5},
    "workload": {
        "name": "coloring",
        "params": {"graph": {"generator": "gnp", "n": 120, "p": 0.5, "seed": 3}, "tabu": {"iters_per_step": 2000}},
    },
}


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


@pytest.fixture
def dash(lab):
    dash = Dashboard(lab, port=0)
    yield dash
    dash.stop()


def test_dashboard_binds_localhost_and_writes_a_private_token(dash):
    d = dash
    assert d.host == "127.0.0.1" and d.url == f"http://127.0.0.1:{d.port}/"
    assert stat.S_IMODE(os.stat(d.token_file).st_mode) == 0o600
    assert d.token_file.read_text().strip() == d.token


def client(dash, token=True):
    """A client of the dashboard's API; with the bearer token unless told otherwise."""
    headers = {"Authorization": f"Bearer {dash.token}"} if token else {}
    return httpx.Client(base_url=dash.url, timeout=30, headers=headers)


def test_api_status_codes_auth_and_validation(lab, dash):
    exp = lab.start_experiment(SPEC)
    c = client(dash)
    assert c.get("/api/experiments").json()["experiments"][0]["id"] == "dash"
    assert c.get("/api/experiments/dash").status_code == 200
    assert c.get("/api/metrics/live", params={"experiment": "dash"}).status_code == 200
    assert c.get("/api/metrics/live", params={"experiment": "../etc"}).status_code == 400
    ghost = c.get("/api/metrics/live", params={"experiment": "ghost"})
    assert ghost.status_code == 404 and ghost.json()["error"].startswith("no experiment 'ghost'")
    assert c.get("/api/metrics/history", params={"run_id": exp.run_id}).status_code == 200
    assert c.get("/api/metrics/history", params={"run_id": "../../etc/passwd"}).status_code == 400
    assert c.get("/api/metrics/history", params={"run_id": "20990101T000000Z-000000"}).status_code == 404
    details = c.get("/api/experiments/dash").json()
    assert {"best", "hypertune_actions", "hypertune_outcomes", "passes"} <= set(details)
    body = {"experiment": "dash"}
    anonymous = client(dash, token=False)
    assert anonymous.post("/api/control/pause", json=body).status_code == 401
    assert anonymous.post("/api/control/pause", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": f"Bearer {dash.token}"}
    assert c.post("/api/control/explode", json=body, headers=auth).status_code == 404
    assert c.post("/api/control/pause", content=b"{nope", headers=auth).status_code == 400
    r = c.post("/api/control/pause", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "paused" and exp.status() == "paused"
    again = c.post("/api/control/pause", json=body, headers=auth)
    assert again.status_code == 409 and "already paused" in again.json()["error"]
    assert c.post("/api/control/resume", json=body, headers=auth).json()["status"] == "running"
    assert c.post("/api/control/restart", json=body, headers=auth).json()["result"]["ok"]
    assert c.post("/api/control/stop", json=body, headers=auth).json()["status"] == "stopped"
    finished = c.post("/api/control/pause", json=body, headers=auth)
    assert finished.status_code == 409 and "stopped" in finished.json()["error"]
    metrics = c.get("/metrics").text
    assert 'crucible_events_persisted{experiment="dash"}' in metrics
    assert "crucible_objective_best{" in metrics and "crucible_restarts" in metrics
    # the host, as a daemon is watched: memory, threads, collections
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#") and len(line.split()) == 2
    }
    assert values["process_resident_memory_bytes"] > 10 << 20
    assert values["crucible_threads"] == pytest.approx(threading.active_count(), abs=20)
    assert "crucible_gc_periodic_runs_total" in values and "crucible_gc_periodic_last_seconds" in values
    assert 'python_gc_collections_total{generation="0"}' in values
    js = anonymous.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000  # served from the plotly package


def test_passes_are_read_from_phase_starts_and_pass_ends():
    from dashboard.server import passes

    starts = [
        {"pass": 1, "ts": 50, "notes": "pass 1 (restart requested)"},
        {"pass": 0, "ts": 10, "notes": "after init"},
        {"pass": 0, "ts": 30, "notes": "after tabu"},
    ]
    ends = [{"pass": 0, "ts": 40, "values": {"chromatic_number": 17.0, "duration_s": 3.0}}]
    assert passes(starts, ends, "chromatic_number") == [
        {"pass": 0, "start_ts": 10, "why": "after init", "end_ts": 40, "best": 17.0},
        {"pass": 1, "start_ts": 50, "why": "pass 1 (restart requested)", "end_ts": None, "best": None},
    ]
    # the pass's result is the objective's field, whatever the workload calls it
    assert passes([], ends, "duration_s")[0]["best"] == 3.0
    assert passes([], ends, None)[0]["best"] is None


LATENCY = {
    "name": "calls",
    "time_budget_s": 600,
    "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0], "calls_per_step": 20}},
    "metrics": {"publish_interval_s": 0.1},
}


def poll(pred, timeout=30.0, what="a condition"):
    """Poll ``pred`` until it gives something truthy; fail naming ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_each_experiment_carries_its_declared_objective_and_best(lab, dash):
    """A latency run's JSON shows latency_ms as its objective and its best on that field;
    a colouring run's, its own declaration: the page reads what to draw from here."""
    lab.start_experiment(LATENCY)
    lab.start_experiment(SPEC)
    c = client(dash)
    views = {e["id"]: e for e in c.get("/api/experiments").json()["experiments"]}
    lat, col = objective_of("latency"), objective_of("coloring")
    assert views["calls"]["objective"] == lat.to_dict()
    assert views["calls"]["objective"]["field"] == "latency_ms" and views["calls"]["objective"]["progress"] is None
    assert views["dash"]["objective"] == col.to_dict()

    def best(exp_id):
        return c.get(f"/api/experiments/{exp_id}").json()["best"]

    b = poll(lambda: best("calls"), what="a best latency")
    assert b["field"] == "latency_ms" and b["label"] == lat.label and b["direction"] == "min" and b["value"] > 0
    b = poll(lambda: best("dash"), what="a best colouring")
    assert b["field"] == col.field and b["label"] == col.label and b["value"] >= 1
    assert c.get("/api/experiments/calls").json()["objective"] == lat.to_dict()


def test_prometheus_exposes_the_objective_of_every_workload_in_its_direction(lab, dash):
    from prometheus_client.parser import text_string_to_metric_families

    lab.start_experiment(LATENCY)
    lab.start_experiment(SPEC)
    c = client(dash)
    lat, col = objective_of("latency"), objective_of("coloring")

    def samples():
        fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        best = {s.labels["experiment"]: s for s in fams["crucible_objective_best"].samples}
        prog = {s.labels["experiment"]: s for s in fams["crucible_objective_progress"].samples}
        return (best, prog, set(fams)) if {"calls", "dash"} <= set(best) and "dash" in prog else None

    best, prog, names = poll(samples, what="both experiments' objective gauges")
    assert best["calls"].labels == {"experiment": "calls", "field": "latency_ms", "direction": lat.direction}
    assert best["dash"].labels == {"experiment": "dash", "field": col.field, "direction": col.direction}
    assert best["calls"].value > 0 and best["dash"].value >= 1
    assert prog["dash"].labels == {"experiment": "dash", "field": col.progress} and prog["dash"].value >= 0
    assert "calls" not in prog  # the latency workload declares no progress value
    assert not any("chromatic" in n or "conflicts" in n for n in names)  # no workload's field in a metric name


def test_history_finds_a_run_through_the_run_directory_index(lab, dash):
    """A run whose events are all in rotated segments (no active events.jsonl) is still found;
    an id that names no run here is a 404, a malformed one a 400."""
    from telemetry.jsonl import iter_run
    from telemetry.rundir import SUMMARY, write_json

    exp = lab.start_experiment(LATENCY)
    poll(lambda: exp.metrics().get("events", 0) > 10, what="some events")
    exp.stop()
    run = exp.run_dir
    events = list(iter_run(run))
    moved = run.parent.parent / "other-exp" / "20990101T000000Z-000001"
    moved.mkdir(parents=True)
    (moved / "events.000001.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    write_json(moved / SUMMARY, {"events_persisted": len(events)})
    c = client(dash)
    got = c.get("/api/metrics/history", params={"run_id": moved.name, "limit": "500"})
    assert got.status_code == 200 and got.json()["events"] == events[:500] and len(events) > 10
    assert c.get("/api/metrics/history", params={"run_id": exp.run_id, "limit": "3"}).json()["events"] == events[:3]
    assert c.get("/api/metrics/history", params={"run_id": "20990101T000000Z-000002"}).status_code == 404
    assert c.get("/api/metrics/history", params={"run_id": ".."}).status_code == 400


def test_websocket_pushes_events_of_a_live_experiment(lab, dash):
    from websockets.sync.client import connect

    lab.start_experiment(SPEC)
    url = dash.url.replace("http://", "ws://") + "ws"
    seen = 0
    with connect(url, additional_headers={"Authorization": f"Bearer {dash.token}"}) as ws:
        while seen < 50:
            msg = orjson.loads(ws.recv(timeout=30))
            assert msg["experiments"][0]["id"] == "dash"
            seen += len(msg["events"].get("dash", []))
        pushes, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 1.5:
            ws.recv(timeout=30)
            pushes += 1
    assert 2 <= pushes <= 17  # batched pushes, at most 10 a second


def test_every_socket_pushes_from_one_read_of_the_lab_per_interval(lab, monkeypatch):
    """Many open pages: the Lab's experiments are read once per interval for all of them, and
    each socket still gets every event once, whenever it joined."""
    exp = lab.start_experiment(SPEC)
    queries = 0
    query = exp.query_window

    def counted(*args, **kwargs):
        nonlocal queries
        queries += 1
        return query(*args, **kwargs)

    monkeypatch.setattr(exp, "query_window", counted)
    now = [0.0]
    source = PushSource(lab, max_age_s=0.1, clock=lambda: now[0])
    sockets = [{} for _ in range(50)]
    seen = [[] for _ in sockets]
    for tick in range(6):
        for i, last_seq in enumerate(sockets[: 10 * (tick + 1)]):  # sockets join as it goes
            seen[i] += [e["seq"] for e in source.push(last_seq)["events"].get("dash", [])]
        assert queries == source.reads == tick + 1
        now[0] += 0.25  # past max_age_s: the next push reads again
        last = seen[0][-1] if seen[0] else -1
        until(lambda last=last: [e for e in query(("last_n", 1)) if e["seq"] > last], what="new events to push")
    for got in seen:
        assert got == sorted(set(got)) and got  # each event once, in order
        assert got[-1] == seen[0][-1]  # and every socket caught up to the same last event


def test_a_client_that_stops_reading_does_not_slow_the_lab(lab, dash):
    import socket

    lab.start_experiment(SPEC)
    host, port = dash.host, dash.port
    s = socket.create_connection((host, port))
    s.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Authorization: Bearer {dash.token}\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert s.recv(12) == b"HTTP/1.1 101"  # accepted: pushes start, and it never reads them
    try:  # connected and never reads: the API and the experiment carry on regardless
        c = client(dash)
        for _ in range(5):
            assert c.get("/api/experiments").status_code == 200
        exp = lab.get("dash")
        exp.stop()
        assert exp.status() == "stopped"
    finally:
        s.close()


def test_a_busy_port_is_a_clear_error_and_leaves_nothing_running(tmp_path):
    import socket
    import threading

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    with Lab(tmp_path / "art") as lab:
        before = threading.active_count()
        try:
            with pytest.raises(OSError, match=rf"dashboard cannot listen on 127\.0\.0\.1:{port}: "):
                Dashboard(lab, "127.0.0.1", port)
        finally:
            s.close()
        assert threading.active_count() == before


def test_the_lab_knows_nothing_of_the_dashboard():
    """The dashboard sits above the Lab: importing and running a Lab loads no dashboard code, and
    the dashboard is started on a Lab by whoever wants one (the Lab takes no dashboard options)."""
    import inspect
    import subprocess
    import sys

    assert not {"dashboard", "dash_host", "dash_port"} & set(inspect.signature(Lab).parameters)
    code = (
        "import sys, tempfile\n"
        "from experiments.lab import Lab\n"
        "with Lab(tempfile.mkdtemp()) as lab:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m == 'dashboard' or m.startswith(('dashboard.', 'cli'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_daemons_queue_reaches_the_page_in_every_push(tmp_path):
    """With a lab daemon's service behind it, each WebSocket push carries the queue (what waits
    for a slot, in order), as GET /api/experiments does; a plain Lab's pushes carry none."""
    from websockets.sync.client import connect

    from experiments.service import LabService

    service = LabService(tmp_path / "art", max_running=1)
    dash = Dashboard(service, port=0)
    try:
        first = service.submit({**LATENCY, "name": "first"})
        second = service.submit({**LATENCY, "name": "second"})
        assert (first["status"], second["status"]) == ("running", "queued")
        url = dash.url.replace("http://", "ws://") + "ws"
        with connect(url, additional_headers={"Authorization": f"Bearer {dash.token}"}) as ws:
            msg = orjson.loads(ws.recv(timeout=30))
        assert [e["id"] for e in msg["experiments"]] == ["first"]
        assert [(q["id"], q["status"], q["position"]) for q in msg["queued"]] == [("second", "queued", 1)]
    finally:
        dash.stop()
        service.shutdown()


def test_the_last_events_of_an_experiment_that_ended_between_pushes_still_go_out(lab):
    exp = lab.start_experiment({**SPEC, "name": "brief", "time_budget_s": 0.3, "hypertune": {"enabled": False}})
    source = PushSource(lab, max_age_s=0)
    assert exp.wait(60)  # it ended before any page asked
    pushed = source.push({})["events"].get("brief", [])
    assert pushed and pushed[-1]["seq"] == exp.query_window(("last_n", 1))[-1]["seq"]
