"""The population phase: CPU engine, selection and crossover, the workload's hooks, and the
CUDA kernels under numba's simulator (in a process of their own: tests/cudasim_checks.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring.graph import gnp, planted
from experiments.coloring.population import PopulationSearch, partition_distance
from experiments.coloring.verify import check_coloring
from experiments.coloring.workload import ColoringWorkload
from kernels.coloring import build_gamma, count_conflicts, reduce_colors
from kernels.population import CpuPopulation, auto_size, chain_bytes, cuda_status
from tests.cudasim_checks import CHECKS

ROOT = Path(__file__).resolve().parents[1]


def under_the_simulator(*argv: str) -> subprocess.CompletedProcess:
    """``python argv...`` in a process of its own with numba's CUDA simulator on."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_cuda_kernels_under_the_simulator(check):
    r = under_the_simulator("-m", "tests.cudasim_checks", check)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{check}: ok" in r.stdout


def test_the_gpu_bench_measures_every_load_round_and_layout_under_the_simulator():
    """``bench.gpu rates`` runs its GPU rows end to end (so a device session spends no time on
    a broken bench): one row per load round and gamma layout, each with a positive rate."""
    args = ["--instances", "myciel5:5", "--seconds", "0.2", "--threads", "4", "--population", "2"]
    r = under_the_simulator("-m", "bench.gpu", "rates", *args, "--iters", "5", "--batches", "1,4")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("GPU ")]
    seen = {(row[3], row[4]) for row in rows}
    assert seen == {(f"batch={b}", f"gamma={g}") for b in (1, 4) for g in ("global", "shared")}, r.stdout
    assert all(int(row[5].replace(",", "")) > 0 and row[6] == "it/s" for row in rows), r.stdout


def test_a_load_round_outside_its_range_is_refused():
    from kernels import tabu_cuda

    for bad in (0, tabu_cuda.MAX_BATCH + 1, -3):
        with pytest.raises(ValueError, match="load round must be 1 to"):
            tabu_cuda.tabu_chains_for(bad)
    assert tabu_cuda.tabu_chains_for(tabu_cuda.BATCH) is tabu_cuda.tabu_chains_for(tabu_cuda.BATCH)


def _exact(pop: CpuPopulation, g) -> None:
    for i in range(pop.size):
        assert count_conflicts(g.indptr, g.indices, pop.colors[i]) == pop.f[i]
        assert (build_gamma(g.indptr, g.indices, pop.colors[i], pop.k) == pop.gammas[i]).all()
        assert count_conflicts(g.indptr, g.indices, pop.best[i]) == pop.best_f[i] <= pop.f[i]


def test_cpu_engine_keeps_every_chain_exact_and_counts_its_work():
    g = gnp(60, 0.5, 2)
    pop = CpuPopulation(g.indptr, g.indices, 4, seed=3, threads=2)
    pop.seed(np.random.default_rng(0).integers(0, 7, (4, g.n)), 7)
    f0 = pop.f.copy()
    f, best_f = pop.run(300)
    assert (best_f <= f0).all() and (f == pop.f).all()
    assert pop.iterations == int(pop.its.sum()) and 0 < pop.iterations <= 4 * 300
    _exact(pop, g)


def test_cpu_crossover_children_restart_exact_and_parents_stay():
    g = gnp(50, 0.4, 1)
    pop = CpuPopulation(g.indptr, g.indices, 5, seed=1, threads=2)
    pop.seed(np.random.default_rng(2).integers(0, 6, (5, g.n)), 6)
    pop.run(200)
    parents = pop.best[[0, 1]].copy()
    pop.crossover(np.array([3, 4]), np.array([0, 1]), np.array([1, 0]))
    assert (pop.best[[0, 1]] == parents).all()
    assert (pop.its[[3, 4]] == 0).all() and (pop.tabus[[3, 4]] == 0).all()
    _exact(pop, g)


