import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from experiments.coloring.catalog import instance_path
from experiments.coloring.graph import MAX_VERTICES, GraphError, from_edges, gnp, planted, read_dimacs
from experiments.coloring.init import STRATEGIES, initial_coloring
from experiments.coloring.verify import check_coloring
from experiments.coloring.workload import ColoringWorkload
from kernels.backend import select_backend
from kernels.coloring import (
    anneal,
    build_gamma,
    count_conflicts,
    dsatur,
    gpx,
    greedy_color,
    rebase_tabu,
    seed_rng,
    tabucol,
)
from kernels.replicas_xp import build_gamma_xp, conflicts_xp, dense_adjacency, sweep_xp

# --- graphs ----------------------------------------------------------------------------------------


def test_reads_the_shipped_instances():
    q = read_dimacs(instance_path("queen8_8"))
    assert (q.n, q.m, q.meta["edge_lines"]) == (64, 728, 1456)  # every edge listed twice, de-duplicated
    g = read_dimacs(instance_path("DSJC125.5"))
    assert (g.n, g.m) == (125, 3891)
    assert all((np.diff(g.neighbors(v)) > 0).all() for v in range(g.n))  # sorted, unique


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("p edge 3 1\ne 1 1\n", r"bad\.col:2: self-loop"),
        ("p edge 3 1\ne 1 4\n", r"bad\.col:2: vertex id out of range 1\.\.3"),
        ("c hi\ne 1 2\np edge 3 1\n", r"bad\.col:2: edge before"),
        ("p edge x 1\n", r"bad\.col:1: N and M must be integers"),
        ("p edge 3\n", r"bad\.col:1: expected 'p edge N M'"),
        ("p edge 3 1\ne 1 two\n", r"bad\.col:2: vertex ids must be integers"),
        ("c only comments\n", r"no 'p edge N M' line"),
        ("p edge 3 1\nq 1 2\n", r"bad\.col:2: unknown line type 'q'"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, text, match):
    p = tmp_path / "bad.col"
    p.write_text(text)
    with pytest.raises(GraphError, match=match):
        read_dimacs(p)


def test_isolated_vertices_and_disconnected_graphs(tmp_path):
    p = tmp_path / "g.col"
    p.write_text("c two triangles and two isolated vertices\np edge 8 6\ne 1 2\ne 2 3\ne 1 3\ne 4 5\ne 5 6\ne 4 6\n")
    g = read_dimacs(p)
    c = initial_coloring(g, "dsatur")
    v = check_coloring(g, c)
    assert v["proper"] and v["k"] == 3


def test_generators_are_seeded_and_planted_is_colourable():
    a, b = gnp(60, 0.3, seed=4), gnp(60, 0.3, seed=4)
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, gnp(60, 0.3, seed=5).indices)
    assert abs(a.density() - 0.3) < 0.08
    g = planted(90, 6, 0.6, seed=2)
    assert check_coloring(g, g.meta["planted"])["proper"]
    with pytest.raises(GraphError):
        planted(5, 9, 0.5)


# --- kernels against slow references ------------------------------------------------------------------

graphs = st.builds(lambda n, p, s: gnp(n, p, seed=s), st.integers(2, 30), st.floats(0.05, 0.9), st.integers(0, 10**6))


def ref_gamma(g, colors, k):
    gam = np.zeros((g.n, k), dtype=np.int64)
    for u, v in g.edges().tolist():
        gam[u, colors[v]] += 1
        gam[v, colors[u]] += 1
    return gam


def ref_greedy(g, order):
    colors = [-1] * g.n
    for v in order:
        used = {colors[u] for u in g.neighbors(v) if colors[u] >= 0}
        colors[v] = next(c for c in range(g.n + 1) if c not in used)
    return colors


def ref_dsatur(g):
    colors = [-1] * g.n
    deg = g.degrees()
    for _ in range(g.n):

        def key(v):
            return (len({colors[u] for u in g.neighbors(v) if colors[u] >= 0}), deg[v], -v)

        v = max((v for v in range(g.n) if colors[v] < 0), key=key)
        used = {colors[u] for u in g.neighbors(v) if colors[u] >= 0}
        colors[v] = next(c for c in range(g.n + 1) if c not in used)
    return colors


@settings(max_examples=40)
@given(graphs, st.integers(1, 6), st.integers(0, 1000))
def test_conflicts_and_gamma_match_reference(g, k, seed):
    c = np.random.default_rng(seed).integers(0, k, g.n).astype(np.int32)
    ref = sum(1 for u, v in g.edges().tolist() if c[u] == c[v])
    assert count_conflicts(g.indptr, g.indices, c) == ref
    assert np.array_equal(build_gamma(g.indptr, g.indices, c, k), ref_gamma(g, c, k))


