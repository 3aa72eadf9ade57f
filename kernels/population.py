"""Populations of TabuCol chains at one k: on all CPU cores (numba ``prange``) or on a CUDA device.

Both engines hold P colourings, each with its own gamma table, tabu table, iteration count
and best colouring, and offer the same operations, so the population phase
(``experiments/coloring/population.py``) is written once:

* ``seed(colorings, k)``: start every chain from the given P x n colourings at k colours;
* ``run(iters)``: advance every chain by up to ``iters`` iterations (one launch / one
  parallel loop; the host waits once); returns (current conflicts, best conflicts) per chain;
* ``best_rows(idx)``: the best colourings of the chains in ``idx`` (host arrays);
* ``crossover(victims, pa, pb)``: GPX children of the best colourings of chains ``pa[i]`` and
  ``pb[i]`` replace chains ``victims[i]``, which restart from them;
* ``iterations``: TabuCol iterations done so far, summed over the chains.

The CPU engine runs each chain with :func:`kernels.coloring.tabucol` (one chain per core at a
time). The CUDA engine keeps everything in device memory and runs ``kernels/tabu_cuda.py``.
"""

from __future__ import annotations

import os
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from kernels.coloring import TABU_REBASE, build_gamma, count_conflicts, gpx, rebase_tabu, seed_rng, tabucol

# prange from several Python threads at once (experiments side by side in one Lab) needs a
# thread-safe layer: OpenMP or TBB, never numba's workqueue
numba.config.THREADING_LAYER = os.environ.get("NUMBA_THREADING_LAYER", "threadsafe")

_BIG = 1 << 30


@njit(cache=True, parallel=True, nogil=True)
def tabu_population(
    indptr, indices, k, colors, gammas, tabus, its, iters, tenure_a, tenure_alpha, best_colors, best_f, f_out, done_out
):  # pragma: no cover - compiled
    """Advance every chain by up to ``iters`` TabuCol iterations, chains spread over the cores."""
    for p in prange(colors.shape[0]):
        done, f, bf = tabucol(
            indptr,
            indices,
            k,
            colors[p],
            gammas[p],
            tabus[p],
            its[p],
            iters,
            tenure_a,
            tenure_alpha,
            best_colors[p],
            best_f[p],
        )
        its[p] += done
        f_out[p] = f
        best_f[p] = bf
        done_out[p] = done


def _check_k(k: int) -> int:
    """Chains need at least two colours to move between (a random move picks another colour)."""
    if int(k) < 2:
        raise ValueError(f"a population searches at k >= 2 colours, got {k}")
    return int(k)