class Engine:
    """A stand-in engine with scripted conflict counts (the selection logic is under test)."""

    device = "cpu"

    def __init__(self, n, size, k):
        self.size, self.n, self.k, self.iterations = size, n, k, 0
        self.rows = np.zeros((size, n), dtype=np.int32)
        self.calls = []
        self.tenure_a, self.tenure_alpha = 10, 0.6

    def seed(self, rows, k):
        self.rows, self.k = rows.copy(), k

    def best_rows(self, idx):
        return self.rows[np.asarray(idx)].copy()

    def crossover(self, victims, pa, pb):
        self.calls.append((victims.copy(), pa.copy(), pb.copy()))

    def close(self):
        pass


def _search(size, best_f, age, rate=0.25, min_age=3):
    g = gnp(20, 0.3, 0)
    s = PopulationSearch.__new__(PopulationSearch)
    s.g, s.rng, s.k = g, np.random.default_rng(0), 3
    s.p = {"crossover_rate": rate, "min_age": min_age}
    s.engine = Engine(g.n, size, 3)
    s.best_f = np.asarray(best_f, dtype=np.int64)
    s.f = s.best_f.copy()
    s.age = np.asarray(age, dtype=np.int64)
    return s


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6)), min_size=3, max_size=40))
def test_crossover_replaces_the_worst_old_chains_with_children_of_better_distinct_parents(chains):
    best_f = [b for b, _ in chains]
    age = [a for _, a in chains]
    s = _search(len(chains), best_f, age)
    s._crossover()
    eligible = [i for i, a in enumerate(age) if a >= 3]
    want = min(round(0.25 * len(chains)), len(eligible), len(chains) - 2)
    if want < 1:
        assert s.engine.calls == []
        return
    ((victims, pa, pb),) = s.engine.calls
    assert len(victims) == want and set(victims) <= set(eligible)
    worst_kept = max((best_f[i] for i in eligible if i not in set(victims)), default=-1)
    assert min(best_f[i] for i in victims) >= worst_kept  # the worst eligible go
    assert not (set(pa) | set(pb)) & set(victims.tolist())  # never a child's own row
    assert (pa != pb).all()
    assert (s.age[victims] == 0).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 40), st.randoms(use_true_random=False))
def test_partition_distance_ignores_colour_names(k, n, rnd):
    a = np.array([rnd.randrange(k) for _ in range(n)])
    b = np.array([rnd.randrange(k) for _ in range(n)])
    perm = np.array(rnd.sample(range(k), k))
    d = partition_distance(a, b, k)
    assert d == partition_distance(b, a, k) == partition_distance(perm[a], b, k) == partition_distance(a, perm[b], k)
    assert partition_distance(a, perm[a], k) == 0 and 0 <= d <= n - 1 + (n == 0)
    assert d <= int((a != b).sum())  # the identity renaming is one candidate


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**16), st.integers(1, 3))
def test_reduce_colors_keeps_colours_below_k_and_moves_to_the_least_used_neighbour_colour(k, seed, rows):
    g = gnp(25, 0.3, seed)
    r = np.random.default_rng(seed).integers(0, k + 3, (rows, g.n)).astype(np.int32)
    out = reduce_colors(g.indptr, g.indices, r, k)
    assert out.max() < k and (out[r < k] == r[r < k]).all() and r.max() < k + 3  # input untouched
    for row_in, row in zip(r, out, strict=True):  # the same vertex-by-vertex rule in Python
        c = row_in.copy()
        for v in np.flatnonzero(c >= k):
            counts = np.bincount([c[u] for u in g.neighbors(v) if c[u] < k], minlength=k)
            c[v] = int(np.argmin(counts))
        assert (c == row).all()


def test_auto_size_fills_the_device_within_memory():
    assert auto_size(500, 48, free_bytes=80 << 30, sms=132) == 132 * 16
    small = auto_size(1000, 85, free_bytes=2 << 30, sms=132)
    assert small * chain_bytes(1000, 85) <= (2 << 30) // 4 and small >= 1
    assert auto_size(10, 3, 80 << 30, sms=1) == 256  # at least 256 when memory allows


