"""Edges of keyed submissions and of the commands around them that a hostile user finds: a
hand-edited queue file's keys, two ``Idempotency-Key`` headers, a client's own retry seen by
``crucible submit``, ``--help`` with stdout closed, and a history retry that would never back off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

import dashboard.client as client_mod
from actors.recorder import Recorder
from cli import main
from cli.exits import EXIT_OUTPUT_CLOSED
from dashboard.client import IDEMPOTENCY_HEADER
from experiments.service import KEYS_KEPT, LabService
from telemetry.rundir import QUEUE_FILE
from tests import test_daemon
from tests.fault_helpers import latency_spec, until
from tests.test_daemon import statuses
from tests.test_submit_idempotency import LoseAnswers

ROOT = Path(__file__).resolve().parents[1]

daemon = test_daemon.daemon  # the same module fixture: a lab daemon of this module's own


def test_a_hand_edited_queue_files_keys_are_checked_and_bounded(tmp_path):
    """Keys that submit could never have written (a key it refuses, an id that is no path
    component, extra fields) are dropped at load, and a file with far more keys than are kept
    loads only the newest: memory stays bounded before the first save trims it."""
    art = tmp_path / "art"
    art.mkdir()
    many = {f"k{i}": {"id": "old", "digest": "0" * 64} for i in range(KEYS_KEPT + 500)}
    bad = {
        "bad key": {"id": "x", "digest": "d"},
        "": {"id": "x", "digest": "d"},
        "up": {"id": "../../elsewhere", "digest": "d"},
        "empty": {"id": "", "digest": "d"},
        "long": {"id": "x" * 10_000, "digest": "d"},
        "nodigest": {"id": "x"},
        "fat": {"id": "ok", "digest": "d", "junk": "j" * 100_000},
    }
    data = {"schema": 1, "queue": [], "keys": {**many, **bad}}
    (art / QUEUE_FILE).write_bytes(orjson.dumps(data))
    service = LabService(art, max_running=1)
    try:
        keys = service._keys
        assert len(keys) <= KEYS_KEPT
        assert keys["fat"] == {"id": "ok", "digest": "d"}
        assert not {"bad key", "", "up", "empty", "long", "nodigest"} & set(keys)
        assert f"k{KEYS_KEPT + 499}" in keys and "k0" not in keys
    finally:
        service.shutdown()


def test_two_idempotency_key_headers_are_refused_not_guessed(daemon):
    http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
    body = orjson.dumps({"spec": latency_spec("dup", budget=600)})
    headers = [("content-type", "application/json"), (IDEMPOTENCY_HEADER, "one"), (IDEMPOTENCY_HEADER, "two")]
    resp = http.post("api/experiments", content=body, headers=headers)
    assert resp.status_code == 400 and IDEMPOTENCY_HEADER in resp.json()["error"]
    assert not [i for i in statuses(daemon.client()) if i.startswith("dup")]


@pytest.mark.parametrize("key", [None, "own-key-1"])
def test_submit_does_not_claim_a_key_was_used_before_after_its_own_retry(daemon, tmp_path, capsys, monkeypatch, key):
    """A repeat met by the client's own retry can be this very submission (its first answer was
    lost): no 'already submitted with this --key', with or without --key; the entry says
    ``retried``."""
    spec = tmp_path / "r.toml"
    name = f"own{'-k' if key else ''}"
    spec.write_text(f'name = "{name}"\ntime_budget_s = 600\n[workload]\nname = "latency"\n')
    lossy = LoseAnswers(1)
    real_init = client_mod.LabClient.__init__

    def lossy_init(self, *a, **kw):  # type: ignore[no-untyped-def]
        real_init(self, *a, **{**kw, "transport": lossy})

    monkeypatch.setattr(client_mod.LabClient, "__init__", lossy_init)
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    assert main(["submit", str(spec), "--to", daemon.url, *(["--key", key] if key else [])]) == 0
    out, err = capsys.readouterr()
    entry = orjson.loads(out)
    assert lossy.lost == 1 and entry["id"] == name and entry["repeated"] is True and entry["retried"] is True
    assert "already submitted" not in err
    monkeypatch.undo()
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    if key:  # run again without a lost answer: now it is a resubmission, and says so
        assert main(["submit", str(spec), "--to", daemon.url, "--key", key]) == 0
        out, err = capsys.readouterr()
        assert "retried" not in orjson.loads(out) and f"already submitted with this --key, as {name}" in err
    daemon.client().stop(name)


def test_help_with_stdout_closed_ends_as_it_warned():
    """``crucible --help >&-`` says its output is lost: it ends with 141, as on a closed pipe, not 0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for argv in (["--help"], ["list", "--help"]):
        p = subprocess.run(
            [sys.executable, "-m", "supervisor", *argv],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: os.close(1),
            timeout=120,
        )
        assert b"stdout is closed" in p.stderr and b"Traceback" not in p.stderr
        assert p.returncode == EXIT_OUTPUT_CLOSED, argv


