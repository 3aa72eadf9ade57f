"""A long step gives way: the colouring phases and the latency workload work in chunks and end
a step early when the Phase actor's check says a pause, a stop, a control or the budget waits."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring.phase import YIELD_ITERS, YIELD_MOVES
from experiments.coloring.population import MAX_ITERS, MIN_ITERS
from experiments.coloring.workload import ColoringWorkload
from experiments.workloads.latency import LatencyWorkload
from kernels.coloring import anneal, build_gamma, seed_rng
from supervisor import Lab
from telemetry.rundir import read_json
from tests.test_coloring_memetic import Events

COMPLETE = {"generator": "gnp", "n": 30, "p": 1.0, "seed": 1}  # K30: no 29-colouring, searches never end


class Check:
    """A check that says yield from its ``after``-th call on, counting the calls."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.after


def coloring(phase: str, check: Any = lambda: False, **section: Any) -> tuple[ColoringWorkload, Events]:
    """The workload after its first step: the initial colouring (DSATUR: 30 colours) and the
    phase's setup at k = 29, which runs a search of its own in some phases."""
    params = ColoringWorkload.check_params({"graph": COMPLETE, "phases": [phase], "gpu": "cpu", phase: section})
    w = ColoringWorkload(params, 3)
    em = Events()
    w.use_interrupt(check)
    w.start(em)
    assert w.step(em) is False
    return w, em


def test_a_tabu_step_ends_at_the_chunk_where_the_check_says_so():
    w, em = coloring("tabu", iters_per_step=10 * YIELD_ITERS)
    check = Check(after=3)
    w.use_interrupt(check)
    w.step(em)  # the phase's setup at k = 29, then its first step
    tabu = w.current
    assert tabu is not None and tabu.k == 29 and tabu.f > 0
    assert tabu.iterations == 3 * YIELD_ITERS and check.calls == 3
    w.use_interrupt(lambda: False)
    w.step(em)
    assert tabu.iterations == 13 * YIELD_ITERS  # uncut: the whole step


def test_a_step_of_one_chunk_is_one_call_and_never_asks():
    w, em = coloring("tabu", iters_per_step=YIELD_ITERS)
    check = Check(after=1)  # would cut anything it were asked about
    w.use_interrupt(check)
    for _ in range(3):
        w.step(em)
    assert w.current.iterations == 3 * YIELD_ITERS and check.calls == 0


def test_a_memetic_local_search_ends_early_too():
    check = Check(after=2)
    w, em = coloring("memetic", check, local_iters=10**9, population=3)  # each TabuCol: ~15 minutes
    assert check.calls == 2  # the setup's local search of the first member, cut after two chunks
    w.step(em)  # the next member's
    assert check.calls == 3
    assert all(np.asarray(c).max() < 29 for c in w.current.pop)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 2**31 - 1))
def test_annealing_in_chunks_draws_the_same_proposals_as_one_call(m1, m2, seed):
    """Why the thermo phase's chunks leave a seeded run as it was."""
    from experiments.coloring.graph import gnp

    g = gnp(40, 0.3, 5)
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 4, g.n).astype(np.int32)
    out = []
    for parts in ((m1 + m2,), (m1, m2)):
        seed_rng(seed)
        c = start.copy()
        gamma = build_gamma(g.indptr, g.indices, c, 4)
        for m in parts:
            anneal(g.indptr, g.indices, 4, c, gamma, 0.7, m)
        out.append((c, gamma))
    assert np.array_equal(out[0][0], out[1][0]) and np.array_equal(out[0][1], out[1][1])


