"""Hypertune's state file is read and written without ever blocking the run: a FIFO or device
in its place, a path that names a folder, a lock held by someone else."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from actors import Registry
from actors.base import ActorRef
from actors.hypertune import Hypertune, Policy
from actors.messages import decode, encode
from experiments.coloring.workload import ColoringWorkload
from experiments.workloads import declarations
from supervisor import Lab
from telemetry.jsonl import iter_run
from telemetry.schema import rows_to_batch
from tests.fault_helpers import ends_within, feed_fifo_eof
from tests.test_hypertune import FakePhase

S = 1_000_000
COLORING = declarations(ColoringWorkload)
DEADLINE_S = 10.0  # far above what a non-blocking step takes; only a hang reaches it


def stalled_steps(t0_s: float, n: int, dt_s: float = 0.1) -> bytes:
    """``n`` tabu steps without progress (conflicts stay at 5), encoded for ``tell_bytes``."""
    rows = [
        {
            "seq": i,
            "ts": int((t0_s + i * dt_s) * S),
            "name": "step",
            "phase": "tabu",
            "parameters": {"phase": "tabu", "tenure_alpha": 0.6, "iters_per_step": 20000},
            "values": {"chromatic_number": 28.0, "k": 27.0, "conflicts": 5.0},
        }
        for i in range(n)
    ]
    return encode(decode(encode(rows_to_batch(rows, "exp", "run"))))


def stall(ht: ActorRef, phase: ActorRef, t0_s: float, n: int) -> None:
    """``n`` stalled steps one by one, with the phase's answer to an action in between, where a
    real phase's events would bring it (its ``hypertune_action``, before its next step)."""
    for i in range(n):
        ht.tell_bytes(stalled_steps(t0_s + i * 0.1, 1))
        ht.ask({"kind": "get"}, timeout=DEADLINE_S)  # the step is taken, an action sent
        phase.ask({"kind": "got"}, timeout=DEADLINE_S)  # the phase has answered it


def stop_late_actor(ref: Any) -> None:
    """An actor that started after the deadline: stopped, so the failing test leaves none behind."""
    if isinstance(ref, ActorRef):
        ref.stop(timeout=DEADLINE_S)


def warnings(logs: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and text in e["event"]]