@settings(max_examples=40)
@given(graphs, st.integers(0, 1000))
def test_greedy_and_dsatur_match_reference(g, seed):
    order = np.random.default_rng(seed).permutation(g.n).astype(np.int32)
    assert greedy_color(g.indptr, g.indices, order).tolist() == ref_greedy(g, order.tolist())
    d = dsatur(g.indptr, g.indices)
    assert d.tolist() == ref_dsatur(g)
    assert check_coloring(g, d)["proper"]


@settings(max_examples=30)
@given(graphs, st.integers(2, 5), st.integers(0, 1000))
def test_tabucol_keeps_gamma_consistent(g, k, seed):
    seed_rng(seed)
    c = np.random.default_rng(seed).integers(0, k, g.n).astype(np.int32)
    gamma = build_gamma(g.indptr, g.indices, c, k)
    tabu = np.zeros((g.n, k), dtype=np.int32)
    best = c.copy()
    done, f, bf = tabucol(g.indptr, g.indices, k, c, gamma, tabu, 0, 200, 10, 0.6, best, 1 << 30)
    assert np.array_equal(gamma, ref_gamma(g, c, k))  # incremental table == recomputation
    assert f == count_conflicts(g.indptr, g.indices, c)
    assert bf == count_conflicts(g.indptr, g.indices, best) <= f
    assert done <= 200 and (f == 0 or done == 200)
    assert (tabu <= done + 10 + 0.6 * g.n).all()  # the reactive tenure bounds every entry


@njit(cache=True)
def _numba_randint(lo, hi):  # the kernel's own generator (numba's, per thread), seen from Python
    return np.random.randint(lo, hi)


def ref_tabucol(g, k, colors, tabu, it0, iters, tenure_a, tenure_alpha, best_colors, best_f):
    """TabuCol as the textbook writes it: one pass over every (conflicting vertex, colour), the
    gamma table rebuilt from scratch every move, the same draws as the kernel (its xorshift64*
    and numba's generator) and the same order of the conflicting-vertex list."""
    mask = (1 << 64) - 1

    def xorshift(s):
        s ^= s >> 12
        s ^= (s << 25) & mask
        s ^= s >> 27
        return s, ((s * 2685821657736338717) & mask) >> 32

    nbrs = [g.neighbors(v).tolist() for v in range(g.n)]
    gamma = ref_gamma(g, colors, k)
    conf = [v for v in range(g.n) if gamma[v, colors[v]] > 0]
    f = int(sum(gamma[v, colors[v]] for v in conf)) // 2
    if f < best_f:
        best_f, best_colors[:] = f, colors
    s = _numba_randint(1, 1 << 62)
    it = it0
    while it < it0 + iters and f > 0:
        bd, ties = None, []
        for v in conf:
            for c in range(k):
                d = int(gamma[v, c] - gamma[v, colors[v]])
                if c == colors[v] or (tabu[v, c] > it and f + d >= best_f) or (bd is not None and d > bd):
                    continue
                if bd is None or d < bd:
                    bd, ties = d, []
                ties.append((v, c))
        s, r = xorshift(s)
        if ties:
            v, c = ties[(r * len(ties)) >> 32]
        else:
            v = conf[_numba_randint(0, len(conf))]
            c = _numba_randint(0, k - 1)
            c += c >= colors[v]
            bd = int(gamma[v, c] - gamma[v, colors[v]])
        old, colors[v] = colors[v], c
        gamma = ref_gamma(g, colors, k)
        for u in [*nbrs[v], v]:  # the list as the kernel keeps it: swap-remove, append
            bad = gamma[u, colors[u]] > 0
            if bad and u not in conf:
                conf.append(u)
            elif not bad and u in conf:
                i = conf.index(u)
                conf[i] = conf[-1]
                conf.pop()
        f += bd
        s, r = xorshift(s)
        tabu[v, old] = it + ((r * tenure_a) >> 32) + int(tenure_alpha * len(conf))
        it += 1
        if f < best_f:
            best_f, best_colors[:] = f, colors
    return it - it0, f, best_f