def test_a_cut_thermo_step_is_one_whole_round_of_every_replica():
    """K64, 4 replicas: a step of 2 x YIELD_MOVES proposals per replica cut at once does one
    round, draw for draw the step of exactly YIELD_MOVES that nothing cuts."""
    k64 = {"generator": "gnp", "n": 64, "p": 1.0, "seed": 1}
    runs = []
    for sweeps, check in ((2 * YIELD_MOVES // 64, lambda: True), (YIELD_MOVES // 64, lambda: False)):
        params = ColoringWorkload.check_params(
            {
                "graph": k64,
                "phases": ["thermo"],
                "gpu": "cpu",
                "thermo": {"sweeps_per_step": sweeps, "replicas": 4},
            }
        )
        w = ColoringWorkload(params, 3)
        em = Events()
        w.use_interrupt(check)
        w.start(em)
        w.step(em)  # the initial colouring and the phase's setup
        w.step(em)  # one annealing step (one round either way)
        runs.append(w.current.colors.copy())
    assert np.array_equal(runs[0], runs[1])


def test_a_population_generation_set_huge_before_its_pace_is_known_is_cut_too():
    w, em = coloring("population", population=4, generation_s=0.05)
    pop = w.current
    search = pop.search
    assert search.pace_iters is None
    pop.set_batch(MAX_ITERS)
    w.use_interrupt(Check(after=1))
    it0 = search.engine.iterations
    w.step(em)
    assert search.engine.iterations - it0 == search.size * 2 * MIN_ITERS  # one first, short launch
    assert em.named("step")[-1]["values"]["iters_per_chain"] == 2 * MIN_ITERS


def test_a_population_generation_set_huge_runs_in_paced_launches():
    w, em = coloring("population", population=4, generation_s=0.05)
    w.use_interrupt(lambda: False)
    for _ in range(4):
        w.step(em)  # setup, then generations: the pace is measured
    pop = w.current
    search = pop.search
    assert search.pace_iters is not None
    pop.set_batch(MAX_ITERS)  # 10 million iterations per chain: minutes on two cores
    w.use_interrupt(Check(after=1))
    it0, pace = search.engine.iterations, search.pace_iters
    w.step(em)
    assert search.engine.iterations - it0 == search.size * pace  # one launch at the measured pace


def slow_call() -> dict[str, Any]:
    time.sleep(0.02)  # the target's own work: a slow endpoint
    return {}


def latency(check: Any, **params: Any) -> tuple[LatencyWorkload, Events]:
    """A started latency workload that asks ``check`` between its calls."""
    w = LatencyWorkload(LatencyWorkload.check_params(params))
    em = Events()
    w.start(em)
    w.use_interrupt(check)
    return w, em


def test_a_latency_step_stops_between_calls():
    check = Check(after=2)
    w, em = latency(check, target="tests.test_long_steps:slow_call", calls_per_step=50)
    w.step(em)
    assert len(em.named("call")) == 2 and w.done == 2  # the first call always; the second check said stop


def test_concurrent_calls_not_yet_started_are_dropped():
    check = Check(after=1)
    w, em = latency(check, target="tests.test_long_steps:slow_call", calls_per_step=200, concurrency=2)
    w.step(em)
    calls = len(em.named("call"))
    assert 1 <= calls < 20 and w.done == calls  # the ones in flight finish and are recorded
    assert check.calls == 1  # asked once: the rest were cancelled together, not one by one


def test_a_concurrent_step_of_many_calls_queues_them_as_calls_end():
    """100,000 quick calls, 8 at a time, cut at the first call: no more than two per worker were
    ever queued, so the cut step recorded at most those (all 100,000 used to be queued first)."""
    w, em = latency(lambda: True, target="math:sqrt", args=[2.0], calls_per_step=100_000, concurrency=8)
    w.step(em)
    assert 1 <= w.done <= 16 and len(em.named("call")) == w.done
    w.use_interrupt(lambda: False)
    w.p["calls_per_step"] = 500
    w.step(em)
    assert len(em.named("call")) == w.done and w.done >= 501  # uncut: every call, in order
    assert [e["step"] for e in em.named("call")] == list(range(1, w.done + 1))


def _spec(name: str, budget: float, phase: str, **section: Any) -> dict[str, Any]:
    return {
        "name": name,
        "time_budget_s": budget,
        "seed": 1,
        "workload": {"name": "coloring", "params": {"graph": COMPLETE, "phases": [phase], phase: section}},
    }


def _in_a_long_step(exp: Any) -> None:
    """Wait until the phase is inside its first long step: the checkpoint of the step before it
    (the initial colouring) is on disk, and the phase saves it just before it sends that step."""
    deadline = time.monotonic() + 60
    while (read_json(exp.run_dir / "checkpoint.json") or {}).get("steps", 0) < 1:
        assert time.monotonic() < deadline, "the initial step never ended"
        threading.Event().wait(0.02)


@pytest.mark.parametrize(
    ("phase", "section", "short_steps"),
    [
        ("tabu", {"iters_per_step": 10**9}, 1),  # the initial colouring, then TabuCol steps
        ("memetic", {"local_iters": 10**9}, 0),  # the first step sets the population up: long
    ],
)
def test_pause_set_and_stop_reach_a_phase_in_a_step_of_many_minutes(tmp_path, phase, section, short_steps):
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(_spec("long", 3600, phase, **section))
        if short_steps:
            _in_a_long_step(exp)
        exp.pause()  # answered within its 30 s ask, not after the step's minutes
        assert exp.status() == "paused"
        exp.resume()
        exp.set_param("set_tenure", 0.9, why="a note with a lone surrogate \udcff")  # kept, escaped
        with pytest.raises(ValueError, match="printable string"):
            exp.set_param("set_tenure\udcff", 0.9)
        exp.stop(timeout=60)
        assert exp.reason == "stopped"
        assert exp.summary()["active_duration"] < 600


def test_the_budget_ends_a_step_of_many_minutes(tmp_path):
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(_spec("budget", 1.0, "tabu", iters_per_step=10**9))
        assert exp.wait(120) and exp.reason == "budget"
