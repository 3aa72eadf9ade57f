"""The lab daemon's own files when they are damaged or cannot be written: the queue is never
lost silently nor run twice, and a storage error is a clear answer, never a dead thread or a
bare 500."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from dashboard.server import Dashboard
from experiments.service import LabLocked, LabService
from telemetry.rundir import QUEUE_FILE, run_status
from tests.fault_helpers import latency_spec, until

ROOT = Path(__file__).resolve().parent.parent


def _queued(exp_id: str, name: str = "job") -> dict:
    return {"id": exp_id, "spec": latency_spec(name, budget=0.2), "set": [], "submitted_at": time.time()}


def test_a_queued_item_that_had_started_before_the_crash_is_not_started_again(tmp_path):
    """Killed between a start and the queue's rewrite: the item's folder exists, so it is not
    started a second time under a made-up id."""
    art = tmp_path / "art"
    run = art / "job-2" / "20260101T000000Z-aaaaaa"  # what the earlier start left: a run that ended since
    run.mkdir(parents=True)
    (run / "lifecycle.json").write_bytes(orjson.dumps({"schema": 1, "status": "stopped", "reason": "budget"}))
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
        a = "a"  # the ids are the names: the failure is in place before the first start, whatever the timing
        real, failed = service._save_queue, []

        def full_disk_once():
            first = service.lab.experiments.get(a)
            if not failed and first is not None and first.wait(0):
                failed.append(True)
                raise OSError(28, "No space left on device")  # the rewrite after b's start
            real()

        monkeypatch.setattr(service, "_save_queue", full_disk_once)
        assert [service.submit(latency_spec(n, budget=0.3))["id"] for n in "abc"] == ["a", "b", "c"]
        b, c = "b", "c"
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


def _disk_full_at_start(service: LabService, monkeypatch) -> threading.Event:
    """While the returned event is set, a tree cannot start for want of disk space (the run's
    folder is made; its start fails as on a full disk)."""
    from experiments.lab import Experiment

    full = threading.Event()
    full.set()
    real = Experiment.child_spec

    def child_spec(exp):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(exp)

    monkeypatch.setattr(Experiment, "child_spec", child_spec)
    return full


def _ended(service: LabService, ids: list[str]) -> bool:
    got = {e["id"]: e["status"] for e in service.list(history=True)}
    return all(got.get(i) == "stopped" for i in ids)


def _runs_after_a_restart(art: Path, exp_id: str) -> None:
    """The next daemon on ``art`` runs the held submission ``exp_id`` (it is still queued)."""
    again = LabService(art, max_running=1)
    try:
        until(lambda: _ended(again, [exp_id]), 60, "the held submission to run")
    finally:
        again.shutdown()


def test_a_full_disk_at_start_holds_the_queue_until_space_is_back(tmp_path, monkeypatch):
    """A start that fails for the machine's sake leaves the submission queued, says why, and
    the queue goes on once the disk has room again: it used to mark every queued item failed
    within a second, and a retry with its key only got the failure back."""
    monkeypatch.setattr("experiments.service.HOLD_RETRY_S", (0.05, 0.2))
    service = LabService(tmp_path / "art", max_running=1)
    try:
        full = _disk_full_at_start(service, monkeypatch)
        ids = [service.submit(latency_spec("job", budget=0.2))["id"] for _ in range(3)]

        seen: list[dict] = []

        def held() -> bool:  # between the timer's tries (the head lists as starting during one)
            seen.append({e["id"]: e for e in service.list(history=False)})
            return seen[-1][ids[0]]["status"] == "queued"

        until(held, 60, "the head held between two tries")
        entries = seen[-1]
        assert [entries[i]["status"] for i in ids] == ["queued"] * 3
        assert "No space left on device" in entries[ids[0]]["reason"] and "reason" not in entries[ids[1]]
        full.clear()
        until(lambda: _ended(service, ids), 60, "the held queue to run")
    finally:
        service.shutdown()


def test_a_nearly_full_disk_holds_the_queue_before_any_run_begins(tmp_path, monkeypatch):
    """With less free disk than a run needs, the head is held (no run folder made, nothing
    ended as ``storage: ...``), and it starts once the disk has room: a start on a nearly full
    disk used to burn the item out in a fraction of a second."""
    import shutil

    monkeypatch.setattr("experiments.service.HOLD_RETRY_S", (0.05, 0.2))
    art = tmp_path / "art"
    service = LabService(art, max_running=1, min_free_bytes=shutil.disk_usage(tmp_path).free + (1 << 40))
    try:
        exp_id = service.submit(latency_spec("job", budget=0.2))["id"]
        seen: list[dict] = []

        def held() -> bool:
            seen.append({e["id"]: e for e in service.list(history=False)})
            return seen[-1][exp_id]["status"] == "queued" and "reason" in seen[-1][exp_id]

        until(held, 60, "the head held for want of space")
        assert "No space left on device" in seen[-1][exp_id]["reason"]
        assert "min_free_bytes" in seen[-1][exp_id]["reason"]
        assert not (art / exp_id).exists()  # no run was begun
        service.lab.min_free_bytes = 0  # room again
        until(lambda: _ended(service, [exp_id]), 60, "the held submission to run")
        assert service.lab.get(exp_id).wait(30)  # its end's record on disk too
        assert [run_status(r).status for r in (art / exp_id).iterdir()] == ["stopped"]
    finally:
        service.shutdown()


def test_a_queue_waiting_on_paused_runs_says_so(tmp_path):
    """Every slot held by a paused experiment (as after a crash that brought them back
    paused): the queue's head says why it waits, and starts once one is resumed and ends."""
    service = LabService(tmp_path / "art", max_running=1)
    try:
        first = service.submit(latency_spec("first", budget=600))["id"]
        assert service.pause(first)["status"] == "paused"
        answer = service.submit(latency_spec("next", budget=0.2))
        nxt = answer["id"]
        assert "held by a paused experiment" in answer["reason"]  # the submission's answer says it too
        (head,) = [e for e in service.list(history=False) if e["id"] == nxt]
        assert head["status"] == "queued" and head["position"] == 1
        assert head["reason"] == f"waiting: every slot (1) is held by a paused experiment ({first}): resume or stop one"
        service.resume(first)
        (head,) = [e for e in service.list(history=False) if e["id"] == nxt]
        assert "reason" not in head  # a running experiment holds the slot: the usual wait
        service.stop(first)
        until(lambda: {e["id"]: e["status"] for e in service.list(history=False)}[nxt] == "stopped", 60, "next ran")
    finally:
        service.shutdown()