@settings(max_examples=40, deadline=None)
@given(graphs, st.integers(2, 6), st.integers(0, 1000), st.integers(0, 120), st.floats(0.0, 2.0))
def test_tabucol_makes_the_textbook_moves(g, k, seed, split, alpha):
    """The kernel's two-pass vectorised scan draws exactly the moves of the one-pass loop, also
    across calls (the own-colour tabu entries it holds during a call are not seen outside)."""
    start = np.random.default_rng(seed).integers(0, k, g.n).astype(np.int32)
    seed_rng(seed)
    c_ref, tabu_ref, best_ref = start.copy(), np.zeros((g.n, k), dtype=np.int32), start.copy()
    done_a, _, bf = ref_tabucol(g, k, c_ref, tabu_ref, 0, split, 3, alpha, best_ref, 1 << 30)
    done_b, f_ref, bf_ref = ref_tabucol(g, k, c_ref, tabu_ref, done_a, 150, 3, alpha, best_ref, bf)
    seed_rng(seed)
    c, tabu, best = start.copy(), np.zeros((g.n, k), dtype=np.int32), start.copy()
    gamma = build_gamma(g.indptr, g.indices, c, k)
    da, _, bf = tabucol(g.indptr, g.indices, k, c, gamma, tabu, 0, split, 3, alpha, best, 1 << 30)
    db, f, bf = tabucol(g.indptr, g.indices, k, c, gamma, tabu, da, 150, 3, alpha, best, bf)
    assert (da, db, f, bf) == (done_a, done_b, f_ref, bf_ref)
    assert np.array_equal(c, c_ref) and np.array_equal(best, best_ref)
    own = np.zeros((g.n, k), dtype=bool)
    own[np.arange(g.n), c] = True
    assert np.array_equal(tabu[~own], tabu_ref[~own]) and not tabu[own].any()


@settings(max_examples=25)
@given(graphs, st.integers(2, 5), st.integers(0, 1000), st.integers(1, 300))
def test_a_rebased_tabu_table_gives_the_same_search(g, k, seed, at):
    """Rebasing (int32 tables on long runs) shifts iteration numbers without changing a move."""
    start = np.random.default_rng(seed).integers(0, k, g.n).astype(np.int32)
    runs = []
    for rebase in (False, True):
        seed_rng(seed)
        c = start.copy()
        gamma = build_gamma(g.indptr, g.indices, c, k)
        tabu = np.zeros((g.n, k), dtype=np.int32)
        best = c.copy()
        done, _, bf = tabucol(g.indptr, g.indices, k, c, gamma, tabu, 0, at, 10, 0.6, best, 1 << 30)
        it = done
        if rebase:
            rebase_tabu(tabu, it)
            assert tabu.min() >= 0
            it = 0
        tabucol(g.indptr, g.indices, k, c, gamma, tabu, it, 200, 10, 0.6, best, bf)
        runs.append((c.copy(), best.copy()))
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


@settings(max_examples=30)
@given(graphs, st.integers(2, 5), st.floats(0.1, 5.0), st.integers(0, 1000))
def test_anneal_keeps_gamma_consistent(g, k, beta, seed):
    seed_rng(seed)
    c = np.random.default_rng(seed).integers(0, k, g.n).astype(np.int32)
    gamma = build_gamma(g.indptr, g.indices, c, k)
    before = count_conflicts(g.indptr, g.indices, c)
    d = anneal(g.indptr, g.indices, k, c, gamma, beta, 300)
    assert np.array_equal(gamma, ref_gamma(g, c, k))
    assert count_conflicts(g.indptr, g.indices, c) == before + d


@settings(max_examples=30)
@given(graphs, st.integers(2, 6), st.integers(0, 1000))
def test_gpx_child_uses_parent_classes(g, k, seed):
    rng = np.random.default_rng(seed)
    p1, p2 = (rng.integers(0, k, g.n).astype(np.int32) for _ in range(2))
    seed_rng(seed)
    child = gpx(p1, p2, k)
    assert child.shape == (g.n,) and child.min() >= 0 and child.max() < k
    largest = np.bincount(p1, minlength=k).max()  # the first class taken is p1's largest, whole
    assert np.bincount(child, minlength=k)[0] >= largest


def sequential_reference(adj, colors, betas, verts, shifts, unif, k):
    """One replica at a time, one move at a time: the semantics the array code must match."""
    colors = colors.copy()
    for r in range(colors.shape[0]):
        for s in range(verts.shape[1]):
            v, old = verts[r, s], colors[r, verts[r, s]]
            new = (old + shifts[r, s]) % k
            gam_new = sum(adj[v, u] for u in range(adj.shape[0]) if colors[r, u] == new)
            gam_old = sum(adj[v, u] for u in range(adj.shape[0]) if colors[r, u] == old)
            d = gam_new - gam_old
            if d <= 0 or unif[r, s] < np.exp(-betas[r] * d):
                colors[r, v] = new
    return colors


