"""Scale-out on Ray: N independent colouring experiments on threads (the embedded backend) and on
Ray processes (``Lab(backend="ray")``, one actor per tree), with every ratio from one run.

Run: ``python -m bench.scale [--iters 3000000] [--repeats 3] [--rounds 20] [--starts 2]``. Both
backends are measured side by side, interleaved, the order alternating every repeat (the
machine's load then falls on both alike); the figures are medians over the repeats.

* **throughput**: N experiments of fixed work each (TabuCol on a G(125, 0.5) graph, seed 7,
  ``max_iters_per_k`` = ``--iters``: the same deterministic work for every one), started one
  after the other, for N = 1, 2 and the machine's cores. Makespan = from the first start call
  to the last end; throughput relative to N x single = makespan(1) / makespan(N) on the same
  backend (1.0: N run as fast as one; 1/N: no parallelism at all); and the same ratio from
  the trees' own active time (``durations()``), which leaves the start cost out.
* **start latency**: ``Lab.start_experiment`` until the handle comes back running (a latency
  experiment, ``--starts`` times, each stopped before the next): the tree's threads, against a
  new Ray actor (a process: Python, the project's imports, the tree).
* **control round trip**: ``exp.pause()`` until it returns paused (the phase parked at its next
  safe point, the metric subscribers detached), ``--rounds`` times with a resume between,
  on a latency experiment whose steps are microseconds, so the figure is the control path
  (both include the fsynced write of ``lifecycle.json`` that every transition makes):
  a call in this process against msgpack bytes to the host's process and back.

Ray is started here (``ray.init(num_cpus=cores)``, no dashboard); the figures, their ratios
and the exact command go to docs/benchmarks.md, *Scale-out on Ray*.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from actors.log import configure_logging
from experiments.remote import RayBackendError  # importing it registers the ray backend
from supervisor import Lab

BACKENDS = ("embedded", "ray")


def coloring_spec(name: str, iters: int) -> dict[str, Any]:
    """A colouring experiment of fixed work: TabuCol down from DSATUR's colours until a k fails."""
    return {
        "name": name,
        "time_budget_s": 3600,
        "seed": 7,
        "workload": {
            "name": "coloring",
            "params": {
                "graph": {"generator": "gnp", "n": 125, "p": 0.5, "seed": 1},
                "phases": ["tabu"],
                "gpu": "cpu",
                "tabu": {"iters_per_step": 20_000, "max_iters_per_k": iters, "stall_iters": iters},
            },
        },
        "anomaly": {"enabled": False},
        "resources": {"cpus": 1},
    }