@contextlib.contextmanager
def held_lock(state: Path) -> Iterator[None]:
    """Hold ``<state>.lock`` as another writer would (``flock`` excludes other open files,
    in this process too)."""
    fd = os.open(state.with_name(state.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- 1. a FIFO, a device, an oversized file -------------------------------------------------


def test_a_fifo_as_state_file_never_blocks_the_start_or_the_saves(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    with capture_logs() as logs:
        # the supervisor's thread runs the constructor: before the fix it hung in open()
        ht = ends_within(
            lambda: Hypertune.start("exp", True, reg, window_s=1.0, state_file=str(fifo), **COLORING),
            DEADLINE_S,
            lambda: feed_fifo_eof(fifo),
            left=stop_late_actor,  # its final save may block too
        )
        try:
            stall(ht, phase, 0, 45)  # two outcomes, so two saves
            state = ht.ask({"kind": "get"}, timeout=DEADLINE_S)
            assert not state["state_loaded"]
            assert sum(v["n"] for v in state["stats"].values()) == 2  # learned in memory
        finally:
            assert ht.stop(timeout=DEADLINE_S)  # the final save does not block either
            phase.stop()
    assert warnings(logs, "unreadable") and "not a regular file" in warnings(logs, "unreadable")[0]["error"]
    assert len(warnings(logs, "not saved")) == 1  # said once, not at every outcome
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["ff"]  # nothing beside it


def test_a_save_never_writes_through_a_fifo(tmp_path):
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    pol = Policy("ucb")
    pol.update("tabu", "tenure_up", 1.0)

    def save() -> None:
        with pytest.raises(FileExistsError, match="not a regular file"):
            pol.save(fifo)

    ends_within(save, DEADLINE_S, lambda: feed_fifo_eof(fifo))
    assert fifo.is_fifo() and pol.stats == {"tabu/tenure_up": {"n": 1.0, "mean": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["ff"]  # not even a lock file (think of /dev/zero.lock)


def test_an_oversized_state_or_a_device_is_ignored_and_read_no_further(tmp_path):
    import actors.hypertune

    MAX_STATE_BYTES = 16 << 20  # the bound docs/hypertune.md gives
    big = tmp_path / "big.json"
    good = orjson.dumps({"kind": "ucb", "stats": {"tabu/tenure_up": {"n": 1, "mean": 2.0}}})
    big.write_bytes(good + b" " * MAX_STATE_BYTES)  # valid JSON, past the bound
    with capture_logs() as logs:
        assert Policy.read_state(big) is None
        # after the bound is proven: without it this would read /dev/zero until memory ran out
        assert Policy.read_state(Path("/dev/zero")) is None
        assert Policy.read_state(Path("/dev/null")) is None
    errors = [e["error"] for e in warnings(logs, "unreadable")]
    assert errors[0] == f"larger than {MAX_STATE_BYTES} bytes"
    assert errors[1:] == ["not a regular file"] * 2
    big.write_bytes(good)
    assert Policy.read_state(big) == {"tabu/tenure_up": {"n": 1.0, "mean": 2.0}}  # the bound is on size only
    assert actors.hypertune.MAX_STATE_BYTES == MAX_STATE_BYTES


# --- 2. a path that names a folder ------------------------------------------------------------


@pytest.mark.parametrize("state_file", [".", "/", "sub/", ".."])
def test_a_state_file_naming_a_folder_is_ignored_and_the_actor_learns_in_memory(tmp_path, monkeypatch, state_file):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    with capture_logs() as logs:
        ht = Hypertune.start("exp", True, reg, window_s=1.0, state_file=state_file, **COLORING)
        try:
            stall(ht, phase, 0, 25)  # an outcome, so a save
            state = ht.ask({"kind": "get"}, timeout=DEADLINE_S)  # before the fix: ValueError, the actor crashed
            assert sum(v["n"] for v in state["stats"].values()) == 1
        finally:
            assert ht.stop(timeout=DEADLINE_S)
            phase.stop()
    assert [e["file"] for e in warnings(logs, "names a folder")] == [state_file]
    assert warnings(logs, "not saved") == []  # no save is tried
    assert sorted(tmp_path.rglob("*")) == [work]  # nothing written: no lock file beside a folder


def test_a_folder_as_state_file_lets_the_run_end_on_its_budget(tmp_path, monkeypatch):
    """The tester's run: ``state_file = "."`` made every save crash hypertune until the tree gave up."""
    spec = Path(__file__).resolve().parents[1] / "experiments" / "latency.toml"
    monkeypatch.chdir(tmp_path)
    lab = Lab(tmp_path / "art")
    try:
        overrides = ["time_budget_s=2", "hypertune.enabled=true", "hypertune.window_s=0.05", "hypertune.state_file=."]
        exp = lab.start_experiment(str(spec), overrides=overrides)
        assert exp.wait(60)
    finally:
        lab.shutdown()
    # before the fix: failed, reached_max_restart_intensity (ValueError: PosixPath('.') has an empty name)
    assert exp.reason == "budget" and exp.summary()["restarts"] == {}
    names = [e["name"] for e in iter_run(exp.run_dir)]
    assert "hypertune_outcome" in names  # an outcome, so a save was tried, and learned in memory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# --- 3. a lock held by someone else -----------------------------------------------------------


def test_a_held_lock_skips_saves_with_one_warning_and_never_stops_the_actor(tmp_path):
    state = tmp_path / "st.json"
    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    ht = Hypertune.start("exp", True, reg, window_s=1.0, state_file=str(state), **COLORING)
    try:
        with capture_logs() as logs, held_lock(state):
            # five outcomes (one every two windows): before the fix the first save blocked for good
            stall(ht, phase, 0, 105)
            got = ht.ask({"kind": "get"}, timeout=DEADLINE_S)
            assert len(got["actions"]) == 5 and sum(v["n"] for v in got["stats"].values()) == 5
            notes = [m for m in phase.ask({"kind": "got"}) if m["kind"] == "note"]
            assert len(notes) == 5  # every outcome reached the phase: the actor kept working
            assert not state.exists()  # no save got past the lock
        busy = warnings(logs, "locked by another writer")
        assert len(busy) == 1 and busy[0]["file"] == str(state)
        # the lock is free again: the next save writes every pull learned meanwhile
        with capture_logs() as logs:
            stall(ht, phase, 10.5, 20)
            got = ht.ask({"kind": "get"}, timeout=DEADLINE_S)
        assert sum(v["n"] for v in got["stats"].values()) == 6
        saved = Policy.read_state(state)
        assert saved is not None and sum(v["n"] for v in saved.values()) == 6
        assert [e["skipped"] for e in logs if e["event"] == "hypertune policy state saved again"] == [5]
    finally:
        assert ht.stop(timeout=DEADLINE_S)
        phase.stop()


def test_a_save_gives_up_on_a_held_lock_after_a_bounded_wait(tmp_path):
    state = tmp_path / "st.json"
    pol = Policy("ucb")
    pol.update("tabu", "tenure_up", 1.0)
    fd = os.open(tmp_path / "st.json.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another writer, stuck
        with pytest.raises(BlockingIOError, match="locked by another writer"):
            ends_within(
                lambda: pol.save(state), DEADLINE_S, lambda: fcntl.flock(fd, fcntl.LOCK_UN)
            )  # before: blocked for good
        assert not state.exists() and pol.stats == {"tabu/tenure_up": {"n": 1.0, "mean": 1.0}}
    finally:
        os.close(fd)
    pol.save(state)  # free again: saved
    assert Policy.read_state(state) == {"tabu/tenure_up": {"n": 1.0, "mean": 1.0}}


# --- a reward that is not a number -------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), good=st.floats(-1e6, 1e6))
def test_a_reward_that_is_not_a_finite_number_is_ignored_and_never_saved(tmp_path_factory, bad, good):
    path = tmp_path_factory.mktemp("nan") / "state.json"
    pol = Policy("ucb")
    assert pol.update("t", "a", good)
    assert not pol.update("t", "a", bad) and not pol.update("t", "b", bad)
    assert pol.stats == {"t/a": {"n": 1, "mean": good}}
    pol.save(path)
    assert pol.update("t", "b", 2.0)
    pol.save(path)  # before the fix: a NaN mean saved as null, and this save refused the file
    assert Policy.read_state(path) == {"t/a": {"n": 1.0, "mean": good}, "t/b": {"n": 1.0, "mean": 2.0}}
