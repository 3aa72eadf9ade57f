"""The ``tabu`` phase: k-reduction with TabuCol.

Take the best colouring, remove a colour, repair with TabuCol (reactive tenure ``tenure_a``
+ ``tenure_alpha`` x conflicting vertices); on success, remove another. After
``stall_iters`` iterations without a better best, ``tenure_alpha`` and ``alternate_alpha``
swap (dense graphs like short tenures, sparse ones long), unless an outside controller owns
the tenure (``external_tenure``). The phase ends after ``max_iters_per_k`` iterations at one k.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from experiments.coloring.phase import ColoringPhase, Outcome
from kernels.coloring import build_gamma, count_conflicts


class Tabu(ColoringPhase):
    name: ClassVar[str] = "tabu"
    batch_key: ClassVar[str] = "iters_per_step"

    iterations = 0  # TabuCol iterations done in this phase, over every k

    def setup(self, k: int, base: np.ndarray) -> np.ndarray | None:
        g = self.ctx.g
        self.k = k
        self.colors = self.ctx.reduced(base, k)
        self.gamma = build_gamma(g.indptr, g.indices, self.colors, k)
        self.tabu = np.zeros((g.n, k), dtype=np.int32)
        self.it = 0  # iterations at this k
        self.clock = 0  # the tabu table's iteration numbers (rebased before they overflow int32)
        self.best_c = self.colors.copy()
        self.best_f = 1 << 30
        self.f = int(count_conflicts(g.indptr, g.indices, self.colors))
        self.stall_best, self.stall_it = 1 << 30, 0
        return None

    def conflicts(self) -> int:
        return self.f

    def step(self) -> Outcome:
        t = self.params
        done, f, self.best_f, self.clock = self.ctx.tabucol(
            self.k,
            self.colors,
            self.gamma,
            self.tabu,
            self.clock,
            t["iters_per_step"],
            (t["tenure_a"], t["tenure_alpha"]),
            self.best_c,
            self.best_f,
        )
        self.it += done
        self.iterations += done
        self.f = int(f)
        if f == 0:
            return Outcome(0, solution=self.colors.copy())
        if self.best_f < self.stall_best:
            self.stall_best, self.stall_it = self.best_f, self.it
        elif not self.ctx.external_tenure and self.it - self.stall_it >= t["stall_iters"]:
            # stagnation: swap the reactive tenure's alpha (sparse graphs want long tenures)
            t["tenure_alpha"], t["alternate_alpha"] = t["alternate_alpha"], t["tenure_alpha"]
            self.stall_it = self.it
        return Outcome(self.f, done=self.it >= t["max_iters_per_k"])
