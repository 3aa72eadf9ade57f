"""The lab daemon end to end: a real ``crucible lab serve`` process, its HTTP API, the client and the CLI."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from cli import main
from cli.run import REPEAT_SIGNAL_S
from dashboard.client import LabClient, LabClientError
from dashboard.security import MAX_BODY
from telemetry.jsonl import iter_run
from tests.fault_helpers import latency_spec

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
SERVE = (sys.executable, "-m", "supervisor", "lab", "serve")


class Daemon:
    """A ``crucible lab serve`` subprocess; ``url`` once it has printed it."""

    def __init__(self, artifacts: Path, max_experiments: int = 1, extra: tuple[str, ...] | list[str] = ()) -> None:
        self.artifacts = artifacts
        self.proc = subprocess.Popen(
            [*SERVE, "--artifacts", str(artifacts), "--port", "0", "--max-experiments", str(max_experiments), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = self.proc.stdout.readline()  # blocks until the daemon serves, or it exits (empty line)
        except BaseException:  # the test's timeout cut the wait short: no daemon outlives its test
            self.kill()
            raise
        if not line.startswith("lab daemon: "):
            self.proc.kill()
            raise AssertionError(f"daemon did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split()[2]
        self.token = (artifacts / "dashboard.token").read_text().strip()

    def client(self) -> LabClient:
        return LabClient(self.url, self.token)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(DEADLINE_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE_S)


def wait_for(pred, what: str, deadline: float = DEADLINE_S):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.05)  # polling a condition with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def statuses(client: LabClient) -> dict[str, tuple[str, int | None]]:
    return {e["id"]: (e["status"], e.get("position")) for e in client.list()}


def on_disk_status(artifacts: Path, exp_id: str) -> str:
    (run,) = [p for p in (artifacts / exp_id).iterdir() if p.is_dir()]
    return orjson.loads((run / "lifecycle.json").read_bytes())["status"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon") / "art", max_experiments=1)
    yield d
    d.kill()


def test_queue_order_and_control_through_the_cli(daemon, capsys, monkeypatch, tmp_path):
    c = daemon.client()
    a = c.submit(latency_spec("qa", budget=300))
    b = c.submit(latency_spec("qb", budget=300))
    spec_file = tmp_path / "qc.toml"
    spec_file.write_text('name = "qc"\ntime_budget_s = 300\n[workload]\nname = "latency"\n')
    token_file = str(daemon.artifacts / "dashboard.token")
    assert main(["submit", str(spec_file), "--set", "seed=7", "--to", daemon.url, "--token-file", token_file]) == 0
    assert orjson.loads(capsys.readouterr().out)["id"] == "qc"
    assert a["status"] == "running" and b == {"id": "qb", "status": "queued", "position": 1}
    assert statuses(c) == {"qa": ("running", None), "qb": ("queued", 1), "qc": ("queued", 2)}

    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    assert main(["pause", "qa", "--to", daemon.url]) == 0
    assert capsys.readouterr().out.strip() == "qa: paused"
    assert statuses(c)["qa"] == ("paused", None)
    assert main(["resume", "qa", "--to", daemon.url]) == 0
    assert statuses(c)["qa"] == ("running", None)
    # a queued item cannot be paused: one line, exit 2, and it stays queued
    with pytest.raises(SystemExit) as exit_:
        main(["pause", "qb", "--to", daemon.url])
    assert exit_.value.code == 2 and "queued" in capsys.readouterr().err
    # stopping the running one starts the next in submission order
    assert main(["stop", "qa", "--to", daemon.url]) == 0
    wait_for(lambda: statuses(c)["qb"][0] == "running", "qb to start after qa stopped")
    assert statuses(c) == {"qa": ("stopped", None), "qb": ("running", None), "qc": ("queued", 1)}
    assert on_disk_status(daemon.artifacts, "qa") == "stopped"
    # stop cancels a queued one: it never runs
    assert main(["stop", "qc", "--to", daemon.url]) == 0
    assert capsys.readouterr().out.strip().endswith("qc: cancelled")
    assert main(["ls", "--json", "--to", daemon.url]) == 0
    rows = {r["id"]: r["status"] for r in orjson.loads(capsys.readouterr().out)}
    assert rows == {"qa": "stopped", "qb": "running", "qc": "cancelled"}
    assert not (daemon.artifacts / "qc").exists()
    c.stop("qb")
    assert statuses(c)["qb"][0] == "stopped"


def test_bad_submissions_are_refused_with_the_reason_and_change_nothing(daemon):
    c = daemon.client()
    before = statuses(c)
    http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
    cases = [
        (dict(content="name = ", headers={"content-type": "application/toml"}), 400, "not valid TOML"),
        (dict(json={"spec": {**latency_spec("u"), "bogus": 1}}), 400, "bogus: unknown key"),
        (dict(json={"spec": {**latency_spec("w"), "seed": "five"}}), 400, "seed"),
        (dict(json={"spec": latency_spec("w"), "set": ["time_budget_s=soon"]}), 400, "time_budget_s"),
        (dict(json={"spec": latency_spec("../escape")}), 400, "name"),
        (dict(json={"spec": latency_spec("ok"), "id": "../../etc"}), 400, "experiment id"),
        (dict(json={"spec": latency_spec("queue.json")}), 400, "reserved"),
        (dict(json={"spec": latency_spec("ok"), "id": "history.sqlite3-wal"}), 400, "reserved"),
        (dict(json={"spec": latency_spec("ok"), "id": "Lab.lock"}), 400, "reserved"),
        (dict(json={"spec": latency_spec("ok"), "extra": 1}), 400, "extra"),
        (dict(content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/toml"}), 413, "over"),
        # a key given twice: refused, not the last one taken (it would run the second spec)
        (
            dict(
                content=b'{"spec": {"name": "a"}, "spec": {"name": "b"}}', headers={"content-type": "application/json"}
            ),
            400,
            "key 'spec' is given twice",
        ),
        # a query the route does not take: a typo would run the spec without its overrides
        (
            dict(content='name = "q"', headers={"content-type": "application/toml"}, params={"sets": "seed=3"}),
            400,
            "sets",
        ),
        (dict(json={"spec": latency_spec("q")}, params={"set": "seed=3"}), 400, '"set" and "id" go in it'),
        (
            dict(content='name = "q"', headers={"content-type": "application/toml"}, params=[("id", "a"), ("id", "b")]),
            400,
            "give one id",
        ),
    ]
    for kwargs, status, needle in cases:
        r = http.post("api/experiments", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert needle in r.json()["error"], (needle, r.json())
    with pytest.raises(LabClientError, match=r"400: .*bogus: unknown key") as err:
        c.submit({**latency_spec("v"), "bogus": 1})
    assert err.value.status == 400
    assert statuses(c) == before
    assert not (daemon.artifacts / "escape").exists() and not (daemon.artifacts.parent / "escape").exists()
    assert daemon.proc.poll() is None


def test_token_origin_and_host_are_checked(daemon):
    body = {"spec": latency_spec("intruder")}
    assert httpx.post(daemon.url + "api/experiments", json=body).status_code == 401
    assert httpx.get(daemon.url + "api/experiments").status_code == 401
    auth = {"Authorization": f"Bearer {daemon.token}"}
    foreign = httpx.post(daemon.url + "api/experiments", json=body, headers={**auth, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    rebound = httpx.post(daemon.url + "api/experiments", json=body, headers={**auth, "Host": "evil.example"})
    assert rebound.status_code == 400
    with pytest.raises(LabClientError, match="401: the token sent is not this dashboard's"):
        LabClient(daemon.url, "wrong-token").list()
    assert "this needs the dashboard token" in httpx.get(daemon.url + "api/experiments").json()["error"]  # none sent
    assert "intruder" not in statuses(daemon.client())


def test_a_token_file_named_wins_over_a_stale_token_in_the_environment(daemon, capsys, monkeypatch):
    """A CRUCIBLE_TOKEN left exported for another daemon does not shadow --token-file."""
    monkeypatch.setenv("CRUCIBLE_TOKEN", "stale-token-of-another-daemon")
    token_file = str(daemon.artifacts / "dashboard.token")
    assert main(["ls", "--to", daemon.url, "--token-file", token_file]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # without the file: the stale token, refused as such
        main(["ls", "--to", daemon.url])
    assert "the token sent is not this dashboard's" in capsys.readouterr().err


def test_a_second_daemon_on_the_same_folder_refuses(daemon):
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "lab", "serve", "--artifacts", str(daemon.artifacts), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()[-1]
    assert str(daemon.artifacts) in err and f"pid {daemon.proc.pid}" in err
    assert daemon.proc.poll() is None


def killed_with_a_queue(art: Path, names: list[str], recorded: bool = False) -> None:
    """A daemon (one experiment at a time) given ``names``, the first running and the others
    queued, then killed -9; ``recorded``: once the first has events on disk."""
    d = Daemon(art, max_experiments=1)
    try:
        c = d.client()
        assert c.submit(latency_spec(names[0], budget=300))["status"] == "running"
        for pos, name in enumerate(names[1:], 1):
            assert c.submit(latency_spec(name, budget=300))["position"] == pos
        if recorded:
            wait_for(lambda: next(iter_run(the_run(art, names[0])), None), f"{names[0]}'s first events")
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(DEADLINE_S)
    finally:
        d.kill()


def test_queue_survives_sigkill_and_sigterm_stops_every_run(tmp_path):
    art = tmp_path / "art"
    killed_with_a_queue(art, ["k1", "k2", "k3"])
    queued = [i["id"] for i in orjson.loads((art / "queue.json").read_bytes())["queue"]]
    assert queued == ["k2", "k3"]
    d2 = Daemon(art, max_experiments=3)  # room for k1 too, where the Lab recovers it
    try:
        c = d2.client()
        got = wait_for(lambda: statuses(c) if statuses(c).get("k3", ("",))[0] == "running" else None, "k2, k3")
        assert got["k2"][0] == "running" and got["k3"][0] == "running"
        assert orjson.loads((art / "queue.json").read_bytes())["queue"] == []
        assert c.submit(latency_spec("k4", budget=300))["position"] == 1
        assert d2.terminate() == 0
    finally:
        d2.kill()
    for exp_id in ("k2", "k3"):
        assert on_disk_status(art, exp_id) == "stopped"
    assert [i["id"] for i in orjson.loads((art / "queue.json").read_bytes())["queue"]] == ["k4"]
    log_lines = [orjson.loads(x) for x in (art / "daemon.log").read_text().splitlines()]
    assert any(x["event"] == "lab daemon stopped" for x in log_lines)
    assert not (art / "lab.lock").read_text().strip()  # released: no holder named


def test_a_daemon_whose_port_is_taken_resumes_and_starts_nothing(tmp_path):
    """The port is bound before the folder's runs are resumed and its queue started: a start
    that fails there (under a supervisor that restarts it, again and again) must not start
    them only to stop them for good, emptying the queue and ending crashed runs as stopped."""
    import socket

    art = tmp_path / "art"
    killed_with_a_queue(art, ["p1", "p2"], recorded=True)
    queue_before = (art / "queue.json").read_bytes()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        for _ in range(2):  # a supervisor restarting it
            r = subprocess.run(
                [*SERVE, "--artifacts", str(art), "--port", str(port), "--max-experiments", "2"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=DEADLINE_S,
            )
            assert r.returncode == 2, r.stderr[-2000:]
            assert "in use" in r.stderr.lower(), r.stderr[-2000:]
    finally:
        holder.close()
    assert (art / "queue.json").read_bytes() == queue_before  # p2 still waits, untouched
    assert on_disk_status(art, "p1") == "running"  # left by the kill: still resumable (crashed)
    assert not (art / "p2").exists()
    d2 = Daemon(art, max_experiments=2)  # the port free: both go on
    try:
        c = d2.client()
        got = wait_for(lambda: statuses(c) if statuses(c).get("p2", ("",))[0] == "running" else None, "p2 running")
        assert got["p1"][0] == "running"  # resumed, not stopped for good
    finally:
        d2.kill()


def test_the_queue_is_bounded_in_submissions_and_bytes_and_a_full_one_answers_429(tmp_path, monkeypatch):
    """Every change rewrites the whole queue file, and the queue lives in memory: it takes at
    most MAX_QUEUED submissions and MAX_QUEUE_BYTES of file; past that a submission is refused
    (429, saying why and what to do), nothing of it queued, and room comes back as items go."""
    import experiments.service as service_mod
    from dashboard.server import Dashboard
    from experiments.service import LabService, QueueFull

    monkeypatch.setattr(service_mod, "MAX_QUEUED", 3)
    monkeypatch.setattr(service_mod, "MAX_QUEUE_BYTES", 20_000)
    service = LabService(tmp_path / "art", max_running=1)
    dash = Dashboard(service, port=0)
    try:
        assert service.submit(latency_spec("run", budget=600))["status"] == "running"
        for i in range(3):
            assert service.submit(latency_spec(f"q{i}", budget=600))["position"] == i + 1
        with pytest.raises(QueueFull, match=r"the queue is full \(3 submissions waiting"):
            service.submit(latency_spec("q3", budget=600))
        r = httpx.post(
            dash.url + "api/experiments",
            json={"spec": latency_spec("q3", budget=600)},
            headers={"Authorization": f"Bearer {dash.token}"},
            timeout=30,
        )
        assert r.status_code == 429 and "the queue is full" in r.json()["error"]
        assert service.stop("q0")["status"] == "cancelled"  # room for one again
        big = latency_spec("big", budget=600) | {"hypothesis": "x" * 19_000}
        with pytest.raises(QueueFull, match=r"bytes of 20,000 in queue\.json"):
            service.submit(big)
        assert service.submit(latency_spec("q3", budget=600))["position"] == 3
        queued = [i["id"] for i in orjson.loads((tmp_path / "art" / "queue.json").read_bytes())["queue"]]
        assert queued == ["q1", "q2", "q3"]  # nothing of a refused one
    finally:
        dash.stop()
        service.shutdown()


def test_a_slow_start_holds_up_no_other_request(tmp_path):
    """A start runs outside the service's lock: while one experiment's tree takes its time to
    build (a big graph), listing, the control of another experiment and a submission are
    answered at once; the starting one is listed once, as starting, and a stop of it waits
    for its start and then stops it."""
    from experiments.service import LabService
    from experiments.workloads import register, unregister
    from experiments.workloads.latency import LatencyWorkload

    built = threading.Event()
    release = threading.Event()

    class SlowStart(LatencyWorkload):
        name = "slowstart"

        def __init__(self, params, seed=0):  # type: ignore[no-untyped-def]
            built.set()
            release.wait(120)
            super().__init__(params, seed)

    register("slowstart", SlowStart)
    service = LabService(tmp_path / "art", max_running=3)
    submitted: list[dict] = []
    try:
        assert service.submit(latency_spec("other", budget=600))["status"] == "running"
        slow = latency_spec("slow", budget=600)
        slow["workload"] = {**slow["workload"], "name": "slowstart"}
        t = threading.Thread(target=lambda: submitted.append(service.submit(slow)))
        t.start()
        assert built.wait(60)  # the slow tree is being built now, its submission waiting on it
        rows = {e["id"]: e["status"] for e in service.list(history=False)}
        assert rows == {"other": "running", "slow": "starting"}  # the Lab holds its handle already: still starting
        assert [e["id"] for e in service.list(history=False)].count("slow") == 1
        assert service.pause("other")["status"] == "paused"
        assert service.resume("other")["status"] == "running"
        assert service.submit(latency_spec("third", budget=600))["position"] == 1  # waits its turn, answered now
        assert service.stop("other")["status"] == "stopped"  # its tree goes down while the other is built
        stopper = threading.Thread(target=lambda: submitted.append(service.stop("slow")))
        stopper.start()
        assert t.is_alive() and stopper.is_alive()  # both wait for the start, nothing else did
        release.set()
        t.join(60)
        stopper.join(60)
        assert submitted[0]["id"] == "slow" and submitted[1] == {"id": "slow", "status": "stopped"}
        wait_for(
            lambda: (
                service.list(history=False)
                and dict((e["id"], e["status"]) for e in service.list(history=False)).get("third") == "running"
            ),
            "the third to start once the slow one stopped",
        )
    finally:
        release.set()
        service.shutdown()
        unregister("slowstart")


def test_a_submissions_answer_waits_for_its_own_start_alone(tmp_path):
    """The submission whose thread starts the queue answers once its own experiment has
    started; the next queued one starts in the background, not before that answer."""
    from experiments.service import LabService
    from experiments.workloads import register, unregister
    from experiments.workloads.latency import LatencyWorkload

    gates = {1: threading.Event(), 2: threading.Event()}
    building = {1: threading.Event(), 2: threading.Event()}

    class Gated(LatencyWorkload):
        name = "gated"

        def __init__(self, params, seed=0):  # type: ignore[no-untyped-def]
            building[seed].set()
            gates[seed].wait(120)
            super().__init__(params, seed)

    def gated(name: str, seed: int) -> dict:
        spec = latency_spec(name, budget=600) | {"seed": seed}
        spec["workload"] = {**spec["workload"], "name": "gated"}
        return spec

    register("gated", Gated)
    service = LabService(tmp_path / "art", max_running=3)
    answers: list[dict] = []
    try:
        a = threading.Thread(target=lambda: answers.append(service.submit(gated("ga", 1))))
        a.start()
        assert building[1].wait(60)
        assert service.submit(gated("gb", 2))["status"] == "queued"  # behind ga's start: answered at once
        gates[1].set()
        a.join(60)
        assert not a.is_alive() and answers[0]["id"] == "ga"  # answered with gb's start still under way
        assert building[2].wait(60)
        assert {e["id"]: e["status"] for e in service.list(history=False)}["gb"] == "starting"
        gates[2].set()
        wait_for(lambda: {e["id"]: e["status"] for e in service.list(history=False)}["gb"] == "running", "gb")
    finally:
        for g in gates.values():
            g.set()
        service.shutdown()
        unregister("gated")


def test_a_stop_asked_while_the_queue_is_being_started_starts_no_more_of_it(tmp_path):
    """A SIGTERM at a daemon's boot (``start(should_stop=...)``): the start under way
    finishes, no other is begun, and the rest stay queued for the next start."""
    from experiments.service import LabService

    service = LabService(tmp_path / "art", max_running=3, start=False)
    try:
        for name in ("b1", "b2", "b3"):
            assert service.submit(latency_spec(name, budget=600))["status"] == "queued"  # before start: waits
        asked = []

        def stop_after_the_first() -> bool:
            asked.append(1)
            return len(asked) > 1

        service.start(should_stop=stop_after_the_first)
        rows = {e["id"]: e["status"] for e in service.list(history=False)}
        assert rows == {"b1": "running", "b2": "queued", "b3": "queued"}
    finally:
        service.shutdown()
    queued = [i["id"] for i in orjson.loads((tmp_path / "art" / "queue.json").read_bytes())["queue"]]
    assert queued == ["b2", "b3"]


def test_a_sigterm_delivered_twice_at_once_still_stops_cleanly(tmp_path):
    """``timeout``, systemd and a shell's process-group kill may deliver one stop twice: the
    handlers stay installed through the whole stop, so the repeat is ignored (not the
    default action, exit 143 mid-stop with the runs left ``running``)."""
    art = tmp_path / "art"
    d = Daemon(art, max_experiments=1)
    try:
        assert d.client().submit(latency_spec("t1", budget=300))["status"] == "running"
        wait_for(lambda: next(iter_run(the_run(art, "t1")), None), "t1's first events")
        first = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:  # the second copy lands once the stop is under way (its first line logged)
            wait_for(lambda: "lab daemon stopping" in (art / "daemon.log").read_text(), "the stop to begin")
        finally:
            gap = time.monotonic() - first
            d.proc.send_signal(signal.SIGTERM)
        code = d.proc.wait(DEADLINE_S)
    finally:
        d.kill()
    if gap >= REPEAT_SIGNAL_S:  # a machine so loaded that it came late: a second request, which ends it at once
        assert code == 128 + signal.SIGTERM
        return
    assert code == 0
    assert on_disk_status(art, "t1") == "stopped"
    assert not (art / "lab.lock").read_text().strip()


def the_run(artifacts: Path, exp_id: str) -> Path:
    (run,) = [p for p in (artifacts / exp_id).iterdir() if p.is_dir()]
    return run


def test_memory_stays_bounded_ended_handles_are_dropped_and_still_listed(tmp_path):
    """A daemon runs thousands of experiments: past ``keep_ended`` it drops the handles of the
    oldest ended ones (their runs stay on disk and in ``list``); a live one is never dropped."""
    from experiments.lab import NotRunning
    from experiments.service import LabService

    service = LabService(tmp_path / "art", max_running=1, keep_ended=2)
    try:
        for i in range(5):
            service.submit(latency_spec(f"e{i}", budget=0.2))
        wait_for(lambda: all(e["status"] == "stopped" for e in service.list()), "every experiment to end")
        wait_for(lambda: len(service.lab.experiments) <= 2, "old handles dropped")
        assert {e["id"]: e["status"] for e in service.list()} == {f"e{i}": "stopped" for i in range(5)}
        live = service.submit(latency_spec("live", budget=600))
        assert live["status"] == "running"
        with pytest.raises(NotRunning, match="only an ended one"):
            service.lab.forget("live")
        service.stop("live")
    finally:
        service.shutdown()


def test_cancelled_submissions_are_bounded_too(tmp_path):
    """Submissions that never ran (cancelled while queued) are kept for ``list`` and across
    restarts, but only the last ``keep_ended`` of them: a daemon cancelling thousands of
    queued items must not grow its memory or its queue file without end."""
    from experiments.service import LabService

    art = tmp_path / "art"
    service = LabService(art, max_running=1, keep_ended=2)
    try:
        service.submit(latency_spec("live", budget=600))
        for i in range(5):
            assert service.submit(latency_spec(f"q{i}", budget=1))["status"] == "queued"
            assert service.stop(f"q{i}")["status"] == "cancelled"
        listed = {e["id"]: e["status"] for e in service.list(history=False)}
        assert listed == {"live": "running", "q3": "cancelled", "q4": "cancelled"}
        assert set(orjson.loads((art / "queue.json").read_bytes())["ended"]) == {"q3", "q4"}
        service.stop("live")
    finally:
        service.shutdown()


def test_a_restarted_daemon_keeps_its_token_unless_the_file_is_doubtful(tmp_path):
    """Clients hold the daemon's token: a crash-restart must not lock them out. A token file
    that others could read, or that is a link, is not trusted: a new token is made."""
    art = tmp_path / "art"
    first = Daemon(art)
    token = first.token
    first.kill()
    second = Daemon(art)
    try:
        assert second.token == token
        assert second.client().list() == []
    finally:
        second.kill()
    (art / "dashboard.token").chmod(0o644)
    third = Daemon(art)
    try:
        assert third.token != token
        assert (art / "dashboard.token").stat().st_mode & 0o777 == 0o600
    finally:
        third.kill()


def _colour_spec(name: str, graph_file: str) -> dict:
    return {
        "name": name,
        "time_budget_s": 1,
        "workload": {"name": "coloring", "params": {"graph": {"file": graph_file}, "phases": ["tabu"]}},
    }


def test_a_submission_reads_files_only_from_the_data_folders(tmp_path):
    """Whoever holds the token may run experiments, not read the daemon's files: a graph file
    outside ``data_dirs`` (or linked out of one) is refused before anything is queued, with no
    word of its contents; shipped instances and files in a data folder are admitted."""
    from experiments.admission import check_data_dir
    from experiments.service import LabService

    secret = tmp_path / "secret.col"
    secret.write_text("secret_password_123\n")
    data = tmp_path / "graphs"
    data.mkdir()
    (data / "tiny.col").write_text("p edge 3 2\ne 1 2\ne 2 3\n")
    (data / "link.col").symlink_to(secret)
    art = tmp_path / "art"
    service = LabService(art, max_running=1, data_dirs=[data])
    try:
        said = set()
        missing = str(tmp_path / "no_such_file.col")
        for bad in (str(secret), str(data / "link.col"), str(data / ".." / "secret.col"), "/etc/passwd", missing):
            with pytest.raises(ValueError, match="outside the daemon's data folders") as err:
                service.submit(_colour_spec("leak", bad))
            assert "secret_password" not in str(err.value) and "root:" not in str(err.value)
            said.add(str(err.value))
        # one answer for all: neither whether a file outside exists nor where a link points is told
        assert len(said) == 1 and str(secret) not in said.pop()
        with pytest.raises(ValueError, match="outside the daemon's data folders"):
            service.submit(_colour_spec("proc", "/proc/1/cwd/."))  # no permission to look: refused as named
        assert service.list(history=False) == [] and not (art / "queue.json").exists()
        assert service.submit(_colour_spec("mine", str(data / "tiny.col")))["id"] == "mine"
        assert service.submit(_colour_spec("shipped", "myciel5"))["id"] == "shipped"
        assert oct((art / "queue.json").stat().st_mode & 0o777) == "0o600"  # specs are the owner's
    finally:
        service.shutdown()
    closed = LabService(tmp_path / "art2", max_running=1)  # no data folder: shipped instances only
    try:
        with pytest.raises(ValueError, match=r"none \(start the daemon with --data-dir\)"):
            closed.submit(_colour_spec("mine", str(data / "tiny.col")))
    finally:
        closed.shutdown()
    for bad in (tmp_path / "missing", secret):
        with pytest.raises(ValueError, match="data folder"):
            check_data_dir(bad)


def test_a_submission_calls_only_the_targets_the_daemon_allows(tmp_path):
    """Whoever holds the token may run experiments, not run code as the daemon's user: a latency
    target (code or URL) the daemon does not allow is refused before anything is queued."""
    from experiments.admission import check_target_rule, target_allowed
    from experiments.service import LabService

    def timing(target):
        return {"name": "t", "time_budget_s": 0.2, "workload": {"name": "latency", "params": {"target": target}}}

    art = tmp_path / "art"
    service = LabService(art, max_running=1, allow_targets=["json:*", "http://127.0.0.1:9/api/"])
    try:
        for bad in (
            "os:system",
            "math:factorial",  # math's functions whose time grows with a number in the spec
            "math:comb",
            "time:sleep",  # a stop cannot cut a call short: the operator's to allow
            "subprocess:run",
            "builtins:exec",
            "json.decoder:*",
            "json:*",
            "http://127.0.0.1:9/",
            "http://127.0.0.1:8/api/",
            "https://127.0.0.1:9/api/",
            "http://169.254.169.254/api/",
            "http://x@127.0.0.1:9/api/",
        ):
            with pytest.raises(ValueError, match="is not allowed on this daemon"):
                service.submit(timing(bad))
        assert service.list(history=False) == [] and not (art / "queue.json").exists()
        assert "this" not in sys.modules  # refused before its module was imported: an import runs code
        for good in ("math:sqrt", "math:hypot", "json:dumps"):  # defaults, and what --allow-target added
            assert service.submit(timing(good))["status"] in ("running", "queued")
        assert service.submit({"name": "d", "workload": {"name": "latency"}})["status"] in ("running", "queued")
    finally:
        service.shutdown()
    assert target_allowed("http://127.0.0.1:9/api/v1?x=1", ["http://127.0.0.1:9/api/"])
    assert not target_allowed("http://127.0.0.1:9/apix", ["http://127.0.0.1:9/api/"])
    for rule in ("os", "os:", ":f", "a b:c", "ftp://h/", "http://", "http://u:p@h/", "http://h:99999/"):
        with pytest.raises(ValueError, match="must be 'module:function'"):
            check_target_rule(rule)


def test_the_default_targets_cannot_hold_a_phase_for_long():
    """What any token holder may call: real functions, none whose time grows with a number in
    the spec, and the default workload's own task bounded in size."""
    import math

    from experiments.admission import BOUNDED_MATH, DEFAULT_TARGETS
    from experiments.workloads.latency import CHECKSUM_MAX_BYTES, checksum_work

    assert all(callable(getattr(math, f)) for f in BOUNDED_MATH)
    assert not {"math:factorial", "math:comb", "math:perm", "time:sleep", "math:*"} & set(DEFAULT_TARGETS)
    for big in (10**300, 1e308, -1e308, float("inf"), 2**63 - 1):  # an error or an answer, at once
        for f in ("sqrt", "exp", "log", "pow", "hypot", "sin", "floor", "fmod"):
            fn = getattr(math, f)
            try:
                fn(big, big) if f in ("pow", "hypot", "fmod") else fn(big)
            except (ValueError, OverflowError):
                pass
    for bad in (CHECKSUM_MAX_BYTES + 1, 10**12, -1, 2.5, True, "1"):
        with pytest.raises(ValueError, match=r"checksum_work: size must be .* got "):
            checksum_work(bad)
    assert checksum_work(64)["bytes"] == 64


