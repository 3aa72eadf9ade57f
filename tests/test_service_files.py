"""The lab daemon's own files when they are damaged or cannot be written: the queue is never
lost silently nor run twice, and a storage error is a clear answer, never a dead thread or a
bare 500."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from dashboard.server import Dashboard
from experiments.service import LabLocked, LabService
from telemetry.rundir import QUEUE_FILE
from tests.fault_helpers import latency_spec, until

ROOT = Path(__file__).resolve().parent.parent


def _queued(exp_id: str, name: str = "job") -> dict:
    return {"id": exp_id, "spec": latency_spec(name, budget=0.2), "set": [], "submitted_at": time.time()}


def test_a_queued_item_that_had_started_before_the_crash_is_not_started_again(tmp_path):
    """Killed between a start and the queue's rewrite: the item's folder exists, so it is not
    started a second time under a made-up id."""
    art = tmp_path / "art"
    (art / "job-2" / "20260101T000000Z-aaaaaa").mkdir(parents=True)  # what the earlier start left
    (art / QUEUE_FILE).write_bytes(orjson.dumps({"schema": 1, "queue": [_queued("job-2"), _queued("job-3")]}))
    service = LabService(art, max_running=1)
    try:
        assert "job-2-2" not in service.lab.experiments and "job-2" not in service.lab.experiments
        assert "job-3" in service.lab.experiments  # the next one in the queue took the slot
        assert [i["id"] for i in orjson.loads((art / QUEUE_FILE).read_bytes())["queue"]] == []
    finally:
        service.shutdown()


@pytest.mark.parametrize("damage", ["truncated", "folder", "list", "entry"])
def test_a_damaged_queue_file_is_kept_aside_and_its_ids_are_not_given_again(tmp_path, damage):
    art = tmp_path / "art"
    art.mkdir()
    good = orjson.dumps({"schema": 1, "queue": [_queued("lat-2", "lat"), _queued("lat-3", "lat")]})
    q = art / QUEUE_FILE
    if damage == "truncated":
        q.write_bytes(good[: good.index(b"lat-3") + 10])  # lat-2 whole, lat-3's id still legible
    elif damage == "folder":
        q.mkdir()
    elif damage == "list":
        q.write_bytes(b"[1, 2]")
    else:  # one entry without what a queued item needs: dropped, the other kept
        q.write_bytes(orjson.dumps({"schema": 1, "queue": [{"id": "lat-2"}, _queued("lat-3", "lat")]}))
    before = q.read_bytes() if q.is_file() else None
    service = LabService(art, max_running=1)
    try:
        aside = sorted(art.glob(f"{QUEUE_FILE}.damaged.*"))
        listed = {e["id"]: e for e in service.list(history=False)}
        if damage == "entry":
            assert aside == [] and set(listed) == {"lat-3"}  # started: it had all it needs
        else:
            assert len(aside) == 1 and (aside[0].read_bytes() == before if before is not None else aside[0].is_dir())
        if damage == "truncated":
            assert {i: (e["status"], e["reason"][:5]) for i, e in listed.items()} == {
                "lat-2": ("failed", "lost:"),
                "lat-3": ("failed", "lost:"),
            }
            assert aside[0].name in listed["lat-2"]["reason"]
            assert service.submit(latency_spec("lat"), experiment_id="lat-2")["id"] == "lat-2-2"  # not given again
        else:
            assert service.submit(latency_spec("lat"))["id"] == "lat"
    finally:
        service.shutdown()


def test_the_keys_still_whole_in_a_damaged_queue_file_answer_their_retries(tmp_path):
    """A retry after a restart on a damaged queue file gets its first entry (run, or lost
    with the file), never a second experiment; a key whose record is torn is forgotten."""
    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    ran, key_quote = latency_spec("ran", budget=0.2), 'job"7"\\x'
    try:
        first = service.submit(ran, key=key_quote)["id"]
        service.lab.experiments[first].wait(60)
        blocker = service.submit(latency_spec("blocker", budget=600), key="k-blocker")["id"]
        queued = service.submit(latency_spec("lat"), key="k-queued")["id"]
        service.submit(latency_spec("torn"), key="k-torn")
        assert service.list(history=False)[-1]["status"] == "queued"
    finally:
        service.shutdown()
    q = art / QUEUE_FILE
    good = q.read_bytes()
    torn = good.index(b'"k-torn"') + 12  # the last key's record cut in two, and the queue with it
    q.write_bytes(good[:torn])
    service = LabService(art, max_running=1)
    try:
        assert len(list(art.glob(f"{QUEUE_FILE}.damaged.*"))) == 1
        again = service.submit(ran, key=key_quote)
        assert again["id"] == first and again["repeated"] and again["status"] == "stopped"
        lost = service.submit(latency_spec("lat"), key="k-queued")
        assert lost["id"] == queued and lost["repeated"] and lost["status"] == "failed"
        assert service.submit(latency_spec("blocker", budget=600), key="k-blocker")["id"] == blocker
        assert "repeated" not in service.submit(latency_spec("torn", budget=0.2), key="k-torn")  # forgotten: new
        assert blocker not in service.lab.experiments  # a retry started nothing
    finally:
        service.shutdown()


def test_a_queue_that_cannot_be_written_does_not_stall_the_queue(tmp_path, monkeypatch):
    """A full disk as a run ends: the queue's rewrite after the next start fails; that start is
    still watched, so the one after it starts in turn."""
    service = LabService(tmp_path / "art", max_running=1)
    try:
        a, b, c = (service.submit(latency_spec(n, budget=0.3))["id"] for n in "abc")
        real, failed = service._save_queue, []

        def full_disk_once():
            if not failed and service.lab.experiments[a].wait(0):
                failed.append(True)
                raise OSError(28, "No space left on device")  # the rewrite after b's start
            real()

        monkeypatch.setattr(service, "_save_queue", full_disk_once)
        until(lambda: c in service.lab.experiments, 60, "the third experiment to start after the second")
        assert failed and b in service.lab.experiments
        service.lab.experiments[c].wait(60)
    finally:
        service.shutdown()


def test_storage_errors_and_oversized_integers_get_clear_answers(tmp_path):
    service = LabService(tmp_path / "art", max_running=1)
    dash = Dashboard(service, port=0)
    try:
        http = httpx.Client(base_url=dash.url, headers={"Authorization": f"Bearer {dash.token}"}, timeout=30)
        r = http.post(
            "api/experiments",
            content=b'{"spec": {"name": "big", "metadata": {"x": 123456789012345678901234567890}}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "does not fit in signed 64 bits" in r.json()["error"]
        (tmp_path / "art" / QUEUE_FILE).unlink(missing_ok=True)
        (tmp_path / "art" / QUEUE_FILE).mkdir()  # the queue cannot be rewritten now
        r = http.post("api/experiments", json={"spec": latency_spec("x")})
        assert r.status_code == 503 and "cannot write its files" in r.json()["error"]
        assert http.get("api/experiments").status_code == 200  # the daemon answers on
        assert [e["id"] for e in service.list(history=False)] == []  # the refused one left nothing queued
    finally:
        dash.stop()
        service.shutdown()


def test_a_lock_file_that_is_a_folder_is_one_line_and_exit_2(tmp_path):
    art = tmp_path / "art"
    (art / "lab.lock").mkdir(parents=True)
    with pytest.raises(LabLocked, match=r"lab\.lock.*must be a file"):
        LabService(art)
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "lab", "serve", "--artifacts", str(art), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "lab.lock" in r.stderr.strip().splitlines()[-1]


def test_ids_of_forgotten_cancellations_are_never_given_again(tmp_path):
    """More cancellations than the service keeps records of: a new submission never gets an id
    a client was given before (a ``stop`` kept from then would stop the new one), across a
    restart too."""
    art = tmp_path / "art"
    service = LabService(art, max_running=1, keep_ended=2)
    try:
        hog = service.submit(latency_spec("hog", budget=600))["id"]  # holds the one slot
        given = []
        for _ in range(4):
            exp_id = service.submit(latency_spec("lat"))["id"]
            given.append(exp_id)
            assert service.stop(exp_id)["status"] == "cancelled"
        assert given == ["lat", "lat-2", "lat-3", "lat-4"]
        assert sorted(e["id"] for e in service.list(history=False) if e["status"] == "cancelled") == ["lat-3", "lat-4"]
        assert service.submit(latency_spec("lat"))["id"] == "lat-5"
        assert service.submit(latency_spec("x"), experiment_id="lat-2")["id"] == "lat-2-2"
        service.stop(hog)
    finally:
        service.shutdown()
    again = LabService(art, max_running=1, keep_ended=2)
    try:
        assert again.submit(latency_spec("lat"))["id"] not in {"lat", "lat-2", "lat-3", "lat-4", "lat-5"}
    finally:
        again.shutdown()


def test_an_unexpected_error_is_a_500_that_names_it_and_the_client_goes_on(tmp_path, monkeypatch):
    from dashboard.client import LabClient, LabClientError

    service = LabService(tmp_path / "art", max_running=1)
    dash = Dashboard(service, port=0)
    try:
        client = LabClient(dash.url, dash.token)
        assert client.list() == []

        def broken(*args, **kwargs):
            raise RuntimeError("a defect in the listing")

        monkeypatch.setattr(service, "list", broken)
        with pytest.raises(LabClientError) as e:
            client.list()
        assert e.value.status == 500 and "RuntimeError: a defect in the listing" in str(e.value)
        monkeypatch.undo()
        assert client.list() == []  # the same client, at once: a new connection, not a reset
        client.close()
    finally:
        dash.stop()
        service.shutdown()


def test_a_retry_of_a_submission_whose_record_was_let_go_still_says_how_it_ended(tmp_path):
    """A submission cancelled while queued leaves no folder; once its record is let go (the
    service keeps ``keep_ended`` of them), a retry with its key used to answer ``unknown``."""
    art = tmp_path / "art"
    service = LabService(art, max_running=1, keep_ended=1)
    try:
        service.submit(latency_spec("blocker", budget=600))
        first = service.submit(latency_spec("q1"), key="k-q1")["id"]
        second = service.submit(latency_spec("q2"), key="k-q2")["id"]
        assert service.stop(first)["status"] == service.stop(second)["status"] == "cancelled"  # q1's record let go
        again = service.submit(latency_spec("q1"), key="k-q1")
        assert again == {"id": first, "status": "cancelled", "reason": "stopped while queued", "repeated": True}
    finally:
        service.shutdown()
    service = LabService(art, max_running=1, keep_ended=1)  # and after a restart: kept with the keys
    try:
        assert service.submit(latency_spec("q1"), key="k-q1")["status"] == "cancelled"
    finally:
        service.shutdown()