def _workload(params, seed=1):
    return ColoringWorkload(ColoringWorkload.check_params(params), seed)


class Recorded:
    def __init__(self):
        self.events = []

    def emit(self, name, values=None, **kw):
        self.events.append({"name": name, "values": values or {}, **kw})

    def set_context(self, **kw):
        pass


def test_population_phase_on_the_cpu_colours_a_planted_graph_and_says_where_it_ran():
    g_spec = {"generator": "planted", "n": 90, "k": 6, "p": 0.5, "seed": 3}
    w = _workload(
        {
            "graph": g_spec,
            "init": {"strategy": "greedy"},
            "phases": ["population"],
            "target": 6,
            "population": {"population": 4, "generation_s": 0.05},
        }
    )
    em = Recorded()
    w.start(em)
    for _ in range(400):
        if w.step(em):
            break
    assert em.events[0]["values"]["chromatic_number"] > 6  # greedy leaves work for the phase
    assert w.best_k <= 6 and check_coloring(w.g, w.best)["proper"]
    ok, why = cuda_status()
    steps = [e for e in em.events if e["name"] == "step"]
    assert steps and all(e["phase"] == "population" for e in steps)
    if not ok:  # machines without a GPU (CI): the CPU cores, and why
        assert {(e["gpu_mode"], e["gpu_reason"]) for e in steps} == {("cpu_fallback", why)}
    last = steps[-1]["values"]
    assert last["population"] == 4 and 0 <= last["diversity"] <= 1
    assert sum(e["values"]["iterations"] for e in steps) > 0
    assert any(e["name"] == "new_best" for e in em.events)


def test_population_controls_apply_at_safe_points_or_are_refused():
    w = _workload(
        {
            "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 2},
            "phases": ["population"],
            "gpu": "cpu",
            "population": {"population": 4, "generation_s": 0.02},
        }
    )
    em = Recorded()
    w.start(em)
    for _ in range(3):
        w.step(em)
    assert w.phase == "population" and w.gpu_mode == "cpu_disabled"
    w.current.search.iters = 90_000
    assert w.set_param("set_population", 6) == (4, 6) and w.current.search.size == 6
    assert w.current.search.iters == 60_000  # the work per generation stays what it was
    f = w.current.search.engine
    for i in range(f.size):  # the resized population is exact
        assert count_conflicts(w.g.indptr, w.g.indices, f.colors[i]) == f.f[i]
    assert w.set_param("set_crossover_rate", 0.3) == (0.1, 0.3)
    assert w.set_param("set_tenure", 1.5) == (0.6, 1.5) and w.current.search.engine.tenure_alpha == 1.5
    assert w.set_param("set_batch", 500)[1] == 500 and w.current.search.iters == 500
    w.step(em)
    assert em.events[-1]["values"]["population"] == 6
    for key, value in (
        ("set_population", 0),
        ("set_population", float("nan")),
        ("set_crossover_rate", 0.95),
        ("set_batch", 10),
        ("set_batch", 2.5),
        ("set_tenure", float("inf")),
    ):
        with pytest.raises(ValueError, match=r"population|crossover|iterations|tenure"):
            w.set_param(key, value)
    assert w.set_param("set_population", 2) == (6, 2)  # as small as a spec may ask: no crossover, the chains go on
    for _ in range(3):
        w.step(em)
    assert em.events[-1]["values"]["population"] == 2 and check_coloring(w.g, w.best)["proper"]


