"""Checks of the CUDA population kernels, run under numba's CUDA simulator.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba.cuda is first imported, so these checks
run in a process of their own: ``NUMBA_ENABLE_CUDASIM=1 python -m tests.cudasim_checks NAME``
(``tests/test_population.py`` does that for each check). The simulator runs the kernels'
Python source thread by thread, so the graphs here are small.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from experiments.coloring.graph import from_edges, gnp, planted
from experiments.coloring.verify import check_coloring
from kernels.coloring import build_gamma, count_conflicts, gpx, seed_rng
from kernels.population import CudaPopulation


def _state(pop: CudaPopulation) -> dict[str, np.ndarray]:
    return {name: getattr(pop, "d_" + name).copy_to_host() for name in ("colors", "gamma", "tabu", "best", "it")}


def kernel_invariants() -> None:
    """After a launch every chain's gamma table, conflict count and best are exact, and its
    tabu entries are bounded by the tenure rule."""
    for shared in (False, True):
        _invariants(shared)


def _invariants(shared: bool) -> None:
    g = gnp(24, 0.4, 3)
    k, p = 4, 3
    pop = CudaPopulation(g.indptr, g.indices, p, seed=5, threads=8, gamma_in_shared=shared)
    pop.tenure_a, pop.tenure_alpha = 5, 0.5
    start = np.random.default_rng(0).integers(0, k, (p, g.n)).astype(np.int32)
    pop.seed(start, k)
    assert pop.gamma_in_shared() is shared  # both layouts of the gamma table are checked
    f0 = np.array([count_conflicts(g.indptr, g.indices, c) for c in start])
    f, best_f = pop.run(25)
    st = _state(pop)
    for i in range(p):
        assert count_conflicts(g.indptr, g.indices, st["colors"][i]) == f[i]
        assert (build_gamma(g.indptr, g.indices, st["colors"][i], k).ravel() == st["gamma"][i]).all()
        assert count_conflicts(g.indptr, g.indices, st["best"][i]) == best_f[i] <= min(f[i], f0[i])
        moved = np.flatnonzero(st["tabu"][i])
        assert moved.size <= st["it"][i] <= 25
        assert (st["tabu"][i][moved] <= st["it"][i] + pop.tenure_a + pop.tenure_alpha * g.n).all()
    assert pop.iterations == int(st["it"].sum())


def load_rounds_give_the_same_search() -> None:
    """A load round of 1, 3 or 4 pairs makes the same moves with the same draws: colours,
    gamma, tabu, best, conflicts and random states agree to the bit. One thread per chain,
    so that the compaction's atomics cannot order the conflicting vertices differently; a
    round of 3 ends mid-list, and the chains' random starts differ."""
    g = gnp(20, 0.35, 7)
    k, p = 4, 4
    start = np.random.default_rng(4).integers(0, k, (p, g.n)).astype(np.int32)
    runs = {}
    for batch in (1, 3, 4):
        pop = CudaPopulation(g.indptr, g.indices, p, seed=9, threads=1, batch=batch)
        pop.tenure_a, pop.tenure_alpha = 3, 0.4
        pop.seed(start, k)
        f, best_f = pop.run(20)
        runs[batch] = (f, best_f, _state(pop), pop.d_rng.copy_to_host(), pop.iterations)
    f1, b1, st1, rng1, it1 = runs[1]
    assert it1 > p  # the chains moved
    for batch, (f, best_f, st, rng, iters) in runs.items():
        assert (f == f1).all() and (best_f == b1).all() and (rng == rng1).all() and iters == it1, batch
        for name, arr in st.items():
            assert (arr == st1[name]).all(), (batch, name)


def load_rounds_keep_every_chain_exact() -> None:
    """With several threads per chain (a walk that strides over pairs) every load round
    keeps each chain's gamma table and conflict count exact."""
    g = gnp(24, 0.4, 5)
    k, p = 5, 3
    start = np.random.default_rng(2).integers(0, k, (p, g.n)).astype(np.int32)
    for batch, threads in ((3, 4), (8, 2)):
        pop = CudaPopulation(g.indptr, g.indices, p, seed=3, threads=threads, batch=batch)
        pop.seed(start, k)
        f, best_f = pop.run(20)
        st = _state(pop)
        for i in range(p):
            assert count_conflicts(g.indptr, g.indices, st["colors"][i]) == f[i], batch
            assert (build_gamma(g.indptr, g.indices, st["colors"][i], k).ravel() == st["gamma"][i]).all(), batch
            assert count_conflicts(g.indptr, g.indices, st["best"][i]) == best_f[i] <= f[i], batch


def kernel_solves_a_planted_graph() -> None:
    """A graph with a planted 3-colouring is coloured properly with 3 colours."""
    g = planted(30, 3, 0.3, 2)
    pop = CudaPopulation(g.indptr, g.indices, 2, seed=1, threads=8)
    pop.seed(np.random.default_rng(1).integers(0, 3, (2, g.n)).astype(np.int32), 3)
    for _ in range(20):
        _, best_f = pop.run(40)
        if best_f.min() == 0:
            break
    winner = int(np.argmin(best_f))
    c = pop.best_rows([winner])[0]
    assert best_f[winner] == 0 and check_coloring(g, c)["proper"] and c.max() < 3


