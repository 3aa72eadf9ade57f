import concurrent.futures
import contextlib
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


def test_prometheus_tells_events_sampled_out_from_events_lost(lab, dash):
    """A sampled run leaves most events out on purpose: ``crucible_events_lost`` stays 0, and
    ``crucible_events_sampled_out`` says how many (``_dropped`` counts both, as the summary does)."""
    from prometheus_client.parser import text_string_to_metric_families

    spec = {
        "name": "sampled",
        "time_budget_s": 600,
        "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0], "calls_per_step": 50}},
        "sampling": {"strategy": "stratified", "config": {"by": "success", "rates": {"true": 0.1}, "min_samples": 10}},
    }
    exp = lab.start_experiment(spec)
    poll(lambda: exp.summary().get("events_sampled_out", 0) > 100, what="events sampled out")
    exp.stop()
    summary = exp.summary()
    fams = {f.name: f for f in text_string_to_metric_families(client(dash).get("/metrics").text)}

    def value(name):
        (sample,) = [s for s in fams[name].samples if s.labels["experiment"] == "sampled"]
        return sample.value

    assert value("crucible_events_sampled_out") == summary["events_sampled_out"] > 100
    assert value("crucible_events_dropped") == summary["events_dropped"] >= summary["events_sampled_out"]
    assert value("crucible_events_lost") == summary["events_dropped"] - summary["events_sampled_out"] == 0


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
        msg = orjson.loads(ws.recv(timeout=30))
        assert msg["experiments"][0]["id"] == "dash"  # the whole list first; then what changed in it
        while seen < 50:
            seen += len(msg["events"].get("dash", []))
            msg = orjson.loads(ws.recv(timeout=30))
            assert "experiments" not in msg and [e["id"] for e in msg.get("updated", [])] in ([], ["dash"])
        with contextlib.suppress(TimeoutError):  # what came while this thread was slow is not in the count
            while True:
                ws.recv(timeout=0)
        pushes, t0 = 0, time.monotonic()
        while pushes < 3 or time.monotonic() - t0 < 1.5:
            ws.recv(timeout=30)
            pushes += 1
        took = time.monotonic() - t0
    assert pushes <= 10 * took + 3, (pushes, took)  # batched pushes, at most 10 a second (and one under way)


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
        "with tempfile.TemporaryDirectory() as d, Lab(d) as lab:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m == 'dashboard' or m.startswith(('dashboard.', 'cli'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_daemons_queue_reaches_the_page_in_its_first_push(tmp_path):
    """With a lab daemon's service behind it, a socket's first push carries the queue (what waits
    for a slot, in order), as GET /api/experiments does, and later ones when it changed; a plain
    Lab's pushes carry none."""
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


# --- bounded reads ------------------------------------------------------------------------------------------


class FakeRun:
    """An experiment's reads over a list of events (ts = 1000 * seq µs): what RunDetails asks,
    with every event each query had to look at counted in ``looked_at``."""

    def __init__(self, n, rare_every):
        self.events = [
            {"seq": i, "ts": 1000 * i, "name": "hypertune_action" if i % rare_every == 0 else "step", "notes": str(i)}
            for i in range(n)
        ]
        self.looked_at = 0
        self.ended = False

    def wait(self, timeout=None):
        return self.ended

    def add(self, n, rare_every):
        start = len(self.events)
        self.events += [
            {"seq": i, "ts": 1000 * i, "name": "hypertune_action" if i % rare_every == 0 else "step", "notes": str(i)}
            for i in range(start, start + n)
        ]

    def query_window(self, spec, filters=None):
        if spec[0] == "last_n":
            return self.events[-spec[1] :]
        lo, hi = round(spec[1] * 1e6), round(spec[2] * 1e6)
        inside = [e for e in self.events if lo <= e["ts"] < hi]
        self.looked_at += len(inside)
        return [e for e in inside if e["name"] == (filters or {}).get("name", e["name"])]


