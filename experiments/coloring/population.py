"""The ``population`` phase: many TabuCol chains at one k, with GPX crossover between generations.

The phase runs a population of P chains (``kernels/population.py``) on a CUDA device when
one answers (``gpu = "auto"`` or ``"gpu"``) and on all CPU cores otherwise. One step is one
generation:

1. every chain runs ``iters`` TabuCol iterations (one launch or one parallel loop; the host
   waits once per generation);
2. a chain that reaches 0 conflicts hands its colouring to the pipeline once the independent
   checker (``verify.check_coloring``) accepts it, and the pipeline aims at k - 1; every
   chain then continues from its own best colouring, the vertices of its highest colour
   moved to their least conflicting colours below (the population keeps its diversity);
3. otherwise the ``crossover_rate`` x P worst chains (among those at least ``min_age``
   generations old, so a child is judged after its own local search) are replaced by GPX
   children of parents drawn by binary tournament from the better half.

``iters`` adapts so that a generation lasts about ``generation_s`` (control stays
responsive at any graph size). Each generation reports the population's best and mean
conflicts and its diversity: the mean partition distance (the fewest vertices to move to
turn one colouring into the other, up to a renaming of colours, solved with scipy's
assignment solver) over a sample of pairs, divided by n.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import linear_sum_assignment

from actors.log import get_logger
from experiments.coloring.phase import ColoringPhase, Outcome
from experiments.coloring.verify import check_coloring
from kernels.backend import device_error_reason
from kernels.coloring import gpx, reduce_colors
from kernels.population import (
    CpuPopulation,
    CudaPopulation,
    auto_size,
    chain_bytes,
    cuda_status,
    load_cuda,
    memory_fit,
)

MIN_ITERS, MAX_ITERS = 50, 10_000_000

log = get_logger("experiments.coloring.population")


def partition_distance(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """Vertices to move to turn colouring ``a`` into ``b`` under the best renaming of colours."""
    overlap = np.zeros((k, k), dtype=np.int64)
    np.add.at(overlap, (a, b), 1)
    rows, cols = linear_sum_assignment(-overlap)
    return int(a.size - overlap[rows, cols].sum())


def choose_engine(
    g: Any, mode: str, size: int, seed: int, threads_per_chain: int, k: int
) -> tuple[Any, str, str | None]:
    """(engine, gpu_mode, reason): the CUDA population unless the spec or the machine says no."""
    if mode == "cpu":
        return _cpu_engine(g, size, k, seed), "cpu_disabled", "disabled in the spec"
    ok, why = cuda_status()
    if ok and g.n > 32767:
        ok, why = False, f"{g.n} vertices: the CUDA population handles up to 32767"
    if ok:
        tpb = 1 << (max(1, threads_per_chain).bit_length() - 1)
        cuda = load_cuda()
        try:
            dev = cuda.get_current_device()
            free, _ = cuda.current_context().get_memory_info()
            size = (
                _capped(size, memory_fit(g.n, max(k, 2), int(free)), "device memory")
                if size
                else auto_size(g.n, max(k, 2), int(free), int(dev.MULTIPROCESSOR_COUNT))
            )
        except AttributeError:  # the simulator: no device properties
            size = size or 4
        try:
            return CudaPopulation(g.indptr, g.indices, size, seed, threads=tpb), "gpu", None
        except Exception as exc:  # noqa: BLE001 - cuda raises its own error types
            ok, why = False, device_error_reason(exc)
    return _cpu_engine(g, size, k, seed), "cpu_fallback", why


def _capped(size: int, fit: int, what: str) -> int:
    if size > fit:
        log.warning("population reduced to what fits", asked=size, chains=fit, limit=what)
    return max(1, min(size, fit))


def _ram_fit(n: int, k: int) -> int:
    """The most CPU chains whose tables take at most a quarter of RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_chain = n * max(k, 2) * (4 + 4) + 2 * 4 * n  # gamma int32, tabu int32, two colourings
    return max(1, ram // 4 // per_chain)


def _cpu_engine(g: Any, size: int, k: int, seed: int) -> CpuPopulation:
    """The CPU population, its size capped so that its tables take at most a quarter of RAM."""
    return CpuPopulation(g.indptr, g.indices, _capped(size or _cpu_size(), _ram_fit(g.n, k), "RAM"), seed)


def _cpu_size() -> int:
    import numba

    return max(4, 2 * numba.config.NUMBA_NUM_THREADS)


class PopulationSearch:
    """The phase's state: the engine, the generation counter, the chains' ages and the RNG."""

    def __init__(self, g: Any, params: dict[str, Any], seed: int, mode: str, k: int) -> None:
        self.g = g
        self.p = params
        self.rng = np.random.default_rng(seed)
        self.engine, self.gpu_mode, self.gpu_reason = choose_engine(
            g, mode, int(params["population"]), seed, int(params["threads_per_chain"]), k
        )
        self.engine.tenure_a = int(params["tenure_a"])
        self.engine.tenure_alpha = float(params["tenure_alpha"])
        self.iters = 2 * MIN_ITERS  # grows to the chains' pace within a few generations
        self.pace_iters: int | None = None  # iterations per chain that take generation_s, once measured
        self.generation = 0
        self.k = 0
        self.f = np.zeros(self.size, dtype=np.int64)
        self.best_f = np.zeros(self.size, dtype=np.int64)
        self.age = np.zeros(self.size, dtype=np.int64)
        self.last: dict[str, float] = {}

    @property
    def size(self) -> int:
        return self.engine.size

    def seed(self, rows: np.ndarray, k: int) -> None:
        """Start every chain at k from the given colourings (one per chain; colours >= k are
        moved to their least conflicting colour below k)."""
        self.k = int(k)
        rows = reduce_colors(self.g.indptr, self.g.indices, np.ascontiguousarray(rows, dtype=np.int32), self.k)
        self.engine.seed(rows, self.k)
        self.age[:] = 0
        self.f = self.engine.current()
        self.best_f = self.f.copy()

    def seed_from(self, best: np.ndarray, k: int, spread: float = 0.05) -> None:
        """A fresh population at k from one colouring: chain 0 takes it as it is, the others
        with up to ``spread`` of the vertices recoloured at random."""
        self._start = best.astype(np.int32).copy()  # where a fall-back to the CPU starts again
        rows = np.repeat(best[None, :].astype(np.int32), self.size, axis=0)
        for i in range(1, self.size):
            mask = self.rng.random(self.g.n) < spread * i / self.size
            rows[i, mask] = self.rng.integers(0, k, int(mask.sum()))
        self.seed(rows, k)

    def step(self, should_yield: Callable[[], bool] = lambda: False) -> np.ndarray | None:
        """One generation; returns a colouring with 0 conflicts at k when a chain found one.

        A generation larger than the pace asks for (``set_batch``) runs in launches of about
        ``generation_s`` each (of ``2 * MIN_ITERS`` until the pace is measured), and ends early
        when ``should_yield()`` says so."""
        t0 = time.perf_counter()
        it0 = self.engine.iterations
        try:
            left = self.iters
            while left > 0:
                part = min(left, 2 * MIN_ITERS if self.pace_iters is None else self.pace_iters)
                c0, i0 = time.perf_counter(), self.engine.iterations
                self.f, self.best_f = self.engine.run(part)
                self._measure(self.engine.iterations - i0, time.perf_counter() - c0)
                left -= part
                if int(self.best_f.min()) == 0 or should_yield():
                    break
        except Exception as exc:  # a device failure of any kind: go on on the CPU (re-raised on the CPU)
            if self.engine.device != "gpu":
                raise
            self._fall_back(exc)
            return None
        dt = max(time.perf_counter() - t0, 1e-9)
        done = self.engine.iterations - it0
        self.generation += 1
        self.age += 1
        self.last = {"iterations": float(done), "iters_per_s": done / dt, "iters_per_chain": done / self.size}
        # the next generation's work follows the measured pace (at most twice this one's: a
        # quick generation says little), so that it lasts about generation_s
        assert self.pace_iters is not None
        self.iters = int(min(MAX_ITERS, max(MIN_ITERS, min(self.pace_iters, 2 * self.iters))))
        if int(self.best_f.min()) == 0:
            winner = int(np.argmin(self.best_f))
            c = self.engine.best_rows([winner])[0].astype(np.int32)
            verdict = check_coloring(self.g, c)  # the independent checker: no kernel shared with the search
            if verdict["proper"] and verdict["k"] <= self.k:
                return c
            log.error(
                "a chain reported a proper colouring that the checker refuses",
                chain=winner,
                device=self.engine.device,
                problems=verdict["problems"],
            )
        self._crossover()
        return None

    def _measure(self, done: int, dt: float) -> None:
        """The iterations per chain that take generation_s at the pace of the launch just done."""
        pace = done / self.size / max(dt, 1e-9)
        self.pace_iters = int(min(MAX_ITERS, max(MIN_ITERS, float(self.p["generation_s"]) * pace)))

    def _fall_back(self, exc: Exception) -> None:
        """The device failed mid-phase (out of memory, a lost device): the search goes on on
        the CPU cores from the phase's starting colouring, and says why."""
        reason = device_error_reason(exc)
        log.warning("the GPU population failed; going on on the CPU", reason=reason)
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - the device is gone; nothing more to release
            pass
        self.engine = _cpu_engine(self.g, int(self.p["population"]), self.k, int(self.rng.integers(1 << 30)))
        self.set_tenure(self.p["tenure_a"], self.p["tenure_alpha"])
        self.gpu_mode, self.gpu_reason = "cpu_fallback", reason
        self.f = np.zeros(self.size, dtype=np.int64)
        self.best_f = np.zeros(self.size, dtype=np.int64)
        self.age = np.zeros(self.size, dtype=np.int64)
        self.iters, self.pace_iters = 2 * MIN_ITERS, None
        self.seed_from(self._start, self.k)

    def _crossover(self) -> None:
        p = self.size
        m = round(float(self.p["crossover_rate"]) * p)
        if m < 1 or p < 3:
            return
        eligible = np.flatnonzero(self.age >= int(self.p["min_age"]))
        if eligible.size == 0:
            return
        order = eligible[np.argsort(-self.best_f[eligible], kind="stable")]
        victims = order[: min(m, eligible.size, p - 2)]
        keep = np.setdiff1d(np.arange(p), victims)
        ranked = keep[np.argsort(self.best_f[keep], kind="stable")]
        pool = ranked[: max(2, ranked.size // 2)]
        pa = self._tournament(pool, victims.size)
        pb = self._tournament(pool, victims.size)
        same = pa == pb
        pb[same] = self._other(pool, pa[same])
        self.engine.crossover(victims.astype(np.int32), pa.astype(np.int32), pb.astype(np.int32))
        self.age[victims] = 0
        self.best_f[victims] = 1 << 30

    def _tournament(self, pool: np.ndarray, count: int) -> np.ndarray:
        a = pool[self.rng.integers(0, pool.size, count)]
        b = pool[self.rng.integers(0, pool.size, count)]
        return np.where(self.best_f[a] <= self.best_f[b], a, b)

    def _other(self, pool: np.ndarray, taken: np.ndarray) -> np.ndarray:
        """A parent from ``pool`` different from each of ``taken``."""
        out = pool[self.rng.integers(0, pool.size, taken.size)]
        clash = out == taken
        while clash.any():
            out[clash] = pool[self.rng.integers(0, pool.size, int(clash.sum()))]
            clash = out == taken
        return out

    def diversity(self, pairs: int = 8) -> float:
        """Mean partition distance / n over a sample of pairs of the chains' best colourings."""
        if self.size < 2:
            return 0.0
        idx = self.rng.choice(self.size, size=min(self.size, 2 * pairs), replace=False)
        rows = self.engine.best_rows(idx)
        d = [partition_distance(rows[2 * i], rows[2 * i + 1], self.k) for i in range(len(idx) // 2)]
        return float(np.mean(d)) / self.g.n if d else 0.0

    def next_k(self, solution: np.ndarray, k: int) -> None:
        """A proper k-colouring was found: every chain goes on at k - 1 from its own best (the
        winner's solution in chain 0)."""
        rows = self.engine.best_rows(np.arange(self.size))
        rows[0] = solution
        self._start = solution.astype(np.int32).copy()
        self.seed(rows, k - 1)

    def resize(self, size: int) -> int:
        """A new population size (a control hook), cut to what memory holds like a spec's: the
        best chains are kept, new ones are GPX children of them; takes effect at once.
        Returns the size applied."""
        size = self._fit(int(size))
        if size == self.size:
            return size
        rows = self.engine.best_rows(np.arange(self.size))
        order = np.argsort(self.best_f, kind="stable")
        if size <= self.size:
            keep = rows[order[:size]]
        else:
            extra = [
                gpx(
                    rows[order[self.rng.integers(0, max(1, self.size // 2))]],
                    rows[order[self.rng.integers(0, self.size)]],
                    self.k,
                )
                for _ in range(size - self.size)
            ]
            keep = np.concatenate([rows, np.stack(extra)]) if extra else rows
        # the work per chain scales with the population, so that a generation (and the time to
        # the next pause, stop or budget check) stays about generation_s; the pace then adapts
        self.iters = int(min(MAX_ITERS, max(MIN_ITERS, self.iters * self.size / size)))
        self.pace_iters = None  # measured again at the new size
        self.engine.close()
        seed = int(self.rng.integers(1 << 30))
        if self.engine.device == "gpu":
            self.engine = CudaPopulation(self.g.indptr, self.g.indices, size, seed, threads=self.engine.tpb)
        else:
            self.engine = CpuPopulation(self.g.indptr, self.g.indices, size, seed)
        self.engine.tenure_a = int(self.p["tenure_a"])
        self.engine.tenure_alpha = float(self.p["tenure_alpha"])
        self.age = np.zeros(size, dtype=np.int64)
        self.seed(keep, self.k)
        return size

    def _fit(self, size: int) -> int:
        """``size`` cut to what this engine's memory holds (a quarter of RAM or of the device's
        free memory)."""
        k = max(self.k, 2)
        if self.engine.device == "gpu":
            try:
                free, _ = load_cuda().current_context().get_memory_info()
            except AttributeError:  # the simulator: no memory figures
                return size
            held = self.size * chain_bytes(self.g.n, k)  # the current chains' memory comes back first
            return _capped(size, memory_fit(self.g.n, k, int(free) + held), "device memory")
        return _capped(size, _ram_fit(self.g.n, k), "RAM")

    def set_tenure(self, a: int, alpha: float) -> None:
        self.engine.tenure_a, self.engine.tenure_alpha = int(a), float(alpha)

    def telemetry(self) -> dict[str, float]:
        """The generation's figures for the ``step`` event."""
        return {
            "pop_best": float(self.best_f.min()),
            "pop_mean": float(self.f.mean()),
            "diversity": self.diversity(),
            "population": float(self.size),
            "generation": float(self.generation),
            **self.last,
        }

    def close(self) -> None:
        self.engine.close()


class Population(ColoringPhase):
    """The phase the pipeline steps: one generation per step; the search (and its device
    memory) is made once and kept across k and passes."""

    name: ClassVar[str] = "population"

    search: PopulationSearch | None = None

    def setup(self, k: int, base: np.ndarray) -> np.ndarray | None:
        self.k = k
        if self.search is None:
            self.search = PopulationSearch(self.ctx.g, self.params, self.ctx.seed, self.ctx.p["gpu"], k)
        elif self.params["population"] and self.params["population"] != self.search.size:
            self.search.resize(self.params["population"])  # asked for while another phase ran
        self.gpu_mode, self.gpu_reason = self.search.gpu_mode, self.search.gpu_reason
        self.search.seed_from(base, k)
        self.gen = 0
        return None

    def next_k(self, solution: np.ndarray, k: int) -> np.ndarray | None:
        assert self.search is not None
        self.k = k
        self.search.next_k(solution, k + 1)  # every chain goes on from its own best
        self.gen = 0
        return None

    def conflicts(self) -> int:
        return int(self.search.best_f.min()) if self.search is not None else 0

    def step(self) -> Outcome:
        assert self.search is not None
        solution = self.search.step(self.ctx.should_yield)
        self.gpu_mode, self.gpu_reason = self.search.gpu_mode, self.search.gpu_reason  # a failure falls back
        self.gen += 1
        extra = self.search.telemetry()
        if solution is not None:
            return Outcome(0, solution=solution, extra=extra)
        return Outcome(int(self.search.best_f.min()), done=self.gen >= self.params["max_generations"], extra=extra)

    def set_batch(self, value: Any) -> tuple[Any, Any]:
        """The iterations per chain of the next generation (the pace adapts from there)."""
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_ITERS <= value <= MAX_ITERS:
            raise ValueError(
                f"set_batch for the population phase: iterations per chain must be an integer in "
                f"[{MIN_ITERS}, {MAX_ITERS}], got {value!r}"
            )
        if self.search is None:
            raise ValueError("set_batch: the population phase has not started")
        before, self.search.iters = self.search.iters, value
        return before, value

    def close(self) -> None:
        if self.search is not None:
            self.search.close()
            self.search = None