@settings(max_examples=25)
@given(graphs, st.integers(2, 5), st.integers(1, 4), st.integers(0, 1000))
def test_array_api_replicas_match_the_sequential_semantics(g, k, reps, seed):
    xp, mode, reason = select_backend("auto")
    assert xp is np and mode == "cpu_fallback" and reason  # no GPU on this machine
    rng = np.random.default_rng(seed)
    colors = rng.integers(0, k, (reps, g.n))
    betas = rng.uniform(0.2, 3.0, reps)
    steps = 20
    verts, shifts = rng.integers(0, g.n, (reps, steps)), rng.integers(1, k, (reps, steps))
    unif = rng.random((reps, steps))
    adj = dense_adjacency(xp, g.n, g.indptr, g.indices)
    xc = colors.copy()
    xg = build_gamma_xp(xp, adj, xc, k)
    before = conflicts_xp(xp, adj, xc)
    delta = sweep_xp(xp, adj, xc, xg, betas, verts, shifts, unif, k)
    assert np.array_equal(xc, sequential_reference(adj, colors, betas, verts, shifts, unif, k))
    assert np.array_equal(xg, build_gamma_xp(xp, adj, xc, k))
    assert np.array_equal(conflicts_xp(xp, adj, xc), before + delta)
    for r in range(reps):  # and the same conflict counts as the numba kernel's
        assert conflicts_xp(xp, adj, xc)[r] == count_conflicts(g.indptr, g.indices, xc[r].astype(np.int32))


def test_cpu_can_be_requested():
    assert select_backend("cpu")[1:] == ("cpu_disabled", "disabled in the spec")
    with pytest.raises(ValueError):
        select_backend("tpu")


# --- strategies and the workload ------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_initial_strategy_is_proper(strategy):
    g = read_dimacs(instance_path("DSJC125.5"))
    c = initial_coloring(g, strategy, seed=3)
    assert check_coloring(g, c)["proper"]
    assert c.max() + 1 <= 30


class Recorded:
    """An emitter stand-in that keeps what the workload emits (the Lab tests cover the real one)."""

    def __init__(self):
        self.events = []
        self.ctx = {}

    def emit(self, name, values=None, **kw):
        self.events.append({"name": name, "values": values or {}, **self.ctx, **kw})

    def set_context(self, **kw):
        self.ctx.update({k.rstrip("_"): v for k, v in kw.items()})


def run_workload(params, steps=10_000, seed=1):
    p = ColoringWorkload.check_params(params)
    w = ColoringWorkload(p, seed)
    em = Recorded()
    w.start(em)
    for _ in range(steps):
        if w.step(em):
            break
    return w, em


def test_pipeline_reaches_a_proper_k_and_records_the_plan_fields():
    w, em = run_workload(
        {
            "graph": {"file": str(instance_path("DSJC125.5"))},
            "target": 18,
            "phases": ["thermo", "tabu", "memetic"],
            "thermo": {"max_steps": 5},
        }
    )
    assert w.best_k <= 18
    assert check_coloring(w.g, w.best)["proper"] and check_coloring(w.g, w.best)["k"] == w.best_k
    init = next(e for e in em.events if e["name"] == "init")
    assert init["parameters"] == {"strategy": "dsatur"} and init["values"]["conflicts"] == 0
    steps = [e for e in em.events if e["name"] == "step"]
    assert {"thermo", "tabu"} <= {e["phase"] for e in steps}
    for e in steps:
        assert {"chromatic_number", "k", "conflicts", "duration_ms"} <= set(e["values"])
        # under gpu = "auto" thermo keeps to its (faster) CPU kernels, tabu and memetic are CPU phases
        assert e["gpu_mode"] == "cpu" and e["gpu_reason"].startswith(e["phase"] + ":")