def test_run_details_search_a_bounded_range_first_then_only_what_arrived(monkeypatch):
    """The first read of a big run searches about DETAILS_SCAN of its newest events, not the
    whole run; each later read only what came since (and a small overlap); events found twice
    are kept once, and only the newest of each name are kept."""
    from dashboard import server

    monkeypatch.setattr(server, "DETAILS_SCAN", 1_000)
    monkeypatch.setattr(server, "RARE_EVENTS", {**server.RARE_EVENTS, "hypertune_action": 5})
    run = FakeRun(100_000, rare_every=100)
    summary = {"events_persisted": len(run.events), "started_ts": 0}
    now = [0.0]
    asks = concurrent.futures.ThreadPoolExecutor(len(server.RARE_EVENTS))
    details = server.RunDetails(asks)
    details.update(run, summary, clock=lambda: now[0])
    per_name = len(server.RARE_EVENTS)
    assert run.looked_at <= 2 * 1_000 * per_name  # not 100,000 per name
    assert details.since_us is not None and details.since_us >= 1000 * (100_000 - 2_000)
    assert [e["seq"] for e in details.newest("hypertune_action")] == [99_500, 99_600, 99_700, 99_800, 99_900]

    details.update(run, summary, clock=lambda: now[0])  # read again at once: the kept answer
    run.add(3_000, rare_every=100)
    now[0] += server.DETAILS_MAX_AGE_S
    before = run.looked_at
    details.update(run, summary, clock=lambda: now[0])
    overlap = server.DETAILS_OVERLAP_US // 1000  # events per overlap (one per ms here)
    assert run.looked_at - before <= (3_000 + overlap + 1) * per_name
    assert [e["seq"] for e in details.newest("hypertune_action")] == [102_500, 102_600, 102_700, 102_800, 102_900]

    run.ended = True  # searched once more after its end, then never again
    now[0] += server.DETAILS_MAX_AGE_S
    details.update(run, summary, clock=lambda: now[0])
    now[0] += server.DETAILS_MAX_AGE_S
    before = run.looked_at
    details.update(run, summary, clock=lambda: now[0])
    assert details.final and run.looked_at == before
    assert [e["seq"] for e in details.found["hypertune_action"]][-1] == 102_900  # what a busy search's waiter gets
    asks.shutdown()