def test_a_held_queue_tries_again_on_its_timer_alone(tmp_path, monkeypatch):
    """Submissions while the queue is held try its head again; a failure of theirs keeps the
    timer and its wait (the wait doubles only when the timer's own try fails), and says nothing
    more than the first hold said."""
    from structlog.testing import capture_logs

    monkeypatch.setattr("experiments.service.HOLD_RETRY_S", (3600.0, 7200.0))
    service = LabService(tmp_path / "art", max_running=1)
    try:
        _disk_full_at_start(service, monkeypatch)
        with capture_logs() as logs:
            for _ in range(3):
                service.submit(latency_spec("job", budget=0.2))
        held = [e for e in logs if e["event"].startswith("queue held")]
        assert [(e["log_level"], e["retry_s"]) for e in held] == [("error", 3600.0)]
        assert [e["status"] for e in service.list(history=False)] == ["queued"] * 3
    finally:
        service.shutdown()


def test_a_held_submission_is_still_queued_after_a_restart(tmp_path, monkeypatch):
    """The failed tries leave run folders that say so; the next daemon on the folder does not
    take them for a start that happened (it used to drop the submission as started)."""
    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        full = _disk_full_at_start(service, monkeypatch)
        (exp_id,) = [service.submit(latency_spec("job", budget=0.2))["id"]]
    finally:
        service.shutdown()
    full.clear()  # room again, for the next daemon
    assert [run_status(r).status for r in (art / exp_id).iterdir()] == ["failed"]  # the failed try, recorded
    _runs_after_a_restart(art, exp_id)


def test_an_end_whose_record_cannot_be_written_is_written_once_it_can(tmp_path, monkeypatch):
    """A run that ended while its lifecycle record could not be written (a full disk) keeps
    trying: a record left saying running would have the next daemon resume a run that ended
    (one answered failed would run after all)."""
    from experiments import lab as lab_module
    from supervisor import Lab

    monkeypatch.setattr(lab_module, "FINAL_RECORD_RETRY_S", (0.05, 0.2))
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(latency_spec("job", budget=300))
        real = lab_module.write_json
        fails = iter(range(3))

        def write_json(path, data, *args, **kwargs):
            if path.name == "lifecycle.json" and data.get("status") != "running" and next(fails, None) is not None:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, data, *args, **kwargs)

        monkeypatch.setattr(lab_module, "write_json", write_json)
        exp.stop()
        assert exp.final_record_written.wait(30)
        assert run_status(exp.run_dir).status == "stopped"
    finally:
        lab.shutdown()


