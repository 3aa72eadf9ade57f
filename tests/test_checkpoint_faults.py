"""The phase's checkpoint file cannot be written: a full disk ends the run ``stopped`` with a
``storage: ...`` reason, any other failure is said once and the run goes on; a stop the
phase crashes in is finished by its replacement, never lost."""

from __future__ import annotations

import errno
import threading
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import actors.phase
from actors import Topics
from actors.base import on_death
from actors.phase import CheckpointStore, PhaseActor
from actors.recorder import Recorder
from actors.registry import Registry
from supervisor import ChildSpec, Lab, Supervisor
from telemetry.jsonl import iter_run
from telemetry.rundir import CHECKPOINT, RunStatus
from telemetry.store import HistoryStore
from tests.actors_fixtures import Counting
from tests.fault_helpers import until
from tests.test_pipeline_faults import ENOSPC, assert_accounts, fast_spec, no_tmp_files, on_disk


def failing_checkpoints(
    monkeypatch, exc: OSError, after: int = 0, until: int | None = None, reached: threading.Event | None = None
) -> list[int]:
    """The phase's checkpoint writes fail with ``exc`` after ``after`` writes, ``until`` of them
    have failed (then ``reached`` is set); returns the count of failed writes."""
    real = actors.phase.atomic_write
    calls, failed = [0], [0]

    def write(path, data, mode=None):
        calls[0] += 1
        if calls[0] > after and (until is None or failed[0] < until):
            failed[0] += 1
            if reached is not None and failed[0] == until:
                reached.set()
            raise exc
        return real(path, data, mode)

    monkeypatch.setattr(actors.phase, "atomic_write", write)
    return failed


def test_a_full_disk_at_the_checkpoint_stops_the_run_with_reason_storage(tmp_path, monkeypatch):
    """The phase used to crash on the write, again after each restart, and the run ended
    ``failed`` (the restart intensity) instead of ``stopped``."""
    failed = failing_checkpoints(monkeypatch, ENOSPC, after=2)
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(fast_spec("full"))
        assert exp.wait(30)
        s = exp.summary()
    assert failed[0] >= 1
    assert exp.status() == RunStatus.STOPPED, exp.reason
    assert exp.reason.startswith("storage: [Errno 28] No space left on device"), exp.reason
    assert str(exp.run_dir / CHECKPOINT) in exp.reason  # names the file
    assert s["restarts"] == {}
    disk = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    assert_accounts(disk, *on_disk(tmp_path / "art", exp.id, exp.run_id))  # the events are all kept
    assert [e["name"] for e in iter_run(exp.run_dir)][-1] == "phase_end"
    assert no_tmp_files(tmp_path) == []


def test_a_checkpoint_that_cannot_be_written_is_said_once_and_the_run_goes_on(tmp_path, monkeypatch):
    """Not a full disk (here: a file that may not be replaced): the run keeps recording until
    it is stopped; one warning naming the file, one ``checkpoint_failed`` event; a write that gets
    through again is said too."""
    refused = OSError(errno.EPERM, "Operation not permitted")
    reached = threading.Event()
    failed = failing_checkpoints(monkeypatch, refused, after=1, until=2, reached=reached)
    with capture_logs() as logs, Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(fast_spec("ro", 600.0))
        assert reached.wait(30)  # two writes in a row failed; the next ones get through
        until(lambda: any(e["event"] == "checkpoint written again" for e in list(logs)), what="a write after them")
        exp.stop()
        s = exp.summary()
    assert failed[0] == 2
    assert exp.status() == RunStatus.STOPPED and exp.reason == "stopped", exp.reason
    assert s["restarts"] == {}
    names = [e["name"] for e in iter_run(exp.run_dir)]
    assert names.count("checkpoint_failed") == 1 and names[-1] == "phase_end"
    note = next(e for e in iter_run(exp.run_dir) if e["name"] == "checkpoint_failed")["notes"]
    assert str(exp.run_dir / CHECKPOINT) in note and "Operation not permitted" in note
    warned = [e for e in logs if e["event"].startswith("checkpoint not written")]
    assert len(warned) == 1 and warned[0]["file"] == str(exp.run_dir / CHECKPOINT)
    assert warned[0]["error"] == str(refused) and warned[0]["log_level"] == "warning"
    again = [e for e in logs if e["event"] == "checkpoint written again"]
    assert len(again) == 1 and again[0]["failed_writes"] == 2
    cp = orjson.loads((exp.run_dir / CHECKPOINT).read_bytes())
    assert cp["finished"] == "stopped"
    disk = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    assert_accounts(disk, *on_disk(tmp_path / "art", exp.id, exp.run_id))


