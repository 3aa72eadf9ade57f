"""The ``memetic`` phase: HEA-style search at k = best - 1 (Galinier and Hao).

A population of ``population`` colourings, each improved by TabuCol (``local_iters``
iterations, the tabu phase's tenure); one step is one generation: two parents, GPX crossover,
optional mutation, TabuCol, and the child replaces the worst non-elite member if it is no
worse. On success, a new population at the next k from the solution.

A new population is refined one member per step (the first, from the best solution, at once):
setting it up costs no more between two safe points than a generation does, so a large
``population`` x ``local_iters`` never holds a pause, a stop or the budget check for long.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from experiments.coloring.phase import ColoringPhase, Outcome
from kernels.coloring import build_gamma, count_conflicts, gpx


class Memetic(ColoringPhase):
    name: ClassVar[str] = "memetic"
    batch_key: ClassVar[str] = "local_iters"

    def _local(self, c: np.ndarray, iters: int) -> tuple[np.ndarray, int]:
        g, t = self.ctx.g, self.ctx.p["tabu"]
        gamma = build_gamma(g.indptr, g.indices, c, self.k)
        tabu = np.zeros((g.n, self.k), dtype=np.int32)
        best = c.copy()
        # chunked: a pause or a stop never waits for a huge local search
        _, _, bf, _ = self.ctx.tabucol(
            self.k, c, gamma, tabu, 0, iters, (t["tenure_a"], t["tenure_alpha"]), best, 1 << 30
        )
        return best, int(bf)

    def setup(self, k: int, base: np.ndarray) -> np.ndarray | None:
        m, g, rng = self.params, self.ctx.g, self.ctx.rng
        self.k = k
        start = self.ctx.reduced(base, k)
        first, f = self._local(start.copy(), m["local_iters"])
        self.pop, self.fit = [first], [f]
        for _ in range(1, m["population"]):  # refined by the next steps, one each
            c = rng.integers(0, k, g.n).astype(np.int32)
            self.pop.append(c)
            self.fit.append(int(count_conflicts(g.indptr, g.indices, c)))
        self._unrefined = list(range(1, len(self.pop)))
        self.gen = 0
        best = int(np.argmin(self.fit))
        return self.pop[best].copy() if self.fit[best] == 0 else None

    def conflicts(self) -> int:
        return int(min(self.fit))

    def step(self) -> Outcome:
        m, rng = self.params, self.ctx.rng
        if self._unrefined:  # setting the population up: one member's TabuCol (not a generation)
            i = self._unrefined.pop(0)
            self.pop[i], self.fit[i] = self._local(self.pop[i], m["local_iters"])
            if self.fit[i] == 0:
                return Outcome(0, solution=self.pop[i].copy())
            return Outcome(min(self.fit))
        i, j = rng.choice(len(self.pop), 2, replace=False)
        child = gpx(self.pop[i], self.pop[j], self.k)
        if m["mutation_rate"] > 0:
            child = self.ctx.perturb(child, self.k, m["mutation_rate"])
        child, f = self._local(child, m["local_iters"])
        order = np.argsort(self.fit)
        protected = set(order[: m["elitism"]].tolist())
        worst = next((int(w) for w in order[::-1] if int(w) not in protected), int(order[-1]))
        if f <= self.fit[worst]:
            self.pop[worst], self.fit[worst] = child, f
        self.gen += 1
        if f == 0:
            return Outcome(0, solution=child)
        return Outcome(min(self.fit), done=self.gen >= m["max_generations"])