def test_iterative_passes_are_non_increasing_and_saved(tmp_path):
    p = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 3},
            "phases": ["tabu"],
            "tabu": {"max_iters_per_k": 3000},
            "iterative": {"enabled": True, "max_passes": 3},
        }
    )
    w = ColoringWorkload(p, 2)
    w.run_dir = tmp_path
    em = Recorded()
    w.start(em)
    while not w.step(em):
        pass
    per_pass = w.colors_per_pass()
    assert per_pass == sorted(per_pass, reverse=True) and len(per_pass) == 3  # every pass runs to max_passes
    saved = sorted(tmp_path.glob("best_solution.pass*.json"))
    assert [json.loads(f.read_text())["pass"] for f in saved] == [0, 1, 2]
    for f in saved:
        sol = json.loads(f.read_text())
        assert check_coloring(w.g, sol["coloring"])["proper"]
    ends = [e for e in em.events if e["name"] == "pass_end"]
    assert [e["pass"] for e in ends] == [0, 1, 2]
    for e in ends:
        v = e["values"]
        assert v["duration_s"] > 0 and v["improvement"] == v["start_colors"] - v["chromatic_number"] >= 0
    starts = [e for e in em.events if e["name"] == "phase_start" and e["pass"] > 0]
    assert starts and all("5% of its vertices recoloured" in e["notes"] for e in starts)


def test_a_pass_that_stalls_ends_and_the_next_starts_perturbed(tmp_path):
    clock = [0.0]
    p = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 80, "p": 0.5, "seed": 4},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 200},
            "iterative": {"enabled": True, "max_passes": 2, "stall_s": 5.0, "perturb": 0.2},
        }
    )
    w = ColoringWorkload(p, 1, clock=lambda: clock[0])  # the stall rule reads this clock: the test drives it
    w.run_dir = tmp_path
    em = Recorded()
    w.start(em)
    steps = 0
    while not w.step(em):
        steps += 1
        clock[0] += 0.5  # half a second per step, without a new best after the first few
        assert steps < 10_000
    ends = [e for e in em.events if e["name"] == "pass_end"]
    assert len(ends) == 2 and "no better colouring for 5 s" in ends[0]["notes"]
    assert ends[0]["values"]["duration_s"] >= 5.0
    base = next(e for e in em.events if e["name"] == "phase_start" and e["pass"] == 1)
    assert "20% of its vertices recoloured" in base["notes"]
    assert sorted(f.name for f in tmp_path.glob("best_solution.pass*.json")) == [
        "best_solution.pass0.json",
        "best_solution.pass1.json",
    ]


def test_a_pass_cut_short_by_the_budget_is_saved_once(tmp_path):
    p = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 80, "p": 0.5, "seed": 4},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 200},
            "iterative": {"enabled": True, "max_passes": 3},
        }
    )
    w = ColoringWorkload(p, 1)
    w.run_dir = tmp_path
    em = Recorded()
    w.start(em)
    for _ in range(20):
        assert not w.step(em)
    assert not list(tmp_path.glob("best_solution.pass*.json"))  # pass 0 is still under way
    assert not (tmp_path / "coloring.json").exists()  # the run's result, once it ends
    w.finish(em, "budget")
    w.finish(em, "budget")  # a second call adds nothing
    sol = json.loads((tmp_path / "best_solution.pass0.json").read_text())
    assert sol["k"] == w.best_k and check_coloring(w.g, sol["coloring"])["proper"]
    ends = [e for e in em.events if e["name"] == "pass_end"]
    assert len(ends) == 1 and "(budget)" in ends[0]["notes"] and w.colors_per_pass() == [w.best_k]
    result = json.loads((tmp_path / "coloring.json").read_text())
    assert result["coloring"] == [c + 1 for c in sol["coloring"]]  # 1-based, as DIMACS numbers vertices
    assert result["k"] == w.best_k and result["proper"] and result["reason"] == "budget"
    assert result["colors_per_pass"] == [w.best_k] and result["graph"]["fingerprint"] == w.g.fingerprint()


def test_the_result_file_is_the_checker_s_verdict_not_the_solver_s(tmp_path):
    from experiments.coloring.workload import save_result

    w, _em = run_workload({"graph": {"generator": "gnp", "n": 40, "p": 0.5}, "phases": ["tabu"]}, steps=1)
    bad = np.zeros(w.g.n, dtype=np.int32)  # one colour for every vertex: every edge conflicts
    verdict = save_result(tmp_path, w.g, bad, "failed", 0.0, [])
    saved = json.loads((tmp_path / "coloring.json").read_text())
    assert not verdict["proper"] and not saved["proper"] and saved["k"] == 1 and saved["reason"] == "failed"


