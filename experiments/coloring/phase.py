"""What every colouring phase is: an object the pipeline sets up at a k and steps.

A phase searches for a proper colouring with ``k`` colours. :meth:`ColoringPhase.setup`
starts it from a colouring (any number of colours: the phase reduces it to k);
:meth:`ColoringPhase.step` does one bounded chunk of work and returns an :class:`Outcome`.
When an outcome carries a solution the pipeline records it and calls
:meth:`ColoringPhase.next_k` to go on at k - 1 (a phase may keep state across k, as the
population does). Either call may return a solution found while setting up.

A step's work goes in chunks (:data:`YIELD_ITERS` TabuCol iterations, :data:`YIELD_MOVES`
annealing proposals per replica, a generation's pace for the population), and between two
chunks the phase asks ``ctx.should_yield()``: when a pause, a stop or a parameter change
waits, or the budget is used, the step ends there with the work it has done (at least one
chunk). A step no larger than one chunk is one kernel call, draw for draw as before; a larger
one is several calls with their own draws, and a seeded run that nothing cuts is still
reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from experiments.coloring.graph import Graph
from experiments.coloring.params import check_number
from kernels.coloring import TABU_REBASE, rebase_tabu, reduce_colors, tabucol

YIELD_ITERS = 1 << 16  # TabuCol iterations between two looks at ctx.should_yield (tens of ms)
YIELD_MOVES = 1 << 18  # annealing proposals between two looks


def _never() -> bool:
    return False


@dataclass
class Outcome:
    """One step's result: the conflicts now, a proper k-colouring if found, whether the phase
    has nothing more to do, and extra figures for the ``step`` event."""

    conflicts: int
    solution: np.ndarray | None = None
    done: bool = False
    extra: dict[str, float] = field(default_factory=dict)


class PhaseContext:
    """What the phases share with the pipeline: the graph, the live parameters (control
    hooks change them between steps), the random stream, and who steers the tenure."""

    def __init__(self, g: Graph, params: dict[str, Any], rng: np.random.Generator, seed: int) -> None:
        self.g, self.p, self.rng, self.seed = g, params, rng, seed
        self.external_tenure = False  # True while an outside controller (hypertune) owns the tenure
        self.should_yield: Callable[[], bool] = _never  # the Phase actor's check (use_interrupt)

    def reduced(self, base: np.ndarray, k: int) -> np.ndarray:
        """``base`` with its colours >= k moved to the least-conflicting colour below k."""
        c = np.ascontiguousarray(base, dtype=np.int32)
        if k < 1:
            return c.copy()
        return reduce_colors(self.g.indptr, self.g.indices, c[None, :], k)[0]

    def tabucol(
        self,
        k: int,
        colors: np.ndarray,
        gamma: np.ndarray,
        tabu: np.ndarray,
        clock: int,
        iters: int,
        tenure: tuple[int, float],
        best: np.ndarray,
        best_f: int,
    ) -> tuple[int, int, int, int]:
        """Up to ``iters`` TabuCol iterations (:func:`kernels.coloring.tabucol`) in chunks of
        :data:`YIELD_ITERS`, ending at 0 conflicts or at the chunk where :attr:`should_yield`
        says so. ``clock`` is the tabu table's iteration number (rebased before it overflows
        int32). Returns (iterations done, conflicts now, best conflicts, clock)."""
        g, total = self.g, 0
        while True:
            if clock > TABU_REBASE:
                rebase_tabu(tabu, clock)
                clock = 0
            part = min(iters - total, YIELD_ITERS)
            done, f, best_f = tabucol(
                g.indptr, g.indices, k, colors, gamma, tabu, clock, part, tenure[0], tenure[1], best, best_f
            )
            clock += done
            total += done
            if f == 0 or total >= iters or self.should_yield():
                return total, int(f), int(best_f), clock

    def perturb(self, c: np.ndarray, k: int, rate: float) -> np.ndarray:
        """A copy of ``c`` with about ``rate`` of its vertices given random colours below k."""
        out = c.copy()
        mask = self.rng.random(c.size) < rate
        out[mask] = self.rng.integers(0, k, int(mask.sum()))
        return out


class ColoringPhase:
    """The base of the phases: CPU by default, no state across k, ``set_batch`` on one key."""

    name: ClassVar[str]
    batch_key: ClassVar[str] = ""  # the parameter ``set_batch`` sets in this phase's section

    def __init__(self, ctx: PhaseContext) -> None:
        self.ctx = ctx
        self.k = 0
        self.steps = 0
        p = ctx.p["gpu"]
        self.gpu_mode, self.gpu_reason = (
            ("cpu_disabled", "disabled in the spec") if p == "cpu" else ("cpu", f"{self.name}: a CPU phase")
        )

    @property
    def params(self) -> dict[str, Any]:
        return self.ctx.p[self.name]

    def enter(self) -> None:
        """The pipeline enters the phase (again, in a later pass): its step count restarts."""
        self.steps = 0

    def setup(self, k: int, base: np.ndarray) -> np.ndarray | None:
        raise NotImplementedError

    def step(self) -> Outcome:
        raise NotImplementedError

    def conflicts(self) -> int:
        """The fewest conflicts the phase holds now at its k (reported with each step)."""
        raise NotImplementedError

    def next_k(self, solution: np.ndarray, k: int) -> np.ndarray | None:
        """Go on at k (one below the solution's) from the solution."""
        return self.setup(k, solution)

    def set_batch(self, value: Any) -> tuple[Any, Any]:
        before = self.params[self.batch_key]
        self.params[self.batch_key] = check_number(self.name, self.batch_key, value)
        return before, value

    def close(self) -> None:
        """Release what the phase holds (device memory); it is not stepped again."""
