"""What the telemetry costs the colouring workload (one run; the anchor measured in the same run).

Run: ``python -m bench.overhead [--graph DSJC250.5] [--iters 3000000] [--rounds 15] [--set KEY=VALUE]
[--profile]``.

The same work twice per round, in interleaved rounds (A B, B A, A B, ...: a load that
drifts during a round weighs on both arms alike):

(A) the anchor: the ``ColoringWorkload`` driven by a bare loop, with an emitter that keeps
    nothing;
(B) the same workload as the phase of a full experiment tree in a ``Lab`` (Recorder,
    Sampler, AnomalyDetection, StreamingMetrics, Phase, Hypertune; the real emitter, JSONL +
    SQLite history, checkpoints, status snapshots), spec defaults otherwise (``--set``
    changes them, e.g. ``telemetry.flush_interval_s=0.5``).

The work: DSATUR, then the tabu phase (TabuCol k-reduction) on a fixed graph with a fixed
seed and ``gpu = "cpu"``, until ``--iters`` TabuCol iterations are done. It is counted from
the workload's own counter (the tabu state's ``it``, banked at every k-reduction), not from
wall steps, and timed from the start of the first tabu step to the end of the last, so the
time between steps (the mailbox, the checkpoint, the emit) is inside the measure and the
DSATUR start and the tree's start-up are not. Both arms follow the same trajectory (the
search is deterministic for a seed; hypertune observes, as by default, because its actions
would change the search): the script checks that both end with the same iterations, k and
conflicts.

Reported: the median rate of each arm and the per-round overhead ``1 - rate_tree /
rate_bare`` (median, quartiles, range) against the design budget (< 5 %) and target
(<= 2 %); and, because wall time on a shared machine mostly measures the other tenants,
the CPU time each arm's process spent on the same work (tree / bare - 1), split into the
thread that runs the steps and the tree's other threads (the consumers, the emitter's
flusher).

``--profile`` runs one more tree with cProfile on over the tabu steps, in the phase actor's
thread, and prints where that thread's time outside the TabuCol kernel goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from actors.log import configure_logging
from actors.runtime import freeze_startup_heap
from experiments import lab as lab_module
from experiments.coloring.workload import ColoringWorkload
from experiments.workloads import registry as workload_registry
from supervisor import Lab


@dataclass
class Tally:
    """Tabu work and its time, as the workload itself counts them."""

    budget: int
    iters: int = 0  # TabuCol iterations done in the tabu phase
    t_first: float | None = None  # perf_counter at the start of the first tabu step
    t_last: float = 0.0  # perf_counter at the end of the last tabu step
    steps: int = 0
    cpu: tuple[float, float] = (0.0, 0.0)  # (process, stepping thread) CPU seconds at the first tabu step
    cpu_used: tuple[float, float] = (0.0, 0.0)  # ... used from then to the last tabu step
    end: tuple[int, int, int] = (0, 0, 0)  # (best_k, k, conflicts) when the budget was reached
    profiler: Any = None  # a cProfile.Profile run over the tabu steps, in the thread that runs them

    def rate(self) -> float:
        assert self.t_first is not None, "no tabu step ran"
        return self.iters / (self.t_last - self.t_first)


def counted(tally: Tally) -> type[ColoringWorkload]:
    """The colouring workload, counting its tabu iterations into ``tally`` and ending at its budget."""

    class Counted(ColoringWorkload):
        def _tabu_done(self) -> int:
            tabu = self.phase_made("tabu")
            return int(getattr(tabu, "iterations", 0))  # over every k the phase worked at

        def step(self, emitter: Any) -> bool:
            if self.phase != "tabu":
                return super().step(emitter)
            t0 = time.perf_counter()
            if tally.t_first is None:
                tally.t_first = t0
                tally.cpu = (time.process_time(), time.thread_time())
                if tally.profiler is not None:
                    tally.profiler.enable()
            done = super().step(emitter)
            tally.iters = self._tabu_done()
            tally.steps += 1
            tally.t_last = time.perf_counter()
            tally.cpu_used = (time.process_time() - tally.cpu[0], time.thread_time() - tally.cpu[1])
            if tally.iters >= tally.budget:
                tally.end = (self.best_k, self.k, int(self.conflicts))
                if tally.profiler is not None:
                    tally.profiler.disable()
                return True
            return done

    return Counted


class NullEmitter:
    """Takes the workload's events and keeps nothing (the bare loop's telemetry)."""

    def emit(self, *a: Any, **kw: Any) -> None:
        pass

    def set_context(self, **kw: Any) -> None:
        pass


def workload_params(graph: str, seed: int) -> dict[str, Any]:
    return {
        "graph": {"file": graph},
        "init": {"strategy": "dsatur"},
        "phases": ["tabu"],
        "gpu": "cpu",
        "target": 0,
        "tabu": {"max_iters_per_k": 10**12},
        "iterative": {"enabled": False},
    }


def run_bare(graph: str, seed: int, iters: int) -> Tally:
    tally = Tally(iters)
    cls = counted(tally)
    w = cls(cls.check_params(workload_params(graph, seed)), seed)
    em = NullEmitter()
    w.start(em)
    while not w.step(em):
        pass
    return tally


def run_tree(
    graph: str, seed: int, iters: int, art: str, profile: bool = False, overrides: list[str] | None = None
) -> tuple[Tally, dict[str, Any]]:
    tally = Tally(iters)
    if profile:
        import cProfile

        tally.profiler = cProfile.Profile()
    cls = counted(tally)
    real = lab_module.workload_registry

    def with_counted() -> dict[str, type[Any]]:
        return {**real(), "coloring": cls}

    spec = {
        "name": "overhead",
        "seed": seed,
        "time_budget_s": 3600.0,
        "workload": {"name": "coloring", "params": workload_params(graph, seed)},
    }
    lab_module.workload_registry = with_counted  # the tree builds its phase from the counting class
    try:
        with Lab(art) as lab:
            exp = lab.start_experiment(spec, overrides=overrides or None)
            assert exp.wait(3600), "the experiment did not end"
            s = exp.summary()
    finally:
        lab_module.workload_registry = real
    assert s.get("reason") == "completed", s.get("reason")
    return tally, s


def print_profile(prof: Any, top: int = 25) -> None:
    """The phase thread's functions by their own time (the TabuCol kernel shows as one entry)."""
    import pstats

    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def spread(xs: list[float]) -> str:
    """Median, quartiles and range of per-round figures, as percentages."""
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return (
        f"median {statistics.median(xs):+.2%}, quartiles {q[0]:+.2%} .. {q[2]:+.2%}, "
        f"range {min(xs):+.2%} .. {max(xs):+.2%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph", default="DSJC250.5", help="a shipped instance or a .col file")
    ap.add_argument("--iters", type=int, default=3_000_000, help="TabuCol iterations per measure")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="then profile one tree's phase thread")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a spec override for the tree, e.g. telemetry.flush_interval_s=0.5 (repeatable)",
    )
    args = ap.parse_args()
    configure_logging("WARNING")
    freeze_startup_heap()  # as `crucible` does after start-up (see actors/runtime.py)
    assert "coloring" in workload_registry()
    art = tempfile.mkdtemp(prefix="crucible-overhead-")
    warm = max(100_000, args.iters // 20)
    run_bare(args.graph, args.seed, warm)  # numba caches, the graph file
    run_tree(args.graph, args.seed, warm, art, overrides=args.set)
    bare, tree, over, cpu, phase_cpu, others = [], [], [], [], [], []
    a = b = None
    s: dict[str, Any] = {}
    for r in range(args.rounds):
        # A B, then B A: a load that drifts during a round weighs on both arms alike
        for arm in ("bare", "tree") if r % 2 == 0 else ("tree", "bare"):
            if arm == "bare":
                a = run_bare(args.graph, args.seed, args.iters)
            else:
                b, s = run_tree(args.graph, args.seed, args.iters, art, overrides=args.set)
        assert a is not None and b is not None
        if (a.iters, a.end) != (b.iters, b.end):
            raise SystemExit(
                f"round {r + 1}: not the same work: bare {a.iters} iterations ending at {a.end}, "
                f"tree {b.iters} ending at {b.end}"
            )
        bare.append(a.rate())
        tree.append(b.rate())
        over.append(1 - tree[-1] / bare[-1])
        cpu.append(b.cpu_used[0] / a.cpu_used[0] - 1)  # all the process's threads, for the same work
        phase_cpu.append(b.cpu_used[1] / a.cpu_used[1] - 1)  # the thread that runs the steps
        others.append((b.cpu_used[0] - b.cpu_used[1]) / a.cpu_used[1])  # the tree's other threads
        print(
            f"round {r + 1:>2}: bare {bare[-1]:>10,.0f} it/s   tree {tree[-1]:>10,.0f} it/s   "
            f"overhead {over[-1]:+7.2%}   CPU for the same work {cpu[-1]:+7.2%} "
            f"(phase thread {phase_cpu[-1]:+.2%}, other threads {others[-1]:+.2%})",
            flush=True,
        )
    assert a is not None and b is not None
    wall = b.t_last - (b.t_first or 0.0)
    print(
        f"graph {args.graph}, seed {args.seed}: {a.iters:,} TabuCol iterations per measure in {a.steps} tabu steps, "
        f"ending at best {a.end[0]} colours, k = {a.end[1]}, {a.end[2]} conflicts; {args.rounds} interleaved rounds"
        + (f"; tree spec overrides: {' '.join(args.set)}" if args.set else "")
    )
    print(
        f"(A) bare workload loop, no-op emitter   {statistics.median(bare):>12,.0f} it/s  (anchor; "
        f"range {min(bare):,.0f} .. {max(bare):,.0f})"
    )
    print(
        f"(B) full experiment tree                {statistics.median(tree):>12,.0f} it/s  "
        f"(range {min(tree):,.0f} .. {max(tree):,.0f})"
    )
    print(f"overhead 1 - B/A:         {spread(over)}   budget < 5 %, target <= 2 %")
    print(f"CPU for the same work:    {spread(cpu)}   (process CPU time, B / A - 1)")
    print(f"  the phase thread:       {spread(phase_cpu)}")
    print(f"  the tree's other threads: {spread(others)} of the bare loop's CPU")
    print(
        f"telemetry load in the tree: {s.get('events_emitted', 0):,} events in the run, "
        f"{b.steps} tabu steps in {wall:.2f} s"
    )
    if args.profile:
        t, _ = run_tree(args.graph, args.seed, args.iters, art, profile=True, overrides=args.set)
        print_profile(t.profiler)


if __name__ == "__main__":
    main()