class CpuPopulation:
    """P chains on the CPU cores (numba ``prange``; ``threads`` caps the cores used)."""

    device = "cpu"

    def __init__(
        self, indptr: np.ndarray, indices: np.ndarray, size: int, seed: int = 0, threads: int | None = None
    ) -> None:
        self.indptr, self.indices = indptr, indices
        self.n = int(indptr.shape[0] - 1)
        self.size = int(size)
        self.threads = max(1, min(int(threads or numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS))
        self.tenure_a, self.tenure_alpha = 10, 0.6
        self.iterations = 0
        self.k = 0
        numba.set_num_threads(self.threads)
        seed_rng(seed)  # the caller's thread (crossover); prange workers keep numba's own per-thread streams

    def seed(self, colorings: np.ndarray, k: int) -> None:
        p, n = self.size, self.n
        self.k = _check_k(k)
        self.colors = np.ascontiguousarray(colorings, dtype=np.int32).reshape(p, n).copy()
        self.gammas = np.empty((p, n, k), dtype=np.int32)
        self.tabus = np.zeros((p, n, k), dtype=np.int32)
        self.its = np.zeros(p, dtype=np.int64)
        self.best = self.colors.copy()
        self.f = np.empty(p, dtype=np.int64)
        for i in range(p):
            self._restart(i)
        self.best_f = self.f.copy()

    def _restart(self, i: int) -> None:
        self.gammas[i] = build_gamma(self.indptr, self.indices, self.colors[i], self.k)
        self.tabus[i] = 0
        self.its[i] = 0
        self.best[i] = self.colors[i]
        self.f[i] = count_conflicts(self.indptr, self.indices, self.colors[i])

    def run(self, iters: int) -> tuple[np.ndarray, np.ndarray]:
        numba.set_num_threads(self.threads)
        for i in np.flatnonzero(self.its > TABU_REBASE):  # int32 tabu tables: rebase before they overflow
            rebase_tabu(self.tabus[i], self.its[i])
            self.its[i] = 0
        done = np.zeros(self.size, dtype=np.int64)
        tabu_population(
            self.indptr,
            self.indices,
            self.k,
            self.colors,
            self.gammas,
            self.tabus,
            self.its,
            int(iters),
            int(self.tenure_a),
            float(self.tenure_alpha),
            self.best,
            self.best_f,
            self.f,
            done,
        )
        self.iterations += int(done.sum())
        return self.f.copy(), self.best_f.copy()

    def best_rows(self, idx: Any) -> np.ndarray:
        return self.best[np.asarray(idx, dtype=np.int64)].copy()

    def current(self) -> np.ndarray:
        """Every chain's conflicts now."""
        return self.f.copy()

    def crossover(self, victims: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> None:
        for v, a, b in zip(victims.tolist(), pa.tolist(), pb.tolist(), strict=True):
            self.colors[v] = gpx(self.best[a], self.best[b], self.k)
        for v in victims.tolist():
            self._restart(v)
            self.best_f[v] = self.f[v]

    def close(self) -> None:
        """Nothing to release on the CPU."""


class CudaPopulation:
    """P chains on a CUDA device: one thread block per chain (``kernels/tabu_cuda.py``)."""

    device = "gpu"

    def __init__(
        self,
        indptr: np.ndarray,
        indices: np.ndarray,
        size: int,
        seed: int = 0,
        threads: int = 64,
        gamma_in_shared: bool = False,
        batch: int | None = None,
    ) -> None:
        cuda = load_cuda()
        from kernels import tabu_cuda

        if threads & (threads - 1) or not 1 <= threads <= tabu_cuda.MAX_THREADS:
            raise ValueError(f"threads per chain must be a power of two <= {tabu_cuda.MAX_THREADS}, got {threads}")
        self.cuda, self.kern = cuda, tabu_cuda
        self.step_kernel = tabu_cuda.tabu_chains_for(tabu_cuda.BATCH if batch is None else int(batch))
        self.n = int(indptr.shape[0] - 1)
        if self.n > 32767:
            raise ValueError(f"the CUDA population handles graphs of up to 32767 vertices, got {self.n}")
        self.size = int(size)
        self.tpb = threads
        self.want_shared = gamma_in_shared
        self.tenure_a, self.tenure_alpha = 10, 0.6
        self.iterations = 0
        self.k = 0
        self.d_indptr = cuda.to_device(np.ascontiguousarray(indptr, dtype=np.int32))
        self.d_indices = cuda.to_device(np.ascontiguousarray(indices, dtype=np.int32))
        self.d_rng = cuda.to_device(tabu_cuda.seed_states(self.size, threads, seed))
        self.d_gx_rng = cuda.to_device(tabu_cuda.seed_states(self.size, threads, seed + 1))
        dev = cuda.get_current_device() if hasattr(cuda, "get_current_device") else None  # the simulator has none
        self.max_shared = int(getattr(dev, "MAX_SHARED_MEMORY_PER_BLOCK", 48 * 1024))

    def gamma_in_shared(self) -> bool:
        """Whether the gamma table goes to shared memory: only when asked and it fits. Global
        memory is the default: on an H100 at 64 threads per chain it was 6-22 % faster on every
        graph small enough for shared memory (DSJC250.5, le450_25c, flat300_28_0)."""
        return self.want_shared and self.kern.shared_bytes(self.n, self.k, True) + 2048 <= self.max_shared

    def seed(self, colorings: np.ndarray, k: int) -> None:
        cuda, p, n = self.cuda, self.size, self.n
        self.k = _check_k(k)
        cols = np.ascontiguousarray(colorings, dtype=np.int32).reshape(p, n)
        self.d_colors = cuda.to_device(cols)
        self.d_best = cuda.to_device(cols)
        self.d_gamma = cuda.device_array((p, n * k), dtype=np.int16)
        self.d_tabu = cuda.device_array((p, n * k), dtype=np.int32)
        self.d_f = cuda.device_array(p, dtype=np.int64)
        self.d_best_f = cuda.device_array(p, dtype=np.int64)
        self.d_it = cuda.device_array(p, dtype=np.int64)
        self.d_done = cuda.device_array(p, dtype=np.int64)
        self._init(np.arange(p, dtype=np.int32))

    def _init(self, chains: np.ndarray) -> None:
        if chains.size == 0:
            return
        graph, state = self._graph_and_state()
        self.kern.init_chains[int(chains.size), self.tpb](*graph, self.cuda.to_device(chains.astype(np.int32)), *state)

    def _graph_and_state(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The kernels' leading arguments: the graph (CSR, n, k), then the chains' device state."""
        graph = (self.d_indptr, self.d_indices, self.n, self.k)
        return graph, (self.d_colors, self.d_gamma, self.d_tabu, self.d_f, self.d_best_f, self.d_best, self.d_it)

    def run(self, iters: int) -> tuple[np.ndarray, np.ndarray]:
        shared = self.gamma_in_shared()
        smem = self.kern.shared_bytes(self.n, self.k, shared)
        graph, state = self._graph_and_state()
        self.step_kernel[self.size, self.tpb, 0, smem](
            *graph,
            *state,
            int(iters),
            int(self.tenure_a),
            float(self.tenure_alpha),
            self.d_rng,
            shared,
            self.d_done,
        )
        self.iterations += int(self.d_done.copy_to_host().sum())  # the generation's one synchronisation
        return self.d_f.copy_to_host(), self.d_best_f.copy_to_host()

    def current(self) -> np.ndarray:
        """Every chain's conflicts now."""
        return self.d_f.copy_to_host()

    def best_rows(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size > self.size // 4:
            return self.d_best.copy_to_host()[idx]
        return np.stack([self.d_best[int(i)].copy_to_host() for i in idx]) if idx.size else np.empty((0, self.n))

    def crossover(self, victims: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> None:
        if victims.size == 0:
            return
        cuda = self.cuda
        smem = 4 * (self.n + self.k)
        self.kern.gpx_children[int(victims.size), self.tpb, 0, smem](
            self.d_best,
            cuda.to_device(pa.astype(np.int32)),
            cuda.to_device(pb.astype(np.int32)),
            self.d_colors,
            cuda.to_device(victims.astype(np.int32)),
            self.n,
            self.k,
            self.d_gx_rng,
        )
        self._init(victims.astype(np.int32))

    def close(self) -> None:
        """Drop the device arrays (the memory goes back to numba's pool)."""
        for name in ("d_colors", "d_best", "d_gamma", "d_tabu", "d_f", "d_best_f", "d_it", "d_done"):
            self.__dict__.pop(name, None)


def load_cuda() -> Any:
    """``numba.cuda``, importable next to numpy >= 2.5 (numba-cuda 0.30 still names
    ``np.row_stack``, which numpy 2.5 removed; it is the same function as ``np.vstack``)."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    from numba import cuda

    return cuda


def cuda_status() -> tuple[bool, str | None]:
    """(usable, reason if not): numba.cuda with at least one device (or its simulator)."""
    try:
        cuda = load_cuda()
    except ImportError as exc:  # pragma: no cover - numba always has cuda
        return False, f"numba.cuda missing: {exc}"
    try:
        if not cuda.is_available():
            return False, "no CUDA device"
        cuda.device_array(1)  # touches the device: fails here rather than mid-phase
    except Exception as exc:  # noqa: BLE001 - any driver error means "use the CPU"
        return False, f"device error: {exc}"
    return True, None


def chain_bytes(n: int, k: int) -> int:
    """Device memory of one chain: gamma (int16) + tabu (int32) + two colourings (int32)."""
    return n * k * (2 + 4) + 2 * 4 * n


def auto_size(n: int, k: int, free_bytes: int, sms: int, per_sm: int = 16, lo: int = 256, hi: int = 65536) -> int:
    """Population size for a device: enough chains to fill every SM ``per_sm`` deep, within
    a quarter of the free memory, in [lo, hi]."""
    want = sms * per_sm
    cap = memory_fit(n, k, free_bytes)
    return int(max(min(lo, cap), min(want, cap, hi)))


def memory_fit(n: int, k: int, free_bytes: int) -> int:
    """The most chains whose device tables take at most a quarter of ``free_bytes``."""
    return max(1, int(free_bytes * 0.25) // max(1, chain_bytes(n, k)))