def test_a_population_checkpoint_restores_best_and_k():
    params = {
        "graph": {"generator": "gnp", "n": 70, "p": 0.5, "seed": 5},
        "phases": ["population"],
        "gpu": "cpu",
        "population": {"population": 4, "generation_s": 0.02},
    }
    w = _workload(params)
    em = Recorded()
    w.start(em)
    for _ in range(15):
        w.step(em)
    cp = w.checkpoint()
    again = _workload(params)
    again.restore(cp)
    again.start(em)
    assert again.best_k == w.best_k and again.phase == "population" and again.k == w.best_k - 1
    assert check_coloring(again.g, again.best)["proper"]
    again.step(em)
    assert again.best_k <= w.best_k


def test_next_k_continues_every_chain_from_its_own_best():
    g = planted(60, 5, 0.4, 1)
    search = PopulationSearch(
        g,
        {
            "population": 4,
            "crossover_rate": 0.1,
            "min_age": 3,
            "generation_s": 0.02,
            "tenure_a": 10,
            "tenure_alpha": 0.6,
            "threads_per_chain": 64,
            "max_generations": 100,
        },
        1,
        "cpu",
        7,
    )
    search.seed_from(np.random.default_rng(0).integers(0, 7, g.n).astype(np.int32), 7)
    while (sol := search.step()) is None:
        pass
    assert count_conflicts(g.indptr, g.indices, sol) == 0 and sol.max() < 7
    search.next_k(sol, 7)
    eng = search.engine
    assert eng.k == 6 and eng.colors.max() < 6
    assert (eng.colors[0] == reduce_colors(g.indptr, g.indices, sol[None, :], 6)[0]).all()


def test_a_device_failure_mid_phase_goes_on_on_the_cpu_and_says_why():
    w = _workload(
        {
            "graph": {"generator": "planted", "n": 80, "k": 5, "p": 0.5, "seed": 2},
            "init": {"strategy": "greedy"},
            "phases": ["population"],
            "target": 5,
            "population": {"population": 4, "generation_s": 0.05},
        }
    )
    em = Recorded()
    w.start(em)
    w.step(em)  # the initial colouring; the population phase is entered
    search = w.current.search

    class LostDevice:
        """Stands for a CUDA population whose device stops answering."""

        device, size, iterations, tenure_a, tenure_alpha = "gpu", 4, 0, 10, 0.6

        def run(self, iters):
            raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered")

        def close(self):
            raise RuntimeError("the context is gone")

    search.engine, search.gpu_mode, search.gpu_reason = LostDevice(), "gpu", None
    for _ in range(300):
        if w.step(em):
            break
    steps = [e for e in em.events if e["name"] == "step"]
    assert (steps[0]["gpu_mode"], steps[0]["gpu_reason"]) == (
        "cpu_fallback",
        "device error: CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered",
    )
    assert search.engine.device == "cpu" and w.best_k <= 5 and check_coloring(w.g, w.best)["proper"]