def latency_spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "time_budget_s": 3600,
        "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0], "calls_per_step": 20}},
        "anomaly": {"enabled": False},
        "resources": {"cpus": 1},
    }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def batch(lab: Lab, n: int, iters: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    exps = [lab.start_experiment(coloring_spec(f"scale-{n}-{i}", iters)) for i in range(n)]
    for e in exps:
        if not e.wait(3600):
            raise RuntimeError(f"{e.id} did not end within an hour")
    makespan = time.perf_counter() - t0
    reasons = {e.reason for e in exps}
    if reasons != {"completed"}:
        raise RuntimeError(f"experiments ended {reasons}, expected completed")
    emitted = sorted({int(e.summary()["events_emitted"]) for e in exps})  # one value: the same work each
    active = statistics.mean(e.durations()["active_duration"] for e in exps)  # the tree's own run time
    return {"n": n, "makespan_s": makespan, "active_s": active, "events_emitted": emitted}


def starts(lab: Lab, count: int) -> list[float]:
    out = []
    for i in range(count):
        t = time.perf_counter()
        exp = lab.start_experiment(latency_spec(f"start-{i}"))
        out.append(time.perf_counter() - t)
        exp.stop()
    return out


def round_trips(lab: Lab, rounds: int) -> list[float]:
    exp = lab.start_experiment(latency_spec("control"))
    out = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            exp.pause()
            out.append(time.perf_counter() - t)
            assert exp.status() == "paused"
            exp.resume()
    finally:
        exp.stop()
    return out


def measure(artifacts: Path, ns: list[int], iters: int, repeats: int, rounds: int, nstarts: int) -> dict[str, Any]:
    """Both backends side by side, interleaved (the order alternating every repeat), so that a
    change in the machine's load falls on both alike; medians over the repeats."""
    labs = {b: Lab(artifacts / b, backend=b) for b in BACKENDS}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {b: {n: [] for n in ns} for b in BACKENDS}
    start_s: dict[str, list[float]] = {b: [] for b in BACKENDS}
    rtt: dict[str, list[float]] = {b: [] for b in BACKENDS}
    try:
        for lab in labs.values():
            lab.start_experiment(coloring_spec("warm-up", 20_000)).wait(600)  # numba's cache, Ray's first worker
        for r in range(repeats):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
            for n in ns:
                for b in order:
                    runs[b][n].append(batch(labs[b], n, iters))
            for b in order:
                start_s[b] += starts(labs[b], nstarts)
                rtt[b] += round_trips(labs[b], rounds)
    finally:
        for lab in labs.values():
            lab.shutdown()
    out: dict[str, Any] = {}
    for b in BACKENDS:
        batches = [
            {
                "n": n,
                "makespan_s": statistics.median(x["makespan_s"] for x in runs[b][n]),
                "active_s": statistics.median(x["active_s"] for x in runs[b][n]),
                "events_emitted": sorted({v for x in runs[b][n] for v in x["events_emitted"]}),
            }
            for n in ns
        ]
        single, single_active = batches[0]["makespan_s"], batches[0]["active_s"]
        for x in batches:
            x["relative_throughput"] = single / x["makespan_s"]  # N/makespan(N) over N x 1/makespan(1)
            x["relative_work_rate"] = single_active / x["active_s"]  # the same, starts left out
        out[b] = {
            "batches": batches,
            "start_p50_s": statistics.median(start_s[b]),
            "start_max_s": max(start_s[b]),
            "pause_p50_ms": 1000 * pct(rtt[b], 0.5),
            "pause_p99_ms": 1000 * pct(rtt[b], 0.99),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=3_000_000, help="TabuCol iterations per k (the fixed work)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every batch (medians)")
    ap.add_argument("--rounds", type=int, default=20, help="pause round trips per backend and repeat")
    ap.add_argument("--starts", type=int, default=2, help="starts timed per backend and repeat")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    configure_logging("WARNING")
    cores = os.cpu_count() or 1
    ns = sorted({1, 2, cores})
    import ray

    ray.init(num_cpus=max(ns), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            res = measure(Path(tmp), ns, args.iters, args.repeats, args.rounds, args.starts)
    except RayBackendError as exc:
        print(f"bench.scale: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    th, ry = res["embedded"], res["ray"]
    print(f"{platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}")
    print("makespan (first start to last end), throughput relative to N x single; the same from the trees'")
    print("active time (starts left out); ray over threads")
    head = ("N", 3), ("threads s", 10), ("rel", 5), ("active rel", 10), ("ray s", 7), ("rel", 5), ("active rel", 10)
    print(" ".join(f"{h:>{w}}" for h, w in head), f"{'ray/thr':>8}")
    for a, b in zip(th["batches"], ry["batches"], strict=True):
        print(
            f"{a['n']:>3} {a['makespan_s']:>10.2f} {a['relative_throughput']:>5.2f} {a['relative_work_rate']:>10.2f}"
            f" {b['makespan_s']:>7.2f} {b['relative_throughput']:>5.2f} {b['relative_work_rate']:>10.2f}"
            f" {b['makespan_s'] / a['makespan_s']:>8.2f}"
        )
    print(
        f"start: threads {th['start_p50_s'] * 1000:.1f} ms, ray {ry['start_p50_s'] * 1000:.0f} ms"
        f" (x{ry['start_p50_s'] / th['start_p50_s']:.0f}); medians of {args.starts * args.repeats}"
    )
    print(
        f"pause round trip p50/p99: threads {th['pause_p50_ms']:.2f}/{th['pause_p99_ms']:.2f} ms,"
        f" ray {ry['pause_p50_ms']:.2f}/{ry['pause_p99_ms']:.2f} ms"
        f" (x{ry['pause_p50_ms'] / th['pause_p50_ms']:.1f} at p50); {args.rounds * args.repeats} rounds"
    )
    if args.json:
        Path(args.json).write_bytes(orjson.dumps({"cores": cores, **res}, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