def test_the_default_task_holds_a_bounded_amount_of_memory_however_many_calls_run_at_once(monkeypatch):
    """``concurrency`` (up to 256, steerable) times the per-call cap would be tens of GB in
    one daemon; the calls of a process share one budget, a call past it waiting for room.
    Measured with tracemalloc: sixteen 4 MiB calls started together under a 16 MiB budget."""
    import tracemalloc

    from experiments.workloads import latency

    size = 4 * 2**20
    monkeypatch.setattr(latency, "CHECKSUM_BUDGET_BYTES", 4 * size)  # room for two calls (each holds 2 x size)
    start = threading.Barrier(16)
    results: list[dict] = []

    def call() -> None:
        start.wait(60)
        results.append(latency.checksum_work(size))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(results) == 16 and all(r["bytes"] == size for r in results)
    assert peak < 6 * size, f"peak {peak / 2**20:.0f} MiB"  # two calls' worth and change, not sixteen
    assert latency._checksum_in_use == 0  # every call gave its room back
    # a call that finds no room within CHECKSUM_WAIT_S fails, so that queued calls cannot hold a stop
    monkeypatch.setattr(latency, "CHECKSUM_WAIT_S", 0.05)
    with latency._checksum_room:
        latency._checksum_in_use = latency.CHECKSUM_BUDGET_BYTES  # as if others held it all
    try:
        with pytest.raises(TimeoutError, match=r"checksum_work: no room for 4,194,304 bytes within 0\.05 s"):
            latency.checksum_work(size)
    finally:
        with latency._checksum_room:
            latency._checksum_in_use = 0