def test_a_big_runs_details_come_back_within_a_lowered_scan_limit(lab, dash, monkeypatch):
    """An ended run is answered from the history, whose scan limit (lowered here to a third of
    the run) is far below its size: the details still come back (200), searched over the run's
    newest events only, in every poll. (A limit that nothing fits: the next test.)"""
    from dashboard import server
    from telemetry import query
    from tests.fault_helpers import persisted

    exp = lab.start_experiment({**LATENCY, "metrics": {"publish_interval_s": 0.05}})
    poll(lambda: persisted(exp) > 60_000, timeout=120, what="60,000 events persisted")
    exp.stop()
    total = exp.summary()["events_persisted"]
    monkeypatch.setattr(query, "MAX_SCAN", total // 3)  # a third of the run: a whole-run search is refused
    monkeypatch.setattr(server, "DETAILS_SCAN", 1_000)
    c = client(dash)
    for _ in range(2):
        r = c.get("/api/experiments/calls")
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["hypertune_actions"] == [] and d["events"] == total and d["started_ts"] > 0
        assert d["details_since"] > d["started_ts"]  # only the newest part was searched


def test_a_query_over_the_limits_is_a_503_naming_the_limit(lab, dash, monkeypatch):
    from dashboard import server
    from telemetry import query

    exp = lab.start_experiment(LATENCY)
    poll(lambda: exp.metrics().get("events", 0) > 500, what="some events")
    exp.stop()
    monkeypatch.setattr(query, "MAX_SCAN", 0)  # not one stored batch fits
    monkeypatch.setattr(server, "DETAILS_SCAN", 1)
    unexpected = []
    monkeypatch.setattr(server.log, "error", lambda *a, **k: unexpected.append((a, k)))
    r = client(dash).get("/api/experiments/calls")
    assert r.status_code == 503, r.text
    assert "query limits" in r.json()["error"] and "limit of 0" in r.json()["error"]
    assert unexpected == []  # a refusal, not a defect: no traceback in the log


def test_history_reads_are_bounded_and_a_bad_limit_is_a_400(lab, monkeypatch):
    """A history read holds up to 100,000 events twice (dicts, then JSON): past HISTORY_READS at
    once, one more is a 503 with Retry-After, not another 100 MB in the Lab's process; a limit
    below 1 or not an integer is a 400 naming it, never clamped."""
    import concurrent.futures

    from dashboard import server

    monkeypatch.setattr(server, "HISTORY_READS", 1)
    exp = lab.start_experiment(LATENCY)
    poll(lambda: exp.metrics().get("events", 0) > 10, what="some events")
    exp.stop()
    started, release = threading.Event(), threading.Event()
    real = server.iter_run

    def held(run):  # the first read waits, inside its slot, until the test lets it go
        started.set()
        assert release.wait(60)
        yield from real(run)

    monkeypatch.setattr(server, "iter_run", held)
    dash = Dashboard(lab, port=0)
    try:
        c = client(dash)
        params = {"run_id": exp.run_id, "limit": "5"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.get, "/api/metrics/history", params=params)
            assert started.wait(30)
            busy = client(dash).get("/api/metrics/history", params=params)
            assert busy.status_code == 503 and busy.headers["retry-after"].isdigit(), busy.text
            assert "history reads" in busy.json()["error"]
            release.set()
            assert first.result(60).status_code == 200 and len(first.result().json()["events"]) == 5
        assert c.get("/api/metrics/history", params=params).status_code == 200  # the slot is free again
        for bad in ("-5", "0", "abc", "1.5", "100001"):
            r = c.get("/api/metrics/history", params={"run_id": exp.run_id, "limit": bad})
            assert r.status_code == 400 and "limit" in r.json()["error"], (bad, r.text)
    finally:
        release.set()
        dash.stop()


def test_a_push_with_nothing_changed_carries_no_list_and_no_queue(tmp_path):
    """A push sends the experiment list only when it changed (whole when an experiment came
    or went, else only the views that changed) and a daemon's queue only when it changed:
    with everything ended, a second push carries neither. A new socket gets everything."""
    from dashboard.server import SENT_KEY
    from experiments.service import LabService

    service = LabService(tmp_path / "art", max_running=1)
    try:
        first = service.submit({**LATENCY, "name": "first"})
        service.submit({**LATENCY, "name": "second"})
        service.stop("second")  # cancelled while queued: it stays in the queue's list
        service.stop(first["id"])
        now = [0.0]
        source = PushSource(service.lab, service, max_age_s=0.1, clock=lambda: now[0])
        state: dict[str, int] = {}
        full = source.push(state)
        assert [e["id"] for e in full["experiments"]] == ["first"]
        assert [(q["id"], q["status"]) for q in full["queued"]] == [("second", "cancelled")]
        for _ in range(3):
            now[0] += 1  # a new read of the Lab each time: nothing in it changed
            push = source.push(state)
            assert "experiments" not in push and "updated" not in push and "queued" not in push, push
        assert set(state) - {SENT_KEY} <= {"first"}
        fresh = source.push({})  # another page, opened now
        assert [e["id"] for e in fresh["experiments"]] == ["first"] and fresh["queued"]
        third = service.submit({**LATENCY, "name": "third"})
        now[0] += 1
        push = source.push(state)
        assert [e["id"] for e in push["experiments"]] == ["first", third["id"]]  # one more: the list again
        service.stop(third["id"])
    finally:
        service.shutdown()
