"""Colouring benchmark on the DIMACS instances shipped in the package (one run; the anchor in the same run).

Run: ``python -m bench.coloring [--instances DSJC125.5,DSJC250.5,...] [--limit-scale 1.0]``, or
``python -m bench.coloring --rate-only`` (the TabuCol rate alone), ``--dsatur-only --against
REV`` (DSATUR now against the one at REV), ``--read-only`` (reading DIMACS files against the
same reader line by line), or ``--against REV`` (the
TabuCol kernel now against ``kernels/coloring.py`` at a git revision, interleaved rounds).

For each instance: NetworkX's ``greedy_color(strategy="saturation_largest_first")`` (DSATUR,
the anchor) and our pipeline (``crucible color``'s workload in-process: DSATUR start,
TabuCol k-reduction, HEA-style memetic), each with colours and seconds; our colouring is
checked by the independent checker. Then TabuCol iterations/s on DSJC250.5 at k = 27.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from actors.log import configure_logging
from actors.runtime import freeze_startup_heap
from experiments.coloring.catalog import instance_path
from experiments.coloring.graph import read_dimacs
from experiments.coloring.verify import check_coloring
from experiments.coloring.workload import ColoringWorkload
from kernels.coloring import build_gamma, seed_rng, tabucol

TARGETS = {  # instance: (target colours, time limit s) the project aims at
    "DSJC125.5": (17, 2),
    "DSJC250.5": (28, 60),
    "le450_15c": (15, 300),
    "DSJC500.5": (49, 600),
    "DSJC1000.5": (89, 1800),
}


class _Quiet:
    def emit(self, *a, **k) -> None:
        pass

    def set_context(self, **k) -> None:
        pass


def solve(path: Path, target: int, limit: float, seed: int = 0) -> tuple[int, float, bool]:
    params = ColoringWorkload.check_params(
        {"graph": {"file": str(path)}, "target": target, "phases": ["tabu", "memetic"]}
    )
    w = ColoringWorkload(params, seed)
    em = _Quiet()
    t0 = time.perf_counter()
    w.start(em)
    while time.perf_counter() - t0 < limit and not w.step(em):
        pass
    dt = time.perf_counter() - t0
    v = check_coloring(w.g, w.best)
    return v["k"], w.seconds_to_best, v["proper"] and dt >= 0


def networkx_dsatur(path: Path) -> tuple[int, float]:
    g = read_dimacs(path)
    G = nx.Graph()
    G.add_nodes_from(range(g.n))
    G.add_edges_from(g.edges().tolist())
    t0 = time.perf_counter()
    c = nx.greedy_color(G, strategy="saturation_largest_first")
    return max(c.values()) + 1, time.perf_counter() - t0


def dsatur_against(then: Any, rev: str, graphs: list[tuple[str, Any]]) -> None:
    """Our DSATUR now against ``kernels/coloring.py`` at ``rev`` (the anchor), same graphs, same
    run, each compiled before it is timed: colours and seconds of each, and the speed-up."""
    from experiments.coloring.graph import gnp
    from kernels.coloring import dsatur

    tiny = gnp(5, 0.5, 0)
    print(f"{'graph':<26} {'n':>7} {'m':>9} | {rev + ' k':>10} {'s':>8} | {'now k':>6} {'s':>8} | {'speed-up':>8}")
    for label, g in graphs:
        runs = []
        for fn in (then.dsatur, dsatur):
            fn(tiny.indptr, tiny.indices)  # compiled (or loaded) before it is timed
            t0 = time.perf_counter()
            k = int(fn(g.indptr, g.indices).max()) + 1
            runs.append((k, time.perf_counter() - t0))
        (tk, tt), (nk, nt) = runs
        print(f"{label:<26} {g.n:>7} {g.m:>9} | {tk:>10} {tt:>8.3f} | {nk:>6} {nt:>8.4f} | {tt / nt:>7.0f}x")


def reading(graphs: list[tuple[str, Path]], rounds: int = 3) -> None:
    """``read_dimacs`` (edge lines read in C) against the same reader line by line in Python
    (the anchor), each file read ``rounds`` times, interleaved; the best time of each."""
    from experiments.coloring.graph import read_dimacs_line_by_line

    print(f"{'graph':<28} {'n':>7} {'m':>9} | {'line by line s':>14} | {'now s':>7} | {'speed-up':>8}")
    for label, path in graphs:
        best = {read_dimacs_line_by_line: float("inf"), read_dimacs: float("inf")}
        for _ in range(rounds):
            for fn in best:
                t0 = time.perf_counter()
                g = fn(path)
                best[fn] = min(best[fn], time.perf_counter() - t0)
        then, now = best.values()
        print(f"{label:<28} {g.n:>7} {g.m:>9} | {then:>14.3f} | {now:>7.3f} | {then / now:>7.1f}x")


def tabucol_rate(
    seconds: float = 3.0, kernels: Any = None, instance: str = "DSJC250.5", k: int = 27
) -> tuple[float, float]:
    """TabuCol iterations per second on ``instance`` at ``k`` (below the best known, so the search
    never stops early): (per wall second, per CPU second of the thread, which other work on a
    shared machine disturbs less); ``kernels``: another module with the same
    ``seed_rng``/``build_gamma``/``tabucol`` (an older version, for an interleaved comparison)."""
    km = kernels
    seed, gamma_of, run = (km.seed_rng, km.build_gamma, km.tabucol) if km else (seed_rng, build_gamma, tabucol)
    g = read_dimacs(instance_path(instance))
    seed(1)
    colors = np.random.default_rng(0).integers(0, k, g.n).astype(np.int32)
    gamma = gamma_of(g.indptr, g.indices, colors, k)
    tabu = np.zeros((g.n, k), dtype=getattr(km, "TABU_DTYPE", np.int32) if km else np.int32)
    best = colors.copy()
    run(g.indptr, g.indices, k, colors, gamma, tabu, 0, 1000, 10, 0.6, best, 1 << 30)  # warm
    it, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - t0 < seconds:
        done, _, _ = run(g.indptr, g.indices, k, colors, gamma, tabu, it, 200_000, 10, 0.6, best, 1 << 30)
        it += done
    return it / (time.perf_counter() - t0), it / (time.thread_time() - c0)


def kernels_at(rev: str) -> Any:
    """``kernels/coloring.py`` as it was at git revision ``rev``, loaded as a module of its own."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:kernels/coloring.py"], capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp(prefix="kernels-")) / "coloring_then.py"
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("coloring_then", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    if "TABU_REBASE" not in src.stdout:
        mod.TABU_DTYPE = np.int64  # tables were int64 before the rebase existed
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", default="DSJC125.5,DSJC250.5,le450_15c,DSJC500.5")
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every time limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate-only", action="store_true", help="only the TabuCol rate (three rounds of 3 s)")
    ap.add_argument("--dsatur-only", action="store_true", help="only DSATUR, now against --against REV")
    ap.add_argument("--read-only", action="store_true", help="only reading DIMACS files, against line by line")
    ap.add_argument("--against", metavar="REV", help="TabuCol now against kernels/coloring.py at git REV, interleaved")
    ap.add_argument(
        "--rate-on", default="DSJC250.5:27", metavar="NAME:K", help="the instance and k of the TabuCol rate"
    )
    args = ap.parse_args()
    configure_logging("CRITICAL")
    freeze_startup_heap()
    name, _, k_text = args.rate_on.partition(":")
    if not k_text.isdigit() or int(k_text) < 2:
        ap.error(f"--rate-on: expected NAME:K with an integer K >= 2, got {args.rate_on!r}")
    if instance_path(name) is None:
        ap.error(f"--rate-on: no shipped instance named {name!r} (crucible instances lists them)")
    on = {"instance": name, "k": int(k_text)}
    if args.read_only:
        import tempfile

        from experiments.coloring.graph import gnp

        big = gnp(20_000, 0.005, 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gnp-20000-0.005.col"
            e = big.edges() + 1
            path.write_bytes(f"p edge {big.n} {big.m}\n".encode() + b"".join(b"e %d %d\n" % (u, v) for u, v in e))
            named = [(n, instance_path(n)) for n in ("DSJC500.5", "DSJC1000.5", "flat1000_76_0")]
            reading([(n, p) for n, p in named if p is not None] + [("G(20000, 0.005) seed 1", path)])
        return
    if args.dsatur_only:
        from experiments.coloring.graph import from_edges, gnp

        if not args.against:
            ap.error("--dsatur-only needs --against REV (the DSATUR to compare with)")
        dsatur_against(
            kernels_at(args.against),
            args.against,
            [
                ("DSJC1000.5", read_dimacs(instance_path("DSJC1000.5"))),
                ("G(20000, 0.001) seed 1", gnp(20_000, 0.001, 1)),
                ("100,000 isolated vertices", from_edges(100_000, np.empty((0, 2), dtype=np.int64))),
            ],
        )
        return
    if args.against:
        then = kernels_at(args.against)
        ratios = []
        for _ in range(6):
            (a, a_cpu), (b, b_cpu) = tabucol_rate(kernels=then, **on), tabucol_rate(**on)
            ratios.append(b_cpu / a_cpu)
            print(
                f"TabuCol at {args.against}: {a:,.0f} it/s ({a_cpu:,.0f} per CPU-s)   "
                f"now: {b:,.0f} it/s ({b_cpu:,.0f} per CPU-s)   ratio per CPU-s {b_cpu / a_cpu:.3f}",
                flush=True,
            )
        print(
            f"median ratio now / {args.against} on {name} at k={on['k']}: {sorted(ratios)[3]:.3f} "
            "(6 interleaved rounds of 3 s, per CPU-s)"
        )
        return
    if args.rate_only:
        runs = [tabucol_rate(**on) for _ in range(3)]
        wall, cpu = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
        print(
            f"TabuCol on {name} at k={k_text}: {wall[1]:,.0f} iterations/s (median of 3; min {wall[0]:,.0f}, "
            f"max {wall[2]:,.0f}); per CPU-second of the thread {cpu[1]:,.0f}"
            + ("   target >= 1,000,000" if (name, on["k"]) == ("DSJC250.5", 27) else "")
        )
        return
    print(
        f"{'instance':<12} {'target':>6} {'limit s':>8} | {'nx DSATUR':>9} {'s':>7} | {'ours':>5} "
        f"{'s to best':>9} {'proper':>6} {'met':>4}"
    )
    for name in args.instances.split(","):
        target, limit = TARGETS.get(name, (1, 60))
        limit *= args.limit_scale
        path = instance_path(name)
        nk, nt = networkx_dsatur(path)
        k, tbest, proper = solve(path, target, limit, args.seed)
        met = proper and k <= target and tbest <= limit
        print(
            f"{name:<12} {target:>6} {limit:>8.0f} | {nk:>9} {nt:>7.2f} | {k:>5} {tbest:>9.2f} {proper!s:>6} "
            f"{'yes' if met else 'no':>4}"
        )
    wall, cpu = tabucol_rate()
    print(f"TabuCol on DSJC250.5 at k=27: {wall:,.0f} iterations/s ({cpu:,.0f} per CPU-s)   target >= 1,000,000")


if __name__ == "__main__":
    main()