def test_a_queued_submission_is_checked_again_when_it_starts(tmp_path):
    """A link in a data folder that points elsewhere by the time the queued experiment starts:
    it fails to start, naming the rule, and no word of the file's contents is shown."""
    from experiments.service import LabService

    secret = tmp_path / "secret.col"
    secret.write_text("secret_password_123\n")
    data = tmp_path / "graphs"
    data.mkdir()
    (data / "ok.col").write_text("p edge 3 2\ne 1 2\ne 2 3\n")
    (data / "swap.col").symlink_to(data / "ok.col")
    service = LabService(tmp_path / "art", max_running=1, data_dirs=[data])
    try:
        blocker = service.submit(latency_spec("blocker", budget=600))
        queued = service.submit(_colour_spec("later", str(data / "swap.col")))
        assert queued["status"] == "queued"
        (data / "swap.col").unlink()
        (data / "swap.col").symlink_to(secret)
        service.stop(blocker["id"])
        wait_for(
            lambda: {e["id"]: e["status"] for e in service.list(history=False)}[queued["id"]] == "failed",
            "the queued item to be refused at its start",
        )
        (entry,) = [e for e in service.list(history=False) if e["id"] == queued["id"]]
        assert "outside the daemon's data folders" in entry["reason"] and "secret_password" not in entry["reason"]
    finally:
        service.shutdown()


