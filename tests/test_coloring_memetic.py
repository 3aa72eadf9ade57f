"""The memetic phase of the colouring workload (GPX crossover, TabuCol local search, mutation,
elitism), through the workload's public API only: every colouring it reports is proper and
has the colours it claims, the best never gets worse, the population's best conflict count
never rises while k holds, the control hooks act on it, and a checkpoint taken mid-phase
restores into a workload that goes on from there."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring.verify import check_coloring
from experiments.coloring.workload import ColoringWorkload


class Events:
    """Keeps what the workload emits (an emitter stand-in; the Lab tests use the real one)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.ctx: dict[str, Any] = {}

    def emit(self, name: str, values: dict[str, float] | None = None, **kw: Any) -> None:
        self.events.append({"name": name, "values": dict(values or {}), **self.ctx, **kw})

    def set_context(self, **kw: Any) -> None:
        self.ctx.update({k.rstrip("_"): v for k, v in kw.items()})

    def named(self, name: str, phase: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["name"] == name and (phase is None or e.get("phase") == phase)]


def memetic(graph: dict[str, Any], seed: int = 1, **memetic_params: Any) -> tuple[ColoringWorkload, Events]:
    params = ColoringWorkload.check_params(
        {
            "graph": graph,
            "phases": ["memetic"],
            "gpu": "cpu",
            "memetic": {"population": 6, "local_iters": 400, "max_generations": 40, **memetic_params},
        }
    )
    w = ColoringWorkload(params, seed)
    em = Events()
    w.start(em)
    return w, em


def run(w: ColoringWorkload, em: Events, steps: int) -> bool:
    for _ in range(steps):
        if w.step(em):
            return True
    return False


def check_memetic_run(w: ColoringWorkload, em: Events) -> None:
    steps = em.named("step", "memetic")
    assert steps, "the memetic phase never ran"
    init = em.named("init")[0]["values"]["chromatic_number"]
    bests = [e["values"]["chromatic_number"] for e in em.named("new_best")]
    assert bests == sorted(bests, reverse=True) and len(set(bests)) == len(bests)  # strictly better each time
    assert all(b < init for b in bests)
    assert w.best_k == (bests[-1] if bests else init)
    verdict = check_coloring(w.g, w.best)
    assert verdict["proper"] and verdict["k"] <= w.best_k
    # elitism: while k holds, the population's best conflict count never rises
    for a, b in itertools.pairwise(steps):
        if a["values"]["k"] == b["values"]["k"]:
            assert b["values"]["conflicts"] <= a["values"]["conflicts"]
    for e in steps:
        assert e["values"]["k"] < e["values"]["chromatic_number"]  # it always aims below the best
        assert e["gpu_mode"] == "cpu_disabled" and e["parameters"]["phase"] == "memetic"  # gpu = "cpu" in the spec


@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**16),
    mutation=st.sampled_from([0.0, 0.05, 0.3]),
    elitism=st.integers(0, 3),
    n=st.integers(20, 50),
)
def test_memetic_runs_are_proper_and_never_get_worse(seed, mutation, elitism, n):
    w, em = memetic(
        {"generator": "gnp", "n": n, "p": 0.4, "seed": seed},
        seed=seed,
        mutation_rate=mutation,
        elitism=elitism,
        max_generations=15,
    )
    assert run(w, em, 400), "the memetic phase must end within max_generations per k"
    check_memetic_run(w, em)
    assert w.colors_per_pass() == [w.best_k]
    assert [e["name"] for e in em.events].count("pass_end") == 1


def test_memetic_improves_on_dsatur():
    """DSATUR colours this G(70, 0.5) with 15 colours; crossing over and repairing proper
    colourings brings it well below."""
    w, em = memetic({"generator": "gnp", "n": 70, "p": 0.5, "seed": 4}, local_iters=2000, max_generations=60)
    assert run(w, em, 500)
    check_memetic_run(w, em)
    init = em.named("init")[0]["values"]["chromatic_number"]
    assert w.best_k <= init - 2, (init, w.best_k)


def test_the_control_hooks_act_on_the_memetic_phase():
    w, em = memetic({"generator": "gnp", "n": 40, "p": 0.5, "seed": 9}, max_generations=10**6)
    run(w, em, 3)
    assert w.phase == "memetic"
    assert w.set_param("set_batch", 123) == (400, 123)  # the local search's iterations
    assert w.params()["local_iters"] == 123
    assert w.set_param("boost_mutation", 0.2) == (0.0, 0.2)
    with pytest.raises(ValueError, match="mutation_rate"):
        w.set_param("boost_mutation", 1.5)
    with pytest.raises(ValueError, match="local_iters"):
        w.set_param("set_batch", 0)
    run(w, em, 5)
    assert all(
        e["parameters"]["local_iters"] == 123 and e["parameters"]["mutation_rate"] == 0.2
        for e in em.named("step", "memetic")[-3:]
    )
    w.set_param("skip_phase", True)
    assert w.step(em)  # the only phase is skipped: the pass (and the run) ends
    check_memetic_run(w, em)


def test_a_checkpoint_taken_mid_memetic_restores_and_goes_on(tmp_path):
    graph = {"generator": "gnp", "n": 45, "p": 0.5, "seed": 5}
    w, em = memetic(graph, max_generations=10**6)
    run(w, em, 6)
    state = orjson.loads(orjson.dumps(w.checkpoint(), option=orjson.OPT_SERIALIZE_NUMPY))  # as the phase saves it
    again, em2 = memetic(graph, seed=2, max_generations=10**6)
    again.restore(state)
    again.run_dir = tmp_path
    again.start(em2)
    assert again.phase == "memetic" and again.best_k == w.best_k
    assert np.array_equal(again.best, w.best)
    run(again, em2, 6)
    assert again.best_k <= w.best_k and check_coloring(again.g, again.best)["proper"]
    assert em2.named("step", "memetic")
    again.finish(em2, "budget")  # the run ends mid-pass: the pass is saved all the same
    saved = orjson.loads((tmp_path / "best_solution.pass0.json").read_bytes())
    assert saved["k"] == again.best_k and check_coloring(again.g, saved["coloring"])["proper"]
    assert em2.named("pass_end")[-1]["values"]["chromatic_number"] == again.best_k


def test_a_new_population_is_refined_one_member_per_step_so_safe_points_come_often():
    """Setting up population x local_iters in one go held a stop for minutes: the first member
    is refined at once, each other one by a step of its own, and only then do generations run."""
    graph = {"generator": "gnp", "n": 70, "p": 0.5, "seed": 4}
    w, em = memetic(graph, population=5, local_iters=300, max_generations=10**6)
    w.step(em)  # init, then the phase set up: one member refined
    ph = w.current
    assert w.phase == "memetic" and ph.gen == 0
    k = ph.k
    for left in (3, 2, 1, 0):
        w.step(em)
        assert ph.k == k and len(ph._unrefined) == left and ph.gen == 0  # this graph: no k reached meanwhile
    w.step(em)
    assert ph.gen == 1  # a generation at last
    check_memetic_run(w, em)
