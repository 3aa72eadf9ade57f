"""The multi-phase colouring pipeline as a step-wise workload (the PRISM plan).

Phases, each a sequence of bounded steps with safe points between them:

* ``init``: the initial colouring (``init.strategy``: greedy, dsatur, spectral, community,
  multistart); records the strategy and its colours and conflicts.
* ``thermo``: replica exchange at fixed k = best - 1: ``replicas`` Metropolis chains on the
  conflict count at temperatures spread geometrically over ``t_min..t_max``, adjacent
  temperatures swapped every ``exchange_interval`` steps. On a CUDA device the replicas run
  as array code on cupy (``kernels/replicas_xp.py``); otherwise each chain is a numba kernel.
* ``tabu``: k-reduction: take the best colouring, remove a colour, repair with TabuCol
  (reactive tenure ``tenure_a`` + ``tenure_alpha`` x conflicting vertices); on success,
  remove another colour. After ``stall_iters`` iterations without a better best, alpha and
  ``alternate_alpha`` swap (dense graphs like short tenures, sparse ones like long).
* ``memetic``: HEA-style: a population at k = best - 1, GPX crossover, TabuCol local search,
  mutation, elitism; on success, k goes down again.
* ``population``: many TabuCol chains at k = best - 1 advancing together, on a CUDA device
  (one thread block per chain) or on all CPU cores (``prange``), with GPX crossover between
  generations; on success every chain goes on at k - 1 (``experiments/coloring/population.py``).

Where each phase runs (``gpu_mode`` with ``gpu_reason`` in every event): ``population`` on
the GPU when one answers (``gpu``), else on the CPU cores (``cpu_fallback`` and why);
``thermo`` uses its GPU array path only when the spec says ``gpu = "gpu"`` (under ``auto``
its numba kernels are faster, so it runs on the CPU: ``cpu``); ``init``, ``tabu`` and
``memetic`` are CPU phases (``cpu``). ``gpu = "cpu"`` keeps everything on the CPU
(``cpu_disabled``).

Every step emits the plan's fields: ``phase``, ``step``, ``chromatic_number`` (best proper k
so far), ``k`` (the k being attempted), ``conflicts``, ``gpu_mode``, ``duration_ms``,
``parameters``, ``notes``, ``pass``. Control hooks (``set_param``): ``adjust_temperature``
(scale the ladder), ``set_batch`` (work per step), ``set_tenure`` (tenure alpha),
``boost_mutation`` (mutation rate), ``skip_phase``, ``restart_pass`` (a new pass from the
best solution now), ``external_tenure`` (an outside controller owns the tenure: the tabu
phase's own stagnation swap stands down, so two controllers never fight).

Iterative restarts: with ``iterative.enabled`` a phase that has gone ``iterative.stall_s``
seconds without a better colouring hands over to the next, and a pass ends when its last
phase ends or stalls; the next pass starts from the
best solution with ``iterative.perturb`` of its vertices recoloured, a new random stream and
longer searches, until ``iterative.max_passes`` or the time budget. Every pass's best is
saved as ``best_solution.pass<N>.json``, also when the budget or a stop cuts a pass short
(:meth:`ColoringWorkload.finish`); ``pass_end`` carries the pass's duration and colours.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson

from experiments.coloring import population as pop_phase
from experiments.coloring.graph import MAX_VERTICES, Graph, GraphError, check_graph, load_graph
from experiments.coloring.init import check_init, initial_coloring
from experiments.validate import Num
from kernels.backend import device_error_reason, select_backend, to_numpy
from kernels.coloring import anneal, build_gamma, count_conflicts, gpx, seed_rng, tabucol
from telemetry.emitter import Emitter

PHASES = ("thermo", "tabu", "memetic", "population")
DENSE_MAX_N = 16_384  # thermo's GPU array path holds an n x n int32 adjacency: 1 GiB at this size
DEFAULTS: dict[str, Any] = {
    "graph": {"generator": "gnp", "n": 125, "p": 0.5, "seed": 1},
    "init": {"strategy": "dsatur", "tries": 64},
    "phases": ["population"],
    "target": 0,
    "gpu": "auto",
    "thermo": {"replicas": 8, "t_min": 0.05, "t_max": 1.5, "exchange_interval": 1, "sweeps_per_step": 2,
               "max_steps": 100},
    "tabu": {"tenure_a": 10, "tenure_alpha": 0.6, "iters_per_step": 20_000, "max_iters_per_k": 20_000_000,
             "stall_iters": 1_000_000, "alternate_alpha": 2.0},
    "memetic": {"population": 10, "local_iters": 20_000, "mutation_rate": 0.0, "elitism": 1,
                "max_generations": 2_000},
    "population": dict(pop_phase.DEFAULTS),
    "iterative": {"enabled": False, "max_passes": 3, "stall_s": 0.0, "perturb": 0.05},
}
LIMITS = {  # (section, key): (min, max, integer)
    ("thermo", "replicas"): (2, 256, True), ("thermo", "t_min"): (1e-4, 100.0, False),
    ("thermo", "t_max"): (1e-4, 1000.0, False), ("thermo", "exchange_interval"): (1, 10_000, True),
    ("thermo", "sweeps_per_step"): (1, 10_000, True), ("thermo", "max_steps"): (1, 10**9, True),
    ("tabu", "tenure_a"): (1, 10_000, True), ("tabu", "tenure_alpha"): (0.0, 10.0, False),
    ("tabu", "iters_per_step"): (1, 10**9, True), ("tabu", "max_iters_per_k"): (1, 10**12, True),
    ("tabu", "stall_iters"): (1, 10**12, True), ("tabu", "alternate_alpha"): (0.0, 10.0, False),
    ("memetic", "population"): (2, 1000, True), ("memetic", "local_iters"): (1, 10**9, True),
    ("memetic", "mutation_rate"): (0.0, 1.0, False), ("memetic", "elitism"): (0, 1000, True),
    ("memetic", "max_generations"): (1, 10**9, True), ("iterative", "max_passes"): (1, 1000, True),
    ("iterative", "stall_s"): (0.0, 1e7, False), ("iterative", "perturb"): (0.0, 0.5, False),
    **{("population", key): lim for key, lim in pop_phase.LIMITS.items()},
}


def _merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"unknown colouring parameter {where}{k!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and k != "graph":
            if not isinstance(v, dict):
                raise ValueError(f"{where}{k} must be a table")
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def _aim(k: int) -> int:
    """The k to attempt next, or 0 when there is none: one colour never does for a graph
    with an edge, and a graph without one has its single colour from the start."""
    return k if k >= 2 else 0


def check_number(section: str, key: str, v: Any) -> Any:
    """``v`` if it is a finite number in the parameter's range (``ValueError`` naming it if not)."""
    lo, hi, integer = LIMITS[(section, key)]
    return Num(lo, hi, integer=integer).check(f"{section}.{key}", v)


