"""How often a later pass of the iterative restarts improves on the earlier ones, and by how much.

Run: ``python -m bench.passes [--spec experiments/default.toml] [--seeds 1-10] [--budget 20]
[--graph-n 250] [--stall 3]``.

Each seed runs the spec's colouring workload in-process (the same steps the Phase actor
runs, without the tree) for the budget, on G(n, 0.5) with that seed, and records the best
colours at the end of every pass. Printed: per seed the colours per pass, then the share of
later passes (pass >= 1) that improved on the best before them, the mean improvement, and
the final colours over the seeds (compare with ``--max-passes 1 --stall 0``: one pass, no
restarts, the same budget).
"""

from __future__ import annotations

import argparse
import time
import tomllib

from actors.log import configure_logging
from experiments.coloring.workload import ColoringWorkload


class _Quiet:
    def __init__(self) -> None:
        self.passes: list[tuple[int, float, float]] = []

    def emit(self, name: str, values: dict | None = None, **kw) -> None:
        if name == "pass_end" and values:
            self.passes.append(
                (int(values["chromatic_number"]), float(values["improvement"]), float(values["duration_s"]))
            )

    def set_context(self, **kw) -> None:
        pass


def seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="experiments/default.toml")
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--budget", type=float, default=None, help="seconds per run (default: the spec's)")
    ap.add_argument("--graph-n", type=int, default=None, help="G(n, 0.5) instead of the spec's graph size")
    ap.add_argument("--stall", type=float, default=None, help="iterative.stall_s (default: the spec's)")
    ap.add_argument("--max-passes", type=int, default=None)
    args = ap.parse_args()
    configure_logging("CRITICAL")
    with open(args.spec, "rb") as fh:
        spec = tomllib.load(fh)
    base = spec["workload"]["params"]
    budget = args.budget or float(spec.get("time_budget_s", 20))
    later = improved = 0
    gains: list[float] = []
    finals: list[int] = []
    for seed in seeds(args.seeds):
        params = {
            **base,
            "graph": {**base["graph"], "seed": seed},
            "iterative": {**base.get("iterative", {}), "enabled": True},
        }
        if args.graph_n:
            params["graph"]["n"] = args.graph_n
        if args.stall is not None:
            params["iterative"]["stall_s"] = args.stall
        if args.max_passes:
            params["iterative"]["max_passes"] = args.max_passes
        w = ColoringWorkload(ColoringWorkload.check_params(params), seed)
        em = _Quiet()
        t0 = time.perf_counter()
        w.start(em)
        while time.perf_counter() - t0 < budget and not w.step(em):
            pass
        w.finish(em, "budget")
        per_pass = [c for c, _, _ in em.passes]
        finals.append(w.best_k)
        for i, (_c, gain, _d) in enumerate(em.passes):
            if i >= 1:
                later += 1
                improved += gain > 0
                if gain > 0:
                    gains.append(gain)
        print(
            f"seed {seed:>3}: colours per pass {per_pass}  (pass seconds {[round(d, 1) for _, _, d in em.passes]})",
            flush=True,
        )
    share = improved / later if later else 0.0
    mean_gain = sum(gains) / len(gains) if gains else 0.0
    print(
        f"later passes: {later}; improved: {improved} ({share:.0%}); mean improvement when improved: "
        f"{mean_gain:.2f} colours"
    )
    dist = {c: finals.count(c) for c in sorted(set(finals))}
    print(f"final colours: mean {sum(finals) / len(finals):.2f}; runs per colour count {dist}")


if __name__ == "__main__":
    main()