def ties_are_broken_uniformly() -> None:
    """Four disjoint edges, every vertex coloured 0, k = 3: 16 moves tie at delta -1; the one
    made is uniform among them (chi-square over many chains and launches)."""
    from scipy.stats import chisquare

    g = from_edges(8, np.array([[0, 1], [2, 3], [4, 5], [6, 7]]))
    chains, rounds = 32, 3
    pop = CudaPopulation(g.indptr, g.indices, chains, seed=11, threads=2)
    counts = np.zeros((8, 3), dtype=np.int64)
    for _ in range(rounds):
        pop.seed(np.zeros((chains, 8), dtype=np.int32), 3)
        f, _ = pop.run(1)
        assert (f == 3).all()  # one conflicting edge repaired
        cols = pop.d_colors.copy_to_host()
        tabu = pop.d_tabu.copy_to_host().reshape(chains, 8, 3)
        for i in range(chains):
            (v,) = np.flatnonzero(cols[i])
            counts[v, cols[i, v]] += 1
            assert tabu[i, v, 0] >= 1  # the old colour is tabu now
    seen = counts[:, 1:].ravel()
    assert counts[:, 0].sum() == 0 and seen.sum() == chains * rounds
    assert chisquare(seen).pvalue > 1e-3, seen


def gpx_classes(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """GPX in plain Python: child colour ``step`` = the largest class left in parent ``a``
    (even steps) or ``b`` (odd steps), ties to the lowest colour; -1 where left over."""
    child = np.full(a.size, -1)
    left = np.ones(a.size, dtype=bool)
    for step in range(k):
        src = a if step % 2 == 0 else b
        sizes = np.bincount(src[left], minlength=k)
        if sizes.max() == 0:
            break
        members = left & (src == int(np.argmax(sizes)))
        child[members] = step
        left &= ~members
    return child


def gpx_matches_the_cpu_reference() -> None:
    """The device GPX builds exactly the colour classes of the reference; only the colours of
    left-over vertices are random."""
    g = gnp(40, 0.3, 1)
    k = 5
    rows = np.random.default_rng(3).integers(0, k, (4, g.n)).astype(np.int32)
    pop = CudaPopulation(g.indptr, g.indices, 4, seed=2, threads=8)
    pop.seed(rows, k)
    pop.crossover(np.array([2, 3]), np.array([0, 1]), np.array([1, 0]))
    got = pop.d_colors.copy_to_host()
    assert (got[:2] == rows[:2]).all()  # the parents are untouched
    for child, (a, b) in zip(got[2:], ((0, 1), (1, 0)), strict=True):
        ref = gpx_classes(rows[a], rows[b], k)
        placed = ref >= 0
        assert placed.sum() > g.n // 2 and (child[placed] == ref[placed]).all()
        assert child.min() >= 0 and child.max() < k
        seed_rng(0)
        cpu = gpx(rows[a], rows[b], k)  # the numba kernel agrees on the placed vertices too
        assert (cpu[placed] == ref[placed]).all()
    f, _ = pop.run(5)  # the children restarted: their state is exact
    st = _state(pop)
    for i in range(4):
        assert (build_gamma(g.indptr, g.indices, st["colors"][i], k).ravel() == st["gamma"][i]).all()
        assert count_conflicts(g.indptr, g.indices, st["colors"][i]) == f[i]


def population_phase_on_the_device() -> None:
    """The workload's population phase picks the (simulated) device, records it in its
    events, and takes a crown graph from greedy's 4 colours down to 2."""
    import tempfile
    from pathlib import Path

    from experiments.coloring.workload import ColoringWorkload

    # crown graph S4: u_i = 2i, v_i = 2i + 1, u_i - v_j for i != j; greedy in index order needs 4 colours
    edges = [(2 * i + 1, 2 * j + 2) for i in range(4) for j in range(4) if i != j]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crown4.col"
        path.write_text("p edge 8 12\n" + "".join(f"e {u} {v}\n" for u, v in edges))
        params = ColoringWorkload.check_params(
            {
                "graph": {"file": str(path)},
                "init": {"strategy": "greedy"},
                "phases": ["population"],
                "target": 2,
                "population": {"population": 3, "threads_per_chain": 4, "generation_s": 0.05, "max_generations": 20},
            }
        )
        w = ColoringWorkload(params, 1)
    events = []

    class Em:
        def emit(self, name, values=None, **kw):
            events.append((name, values or {}, kw))

        def set_context(self, **kw):
            pass

    w.start(Em())
    for _ in range(60):
        if w.step(Em()):
            break
    init = next(v for name, v, _ in events if name == "init")
    steps = [e for e in events if e[0] == "step"]
    assert init["chromatic_number"] == 4 and w.best_k == 2 and check_coloring(w.g, w.best)["proper"]
    assert steps and all(kw["gpu_mode"] == "gpu" and kw["phase"] == "population" for _, _, kw in steps)
    assert {"pop_best", "pop_mean", "diversity", "population", "generation"} <= set(steps[-1][1])
    cp = w.checkpoint()
    assert cp["best_k"] == 2 and check_coloring(w.g, cp["best"])["proper"]


CHECKS = {
    f.__name__: f
    for f in (
        kernel_invariants,
        load_rounds_give_the_same_search,
        load_rounds_keep_every_chain_exact,
        kernel_solves_a_planted_graph,
        ties_are_broken_uniformly,
        gpx_matches_the_cpu_reference,
        population_phase_on_the_device,
    )
}

if __name__ == "__main__":
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("run with NUMBA_ENABLE_CUDASIM=1 (numba's CUDA simulator)")
    for name in sys.argv[1:] or list(CHECKS):
        CHECKS[name]()
        print(f"{name}: ok", flush=True)