def test_the_lab_saves_the_pass_under_way_when_the_budget_ends(tmp_path):
    from supervisor import Lab

    spec = {
        "name": "cut",
        "time_budget_s": 1.0,
        "seed": 1,
        "workload": {
            "name": "coloring",
            "params": {
                "graph": {"generator": "gnp", "n": 120, "p": 0.5, "seed": 2},
                "phases": ["tabu"],
                "tabu": {"iters_per_step": 2000},
                "iterative": {"enabled": True, "max_passes": 3},
            },
        },
    }
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(spec)
        assert exp.wait(60) and exp.reason == "budget"
        saved = json.loads((exp.run_dir / "best_solution.pass0.json").read_bytes())
        result = json.loads((exp.run_dir / "coloring.json").read_bytes())  # a spec's run, not crucible color
    assert saved["pass"] == 0 and saved["k"] >= 1
    assert result["reason"] == "budget" and result["proper"] and result["k"] == saved["k"]


def test_a_target_above_the_file_s_vertex_count_fails_the_run_at_its_start(tmp_path):
    from experiments.spec import SpecError, load_spec
    from experiments.workloads import registry
    from supervisor import Lab

    col = tmp_path / "c5.col"
    col.write_text("p edge 5 5\ne 1 2\ne 2 3\ne 3 4\ne 4 5\ne 5 1\n")
    spec = {
        "name": "typo",
        "time_budget_s": 600.0,
        "workload": {"name": "coloring", "params": {"graph": {"file": str(col)}, "phases": ["tabu"], "target": 6}},
    }
    assert ColoringWorkload.check_params({"graph": {"generator": "gnp", "n": 40}, "target": 40})["target"] == 40
    with pytest.raises(SpecError, match=r"workload\.params: target must be between 1 and the number of vertices"):
        load_spec({**spec, "workload": {"name": "coloring", "params": {"target": 500}}}, workloads=registry())
    load_spec(spec, workloads=registry())  # the file's size is known once it is read: at the run's start
    with Lab(tmp_path / "art") as lab:
        with pytest.raises(ValueError, match=r"number of vertices \(5\), got 6") as failed:
            lab.start_experiment(spec)
        (run_dir,) = (tmp_path / "art" / "typo").iterdir()
    record = json.loads((run_dir / "lifecycle.json").read_bytes())
    assert record["status"] == "failed" and record["start_failed"]  # failed, never "completed"
    assert record["reason"] == f"failed: could not start: ValueError: {failed.value}"
    assert not (run_dir / "coloring.json").exists()  # nothing was coloured


def test_control_hooks_apply_or_refuse():
    w, _em = run_workload({"graph": {"generator": "gnp", "n": 40, "p": 0.5}, "phases": ["tabu"]}, steps=2)
    assert w.set_param("set_tenure", 1.2) == (0.6, 1.2) and w.p["tabu"]["tenure_alpha"] == 1.2
    assert w.set_param("boost_mutation", 0.2)[1] == 0.2
    t = (w.p["thermo"]["t_min"], w.p["thermo"]["t_max"])
    assert w.set_param("adjust_temperature", 2.0) == (t, (t[0] * 2, t[1] * 2))
    for key, value in (("set_tenure", 50), ("boost_mutation", 3), ("adjust_temperature", 0), ("warp", 1)):
        with pytest.raises(ValueError):
            w.set_param(key, value)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"graph": {"generator": "lattice"}}, "generator"),
        ({"init": {"strategy": "magic"}}, "init.strategy"),
        ({"phases": ["thermo", "nap"]}, "phases"),
        ({"tabu": {"tenure_alpha": -1}}, r"tabu\.tenure_alpha"),
        ({"target": -2}, "target"),
        ({"graph": {"generator": "gnp", "n": 40}, "target": 41}, r"number of vertices \(40\), got 41"),
        ({"target": 126}, r"number of vertices \(125\), got 126"),  # the default graph's
        ({"colour": 1}, "unknown colouring parameter"),
        ({"graph": {"file": "/no/such.col"}}, "does not exist"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        ColoringWorkload.check_params(params)


@pytest.mark.parametrize("phase", ["thermo", "tabu", "memetic", "population"])
def test_a_bipartite_graph_ends_at_two_colours_in_every_phase(phase):
    # two colours found, the next target would be one: no phase may try it (it used to crash)
    w, _ = run_workload(
        {
            "graph": {"generator": "planted", "n": 30, "k": 2, "p": 0.3, "seed": 1},
            "phases": [phase],
            "gpu": "cpu",
            "init": {"strategy": "greedy"},
            "tabu": {"max_iters_per_k": 2000},
            "memetic": {"max_generations": 3},
            "thermo": {"max_steps": 3},
            "population": {"max_generations": 3},
        },
        steps=200,
    )
    assert w.best_k == 2 and w.k == 0 and check_coloring(w.g, w.best)["proper"]


def test_tiny_graphs():
    g = from_edges(1, np.zeros((0, 2)))
    assert check_coloring(g, initial_coloring(g, "dsatur"))["k"] == 1
    w, _ = run_workload({"graph": {"generator": "gnp", "n": 3, "p": 0.0}, "phases": ["tabu", "memetic"]})
    assert w.best_k == 1 and check_coloring(w.g, w.best)["proper"]


def test_a_device_failure_falls_back_to_the_cpu_and_says_why(monkeypatch):
    class BrokenDevice:
        """Stands for cupy on a device that has run out of memory."""

        int32 = np.int32

        def asarray(self, *a, **k):
            raise RuntimeError("cudaErrorMemoryAllocation: out of memory")

        def __getattr__(self, name):
            return getattr(np, name)

    import experiments.coloring.thermo as thermo_module

    monkeypatch.setattr(thermo_module, "select_backend", lambda mode: (BrokenDevice(), "gpu", None))
    p = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 50, "p": 0.5},
            "phases": ["thermo"],
            "thermo": {"max_steps": 3},
            "gpu": "gpu",
        }
    )
    w = ColoringWorkload(p, 0)
    em = Recorded()
    w.start(em)
    while not w.step(em):
        pass
    assert (w.gpu_mode, w.gpu_reason) == ("cpu_fallback", "out of memory")
    thermo = [e for e in em.events if e["name"] == "step" and e["phase"] == "thermo"]
    assert thermo and (thermo[-1]["gpu_mode"], thermo[-1]["gpu_reason"]) == ("cpu_fallback", "out of memory")
    assert check_coloring(w.g, w.best)["proper"]