def test_the_labs_shutdown_makes_a_last_try_at_an_owed_end_record(tmp_path, monkeypatch):
    """The background tries wait longer each time; a Lab shutting down (a daemon stopped once
    the disk has room) writes the owed record before it returns, instead of leaving it to a
    thread the process exit kills."""
    from experiments import lab as lab_module
    from supervisor import Lab

    monkeypatch.setattr(lab_module, "FINAL_RECORD_RETRY_S", (3600.0, 3600.0))  # no background try in time
    lab = Lab(tmp_path / "art")
    full = threading.Event()
    try:
        exp = lab.start_experiment(latency_spec("job", budget=300))
        real = lab_module.write_json

        def write_json(path, data, *args, **kwargs):
            if path.name == "lifecycle.json" and full.is_set():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, data, *args, **kwargs)

        monkeypatch.setattr(lab_module, "write_json", write_json)
        full.set()
        exp.stop()
        assert not exp.final_record_written.is_set() and run_status(exp.run_dir).status != "stopped"
        full.clear()  # room again
    finally:
        lab.shutdown()
    assert exp.final_record_written.is_set() and run_status(exp.run_dir).status == "stopped"


def test_a_second_daemon_is_refused_after_the_lock_file_was_deleted(tmp_path):
    """``lab.lock`` looks stale and gets tidied away: the folder stays locked all the same (a
    lock on the file alone let a second daemon in, and both ran the same queued items)."""
    art = tmp_path / "art"
    first = LabService(art, max_running=1)
    try:
        (art / "lab.lock").unlink()
        with pytest.raises(LabLocked, match="in use by another lab daemon"):
            LabService(art, max_running=1)
    finally:
        first.shutdown()
    LabService(art, max_running=1).shutdown()  # free again once the first has stopped


def test_a_bad_shutdown_timeout_closes_nothing(tmp_path):
    """It marked the service closed and released the folder's lock before the Lab refused the
    timeout: the runs went on unlocked, a second daemon could take the folder, and a retry did
    nothing. ``math.inf`` means no limit."""
    import math

    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        exp_id = service.submit(latency_spec("job", budget=600.0))["id"]
        for bad in (-1.0, math.nan, "5"):
            with pytest.raises(ValueError, match="timeout must be None or inf"):
                service.shutdown(bad)
        with pytest.raises(LabLocked, match="in use by another lab daemon"):
            LabService(art, max_running=1)
        assert service.lab.get(exp_id).status() == "running"
    finally:
        service.shutdown(math.inf)
    assert service.lab.get(exp_id).status() == "stopped"
    LabService(art, max_running=1).shutdown()  # the folder is free once it has stopped


def test_a_try_the_full_disk_cut_short_before_its_first_record_is_no_start(tmp_path, monkeypatch):
    """The first write of a start (its lifecycle record) fails too: the try leaves an empty
    run folder, which the next daemon must not take for a start (it used to drop the
    submission, which never ran)."""
    from experiments import lab as lab_module

    full = threading.Event()
    full.set()
    for name in ("write_json", "atomic_write"):
        real = getattr(lab_module, name)

        def failing(path, *a, _real=real, **k):
            if full.is_set():
                raise OSError(errno.ENOSPC, "No space left on device")
            return _real(path, *a, **k)

        monkeypatch.setattr(lab_module, name, failing)
    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        exp_id = service.submit(latency_spec("job", budget=0.2))["id"]
        assert service.list(history=False)[0]["status"] == "queued"
    finally:
        service.shutdown()
    full.clear()
    assert [run_status(r).status for r in (art / exp_id).iterdir()] == ["unknown"]
    _runs_after_a_restart(art, exp_id)


def test_cancelling_the_held_head_lets_the_next_start_at_once(tmp_path, monkeypatch):
    """The head of a held queue is cancelled: the next item starts now, not at the next retry."""
    from experiments.lab import Experiment

    monkeypatch.setattr("experiments.service.HOLD_RETRY_S", (300.0, 300.0))
    real = Experiment.child_spec

    def child_spec(exp):
        if exp.id == "bad":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(exp)

    monkeypatch.setattr(Experiment, "child_spec", child_spec)
    service = LabService(tmp_path / "art", max_running=1)
    try:
        service.submit(latency_spec("bad", budget=0.2), experiment_id="bad")
        service.submit(latency_spec("good", budget=300), experiment_id="good")
        assert [e["status"] for e in service.list(history=False)] == ["queued", "queued"]
        assert service.stop("bad")["status"] == "cancelled"
        assert {e["id"]: e["status"] for e in service.list(history=False)}["good"] == "running"
        service.stop("good")
    finally:
        service.shutdown()