class ColoringWorkload:
    """The colouring pipeline; see the module docs."""

    name: ClassVar[str] = "coloring"

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        p = _merge(DEFAULTS, params)
        p["graph"] = check_graph(p["graph"])
        p["init"] = check_init(p["init"])
        if not isinstance(p["phases"], list) or not p["phases"] or any(x not in PHASES for x in p["phases"]):
            raise ValueError(f"phases must be a non-empty list of {', '.join(PHASES)}, got {p['phases']!r}")
        if p["gpu"] not in ("auto", "gpu", "cpu"):
            raise ValueError(f"gpu must be auto, gpu or cpu, got {p['gpu']!r}")
        Num(0, MAX_VERTICES, integer=True).check("target", p["target"])
        for (section, key) in LIMITS:
            check_number(section, key, p[section][key])
        if p["thermo"]["t_min"] > p["thermo"]["t_max"]:
            raise ValueError("thermo.t_min must be <= thermo.t_max")
        if not isinstance(p["iterative"]["enabled"], bool):
            raise ValueError("iterative.enabled must be true or false")
        return p

    def __init__(self, params: dict[str, Any], seed: int = 0, clock: Any = time.monotonic) -> None:
        self.clock = clock  # seconds, for the pass and stall times (tests drive it)
        self.p = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.run_dir: Path | None = None  # set by the phase actor: where per-pass solutions go
        try:
            self.g: Graph = load_graph(self.p["graph"])
        except GraphError as exc:
            raise ValueError(str(exc)) from None
        self.xp: Any = np
        self.gpu_mode, self.gpu_reason = self._phase_device("init")
        self._search: pop_phase.PopulationSearch | None = None  # made at the first population phase
        self.pass_ = 0
        self.phase_idx = -1  # -1 = init
        self.best: np.ndarray | None = None
        self.best_k = 0
        self.k = 0
        self.steps_in_phase = 0
        self.iters_at_k = 0
        self.pass_best: list[int] = []
        self.pass_start_best = 0
        self.t_start = self.clock()
        self.pass_t0 = self.t_start
        self.last_best_t = self.t_start
        self.seconds_to_best = 0.0
        self._state: dict[str, Any] = {}
        self._external_tenure = False  # True while hypertune owns the tenure (no built-in swap)
        self._pass_base: np.ndarray | None = None

    # --- protocol ---------------------------------------------------------------------------------

    def start(self, emitter: Emitter) -> None:
        seed_rng(self.seed + 7919 * self.pass_)
        emitter.set_context(gpu_mode=self.gpu_mode, pass_=self.pass_)
        if self.best is not None:
            self._enter_phase(max(self.phase_idx, 0), emitter, "resumed from checkpoint")

    @property
    def phase(self) -> str:
        return "init" if self.phase_idx < 0 else self.p["phases"][self.phase_idx]

    def step(self, emitter: Emitter) -> bool:
        t0 = time.perf_counter()
        if self.phase_idx < 0:
            return self._init(emitter, t0)
        if self._state.pop("restart_pass", False):
            self._close_pass(emitter, "restart requested")
            self._start_pass(emitter, "restart requested")
            return False
        phase = self.phase
        done_phase = {"thermo": self._thermo_step, "tabu": self._tabu_step, "memetic": self._memetic_step,
                      "population": self._population_step}[phase]()
        self.steps_in_phase += 1
        emitter.emit("step", {"chromatic_number": float(self.best_k), "k": float(self.k),
                              "conflicts": float(self._state.get("f", 0)),
                              "duration_ms": (time.perf_counter() - t0) * 1e3, **self._state.pop("extra", {})},
                     phase=phase, step=self.steps_in_phase, parameters=self.params(),
                     gpu_mode=self.gpu_mode, gpu_reason=self.gpu_reason)
        if self._state.pop("improved", False):
            self._new_best(emitter, phase)
        if self.p["target"] and self.best_k <= self.p["target"]:
            emitter.emit("target_reached", {"chromatic_number": float(self.best_k)}, phase=phase,
                         notes=f"target {self.p['target']} reached")
            return self._end_pass(emitter, final=True)
        if done_phase or self.best_k <= 1:
            return self._next_phase(emitter)
        it = self.p["iterative"]
        if it["enabled"] and it["stall_s"] > 0 and self.clock() - self.last_best_t >= it["stall_s"]:
            # a phase that finds nothing better for stall_s hands over; after the last, the pass ends
            return self._next_phase(emitter, why=f"no better colouring for {it['stall_s']:g} s")
        return False

    def finish(self, emitter: Emitter, reason: str) -> None:
        """The run is ending (budget, stop): the pass under way is saved and reported like any
        other, so a pass cut short still leaves its ``best_solution.pass<N>.json``."""
        if self.best is None or len(self.pass_best) > self.pass_:
            return
        self._close_pass(emitter, reason)

    def checkpoint(self) -> dict[str, Any]:
        return {"pass": self.pass_, "phase_idx": self.phase_idx, "best_k": self.best_k,
                "colors_per_pass": self.colors_per_pass(),
                "best": self.best.tolist() if self.best is not None else None, "pass_best": self.pass_best,
                "seconds_to_best": self.seconds_to_best, "params": {s: self.p[s] for s in PHASES}}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("best") is None:
            return
        self.pass_ = int(state["pass"])
        self.phase_idx = int(state["phase_idx"])
        self.best = np.asarray(state["best"], dtype=np.int32)
        self.best_k = int(state["best_k"])
        self.pass_best = list(state.get("pass_best", []))
        self.seconds_to_best = float(state.get("seconds_to_best", 0.0))
        for s in PHASES:
            self.p[s].update(state.get("params", {}).get(s, {}))

    def params(self) -> dict[str, Any]:
        ph = self.phase
        return {"phase": ph, **(self.p[ph] if ph in PHASES else {"strategy": self.p["init"]["strategy"]})}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        """The control hooks, applied at the next safe point (between steps); see the module docs."""
        hook = self._HOOKS.get(key)
        if hook is None:
            raise ValueError(f"unknown control {key!r}; expected one of {', '.join(sorted(self._HOOKS))}")
        return hook(self, value)

    def _adjust_temperature(self, value: Any) -> tuple[Any, Any]:
        f = float(value)
        if not 0.1 <= f <= 10.0:
            raise ValueError(f"adjust_temperature factor must be in [0.1, 10], got {value!r}")
        before = (self.p["thermo"]["t_min"], self.p["thermo"]["t_max"])
        self.p["thermo"]["t_min"] = check_number("thermo", "t_min", before[0] * f)
        self.p["thermo"]["t_max"] = check_number("thermo", "t_max", before[1] * f)
        self._betas()
        return before, (self.p["thermo"]["t_min"], self.p["thermo"]["t_max"])

    def _set_batch(self, value: Any) -> tuple[Any, Any]:
        if self.phase == "population" and self._search is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    pop_phase.MIN_ITERS <= value <= pop_phase.MAX_ITERS):
                raise ValueError(f"set_batch for the population phase: iterations per chain must be an integer in "
                                 f"[{pop_phase.MIN_ITERS}, {pop_phase.MAX_ITERS}], got {value!r}")
            before, self._search.iters = self._search.iters, value
            return before, value
        section, field = {"thermo": ("thermo", "sweeps_per_step"), "memetic": ("memetic", "local_iters")}.get(
            self.phase, ("tabu", "iters_per_step"))
        before = self.p[section][field]
        self.p[section][field] = check_number(section, field, value)
        return before, value

    def _set_tenure(self, value: Any) -> tuple[Any, Any]:
        section = "population" if self.phase == "population" else "tabu"
        before = self.p[section]["tenure_alpha"]
        for sec in ("tabu", "population"):
            self.p[sec]["tenure_alpha"] = check_number(sec, "tenure_alpha", value)
        if self._search is not None:
            self._search.set_tenure(self.p["population"]["tenure_a"], value)
        return before, value

    def _boost_mutation(self, value: Any) -> tuple[Any, Any]:
        before = self.p["memetic"]["mutation_rate"]
        self.p["memetic"]["mutation_rate"] = check_number("memetic", "mutation_rate", value)
        return before, value

    def _set_population(self, value: Any) -> tuple[Any, Any]:
        check_number("population", "population", value)
        if value < 3:
            raise ValueError(f"population must be at least 3 chains, got {value!r}")
        before = self._search.size if self._search is not None else self.p["population"]["population"]
        self.p["population"]["population"] = value
        if self._search is not None and self.phase == "population" and self.k >= 1:
            self._search.resize(value)
        return before, value

    def _set_crossover_rate(self, value: Any) -> tuple[Any, Any]:
        before = self.p["population"]["crossover_rate"]
        self.p["population"]["crossover_rate"] = check_number("population", "crossover_rate", value)
        return before, value

    def _set_external_tenure(self, value: Any) -> tuple[Any, Any]:
        # an outside controller (hypertune) steers the tenure: the built-in swap stands down
        before = self._external_tenure
        self._external_tenure = bool(value)
        return before, self._external_tenure

    def _restart_pass(self, value: Any) -> tuple[Any, Any]:
        self._state["restart_pass"] = True
        return self.pass_, self.pass_ + 1

    def _skip_phase(self, value: Any) -> tuple[Any, Any]:
        self._state["skip"] = True
        return self.phase, "next phase"

    _HOOKS: ClassVar[dict[str, Any]] = {
        "adjust_temperature": _adjust_temperature, "set_batch": _set_batch, "set_tenure": _set_tenure,
        "boost_mutation": _boost_mutation, "set_population": _set_population,
        "set_crossover_rate": _set_crossover_rate, "external_tenure": _set_external_tenure,
        "restart_pass": _restart_pass, "skip_phase": _skip_phase,
    }

    # --- phases --------------------------------------------------------------------------------------

    def _init(self, emitter: Emitter, t0: float) -> bool:
        strat = self.p["init"]["strategy"]
        kw = {"tries": self.p["init"]["tries"]} if strat == "multistart" else {}
        c = initial_coloring(self.g, strat, self.seed, **kw)
        conflicts = int(count_conflicts(self.g.indptr, self.g.indices, c))
        self.best, self.best_k = c, int(c.max()) + 1 if c.size else 0
        self.seconds_to_best = self.clock() - self.t_start
        emitter.emit("init", {"chromatic_number": float(self.best_k), "conflicts": float(conflicts),
                              "duration_ms": (time.perf_counter() - t0) * 1e3, "vertices": float(self.g.n),
                              "edges": float(self.g.m)},
                     phase="init", step=0, parameters={"strategy": strat}, gpu_reason=self.gpu_reason,
                     notes=f"initial colouring by {strat}: {self.best_k} colours, {conflicts} conflicts")
        self.pass_start_best = self.best_k
        return self._next_phase(emitter)

    def _phase_device(self, phase: str) -> tuple[str, str | None]:
        """(gpu_mode, reason) for a phase; see the module docs. The population phase's engine
        decides its own when it is made."""
        if self.p["gpu"] == "cpu":
            return "cpu_disabled", "disabled in the spec"
        if phase == "thermo":
            if self.p["gpu"] == "gpu":
                self.xp, mode, why = select_backend("gpu")
                return mode, why
            return "cpu", "thermo: its numba kernels are faster than its GPU array path"
        if phase == "population" and self._search is not None:
            return self._search.gpu_mode, self._search.gpu_reason
        return "cpu", f"{phase}: a CPU phase"

    def _enter_phase(self, idx: int, emitter: Emitter, why: str) -> None:
        self.phase_idx = idx
        self.steps_in_phase = 0
        self._state = {}
        self.k = _aim(self.best_k - 1)
        self.last_best_t = self.clock()  # each phase gets its own stall window
        self.xp = np
        self.gpu_mode, self.gpu_reason = self._phase_device(self.phase)
        if self.k >= 1:
            {"thermo": self._thermo_setup, "tabu": self._tabu_setup, "memetic": self._memetic_setup,
             "population": self._population_setup}[self.phase]()
        emitter.set_context(gpu_mode=self.gpu_mode)
        emitter.emit("phase_start", {"chromatic_number": float(self.best_k), "k": float(self.k)}, phase=self.phase,
                     parameters=self.params(), notes=why)

    def _next_phase(self, emitter: Emitter, why: str | None = None) -> bool:
        nxt = self.phase_idx + 1
        if nxt >= len(self.p["phases"]) or self.best_k <= 1:
            return self._end_pass(emitter, why=why or "its phases ended")
        self._enter_phase(nxt, emitter, f"after {self.phase}" + (f" ({why})" if why else ""))
        return False

    def _close_pass(self, emitter: Emitter, why: str) -> None:
        """Record the pass under way: its best, saved to disk, and a ``pass_end`` event."""
        self.pass_best.append(self.best_k)
        self._save_pass()
        now = self.clock()
        emitter.emit("pass_end", {"chromatic_number": float(self.best_k), "duration_s": now - self.pass_t0,
                                  "start_colors": float(self.pass_start_best),
                                  "improvement": float(self.pass_start_best - self.best_k)},
                     phase=self.phase, notes=f"pass {self.pass_} ended at {self.best_k} colours ({why})")

    def _end_pass(self, emitter: Emitter, final: bool = False, why: str = "its phases ended") -> bool:
        self._close_pass(emitter, "target reached" if final else why)
        it = self.p["iterative"]
        if final or not it["enabled"] or self.pass_ + 1 >= it["max_passes"]:
            return True
        self._start_pass(emitter, "iterative restart")
        return False

    def _start_pass(self, emitter: Emitter, why: str) -> None:
        self.pass_ += 1
        self.pass_start_best = self.best_k
        self.pass_t0 = self.last_best_t = self.clock()
        # next pass: longer searches, a little more diversity
        self.p["tabu"]["max_iters_per_k"] = int(min(10**12, self.p["tabu"]["max_iters_per_k"] * 2))
        self.p["memetic"]["max_generations"] = int(min(10**9, self.p["memetic"]["max_generations"] * 2))
        self.p["tabu"]["tenure_alpha"] = min(10.0, self.p["tabu"]["tenure_alpha"] * 1.1)
        emitter.set_context(pass_=self.pass_)
        seed_rng(self.seed + 7919 * self.pass_)
        rate = float(self.p["iterative"]["perturb"])
        self._pass_base = self._perturb(self.best, self.best_k, rate) if rate > 0 else None
        self._enter_phase(0, emitter, f"pass {self.pass_} ({why}): from the best solution ({self.best_k} colours)"
                                      + (f", {rate:.0%} of its vertices recoloured" if rate > 0 else ""))

    def _base(self) -> np.ndarray:
        """Where a phase starts: the best colouring, or its perturbed copy at the start of a pass."""
        assert self.best is not None
        return self._pass_base if self._pass_base is not None else self.best

    def _save_pass(self) -> None:
        if self.run_dir is None or self.best is None:
            return
        data = {"instance": self.g.name, "pass": self.pass_, "k": self.best_k, "coloring": self.best.tolist()}
        path = self.run_dir / f"best_solution.pass{self.pass_}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(data))
        os.replace(tmp, path)  # a reader never sees half a file

    def _new_best(self, emitter: Emitter, phase: str) -> None:
        self.last_best_t = self.clock()
        self.seconds_to_best = self.last_best_t - self.t_start
        emitter.emit("new_best", {"chromatic_number": float(self.best_k)}, phase=phase,
                     notes=f"proper colouring with {self.best_k} colours")

    def _accept(self, colors: np.ndarray, k: int) -> None:
        """A proper colouring with k colours was found: record it, aim at k - 1."""
        self.best = colors.astype(np.int32).copy()
        self.best_k = k
        self._pass_base = None
        self._state["improved"] = True
        self.k = _aim(k - 1)

    def _reduced(self, base: np.ndarray, k: int) -> np.ndarray:
        """``base`` with its colours >= k moved to the least-conflicting colour below k."""
        c = base.astype(np.int32).copy()
        if k < 1:
            return c
        gamma = build_gamma(self.g.indptr, self.g.indices, np.minimum(c, k - 1), k)
        for v in np.flatnonzero(c >= k):
            c[v] = int(np.argmin(gamma[v]))
        return c

    # thermo ---------------------------------------------------------------------------------------

    def _betas(self) -> None:
        t = self.p["thermo"]
        r = t["replicas"]
        temps = np.geomspace(t["t_min"], t["t_max"], r) if r > 1 else np.array([t["t_min"]])
        self._state["betas"] = 1.0 / temps

    def _thermo_setup(self) -> None:
        k = self.k
        r = self.p["thermo"]["replicas"]
        start = self._reduced(self._base(), k)
        reps = np.stack([start] + [self._perturb(start, k, 0.05) for _ in range(r - 1)])
        self._state["colors"] = reps
        self._betas()
        if self.gpu_mode == "gpu" and self.g.n > DENSE_MAX_N:
            self.gpu_mode, self.gpu_reason = "cpu_fallback", (
                f"{self.g.n} vertices: the array path's dense n x n adjacency is kept to {DENSE_MAX_N}")
        if self.gpu_mode == "gpu":
            from kernels.replicas_xp import build_gamma_xp, dense_adjacency

            xp = self.xp
            try:
                self._state["adj"] = dense_adjacency(xp, self.g.n, self.g.indptr, self.g.indices)
                self._state["xc"] = xp.asarray(reps)
                self._state["xg"] = build_gamma_xp(xp, self._state["adj"], self._state["xc"], k)
            except Exception as exc:  # noqa: BLE001 - cupy raises its own error types
                self._gpu_failed(exc)
                return
        else:
            self._state["gammas"] = [build_gamma(self.g.indptr, self.g.indices, c, k) for c in reps]
        self._state["f"] = min(int(count_conflicts(self.g.indptr, self.g.indices, c)) for c in reps)

    def _perturb(self, c: np.ndarray, k: int, rate: float) -> np.ndarray:
        out = c.copy()
        mask = self.rng.random(c.size) < rate
        out[mask] = self.rng.integers(0, k, int(mask.sum()))
        return out

    def _gpu_failed(self, exc: Exception) -> None:
        """A device error mid-phase (out of memory, a lost device): continue on the CPU."""
        self.xp = np
        self.gpu_mode = "cpu_fallback"
        self.gpu_reason = device_error_reason(exc)
        self._thermo_setup()

    def _thermo_step(self) -> bool:
        if self._state.pop("skip", False) or self.k < 1:
            return True
        if self.gpu_mode == "gpu":
            try:
                return self._thermo_work()
            except Exception as exc:  # noqa: BLE001 - cupy raises its own error types
                self._gpu_failed(exc)
        return self._thermo_work()

    def _thermo_work(self) -> bool:
        t = self.p["thermo"]
        st = self._state
        moves = t["sweeps_per_step"] * self.g.n
        betas = st["betas"]
        if self.gpu_mode == "gpu":
            from kernels.replicas_xp import conflicts_xp, sweep_xp

            xp = self.xp
            r = st["xc"].shape[0]
            verts = xp.asarray(self.rng.integers(0, self.g.n, (r, moves)))
            shifts = xp.asarray(self.rng.integers(1, self.k, (r, moves))) if self.k > 1 else xp.ones((r, moves), int)
            unif = xp.asarray(self.rng.random((r, moves)))
            sweep_xp(xp, st["adj"], st["xc"], st["xg"], xp.asarray(betas), verts, shifts, unif, self.k)
            energies = to_numpy(xp, conflicts_xp(xp, st["adj"], st["xc"]))
            colors = to_numpy(xp, st["xc"])
        else:
            colors = st["colors"]
            for i in range(colors.shape[0]):
                anneal(self.g.indptr, self.g.indices, self.k, colors[i], st["gammas"][i], float(betas[i]), moves)
            energies = np.array([count_conflicts(self.g.indptr, self.g.indices, c) for c in colors])
        st["f"] = int(energies.min())
        if st["f"] == 0:
            self._accept(colors[int(np.argmin(energies))], self.k)
            if self.k < 1:
                return True
            self._thermo_setup()
            return False
        if self.steps_in_phase % t["exchange_interval"] == 0:
            self._exchange(energies, betas)
        return self.steps_in_phase + 1 >= t["max_steps"]

    def _exchange(self, energies: np.ndarray, betas: np.ndarray) -> None:
        """Swap adjacent temperatures' configurations with the replica-exchange probability."""
        st = self._state
        for i in range(len(betas) - 1):
            a = (betas[i] - betas[i + 1]) * (energies[i] - energies[i + 1])
            if a >= 0 or self.rng.random() < math.exp(a):
                if self.gpu_mode == "gpu":
                    st["xc"][[i, i + 1]] = st["xc"][[i + 1, i]]
                    st["xg"][[i, i + 1]] = st["xg"][[i + 1, i]]
                else:
                    st["colors"][[i, i + 1]] = st["colors"][[i + 1, i]]
                    st["gammas"][i], st["gammas"][i + 1] = st["gammas"][i + 1], st["gammas"][i]
                energies[i], energies[i + 1] = energies[i + 1], energies[i]

    # tabu -------------------------------------------------------------------------------------------

    def _tabu_setup(self) -> None:
        k = self.k
        c = self._reduced(self._base(), k)
        st = self._state
        st["colors"] = c
        st["gamma"] = build_gamma(self.g.indptr, self.g.indices, c, k)
        st["tabu"] = np.zeros((self.g.n, k), dtype=np.int64)
        st["it"] = 0
        st["best_c"] = c.copy()
        st["best_f"] = 1 << 30
        st["f"] = int(count_conflicts(self.g.indptr, self.g.indices, c))

    def _tabu_step(self) -> bool:
        st, t = self._state, self.p["tabu"]
        if st.pop("skip", False) or self.k < 1:
            return True
        done, f, st["best_f"] = tabucol(self.g.indptr, self.g.indices, self.k, st["colors"], st["gamma"], st["tabu"],
                                        st["it"], t["iters_per_step"], t["tenure_a"], t["tenure_alpha"],
                                        st["best_c"], st["best_f"])
        st["it"] += done
        st["f"] = int(f)
        if f == 0:
            self._accept(st["colors"], self.k)
            if self.k < 1:
                return True
            self._tabu_setup()
            return False
        if st["best_f"] < st.get("stall_best", 1 << 30):
            st["stall_best"], st["stall_it"] = st["best_f"], st["it"]
        elif not self._external_tenure and st["it"] - st.get("stall_it", 0) >= t["stall_iters"]:
            # stagnation: swap the reactive tenure's alpha (sparse graphs want long tenures)
            t["tenure_alpha"], t["alternate_alpha"] = t["alternate_alpha"], t["tenure_alpha"]
            st["stall_it"] = st["it"]
        return st["it"] >= t["max_iters_per_k"]

    # memetic --------------------------------------------------------------------------------------------

    def _local(self, c: np.ndarray, k: int, iters: int) -> tuple[np.ndarray, int]:
        t = self.p["tabu"]
        gamma = build_gamma(self.g.indptr, self.g.indices, c, k)
        tabu = np.zeros((self.g.n, k), dtype=np.int64)
        best = c.copy()
        _, _, bf = tabucol(self.g.indptr, self.g.indices, k, c, gamma, tabu, 0, iters, t["tenure_a"],
                           t["tenure_alpha"], best, 1 << 30)
        return best, int(bf)

    def _memetic_setup(self) -> None:
        k, m = self.k, self.p["memetic"]
        base = self._reduced(self._base(), k)
        pop, fit = [], []
        for i in range(m["population"]):
            c = base.copy() if i == 0 else self.rng.integers(0, k, self.g.n).astype(np.int32)
            c, f = self._local(c, k, m["local_iters"])
            pop.append(c)
            fit.append(f)
        self._state.update(pop=pop, fit=fit, f=min(fit), gen=0)
        if min(fit) == 0:
            self._accept(pop[int(np.argmin(fit))], k)

    def _memetic_step(self) -> bool:
        st, m = self._state, self.p["memetic"]
        if st.pop("skip", False) or self.k < 1:
            return True
        pop, fit = st["pop"], st["fit"]
        i, j = self.rng.choice(len(pop), 2, replace=False)
        child = gpx(pop[i], pop[j], self.k)
        if m["mutation_rate"] > 0:
            child = self._perturb(child, self.k, m["mutation_rate"])
        child, f = self._local(child, self.k, m["local_iters"])
        order = np.argsort(fit)
        protected = set(order[: m["elitism"]].tolist())
        worst = next((int(w) for w in order[::-1] if int(w) not in protected), int(order[-1]))
        if f <= fit[worst]:
            pop[worst], fit[worst] = child, f
        st["gen"] += 1
        st["f"] = min(fit)
        if f == 0:
            self._accept(child, self.k)
            if self.k < 1:
                return True
            self._memetic_setup()  # a new population at the next k, from the new best
            return False
        return st["gen"] >= m["max_generations"]

    # population ---------------------------------------------------------------------------------------

    def _population_setup(self) -> None:
        if self._search is None:
            self._search = pop_phase.PopulationSearch(self.g, self.p["population"], self.seed + 7919 * self.pass_,
                                                      self.p["gpu"], self.k)
        self.gpu_mode, self.gpu_reason = self._search.gpu_mode, self._search.gpu_reason
        self._search.seed_from(self._base(), self.k)
        self._state.update(f=int(self._search.best_f.min()) if self._search.size else 0, gen=0)

    def _population_step(self) -> bool:
        st, search = self._state, self._search
        if st.pop("skip", False) or self.k < 1 or search is None:
            return True
        solution = search.step()
        self.gpu_mode, self.gpu_reason = search.gpu_mode, search.gpu_reason  # a device failure falls back
        st["gen"] = st.get("gen", 0) + 1
        st["f"] = int(search.best_f.min())
        st["extra"] = search.telemetry()
        if solution is not None:
            self._accept(solution, self.k)
            if self.k < 1:
                return True
            search.next_k(solution, self.k + 1)
            st["gen"] = 0
            return False
        return st["gen"] >= self.p["population"]["max_generations"]

    # --- results ----------------------------------------------------------------------------------------

    def colors_per_pass(self) -> list[int]:
        """Best colours of each pass, the pass under way included (non-increasing)."""
        return list(self.pass_best) + ([self.best_k] if len(self.pass_best) <= self.pass_ and self.best_k else [])

    def result(self) -> dict[str, Any]:
        return {"instance": self.g.name, "k": self.best_k, "colors_per_pass": self.colors_per_pass(),
                "seconds_to_best": self.seconds_to_best,
                "coloring": self.best.tolist() if self.best is not None else None}