def test_external_tenure_stops_the_built_in_swap():
    base = {
        "graph": {"generator": "gnp", "n": 70, "p": 0.5, "seed": 1},
        "phases": ["tabu"],
        "tabu": {"stall_iters": 1, "iters_per_step": 500, "max_iters_per_k": 10**9},
    }
    free = ColoringWorkload(ColoringWorkload.check_params(base), 1)
    em = Recorded()
    free.start(em)
    seen = set()
    for _ in range(30):
        free.step(em)
        seen.add(free.p["tabu"]["tenure_alpha"])
    assert seen == {0.6, 2.0}  # left alone, the phase swaps alpha on its stalls
    held = ColoringWorkload(ColoringWorkload.check_params(base), 1)
    assert held.set_param("external_tenure", True) == (False, True)
    held.set_param("set_tenure", 1.3)
    em = Recorded()
    held.start(em)
    for _ in range(30):
        held.step(em)
    assert held.p["tabu"]["tenure_alpha"] == 1.3  # the outside controller's value stands


def test_a_restored_workload_keeps_its_clocks_pass_figures_and_tenure_owner():
    clock = [1000.0]
    params = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 2},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 500},
        }
    )
    w = ColoringWorkload(params, 1, clock=lambda: clock[0])
    em = Recorded()
    w.start(em)
    for _ in range(5):
        w.step(em)
        clock[0] += 100.0
    w.set_param("external_tenure", True)
    cp = w.checkpoint()
    clock[0] += 7.0  # the restart takes a while
    again = ColoringWorkload(params, 1, clock=lambda: clock[0])
    again.restore(cp)
    assert again.ctx.external_tenure and again.pass_start_best == w.pass_start_best
    assert again.clock() - again.t_start == pytest.approx(cp["elapsed_s"])  # not counted from the restart
    again.start(em)
    again.finish(em, "budget")
    end = [e for e in em.events if e["name"] == "pass_end"][-1]["values"]
    assert end["improvement"] == w.pass_start_best - again.best_k >= 0
    assert end["duration_s"] == pytest.approx(cp["pass_elapsed_s"])