def test_a_population_too_large_for_memory_is_cut_to_what_fits():
    from experiments.coloring.population import _cpu_engine

    g = gnp(2000, 0.01, 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    eng = _cpu_engine(g, 65_536, 2000, seed=0)  # 65,536 chains x 2000 x 2000 tables would need petabytes
    assert 1 <= eng.size and eng.size * 2000 * 2000 * 8 <= ram // 4  # int32 gamma and tabu tables
    assert _cpu_engine(g, 5, 3, seed=0).size == 5  # a size that fits is kept


def test_controls_of_the_wrong_type_are_refused_not_crashes():
    w = _workload(
        {
            "graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 1},
            "phases": ["population"],
            "gpu": "cpu",
            "population": {"population": 4, "generation_s": 0.02},
        }
    )
    em = Recorded()
    w.start(em)
    w.step(em)
    for key, value in (
        (["set_tenure"], 1.0),
        ({"a": 1}, 1),
        ("adjust_temperature", None),
        ("adjust_temperature", "2"),
        ("adjust_temperature", True),
        ("external_tenure", "false"),
        ("external_tenure", float("nan")),
        ("external_tenure", 1),
    ):
        with pytest.raises(ValueError):
            w.set_param(key, value)
    assert w.set_param("external_tenure", True) == (False, True)


def test_a_bad_control_never_crashes_the_phase_actor(tmp_path):
    from supervisor import Lab

    spec = {
        "name": "ctl",
        "time_budget_s": 30.0,
        "seed": 1,
        "supervision": {"max_restarts": 1, "max_seconds": 30},
        "workload": {
            "name": "coloring",
            "params": {
                "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 2},
                "phases": ["population"],
                "gpu": "cpu",
                "population": {"population": 4, "generation_s": 0.05},
            },
        },
    }
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(spec)
        phase = exp.registry.whereis("phase")
        for msg in (
            {"key": "adjust_temperature", "value": None},
            {"key": ["set_tenure"], "value": 1},
            {"key": "set_population", "value": [3]},
            {"key": None, "value": None},
        ):
            answer = phase.ask({"kind": "set_param", **msg}, timeout=30)
            assert answer["ok"] is False and answer["error"]
        assert exp.registry.whereis("phase") is phase  # the same actor: nothing restarted
        exp.stop()
        assert exp.status() == "stopped" and exp.reason == "stopped"


def test_set_population_is_cut_to_memory_and_applied_when_the_phase_comes_back():
    from experiments.coloring.population import _ram_fit

    w = _workload(
        {
            "graph": {"generator": "gnp", "n": 70, "p": 0.5, "seed": 3},
            "phases": ["population", "tabu"],
            "gpu": "cpu",
            "population": {"population": 4, "generation_s": 0.02, "max_generations": 2},
            "tabu": {"max_iters_per_k": 2000},
            "iterative": {"enabled": True, "max_passes": 2},
        }
    )
    em = Recorded()
    w.start(em)
    while w.phase != "tabu":
        assert not w.step(em)
    search = w.current.search if w.phase == "population" else w._phases["population"].search
    assert search._fit(65_536) == min(65_536, _ram_fit(w.g.n, search.k))
    assert w.set_param("set_population", 6) == (4, 6)  # asked for while the tabu phase runs
    while not w.step(em):
        pass
    first_end = next(i for i, e in enumerate(em.events) if e["name"] == "pass_end")
    later = [e for e in em.events[first_end:] if e["name"] == "step" and e["phase"] == "population"]
    assert later and all(e["values"]["population"] == 6 for e in later)


def test_every_event_after_the_phase_starts_says_where_it_ran_and_why(tmp_path):
    """gpu_mode and gpu_reason are in every event (phase_start, new_best, pass_end, control),
    not only in the steps': the real emitter's context carries both."""
    from supervisor import Lab
    from telemetry.jsonl import iter_run
    from tests.fault_helpers import until

    lab = Lab(tmp_path / "art")
    try:
        params = {
            "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 2},
            "phases": ["population"],
            "gpu": "auto",
            "population": {"population": 4, "generation_s": 0.02},
        }
        exp = lab.start_experiment(
            {"name": "where", "time_budget_s": 3.0, "workload": {"name": "coloring", "params": params}}
        )
        until(lambda: exp.phase_status(max_age=0, wait=10).get("steps", 0) >= 3, what="the phase's steps")
        exp.set_param("set_crossover_rate", 0.3)
        assert exp.wait(60)
    finally:
        lab.shutdown()
    events = list(iter_run(exp.run_dir))
    after = events[next(i for i, e in enumerate(events) if e["name"] == "phase_start") :]
    named = {e["name"] for e in after}
    assert {"phase_start", "step", "pass_end", "control"} <= named
    ok, why = cuda_status()
    for e in after:
        if e["name"] in ("phase_end", "counters"):
            continue  # the Phase actor's own closing records
        assert e.get("gpu_mode") in ("gpu", "cpu_fallback"), e
        if not ok:
            assert (e["gpu_mode"], e.get("gpu_reason")) == ("cpu_fallback", why), e
