"""The multi-phase colouring pipeline as a step-wise workload (the PRISM plan).

The pipeline colours the graph once (``init``), then runs its phases in the order of
``phases``; each phase is an object (:mod:`experiments.coloring.phase`) that searches at
k = best - 1 in bounded steps, with safe points between them:

* ``init``: the initial colouring (``init.strategy``: greedy, dsatur, spectral, community,
  multistart); records the strategy and its colours and conflicts.
* ``thermo`` (:mod:`~experiments.coloring.thermo`): replica exchange at fixed k.
* ``tabu`` (:mod:`~experiments.coloring.tabu`): k-reduction with TabuCol.
* ``memetic`` (:mod:`~experiments.coloring.memetic`): HEA-style GPX + TabuCol.
* ``population`` (:mod:`~experiments.coloring.population`): many TabuCol chains at once,
  on a CUDA device or on all CPU cores, with GPX crossover between generations.

When a phase finds a proper colouring the pipeline records it (``new_best``) and the phase
goes on at the next k; when it is done the next phase starts from the best colouring.

Where each phase runs (``gpu_mode`` with ``gpu_reason`` in every event): ``population`` on
the GPU when one answers (``gpu``), else on the CPU cores (``cpu_fallback`` and why);
``thermo`` uses its GPU array path only when the spec says ``gpu = "gpu"`` (under ``auto``
its numba kernels are faster, so it runs on the CPU: ``cpu``); ``init``, ``tabu`` and
``memetic`` are CPU phases (``cpu``). ``gpu = "cpu"`` keeps everything on the CPU
(``cpu_disabled``).

Every step emits the plan's fields: ``phase``, ``step``, ``chromatic_number`` (best proper k
so far), ``k`` (the k being attempted), ``conflicts``, ``gpu_mode``, ``duration_ms``,
``parameters``, ``notes``, ``pass``. Control hooks (``set_param``, a dispatch table):
``adjust_temperature`` (scale the ladder), ``set_batch`` (work per step of the current
phase), ``set_tenure`` (tenure alpha), ``boost_mutation`` (mutation rate),
``set_population``, ``set_crossover_rate``, ``skip_phase``, ``restart_pass`` (a new pass from
the best solution now; refused once the run has had ``iterative.max_passes`` passes, asked
for or not), ``external_tenure`` (an outside controller owns the tenure: the tabu
phase's own stagnation swap stands down, so two controllers never fight). ``skip_phase`` and
``restart_pass`` are actions and take ``true`` only. An automatic controller (hypertune) is
refused a ``skip_phase`` that would end the run (:meth:`ColoringWorkload.check_controller_action`).

Iterative restarts: with ``iterative.enabled`` a phase that has gone ``iterative.stall_s``
seconds without a better colouring hands over to the next, and a pass ends when its last
phase ends or stalls; the next pass starts from the best solution with
``iterative.perturb`` of its vertices recoloured, a new random stream and longer searches,
until ``iterative.max_passes`` or the time budget. Every pass's best is saved as
``best_solution.pass<N>.json``, also when the budget or a stop cuts a pass short
(:meth:`ColoringWorkload.finish`); ``pass_end`` carries the pass's duration and colours.
At its end the run writes its result, judged by the independent checker, to
``coloring.json`` (:func:`save_result`): from ``crucible color``, a spec, the lab daemon, or
a resumed run alike.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson

from actors.files import atomic_write
from experiments.coloring.catalog import INSTANCES_DIR, instance_family
from experiments.coloring.graph import Graph, GraphError, load_graph, resolve_graph_file
from experiments.coloring.init import initial_coloring
from experiments.coloring.memetic import Memetic
from experiments.coloring.objective import OBJECTIVE
from experiments.coloring.params import (
    PHASES,
    SEARCH_SPACE,
    aim,
    check_number,
    check_params,
    check_target,
    search_space,
)
from experiments.coloring.phase import ColoringPhase, PhaseContext
from experiments.coloring.population import Population
from experiments.coloring.tabu import Tabu
from experiments.coloring.thermo import Thermo
from experiments.coloring.verify import check_coloring
from experiments.validate import Num
from experiments.workloads.base import Arm, Control, Objective
from kernels.coloring import count_conflicts, seed_rng
from telemetry.emitter import Emitter

PHASE_CLASSES: dict[str, type[ColoringPhase]] = {
    "thermo": Thermo,
    "tabu": Tabu,
    "memetic": Memetic,
    "population": Population,
}


RESULT_FILE = "coloring.json"  # the run's checked result, in its run directory

_TENURE = {"param": "tenure_alpha", "default": 0.6}
_CROSSOVER = {"param": "crossover_rate", "default": 0.1}


def save_result(
    run_dir: Path, g: Graph, best: Any, reason: str | None, seconds_to_best: float, colors_per_pass: list[int]
) -> dict[str, Any]:
    """Write a run's ``coloring.json`` and return the checker's verdict: the best colouring
    (1-based colours, as DIMACS numbers vertices), judged by the independent checker, not by
    the solver that found it; ``graph`` says which graph it colours."""
    verdict = check_coloring(g, best)
    data = {
        "instance": g.name,
        "k": verdict["k"],
        "proper": verdict["proper"],
        "seconds_to_best": round(float(seconds_to_best), 3),
        "colors_per_pass": colors_per_pass,
        "reason": reason,
        "graph": {"n": g.n, "m": g.m, "fingerprint": g.fingerprint()},
        "coloring": (np.asarray(best, dtype=np.int64) + 1).tolist(),
    }
    atomic_write(run_dir / RESULT_FILE, orjson.dumps(data))  # fsync'd
    return verdict


class ColoringWorkload:
    """The colouring pipeline; see the module docs."""

    name: ClassVar[str] = "coloring"
    objective: ClassVar[Objective] = OBJECTIVE
    """Fewer colours is better; between two better colourings, fewer conflicts at the k attempted."""
    arms: ClassVar[tuple[Arm, ...]] = (
        Arm("mutation_up", "boost_mutation", ("memetic",), param="mutation_rate", shift=0.05, hi=1.0),
        Arm("tenure_up", "set_tenure", ("tabu", "memetic", "population"), **_TENURE, scale=1.6, shift=0.1, hi=10.0),
        Arm("tenure_down", "set_tenure", ("tabu", "memetic", "population"), **_TENURE, scale=1 / 1.6, lo=0.05),
        # the population's spread against its convergence: instances differ (docs/benchmarks.md:
        # le450_25c reached 25 only with a low rate, flat300_28_0 28 only with a high one)
        Arm("crossover_up", "set_crossover_rate", ("population",), **_CROSSOVER, scale=2.0, shift=0.01, hi=0.5),
        Arm("crossover_down", "set_crossover_rate", ("population",), **_CROSSOVER, scale=0.5, lo=0.005),
        Arm(
            "batch_up",
            "set_batch",
            ("tabu",),
            param="iters_per_step",
            default=20_000,
            scale=2,
            hi=10**7,
            integer=True,
        ),
        Arm("heat", "adjust_temperature", ("thermo",), value=1.5),
        Arm("cool", "adjust_temperature", ("thermo",), value=1 / 1.5),
        Arm("skip_phase", "skip_phase", ("memetic", "thermo"), value=True),
    )
    """Hypertune's arms per phase (the order is the order they are first tried in)."""
    takeover: ClassVar[tuple[Control, ...]] = (Control("external_tenure", True, "hypertune steers the tenure"),)
    """A controller owns the tenure: the tabu phase's own stagnation swap stands down, so two
    controllers never overwrite each other's tenure."""

    search_space: ClassVar[dict[str, tuple[float, float, str]]] = SEARCH_SPACE
    record_events: ClassVar[tuple[str, ...]] = ("init", "new_best", "pass_end", "target_reached")
    """Milestones sampling never drops (the framework's own record events are kept too)."""

    @classmethod
    def search_space_for(cls, params: dict[str, Any] | None) -> dict[str, tuple[float, float, str]]:
        """The dimensions of the phases the spec runs (params.search_space)."""
        return search_space(params)

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return check_params(params)

    @classmethod
    def files(cls, params: dict[str, Any]) -> list[Path]:
        """The graph file these parameters read, if any; a shipped instance reads none of the
        user's files."""
        graph = (params or {}).get("graph") or {}
        if not graph.get("file"):
            return []
        try:
            path = resolve_graph_file(graph["file"]).resolve()
        except (GraphError, OSError):  # missing, or not to be looked into (/proc/1/cwd): judged as named
            # a lab daemon refuses it when it is outside its data folders, as it refuses a file that
            # is there: whether a path outside exists is not the submitter's to learn
            return [Path(os.path.abspath(str(graph["file"])))]
        return [] if path.parent == INSTANCES_DIR.resolve() else [path]

    @classmethod
    def family(cls, params: dict[str, Any]) -> str:
        """A DIMACS file's family (``DSJC``, ``le``, ``flat``...: see
        :func:`~experiments.coloring.catalog.instance_family`), else the generator's name."""
        graph = (params or {}).get("graph") or {}
        if graph.get("file"):
            return instance_family(Path(graph["file"]).stem)
        return str(graph.get("generator", cls.name))

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
        check_target(self.p["target"], self.g.n)  # a file's size is known now: the run fails at its start
        self.ctx = PhaseContext(self.g, self.p, self.rng, seed)
        self._phases: dict[str, ColoringPhase] = {}  # made on first entry, kept (the population's device state)
        self.current: ColoringPhase | None = None
        self.gpu_mode, self.gpu_reason = (
            ("cpu_disabled", "disabled in the spec") if self.p["gpu"] == "cpu" else ("cpu", "init: a CPU phase")
        )
        self.pass_ = 0
        self.phase_idx = -1  # -1 = init
        self.best: np.ndarray | None = None
        self.best_k = 0
        self.k = 0
        self.conflicts = 0
        self.pass_best: list[int] = []
        self.pass_start_best = 0
        self.t_start = self.clock()
        self.pass_t0 = self.t_start
        self.last_best_t = self.t_start
        self.seconds_to_best = 0.0
        self._pass_base: np.ndarray | None = None
        self._skip = False
        self._restart = False
        self._improved = False  # a new best since the last step event (reported with the next one)
        self._gpu_context: tuple[str | None, str | None] = (None, None)  # what the emitter was last told
        self._graph_digest: str | None = None  # the graph's fingerprint, once a checkpoint needs it
        self._resume_steps = 0  # the current phase's steps when the checkpoint restored was taken

    # --- protocol ---------------------------------------------------------------------------------

    def _set_gpu_context(self, emitter: Emitter) -> None:
        """Where the phase runs and why, in every later event (not only the steps')."""
        emitter.set_context(gpu_mode=self.gpu_mode, gpu_reason=self.gpu_reason)
        self._gpu_context = (self.gpu_mode, self.gpu_reason)

    def use_clock(self, clock: Any) -> None:
        """Read time from ``clock`` from now on (the Phase actor gives its active time, so paused
        time never counts toward a stall, a pass or the time to the best); the times already
        taken are carried over."""
        shift = clock() - self.clock()
        self.t_start += shift
        self.pass_t0 += shift
        self.last_best_t += shift
        self.clock = clock

    def use_interrupt(self, check: Any) -> None:
        """Ask ``check()`` between the chunks of a long step and end the step when it says so
        (the Phase actor's: a pause, a stop or a parameter change waits, or the budget is used)."""
        self.ctx.should_yield = check

    def start(self, emitter: Emitter) -> None:
        seed_rng(self.seed + 7919 * self.pass_)
        emitter.set_context(pass_=self.pass_)
        self._set_gpu_context(emitter)
        if self.best is not None:
            self._enter_phase(max(self.phase_idx, 0), emitter, "resumed from checkpoint")
            if self.current is not None:  # the phase goes on: its step count too (not for init)
                self.current.steps = self._resume_steps

    @property
    def phase(self) -> str:
        return "init" if self.phase_idx < 0 else self.p["phases"][self.phase_idx]

    def step(self, emitter: Emitter) -> bool:
        t0 = time.perf_counter()
        if self.phase_idx < 0:
            return self._init(emitter, t0)
        if self._restart:
            self._restart = False
            self._close_pass(emitter, "restart requested")
            self._start_pass(emitter, "restart requested")
            return False
        phase = self.phase
        done_phase, extra = self._phase_step()
        if (self.gpu_mode, self.gpu_reason) != self._gpu_context:  # a device failure fell back mid-phase
            self._set_gpu_context(emitter)
        emitter.emit(
            "step",
            {
                "chromatic_number": float(self.best_k),
                "k": float(self.k),
                "conflicts": float(self.conflicts),
                "duration_ms": (time.perf_counter() - t0) * 1e3,
                **extra,
            },
            phase=phase,
            step=self.current.steps if self.current else 0,
            parameters=self.params(),
            gpu_mode=self.gpu_mode,
            gpu_reason=self.gpu_reason,
        )
        if self._improved:
            self._improved = False
            self._new_best(emitter, phase)
        if self.p["target"] and self.best_k <= self.p["target"]:
            emitter.emit(
                "target_reached",
                {"chromatic_number": float(self.best_k)},
                phase=phase,
                notes=f"target {self.p['target']} reached",
            )
            return self._end_pass(emitter, final=True)
        if done_phase or self.best_k <= 1:
            return self._next_phase(emitter)
        it = self.p["iterative"]
        if it["enabled"] and it["stall_s"] > 0 and self.clock() - self.last_best_t >= it["stall_s"]:
            # a phase that finds nothing better for stall_s hands over; after the last, the pass ends
            return self._next_phase(emitter, why=f"no better colouring for {it['stall_s']:g} s")
        return False

    def _phase_step(self) -> tuple[bool, dict[str, float]]:
        """One step of the current phase: (the phase is done, extra figures for the event)."""
        ph = self.current
        if self._skip or self.k < 1 or ph is None:
            self._skip = False
            return True, {}
        out = ph.step()
        ph.steps += 1
        self.gpu_mode, self.gpu_reason = ph.gpu_mode, ph.gpu_reason  # a device failure falls back
        self.conflicts = out.conflicts
        solution = out.solution
        while solution is not None:  # a phase may find the next k's colouring while setting up
            self._accept(solution, self.k)
            if self.k < 1:
                return True, out.extra
            solution = ph.next_k(self.best, self.k)
            self.conflicts = ph.conflicts()  # the event reports the new k's state
        return out.done, out.extra

    def finish(self, emitter: Emitter, reason: str) -> None:
        """The run is ending (completed, budget, stop): the pass under way is saved and reported
        like any other, so a pass cut short still leaves its ``best_solution.pass<N>.json``, and
        the run's result goes to ``coloring.json``, however the run was started or resumed."""
        if self.best is None:
            return
        if len(self.pass_best) <= self.pass_:
            self._close_pass(emitter, reason)
        self._save_result(reason)

    def _save_result(self, reason: str) -> None:
        if self.run_dir is not None and self.best is not None:
            save_result(self.run_dir, self.g, self.best, reason, self.seconds_to_best, self.colors_per_pass())

    def checkpoint(self) -> dict[str, Any]:
        return {
            "pass": self.pass_,
            "phase_idx": self.phase_idx,
            "best_k": self.best_k,
            "colors_per_pass": self.colors_per_pass(),
            "best": self.best.tolist() if self.best is not None else None,
            "pass_best": self.pass_best,
            "seconds_to_best": self.seconds_to_best,
            "params": {s: self.p[s] for s in PHASES},
            # the clocks and the pass's figures, so that a restarted phase reports them right
            "elapsed_s": self.clock() - self.t_start,
            "pass_elapsed_s": self.clock() - self.pass_t0,
            "pass_start_best": self.pass_start_best,
            "external_tenure": self.ctx.external_tenure,
            "graph": {"n": self.g.n, "m": self.g.m, "fingerprint": self._fingerprint()},
            # the phase's own step count: its max_steps and its events' step numbers go on
            "phase_steps": self.current.steps if self.current is not None else 0,
        }

    def _fingerprint(self) -> str:
        if self._graph_digest is None:
            self._graph_digest = self.g.fingerprint()
        return self._graph_digest

    def _check_state(self, state: dict[str, Any]) -> tuple[np.ndarray, int]:
        """The checkpoint's best colouring and k, if they belong to this graph and pipeline.

        The kernels index their tables by vertex and colour without bounds checks: a colouring
        of another graph (its file changed since the crash) would corrupt memory, not fail.

        Raises:
            ValueError: naming what does not match (the run fails; nothing is coloured).
        """
        g = self.g
        was = state.get("graph")
        if isinstance(was, dict) and (was.get("n"), was.get("fingerprint")) != (g.n, self._fingerprint()):
            raise ValueError(
                f"the checkpoint is of another graph ({was.get('n')} vertices, {was.get('m')} edges) than "
                f"{g.name!r} now ({g.n} vertices, {g.m} edges): its file changed since the run started"
            )
        try:
            best = np.asarray(state["best"], dtype=np.int64)
            best_k, pass_, phase_idx = int(state["best_k"]), int(state["pass"]), int(state["phase_idx"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"the checkpoint's colouring state is malformed ({type(exc).__name__}: {exc})") from None
        if best.shape != (g.n,):
            raise ValueError(f"the checkpoint's colouring has {best.size} vertices; {g.name!r} has {g.n}")
        if not (1 if g.n else 0) <= best_k <= g.n or (best.size and not (best.min() >= 0 and best.max() < best_k)):
            raise ValueError(f"the checkpoint's colouring does not use colours 0..{best_k - 1} (k = {best_k})")
        if pass_ < 0 or not -1 <= phase_idx < len(self.p["phases"]):
            raise ValueError(f"the checkpoint's pass {pass_} or phase {phase_idx} is out of range for this spec")
        colors = best.astype(np.int32)
        if int(count_conflicts(g.indptr, g.indices, colors)):
            raise ValueError(f"the checkpoint's colouring is not proper on {g.name!r}: its file changed since")
        return colors, best_k

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("best") is None:
            return
        self.best, self.best_k = self._check_state(state)
        self.pass_ = int(state["pass"])
        self.phase_idx = int(state["phase_idx"])
        self.pass_best = list(state.get("pass_best", []))
        self.seconds_to_best = float(state.get("seconds_to_best", 0.0))
        now = self.clock()
        self.t_start = now - float(state.get("elapsed_s", 0.0))
        self.pass_t0 = now - float(state.get("pass_elapsed_s", 0.0))
        self.pass_start_best = int(state.get("pass_start_best", self.best_k))
        self.ctx.external_tenure = bool(state.get("external_tenure", False))
        steps = state.get("phase_steps", 0)
        self._resume_steps = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0
        for s in PHASES:
            self.p[s].update(state.get("params", {}).get(s, {}))

    def params(self) -> dict[str, Any]:
        """The parameters in force in the current phase: its own section, and for ``memetic``
        also the tenure its TabuCol runs with (``tenure_a``, ``tenure_alpha``: the tabu
        section's), which the tenure arms and controls change."""
        ph = self.phase
        if ph == "memetic":
            t = self.p["tabu"]
            return {"phase": ph, **self.p[ph], "tenure_a": t["tenure_a"], "tenure_alpha": t["tenure_alpha"]}
        return {"phase": ph, **(self.p[ph] if ph in PHASES else {"strategy": self.p["init"]["strategy"]})}

    # --- control hooks ----------------------------------------------------------------------------

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        """The control hooks, applied at the next safe point (between steps); see the module docs."""
        hook = self._HOOKS.get(key) if isinstance(key, str) else None
        if hook is None:
            raise ValueError(f"unknown control {key!r}; expected one of {', '.join(sorted(self._HOOKS))}")
        return hook(self, value)

    def _adjust_temperature(self, value: Any) -> tuple[Any, Any]:
        f = Num(0.1, 10.0).check("adjust_temperature factor", value)
        before = (self.p["thermo"]["t_min"], self.p["thermo"]["t_max"])
        t_min = check_number("thermo", "t_min", before[0] * f)
        t_max = check_number("thermo", "t_max", before[1] * f)
        self.p["thermo"]["t_min"], self.p["thermo"]["t_max"] = t_min, t_max  # the ladder follows at the next step
        return before, (t_min, t_max)

    def _set_batch(self, value: Any) -> tuple[Any, Any]:
        if self.current is not None and self.phase != "init":
            return self.current.set_batch(value)
        before = self.p["tabu"]["iters_per_step"]
        self.p["tabu"]["iters_per_step"] = check_number("tabu", "iters_per_step", value)
        return before, value

    def _set_tenure(self, value: Any) -> tuple[Any, Any]:
        section = "population" if self.phase == "population" else "tabu"
        before = self.p[section]["tenure_alpha"]
        for sec in ("tabu", "population"):  # one tenure: the two phases share it
            self.p[sec]["tenure_alpha"] = check_number(sec, "tenure_alpha", value)
        pop = self._phases.get("population")
        if isinstance(pop, Population) and pop.search is not None:
            pop.search.set_tenure(self.p["population"]["tenure_a"], value)
        return before, value

    def _set_number(self, section: str, key: str, value: Any) -> tuple[Any, Any]:
        """A parameter the phase reads afresh at each step: checked against its range, then set."""
        before = self.p[section][key]
        self.p[section][key] = check_number(section, key, value)
        return before, value

    def _set_population(self, value: Any) -> tuple[Any, Any]:
        check_number("population", "population", value)
        if value < 1:  # as a spec's sizes (1 and 2 run without crossover); 0, "chosen from the machine", is the spec's
            raise ValueError(f"population must be at least 1 chain while the run goes on, got {value!r}")
        pop = self._phases.get("population")
        search = pop.search if isinstance(pop, Population) else None
        before = search.size if search is not None else self.p["population"]["population"]
        if search is not None and self.phase == "population" and self.k >= 1:
            value = search.resize(value)  # cut to what memory holds
        self.p["population"]["population"] = value  # otherwise applied when the phase is next set up
        return before, value

    def _set_external_tenure(self, value: Any) -> tuple[Any, Any]:
        # an outside controller (hypertune) steers the tenure: the built-in swap stands down
        if not isinstance(value, bool):
            raise ValueError(f"external_tenure must be true or false, got {value!r}")
        before = self.ctx.external_tenure
        self.ctx.external_tenure = value
        return before, self.ctx.external_tenure

    @staticmethod
    def _only_true(key: str, value: Any) -> None:
        """``skip_phase`` and ``restart_pass`` are actions, not settings: only ``true`` asks for one."""
        if value is not True:
            raise ValueError(f"{key} takes true (do it now), got {value!r:.200}; nothing was done")

    def check_controller_action(self, key: str, value: Any) -> None:
        """Refuse what an automatic controller (hypertune) must not do though a person may:
        ``skip_phase`` where it would end the run, with budget left (the last phase of a pass
        that no pass follows; a person skipping it ends the run on purpose).

        Raises:
            ValueError: naming the action and why it is refused.
        """
        if key != "skip_phase" or self.phase_idx < 0:
            return
        it = self.p["iterative"]
        last_phase = self.phase_idx + 1 >= len(self.p["phases"]) or self.best_k <= 1
        if last_phase and (not it["enabled"] or self.pass_ + 1 >= it["max_passes"]):
            raise ValueError(
                f"skip_phase would end the run: {self.phase} is the last phase of pass {self.pass_} and no pass "
                f"follows (iterative.enabled = {str(it['enabled']).lower()}, max_passes = {it['max_passes']}); "
                "a controller never ends a run"
            )

    def _restart_pass(self, value: Any) -> tuple[Any, Any]:
        # iterative.max_passes bounds the passes, asked for or automatic (each leaves a file)
        self._only_true("restart_pass", value)
        most = int(self.p["iterative"]["max_passes"])
        if self.pass_ + 1 >= most:
            raise ValueError(
                f"this run has had its iterative.max_passes = {most} passes (pass {self.pass_} is the last)"
            )
        self._restart = True
        return self.pass_, self.pass_ + 1

    def _skip_phase(self, value: Any) -> tuple[Any, Any]:
        self._only_true("skip_phase", value)
        self._skip = True
        return self.phase, "next phase"

    _HOOKS: ClassVar[dict[str, Any]] = {
        "adjust_temperature": _adjust_temperature,
        "set_batch": _set_batch,
        "set_tenure": _set_tenure,
        "boost_mutation": lambda self, v: self._set_number("memetic", "mutation_rate", v),
        "set_population": _set_population,
        "set_crossover_rate": lambda self, v: self._set_number("population", "crossover_rate", v),
        "external_tenure": _set_external_tenure,
        "restart_pass": _restart_pass,
        "skip_phase": _skip_phase,
    }

    # --- the pipeline --------------------------------------------------------------------------------

    def _init(self, emitter: Emitter, t0: float) -> bool:
        strat = self.p["init"]["strategy"]
        kw = {"tries": self.p["init"]["tries"]} if strat == "multistart" else {}
        c = initial_coloring(self.g, strat, self.seed, **kw)
        conflicts = int(count_conflicts(self.g.indptr, self.g.indices, c))
        self.best, self.best_k = c, int(c.max()) + 1 if c.size else 0
        self.seconds_to_best = self.clock() - self.t_start
        emitter.emit(
            "init",
            {
                "chromatic_number": float(self.best_k),
                "conflicts": float(conflicts),
                "duration_ms": (time.perf_counter() - t0) * 1e3,
                "vertices": float(self.g.n),
                "edges": float(self.g.m),
            },
            phase="init",
            step=0,
            parameters={"strategy": strat},
            gpu_reason=self.gpu_reason,
            notes=f"initial colouring by {strat}: {self.best_k} colours, {conflicts} conflicts",
        )
        self.pass_start_best = self.best_k
        return self._next_phase(emitter)

    def phase_made(self, name: str) -> ColoringPhase | None:
        """The phase object of that name if the pipeline has entered it (phases are made on
        first entry and kept, with their counters, across k and passes), else None."""
        return self._phases.get(name)

    def _enter_phase(self, idx: int, emitter: Emitter, why: str) -> None:
        self.phase_idx = idx
        name = self.phase
        if name not in self._phases:
            self._phases[name] = PHASE_CLASSES[name](self.ctx)
        ph = self.current = self._phases[name]
        ph.enter()
        self.k = aim(self.best_k - 1)
        self.last_best_t = self.clock()  # each phase gets its own stall window
        self.conflicts = 0
        solution = ph.setup(self.k, self._base()) if self.k >= 1 else None
        while solution is not None:
            self._accept(solution, self.k)
            solution = ph.next_k(self.best, self.k) if self.k >= 1 else None
        self.conflicts = ph.conflicts() if self.k >= 1 else 0
        self.gpu_mode, self.gpu_reason = ph.gpu_mode, ph.gpu_reason
        self._set_gpu_context(emitter)
        emitter.emit(
            "phase_start",
            {"chromatic_number": float(self.best_k), "k": float(self.k)},
            phase=name,
            parameters=self.params(),
            notes=why,
        )

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
        emitter.emit(
            "pass_end",
            {
                "chromatic_number": float(self.best_k),
                "duration_s": now - self.pass_t0,
                "start_colors": float(self.pass_start_best),
                "improvement": float(self.pass_start_best - self.best_k),
            },
            phase=self.phase,
            notes=f"pass {self.pass_} ended at {self.best_k} colours ({why})",
        )

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
        assert self.best is not None
        self._pass_base = self.ctx.perturb(self.best, self.best_k, rate) if rate > 0 else None
        self._enter_phase(
            0,
            emitter,
            f"pass {self.pass_} ({why}): from the best solution ({self.best_k} colours)"
            + (f", {rate:.0%} of its vertices recoloured" if rate > 0 else ""),
        )

    def _base(self) -> np.ndarray:
        """Where a phase starts: the best colouring, or its perturbed copy at the start of a pass."""
        assert self.best is not None
        return self._pass_base if self._pass_base is not None else self.best

    def _save_pass(self) -> None:
        if self.run_dir is None or self.best is None:
            return
        data = {"instance": self.g.name, "pass": self.pass_, "k": self.best_k, "coloring": self.best.tolist()}
        atomic_write(self.run_dir / f"best_solution.pass{self.pass_}.json", orjson.dumps(data))  # fsync'd

    def _new_best(self, emitter: Emitter, phase: str) -> None:
        self.last_best_t = self.clock()
        self.seconds_to_best = self.last_best_t - self.t_start
        emitter.emit(
            "new_best",
            {"chromatic_number": float(self.best_k)},
            phase=phase,
            notes=f"proper colouring with {self.best_k} colours",
        )

    def _accept(self, colors: np.ndarray, k: int) -> None:
        """A proper colouring with k colours was found: record it, aim at k - 1."""
        self.best = colors.astype(np.int32).copy()
        self.best_k = k
        self._pass_base = None
        self._improved = True
        self.k = aim(k - 1)

    # --- results ----------------------------------------------------------------------------------------

    def colors_per_pass(self) -> list[int]:
        """Best colours of each pass, the pass under way included (non-increasing)."""
        return list(self.pass_best) + ([self.best_k] if len(self.pass_best) <= self.pass_ and self.best_k else [])