def test_a_checkpoint_of_another_graph_is_refused_with_why_never_coloured():
    """A resumed run whose graph changed since its checkpoint (the file was rewritten) must fail
    naming the mismatch: the kernels index by vertex and colour unchecked, so a stale colouring
    would corrupt memory (it segfaulted), not raise."""

    def params(seed: int, n: int = 60) -> dict:
        return ColoringWorkload.check_params(
            {"graph": {"generator": "gnp", "n": n, "p": 0.5, "seed": seed}, "phases": ["tabu"]}
        )

    w = ColoringWorkload(params(2), 1)
    em = Recorded()
    w.start(em)
    w.step(em)
    cp = w.checkpoint()
    assert cp["graph"]["n"] == 60 and len(cp["graph"]["fingerprint"]) == 32
    same = ColoringWorkload(params(2), 1)
    same.restore(cp)  # the same graph: goes on
    assert same.best_k == w.best_k and np.array_equal(same.best, w.best)
    for other, match in (
        (params(2, n=250), "another graph .60 vertices.*now .250 vertices"),
        (params(3), "another graph"),  # as many vertices, other edges
    ):
        with pytest.raises(ValueError, match=match):
            ColoringWorkload(other, 1).restore(cp)
    old = {k: v for k, v in cp.items() if k != "graph"}  # a checkpoint from before fingerprints
    bad = [
        ({**old, "best": old["best"][:10]}, "has 10 vertices"),
        ({**old, "best": [*old["best"][:-1], 10**6]}, "does not use colours"),
        ({**old, "best": [-1, *old["best"][1:]]}, "does not use colours"),
        ({**old, "best_k": 0}, "does not use colours"),
        ({**old, "best": ["x"] * 60}, "malformed"),
        ({**old, "phase_idx": 7}, "out of range"),
    ]
    for state, match in bad:
        with pytest.raises(ValueError, match=match):
            ColoringWorkload(params(2), 1).restore(state)
    with pytest.raises(ValueError, match="not proper"):  # same size, other edges, no fingerprint
        ColoringWorkload(params(3), 1).restore(old)


def test_restart_pass_is_refused_past_max_passes_with_or_without_iterative():
    for enabled in (False, True):
        params = ColoringWorkload.check_params(
            {
                "graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 1},
                "phases": ["tabu"],
                "iterative": {"enabled": enabled, "max_passes": 2, "stall_s": 0.0},
            }
        )
        w = ColoringWorkload(params, 1)
        em = Recorded()
        w.start(em)
        w.step(em)
        assert w.set_param("restart_pass", True) == (0, 1)
        w.step(em)  # the restart happens at the next safe point
        assert w.pass_ == 1
        with pytest.raises(ValueError, match=r"iterative\.max_passes = 2 passes"):
            w.set_param("restart_pass", True)
        w.step(em)
        assert w.pass_ == 1 and len([e for e in em.events if e["name"] == "pass_end"]) == 1


def test_a_graph_over_the_table_bound_is_refused_naming_its_file(tmp_path):
    """A bound on the whole graph (its conflict table), not on one line: still the file named."""
    star = tmp_path / "star.col"
    n = 100_000
    star.write_text(f"p edge {n} {n - 1}\n" + "".join(f"e 1 {v}\n" for v in range(2, n + 1)))
    with pytest.raises(GraphError, match=rf"^{re.escape(str(star))}: .*exceeds"):
        read_dimacs(star)


@pytest.mark.parametrize(("n", "p", "seed"), [(300, 0.9, 4), (250, 0.02, 5), (200, 0.5, 3)])
def test_dsatur_matches_the_reference_on_larger_graphs(n, p, seed):
    """The heap's order is the scan's: most saturated, then highest degree, then lowest id."""
    g = gnp(n, p, seed)
    assert dsatur(g.indptr, g.indices).tolist() == ref_dsatur(g)


def test_dsatur_on_the_largest_graph_of_isolated_vertices():
    g = from_edges(MAX_VERTICES, np.empty((0, 2), dtype=np.int64))
    assert not dsatur(g.indptr, g.indices).any()  # one colour: every vertex 0


def test_a_resumed_phase_goes_on_counting_its_steps():
    """A phase's step count (thermo's max_steps, the events' step numbers) survives a
    checkpoint: a run resumed after a crash does not get a fresh step budget in its phase."""
    import orjson

    from tests.test_coloring_memetic import Events

    params = ColoringWorkload.check_params(
        {
            "graph": {"generator": "gnp", "n": 60, "p": 0.5, "seed": 4},
            "phases": ["thermo", "tabu"],
            "gpu": "cpu",
            "thermo": {"max_steps": 8, "sweeps_per_step": 1, "replicas": 2},
        }
    )
    w, em = ColoringWorkload(params, 1), Events()
    w.start(em)
    for _ in range(6):  # the initial colouring, then five thermo steps
        w.step(em)
    assert w.phase == "thermo" and w.current.steps == 5
    state = orjson.loads(orjson.dumps(w.checkpoint()))
    again, em2 = ColoringWorkload(params, 1), Events()
    again.restore(state)
    again.start(em2)
    assert again.phase == "thermo" and again.current.steps == 5
    for _ in range(3):
        again.step(em2)
    assert again.phase == "tabu"  # thermo's last three of eight steps, not eight more
    assert [e["step"] for e in em2.named("step", "thermo")] == [6, 7, 8]