def test_ids_of_earlier_lifetimes_are_not_given_again(tmp_path):
    from experiments.service import LabService

    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        first = service.submit(latency_spec("same", budget=0.2))
        service.get(first["id"]).wait(DEADLINE_S)
    finally:
        service.shutdown()
    again = LabService(art, max_running=1)  # a new lifetime: the first is only on disk now
    try:
        second = again.submit(latency_spec("same", budget=0.2))
        assert (first["id"], second["id"]) == ("same", "same-2")
        again.get(second["id"]).wait(DEADLINE_S)
    finally:
        again.shutdown()


def test_serve_refuses_a_history_it_cannot_open_and_submit_says_when_nothing_runs(tmp_path, capsys):
    proc = subprocess.run(
        [*SERVE, "--artifacts", str(tmp_path / "a"), "--port", "0", "--history", str(tmp_path / "no" / "h.sqlite3")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 2 and "cannot be opened" in proc.stderr.splitlines()[-1], proc.stderr
    data = tmp_path / "graphs"
    data.mkdir()
    (data / "loop.col").write_text("p edge 2 1\ne 1 1\n")  # admitted; fails when the experiment starts
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'name = "g"\n[workload]\nname = "coloring"\n[workload.params]\ngraph = {{ file = "{data}/loop.col" }}\n'
    )
    d = Daemon(tmp_path / "art", extra=["--data-dir", str(data)])
    try:
        capsys.readouterr()
        code = main(["submit", str(spec), "--to", d.url, "--token-file", str(d.artifacts / "dashboard.token")])
        out, err = capsys.readouterr()
        assert code == 1 and '"status":"failed"' in out and "self-loop" in err, (out, err)
    finally:
        d.kill()


def test_ids_made_unique_stay_within_the_id_limit_and_can_be_cancelled(tmp_path):
    from experiments.service import LabService

    service = LabService(tmp_path / "art", max_running=1)
    long_id = "b" * 128
    try:
        assert service.submit(latency_spec("x", budget=600), experiment_id=long_id)["status"] == "running"
        second = service.submit(latency_spec("x", budget=600), experiment_id=long_id)
        third = service.submit(latency_spec("x", budget=600), experiment_id=long_id)
        assert second["id"] == "b" * 126 + "-2" and third["id"] == "b" * 126 + "-3"
        assert second["status"] == third["status"] == "queued"
        assert service.stop(second["id"])["status"] == "cancelled"
        service.stop(long_id)
        wait_for(
            lambda: {e["id"]: e["status"] for e in service.list(history=False)}[third["id"]] == "running",
            "the third to start",
        )
        service.stop(third["id"])
    finally:
        service.shutdown()


def test_client_mistakes_are_one_line_errors(daemon, tmp_path, capsys, monkeypatch):
    """What a user mistypes or pastes gives one line and exit 2, never a traceback."""
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    cases = [
        (["submit", str(binary), "--to", daemon.url], "not UTF-8 text"),
        (["ls", "--to", "http://[::1"], "is not a URL"),
        (["ls", "--to", f"{daemon.url}?token={daemon.token}"], f"give its base URL, {daemon.url}"),
        (["ls", "--to", f"{daemon.url}#code=abc"], f"give its base URL, {daemon.url}"),  # the printed sign-in link
        (["ls", "--to", "127.0.0.1:7878"], "must be http://HOST:PORT"),
        (["ls", "--to", f"{daemon.url}api"], f"names its API path: give its base URL, {daemon.url} "),
        (["ls", "--to", f"{daemon.url}lab/api/experiments"], f"give its base URL, {daemon.url}lab/ "),
        (["ls", "--to", f"{daemon.url}api/crucible/"], "404"),  # a proxy prefix: taken as a base URL (here: a 404)
        (["ls", "--to", daemon.url.replace("http://", "http://me:hunter2@")], "has a user name or password"),
        (["submit", str(tmp_path), "--to", daemon.url], "a folder, not a file"),
        (["ls", "--to", daemon.url, "--token-file", ""], "path (--token-file) is empty"),  # not the current folder
        (["ls", "--to", daemon.url, "--token-file", " "], "path (--token-file) is empty"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and needle in err and "Traceback" not in err, (argv, err)
        assert "hunter2" not in err
    monkeypatch.setenv("CRUCIBLE_TOKEN", "tökén")
    with pytest.raises(SystemExit) as exit_:
        main(["ls", "--to", daemon.url])
    assert exit_.value.code == 2 and "URL-safe ASCII" in capsys.readouterr().err


def test_the_python_client_names_a_non_finite_number_before_sending(daemon):
    """JSON has no NaN: the client says which field holds one (a bare ValueError of the
    encoder named none), and nothing reaches the daemon."""
    with LabClient(daemon.url, daemon.token) as client:
        before = client.list(history=False)
        spec = latency_spec("nanspec", budget=float("nan"))
        with pytest.raises(LabClientError, match=r"the spec's field time_budget_s must be a finite number, got nan"):
            client.submit(spec)
        spec = latency_spec("infspec") | {"workload": {"name": "latency", "params": {"concurrency": [1, float("inf")]}}}
        with pytest.raises(LabClientError, match=r"workload\.params\.concurrency\[1\] must be a finite number"):
            client.submit(spec)
        with pytest.raises(LabClientError, match=r"control 'concurrency' must be a finite number, got nan"):
            client.set_param("whatever", "concurrency", float("nan"))
        assert client.list(history=False) == before


@pytest.mark.parametrize("status", [200, 502])
def test_a_server_that_is_not_a_lab_daemon_is_one_line_and_exit_2(status, capsys, monkeypatch):
    """Another program on the port (a web server, a proxy's long error page)."""
    page = b"<html>\n<body>" + b"<p>not here</p>\n" * 5000 + b"</body></html>"

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("CRUCIBLE_TOKEN", "some-token")
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["ls", "--to", f"http://127.0.0.1:{srv.server_address[1]}/"])
    finally:
        srv.shutdown()
        srv.server_close()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 600, err
    assert "not a lab daemon" in err and (status == 200 or "answered 502 Bad Gateway without" in err), err


@pytest.mark.parametrize("body", [b"{}", b"[]", b'[1, 2, "x"]', b'{"experiments": [{"id": 1}]}', b"null"])
def test_a_server_that_answers_200_with_other_json_is_one_line_and_exit_2(body, capsys, monkeypatch, tmp_path):
    """Another program on the port that answers 200 with JSON, though not a lab daemon's: each
    command says so in one line, and ``ls`` does not print an empty table as a success."""

    class Json(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer()

        def do_POST(self):
            self.answer()

        def log_message(self, *args):
            pass

    spec = tmp_path / "spec.toml"
    spec.write_text('name = "x"\n')
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Json)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("CRUCIBLE_TOKEN", "some-token")
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    try:
        for argv in (["ls"], ["steer", "lat1", "calls_per_step=3"], ["pause", "lat1"], ["open"], ["submit", str(spec)]):
            with pytest.raises(SystemExit) as exit_:
                main([*argv, "--to", url])
            captured = capsys.readouterr()
            err = captured.err
            assert exit_.value.code == 2 and "Traceback" not in err and not captured.out, (argv, err)
            assert len(err.strip().splitlines()) == 1 and "JSON that is not a lab daemon's" in err, (argv, err)
    finally:
        srv.shutdown()
        srv.server_close()


def test_steering_a_running_experiment_through_the_cli_and_the_api(daemon, capsys, monkeypatch):
    """``crucible steer`` and ``POST /api/control/set`` change a control at the phase's next safe
    point (recorded as a control event); a value the workload refuses, a malformed request or
    a queued experiment is a clear refusal that changes nothing."""
    c = daemon.client()
    wait_for(lambda: all(s != "running" for s, _ in statuses(c).values()), "the slot to be free")
    assert c.submit(latency_spec("steered", budget=300))["status"] == "running"
    assert c.submit(latency_spec("waiting", budget=300))["status"] == "queued"
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    try:
        assert main(["steer", "steered", "concurrency=3", "--why", "more load", "--to", daemon.url]) == 0
        assert capsys.readouterr().out.strip() == "steered: concurrency 1 -> 3 (running)"
        assert main(["steer", "steered", "timeout_s=2.5", "--json", "--to", daemon.url]) == 0
        answer = orjson.loads(capsys.readouterr().out)
        assert answer["result"] == {"ok": True, "key": "timeout_s", "before": 10.0, "after": 2.5}
        refused = [
            (["steered", "concurrency=0"], "concurrency"),  # out of its range: the workload says so
            (["steered", "no_such=1"], "no tunable parameter 'no_such'"),
            (["steered", "concurrency=1e400"], "must be a finite number"),  # refused before it is sent
            (["steered", "concurrency=nan"], "'nan' is not a finite number"),  # as Python prints it, not text
            (["steered", "concurrency=-inf"], "'-inf' is not a finite number"),
            (["steered", "concurrency=99999999999999999999"], "64 bits"),
            (["steered", "concurrency"], "expected KEY=VALUE"),
            (["waiting", "concurrency=2"], "queued"),
            (["nobody", "concurrency=2"], "404"),
            (["nobody", "concurrency=2"], "; queued: waiting"),  # the queue named too
        ]
        for argv, said in refused:
            with pytest.raises(SystemExit) as exit_:
                main(["steer", *argv, "--to", daemon.url])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and said in err, (argv, err)
        http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
        bad_bodies = [
            (b'{"experiment": "steered", "key": "concurrency", "value": NaN}', "not valid JSON"),
            (b'{"experiment": "steered", "key": "concurrency"}', '"value" is missing'),
            (b'{"experiment": "steered", "key": "concurrency", "value": 2, "extra": 1}', "unknown key(s) extra"),
            (b'{"experiment": "steered", "key": "", "value": 2}', '"key" must name a control'),
            (b'{"experiment": "steered", "key": "x\\ud800", "value": 2}', "not valid text"),
            (b'{"experiment": "steered", "key": "concurrency", "value": 2, "why": 7}', '"why" must be a string'),
            (b"[1]", "must be a JSON object"),
        ]
        for body, said in bad_bodies:
            r = http.post("api/control/set", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and said in r.json()["error"], (body, r.text)
        run = next(p for p in (daemon.artifacts / "steered").iterdir() if p.is_dir())

        def controls() -> list[str]:
            return [e["notes"] for e in iter_run(run) if e["name"] == "control"]

        wait_for(lambda: len(controls()) >= 2, "the two changes in the run's events")
        assert controls()[:2] == ["concurrency: 1 -> 3 (more load)", "timeout_s: 10.0 -> 2.5 (crucible steer)"]
        assert c.set_param("steered", "concurrency", 2)["result"]["after"] == 2  # the client's own call
    finally:
        c.stop("waiting")
        c.stop("steered")


def test_crucible_open_prints_a_new_sign_in_link_each_time(daemon, capsys, monkeypatch):
    """The link the daemon printed works once; ``crucible open`` prints another, for the holder
    of the token, and each one is traded for the token once."""
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    links = []
    for _ in range(2):
        assert main(["open", "--to", daemon.url]) == 0
        links.append(capsys.readouterr().out.strip())
    assert links[0] != links[1] and all(link.startswith(daemon.url.rstrip("/") + "/#code=") for link in links)
    http = httpx.Client(base_url=daemon.url, timeout=30)
    code = links[0].split("#code=", 1)[1]
    first = http.post("api/login", json={"code": code}, headers={"origin": daemon.url.rstrip("/")})
    assert first.status_code == 200 and first.json()["token"] == daemon.token
    again = http.post("api/login", json={"code": code}, headers={"origin": daemon.url.rstrip("/")})
    assert again.status_code == 401
    assert http.post("api/sign-in-link").status_code == 401  # no token, no link