def test_a_daemon_started_without_stdout_serves_and_ends_as_it_would_have(tmp_path):
    """A service manager may start ``lab serve`` with stdout closed: the daemon's product is its
    runs and its log, so a SIGTERM ends it with 0, as with a stdout, not 141."""
    art = tmp_path / "art"
    p = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "lab", "serve", "--artifacts", str(art), "--port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
    )
    try:
        log = art / "daemon.log"
        until(lambda: log.exists() and b"lab daemon serving" in log.read_bytes(), timeout=60, what="the daemon")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    assert p.returncode == 0, err
    assert b"stdout is closed" in err and b"Traceback" not in err
    assert b"lab daemon stopped" in (art / "daemon.log").read_bytes()


@pytest.mark.parametrize("retry", [(0, 5.0), (0.0, 0.0), (-0.0, 1.0)])
def test_a_history_retry_that_starts_at_zero_is_refused(tmp_path, retry):
    """The backoff doubles the first wait: from 0 it stays 0, a hot loop against a dead history."""
    art = tmp_path / "art"
    with pytest.raises(ValueError, match=r"history_retry_s\[0\]"):
        Recorder(art, "exp", "run", history_retry_s=retry)
    assert not art.exists()


def test_a_json_body_nested_past_the_readers_stack_is_a_400_not_a_500(daemon):
    http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
    n = 3000  # within the 64 KiB body limit, past json's recursion limit
    body = ('{"spec":{"name":"deep","metadata":' + '{"a":' * n + "{}" + "}" * n + "}}").encode()
    resp = http.post("api/experiments", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "nested too deep" in resp.json()["error"]


@pytest.mark.parametrize("key", [None, "sur-1"])
def test_a_string_that_is_not_text_is_a_400_and_the_queue_goes_on(daemon, key):
    """A JSON ``\\ud800`` escape is a lone surrogate in Python: no file can hold it. It used to
    pass validation, fail the queue's save with a TypeError (a 500) and stay in the queue in
    memory, so every later save failed and nothing started again."""
    http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
    headers = {"content-type": "application/json", **({IDEMPOTENCY_HEADER: key} if key else {})}
    for body in (
        b'{"spec": {"name": "sur", "hypothesis": "x\\ud800", "time_budget_s": 2}}',
        b'{"spec": {"name": "sur", "metadata": {"k\\udcff": 1}, "time_budget_s": 2}}',
        b'{"spec": {"name": "sur", "time_budget_s": 2}, "set": ["hypothesis=caf\\udce9"]}',
    ):
        resp = http.post("api/experiments", content=body, headers=headers)
        assert resp.status_code == 400 and "not valid text" in resp.json()["error"], resp.text
    c = daemon.client()
    ok = c.submit(latency_spec(f"after-sur-{key}", budget=0.5))
    assert ok["id"] == f"after-sur-{key}"
    queued = orjson.loads((daemon.artifacts / QUEUE_FILE).read_bytes())
    assert not any(i["id"].startswith("sur") for i in queued["queue"])
    until(lambda: statuses(c).get(ok["id"], ("",))[0] not in ("queued", "running"), what="the next submission to run")


def test_a_queue_save_that_fails_in_any_way_leaves_the_submission_out(tmp_path, monkeypatch):
    service = LabService(tmp_path / "art", max_running=1)
    try:
        real = service._save_queue
        monkeypatch.setattr(service, "_save_queue", lambda: (_ for _ in ()).throw(TypeError("cannot hold it")))
        with pytest.raises(TypeError):
            service.submit(latency_spec("lost", budget=0.2), key="t-1")
        monkeypatch.setattr(service, "_save_queue", real)
        assert service.list(history=False) == [] and "t-1" not in service._keys
        assert service.submit(latency_spec("kept", budget=0.2), key="t-1")["id"] == "kept"
    finally:
        service.shutdown()


def test_a_command_line_value_that_is_not_utf8_is_one_line(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\ntime_budget_s = 0.2\n[workload]\nname = "latency"\n')
    with pytest.raises(SystemExit) as exit_:  # what the shell hands over for $'caf\xe9'
        main(["run", str(spec), "--set", "hypothesis=caf\udce9", "--artifacts", str(tmp_path / "art"), "--no-live"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "hypothesis" in err and "not valid text" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "art").exists()
