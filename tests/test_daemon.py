"""The lab daemon end to end: a real ``crucible lab serve`` process, its HTTP API, the client and the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from cli import main
from dashboard.client import LabClient, LabClientError
from dashboard.security import MAX_BODY
from tests.fault_helpers import latency_spec

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 60.0
SERVE = (sys.executable, "-m", "supervisor", "lab", "serve")


class Daemon:
    """A ``crucible lab serve`` subprocess; ``url`` once it has printed it."""

    def __init__(self, artifacts: Path, max_experiments: int = 1) -> None:
        self.artifacts = artifacts
        self.proc = subprocess.Popen(
            [*SERVE, "--artifacts", str(artifacts), "--port", "0", "--max-experiments", str(max_experiments)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # blocks until the daemon serves, or it exits (empty line)
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
        (dict(json={"spec": latency_spec("ok"), "extra": 1}), 400, "extra"),
        (dict(content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/toml"}), 413, "over"),
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
    with pytest.raises(LabClientError, match="401"):
        LabClient(daemon.url, "wrong-token").list()
    assert "intruder" not in statuses(daemon.client())


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


def test_queue_survives_sigkill_and_sigterm_stops_every_run(tmp_path):
    art = tmp_path / "art"
    d = Daemon(art, max_experiments=1)
    try:
        c = d.client()
        assert c.submit(latency_spec("k1", budget=300))["status"] == "running"
        assert c.submit(latency_spec("k2", budget=300))["position"] == 1
        assert c.submit(latency_spec("k3", budget=300))["position"] == 2
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(DEADLINE_S)
    finally:
        d.kill()
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
