"""GPU population search against the CPU of the same machine (one run; anchors in the same run).

Run: ``python -m bench.gpu rates [--instances DSJC250.5:27,DSJC500.5:46] [--seconds 10]`` and
``python -m bench.gpu search [--instances DSJC500.5:48:600,...]``.

``rates``: TabuCol iterations per second at a fixed k below the best known (the search never
stops early), summed over the chains: one CPU core running the numba kernel (the anchor),
all CPU cores with ``prange`` (one chain per core), and the CUDA population (one block per
chain), printed as ratios to the anchor; for the GPU, each threads-per-chain, load round
(``--batches``) and gamma layout, with the kernel's registers and resident blocks.

``search``: the colouring pipeline's population phase on the device (``gpu = "auto"``), from
DSATUR down; colours reached, seconds to reach them, checked by the independent checker.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from experiments.coloring.graph import Graph, load_graph
from kernels.coloring import build_gamma, seed_rng, tabucol
from kernels.population import CpuPopulation, CudaPopulation, auto_size, cuda_status, load_cuda


def _start(g: Graph, k: int, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, (count, g.n)).astype(np.int32)


def one_core(g: Graph, k: int, seconds: float) -> float:
    """The anchor: numba TabuCol on one core, iterations/s."""
    seed_rng(1)
    colors = _start(g, k, 1, 0)[0]
    gamma = build_gamma(g.indptr, g.indices, colors, k)
    tabu = np.zeros((g.n, k), dtype=np.int32)
    best = colors.copy()
    tabucol(g.indptr, g.indices, k, colors, gamma, tabu, 0, 1000, 10, 0.6, best, 1 << 30)  # compiled, warm
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done, _, _ = tabucol(g.indptr, g.indices, k, colors, gamma, tabu, it, 100_000, 10, 0.6, best, 1 << 30)
        it += done
    return it / (time.perf_counter() - t0)


def population_rate(pop, g: Graph, k: int, seconds: float, iters: int) -> float:
    pop.seed(_start(g, k, pop.size, 1), k)
    pop.run(min(iters, 1000))  # compile and warm
    it0, t0 = pop.iterations, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pop.run(iters)
    return (pop.iterations - it0) / (time.perf_counter() - t0)


def rates(args: argparse.Namespace) -> None:
    ok, why = cuda_status()
    cores = numba.config.NUMBA_NUM_THREADS
    print(f"cores: {cores}; CUDA: {'yes' if ok else 'no (' + str(why) + ')'}")
    if ok:
        name, sms, _ = device_info()
        print(f"device: {name}, {sms} SMs")
    for item in args.instances.split(","):
        name, k = item.split(":")[:2]
        k = int(k)
        g = load_graph({"file": name})
        anchor = one_core(g, k, args.seconds)
        print(f"\n{name} (n={g.n}, m={g.m}) at k={k}")
        print(f"  1 CPU core (anchor)           {anchor:>14,.0f} it/s   1.0x")
        cpu = CpuPopulation(g.indptr, g.indices, cores, seed=1)
        r = population_rate(cpu, g, k, args.seconds, 20_000)
        print(f"  {cores} CPU cores (prange, P={cores}) {r:>14,.0f} it/s   {r / anchor:.1f}x")
        if not ok:
            continue
        _, sms, free = device_info()
        layouts = [x == "shared" for x in args.gamma.split(",")]
        for tpb in [int(x) for x in args.threads.split(",")]:
            for batch in [int(x) for x in args.batches.split(",")]:
                for shared in layouts:
                    p = args.population or auto_size(g.n, k, free, sms, args.per_sm)
                    pop = CudaPopulation(
                        g.indptr, g.indices, p, seed=1, threads=tpb, gamma_in_shared=shared, batch=batch
                    )
                    pop.k = k
                    if shared and not pop.gamma_in_shared():
                        continue
                    r = population_rate(pop, g, k, args.seconds, args.iters)
                    print(
                        f"  GPU P={p} threads={tpb} batch={batch} gamma={'shared' if shared else 'global'}"
                        f" {r:>14,.0f} it/s   {r / anchor:.1f}x   {kernel_resources(pop)}"
                    )
                    pop.close()


def device_info() -> tuple[str, int, int]:
    """(name, SMs, free bytes) of the current device; numba's CUDA simulator, which has no
    device properties, counts as one SM with 1 GiB free (the bench's smoke test runs there)."""
    cuda = load_cuda()
    if not hasattr(cuda, "get_current_device"):
        return "numba CUDA simulator", 1, 1 << 30
    dev = cuda.get_current_device()
    free, _ = cuda.current_context().get_memory_info()
    return (dev.name.decode() if isinstance(dev.name, bytes) else dev.name), int(dev.MULTIPROCESSOR_COUNT), int(free)


def kernel_resources(pop: CudaPopulation) -> str:
    """Registers and local memory a thread of the compiled kernel takes, and how many of its
    blocks the device holds at once: more chains than that run in a second wave."""
    if not hasattr(pop.cuda, "get_current_device"):
        return "resources: none (simulator)"
    try:
        (kern,) = pop.step_kernel.overloads.values()
        smem = pop.kern.shared_bytes(pop.n, pop.k, pop.gamma_in_shared())
        resident = kern.max_cooperative_grid_blocks(pop.tpb, smem)
        return f"regs={kern.regs_per_thread} local={kern.local_mem_per_thread}B resident={resident}"
    except (AttributeError, ValueError) as exc:  # numba-cuda versions differ in these attributes
        return f"resources: {exc}"


class _Quiet:
    """An emitter that keeps the step events' values and nothing else."""

    def __init__(self) -> None:
        self.last: dict = {}

    def emit(self, name: str, values: dict | None = None, **kw) -> None:
        if name == "step" and values:
            self.last = values

    def set_context(self, **kw) -> None:
        pass


def search(args: argparse.Namespace) -> None:
    from experiments.coloring.verify import check_coloring
    from experiments.coloring.workload import ColoringWorkload

    for item in args.instances.split(","):
        name, target, limit = item.split(":")
        target, limit = int(target), float(limit) * args.limit_scale
        params = {
            "graph": {"file": name}
            if not name.startswith("gnp")
            else {"generator": "gnp", "n": int(name.split("-")[1]), "p": 0.5, "seed": int(name.split("-")[2])},
            "target": target,
            "phases": args.phases.split(","),
            "gpu": args.gpu,
            "population": {
                "population": args.population,
                "crossover_rate": args.crossover_rate,
                "threads_per_chain": args.threads,
                "tenure_alpha": args.tenure_alpha,
            },
        }
        w = ColoringWorkload(ColoringWorkload.check_params(params), args.seed)
        em = _Quiet()
        t0 = time.perf_counter()
        w.start(em)
        last = None
        print(f"\n{name}: target {target}, limit {limit:.0f} s", flush=True)
        while time.perf_counter() - t0 < limit:
            if w.step(em):
                break
            if w.best_k != last:
                last = w.best_k
                v = em.last
                print(
                    f"  {time.perf_counter() - t0:8.1f} s  {w.best_k:>4} colours  phase={w.phase} "
                    f"gpu_mode={w.gpu_mode}  P={v.get('population', 0):.0f} "
                    f"it/s={v.get('iters_per_s', 0):,.0f}",
                    flush=True,
                )
        v = check_coloring(w.g, w.best)
        print(
            f"  result: {v['k']} colours, proper={v['proper']}, {w.seconds_to_best:.1f} s to best, "
            f"target {'met' if v['proper'] and v['k'] <= target else 'NOT met'}; gpu_mode={w.gpu_mode} "
            f"({w.gpu_reason})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rates")
    r.add_argument("--instances", default="DSJC250.5:27,DSJC500.5:46")
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument("--threads", default="32,64,128")
    r.add_argument("--batches", default="1,4", help="load rounds (pairs per thread per round) to compare")
    r.add_argument("--gamma", default="global,shared", help="gamma table layouts to compare")
    r.add_argument("--population", type=int, default=0, help="chains on the GPU (0: chosen from the device)")
    r.add_argument("--per-sm", type=int, default=16)
    r.add_argument("--iters", type=int, default=2000, help="iterations per chain per launch")
    r.set_defaults(func=rates)
    s = sub.add_parser("search")
    s.add_argument("--instances", default="DSJC500.5:48:600")
    s.add_argument("--phases", default="population")
    s.add_argument("--gpu", default="auto")
    s.add_argument("--population", type=int, default=0)
    s.add_argument("--crossover-rate", type=float, default=0.1)
    s.add_argument("--threads", type=int, default=64)
    s.add_argument("--tenure-alpha", type=float, default=0.6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit-scale", type=float, default=1.0)
    s.set_defaults(func=search)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    args.func(args)


if __name__ == "__main__":
    main()