def test_the_recorders_stop_on_a_full_disk_ends_the_run_when_the_checkpoint_fails_too(tmp_path, monkeypatch):
    """The report's case: the Recorder's writes fail (it asks the phase to stop) and from then on
    so do the checkpoint's. The phase used to crash in the stop (its final checkpoint), and the
    stop went with it: a restarted phase ran on to its budget recording nothing, or crashed
    again until the supervisor gave up (``failed``)."""
    full = threading.Event()
    real_insert = HistoryStore.insert_batch
    calls = [0]

    def insert(self, *a, **kw):
        calls[0] += 1
        if calls[0] > 20:
            full.set()
            raise ENOSPC
        return real_insert(self, *a, **kw)

    monkeypatch.setattr(HistoryStore, "insert_batch", insert)
    real_write = actors.phase.atomic_write

    def write(path, data, mode=None):
        if full.is_set():
            raise ENOSPC
        return real_write(path, data, mode)

    monkeypatch.setattr(actors.phase, "atomic_write", write)
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(fast_spec("full2"))
        assert exp.wait(30)
        s = exp.summary()
    assert exp.status() == RunStatus.STOPPED, exp.reason
    assert exp.reason == s["storage_error"] == "storage: [Errno 28] No space left on device", exp.reason
    assert s["restarts"] == {}
    disk = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    assert_accounts(disk, *on_disk(tmp_path / "art", exp.id, exp.run_id))


class Finicky(Counting):
    """A workload whose ``finish`` fails the first time (the phase crashes in its stop)."""

    name: ClassVar[str] = "finicky"
    finished: ClassVar[list[str]] = []
    crashed = threading.Event()

    def finish(self, emitter: Any, reason: str) -> None:
        if not Finicky.crashed.is_set():
            Finicky.crashed.set()
            raise RuntimeError("finish failed")
        Finicky.finished.append(reason)


def test_a_stop_the_phase_crashed_in_is_finished_by_its_replacement(tmp_path):
    """The stop message the phase was handling when it crashed is gone with it: the store keeps
    the request, and the restarted phase stops at once with its reason."""
    Finicky.crashed.clear()
    Finicky.finished.clear()
    topics, reg, store = Topics(), Registry(), CheckpointStore(tmp_path / "checkpoint.json")
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    done = threading.Event()
    phase = ChildSpec(
        "phase",
        PhaseActor,
        args=("exp", "run", Finicky, {}, topics, store),
        name="phase",
        restart="transient",
        significant=True,
        kwargs={"budget_s": 600},
    )
    sup = Supervisor.start([phase], registry=reg, auto_shutdown="any_significant")
    on_death(sup, lambda reason: done.set())
    try:
        reg.await_name("phase", timeout=30).tell({"kind": "stop", "reason": "storage: disk full"}, urgent=True)
        assert Finicky.crashed.wait(30)
        assert done.wait(30), "the restarted phase ran on"
    finally:
        sup.stop()
    rec.stop()
    assert Finicky.finished == ["storage: disk full"]
    assert store.finish_reason == "storage: disk full"
    assert orjson.loads((tmp_path / "checkpoint.json").read_bytes())["finished"] == "storage: disk full"


# --- what a checkpoint file holds ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    state=st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8)),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=20,
    )
)
def test_a_checkpoint_file_gives_back_what_was_saved_nan_and_infinities_too(tmp_path_factory, state):
    """JSON has no NaN or infinity (orjson writes null): a run resumed from the file must get
    the workload's floats back as they were, not None."""
    path = tmp_path_factory.mktemp("ckpt") / CHECKPOINT
    store = CheckpointStore(path)
    store.update(workload={"state": state}, steps=3)
    store.save()
    back = CheckpointStore(path).get()["workload"]["state"]
    assert repr(back) == repr(state)  # repr: NaN equals nothing, its repr does


def test_a_checkpoint_no_file_can_hold_names_its_field(tmp_path):
    store = CheckpointStore(tmp_path / CHECKPOINT)
    for bad, needle in (
        ({"best": object()}, r"checkpoint field workload\.best: a value of type object"),
        ({"seen": {(1, 2): 3}}, r"checkpoint field workload\.seen: a key of type tuple"),
        ({"n": [1, 2**70]}, r"checkpoint field workload\.n\[1\]: an integer of 71 bits"),
    ):
        store.update(workload=bad)
        with pytest.raises(TypeError, match=needle):
            store.save()
    assert not (tmp_path / CHECKPOINT).exists()
