"""The ``thermo`` phase: replica exchange at fixed k = best - 1.

``replicas`` Metropolis chains on the conflict count at temperatures spread geometrically
over ``t_min..t_max``; adjacent temperatures swap configurations every
``exchange_interval`` steps with the replica-exchange probability. Each chain is a numba
kernel on the CPU. With ``gpu = "gpu"`` the replicas run as array code on cupy instead
(``kernels/replicas_xp.py``); under ``auto`` the CPU kernels are used, being the faster.
A device failure mid-phase goes on on the CPU and says why.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from experiments.coloring.params import DENSE_MAX_N
from experiments.coloring.phase import YIELD_MOVES, ColoringPhase, Outcome, PhaseContext
from kernels.backend import device_error_reason, select_backend, to_numpy
from kernels.coloring import anneal, build_gamma, count_conflicts


class Thermo(ColoringPhase):
    name: ClassVar[str] = "thermo"
    batch_key: ClassVar[str] = "sweeps_per_step"

    def __init__(self, ctx: PhaseContext) -> None:
        super().__init__(ctx)
        self.xp: Any = np
        if ctx.p["gpu"] == "gpu":
            self.xp, self.gpu_mode, self.gpu_reason = select_backend("gpu")
        elif ctx.p["gpu"] == "auto":
            self.gpu_reason = "thermo: its numba kernels are faster than its GPU array path"

    def betas(self) -> np.ndarray:
        """Inverse temperatures, from the parameters in force (a control may have moved them)."""
        t = self.params
        r = t["replicas"]
        temps = np.geomspace(t["t_min"], t["t_max"], r) if r > 1 else np.array([t["t_min"]])
        return 1.0 / temps

    def setup(self, k: int, base: np.ndarray) -> np.ndarray | None:
        g = self.ctx.g
        self.k = k
        self.base = base
        r = self.params["replicas"]
        start = self.ctx.reduced(base, k)
        reps = np.stack([start] + [self.ctx.perturb(start, k, 0.05) for _ in range(r - 1)])
        self.colors = reps
        if self.gpu_mode == "gpu" and g.n > DENSE_MAX_N:
            self.gpu_mode, self.gpu_reason = (
                "cpu_fallback",
                (f"{g.n} vertices: the array path's dense n x n adjacency is kept to {DENSE_MAX_N}"),
            )
        if self.gpu_mode == "gpu":
            from kernels.replicas_xp import build_gamma_xp, dense_adjacency

            xp = self.xp
            try:
                self.adj = dense_adjacency(xp, g.n, g.indptr, g.indices)
                self.xc = xp.asarray(reps)
                self.xg = build_gamma_xp(xp, self.adj, self.xc, k)
            except Exception as exc:  # noqa: BLE001 - cupy raises its own error types
                return self._gpu_failed(exc, base)
        else:
            self.gammas = [build_gamma(g.indptr, g.indices, c, k) for c in reps]
        self.f = min(int(count_conflicts(g.indptr, g.indices, c)) for c in reps)
        return None

    def conflicts(self) -> int:
        return self.f

    def _gpu_failed(self, exc: Exception, base: np.ndarray) -> np.ndarray | None:
        """A device error (out of memory, a lost device): continue on the CPU."""
        self.xp = np
        self.gpu_mode = "cpu_fallback"
        self.gpu_reason = device_error_reason(exc)
        return self.setup(self.k, base)

    def step(self) -> Outcome:
        if self.gpu_mode == "gpu":
            try:
                return self._work()
            except Exception as exc:  # noqa: BLE001 - cupy raises its own error types
                self._gpu_failed(exc, self.base)
        return self._work()

    def _work(self) -> Outcome:
        t, g, rng = self.params, self.ctx.g, self.ctx.rng
        moves = t["sweeps_per_step"] * g.n
        betas = self.betas()
        if self.gpu_mode == "gpu":
            from kernels.replicas_xp import conflicts_xp, sweep_xp

            xp = self.xp
            r = self.xc.shape[0]
            verts = xp.asarray(rng.integers(0, g.n, (r, moves)))
            shifts = xp.asarray(rng.integers(1, self.k, (r, moves))) if self.k > 1 else xp.ones((r, moves), int)
            unif = xp.asarray(rng.random((r, moves)))
            sweep_xp(xp, self.adj, self.xc, self.xg, xp.asarray(betas), verts, shifts, unif, self.k)
            energies = to_numpy(xp, conflicts_xp(xp, self.adj, self.xc))
            colors = to_numpy(xp, self.xc)
        else:
            colors = self.colors
            # rounds of at most YIELD_MOVES proposals per replica, every replica in each round, so
            # that a step cut short leaves the temperatures with equal work; one round when the
            # step is no larger, the same proposals as before
            for done in range(0, moves, YIELD_MOVES):
                if done and self.ctx.should_yield():
                    break
                for i in range(colors.shape[0]):
                    part = min(moves - done, YIELD_MOVES)
                    anneal(g.indptr, g.indices, self.k, colors[i], self.gammas[i], float(betas[i]), part)
            energies = np.array([count_conflicts(g.indptr, g.indices, c) for c in colors])
        best = self.f = int(energies.min())
        if best == 0:
            return Outcome(0, solution=colors[int(np.argmin(energies))].copy())
        if self.steps % t["exchange_interval"] == 0:  # steps done before this one (the pipeline counts)
            self._exchange(energies, betas)
        return Outcome(best, done=self.steps + 1 >= t["max_steps"])

    def _exchange(self, energies: np.ndarray, betas: np.ndarray) -> None:
        """Swap adjacent temperatures' configurations with the replica-exchange probability."""
        for i in range(len(betas) - 1):
            a = (betas[i] - betas[i + 1]) * (energies[i] - energies[i + 1])
            if a >= 0 or self.ctx.rng.random() < math.exp(a):
                if self.gpu_mode == "gpu":
                    self.xc[[i, i + 1]] = self.xc[[i + 1, i]]
                    self.xg[[i, i + 1]] = self.xg[[i + 1, i]]
                else:
                    self.colors[[i, i + 1]] = self.colors[[i + 1, i]]
                    self.gammas[i], self.gammas[i + 1] = self.gammas[i + 1], self.gammas[i]
                energies[i], energies[i + 1] = energies[i + 1], energies[i]
