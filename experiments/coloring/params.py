"""The colouring workload's parameters: defaults, ranges and their validation, in one place.

``workload.params`` in a spec is merged over :data:`DEFAULTS` (an unknown key is an error
naming it) and every number is checked against :data:`LIMITS` with the project's
validation kit (finite, in range).
"""

from __future__ import annotations

from typing import Any

from experiments.coloring.graph import MAX_VERTICES, check_graph
from experiments.coloring.init import check_init
from experiments.validate import Num

PHASES = ("thermo", "tabu", "memetic", "population")
DENSE_MAX_N = 16_384  # thermo's GPU array path holds an n x n int32 adjacency: 1 GiB at this size
DEFAULTS: dict[str, Any] = {
    "graph": {"generator": "gnp", "n": 125, "p": 0.5, "seed": 1},
    "init": {"strategy": "dsatur", "tries": 64},
    "phases": ["population"],
    "target": 0,
    "gpu": "auto",
    "thermo": {
        "replicas": 8,
        "t_min": 0.05,
        "t_max": 1.5,
        "exchange_interval": 1,
        "sweeps_per_step": 2,
        "max_steps": 100,
    },
    "tabu": {
        "tenure_a": 10,
        "tenure_alpha": 0.6,
        "iters_per_step": 20_000,
        "max_iters_per_k": 20_000_000,
        "stall_iters": 1_000_000,
        "alternate_alpha": 2.0,
    },
    "memetic": {"population": 10, "local_iters": 20_000, "mutation_rate": 0.0, "elitism": 1, "max_generations": 2_000},
    "population": {
        "population": 0,
        "crossover_rate": 0.1,
        "min_age": 3,
        "generation_s": 0.5,
        "tenure_a": 10,
        "tenure_alpha": 0.6,
        "threads_per_chain": 64,
        "max_generations": 10**9,
    },
    "iterative": {"enabled": False, "max_passes": 3, "stall_s": 0.0, "perturb": 0.05},
}
LIMITS = {  # (section, key): (min, max, integer)
    ("thermo", "replicas"): (2, 256, True),
    ("thermo", "t_min"): (1e-4, 100.0, False),
    ("thermo", "t_max"): (1e-4, 1000.0, False),
    ("thermo", "exchange_interval"): (1, 10_000, True),
    ("thermo", "sweeps_per_step"): (1, 10_000, True),
    ("thermo", "max_steps"): (1, 10**9, True),
    ("tabu", "tenure_a"): (1, 10_000, True),
    ("tabu", "tenure_alpha"): (0.0, 10.0, False),
    ("tabu", "iters_per_step"): (1, 10**9, True),
    ("tabu", "max_iters_per_k"): (1, 10**12, True),
    ("tabu", "stall_iters"): (1, 10**12, True),
    ("tabu", "alternate_alpha"): (0.0, 10.0, False),
    ("memetic", "population"): (2, 1000, True),
    ("memetic", "local_iters"): (1, 10**9, True),
    ("memetic", "mutation_rate"): (0.0, 1.0, False),
    ("memetic", "elitism"): (0, 1000, True),
    ("memetic", "max_generations"): (1, 10**9, True),
    ("iterative", "max_passes"): (1, 1000, True),
    ("iterative", "stall_s"): (0.0, 1e7, False),
    ("iterative", "perturb"): (0.0, 0.5, False),
    ("population", "population"): (0, 65_536, True),
    ("population", "crossover_rate"): (0.0, 0.9, False),
    ("population", "min_age"): (0, 1000, True),
    ("population", "generation_s"): (0.01, 60.0, False),
    ("population", "tenure_a"): (1, 10_000, True),
    ("population", "tenure_alpha"): (0.0, 10.0, False),
    ("population", "threads_per_chain"): (1, 128, True),
    ("population", "max_generations"): (1, 10**12, True),
}


_TABUCOL = {"tabu.tenure_alpha": (0.2, 3.0, "float"), "tabu.tenure_a": (2, 30, "int")}
PHASE_SEARCH: dict[str, dict[str, tuple[float, float, str]]] = {
    # what ``crucible tune`` searches for each phase a spec runs: dotted parameter -> (low, high, kind)
    "thermo": {"thermo.replicas": (4, 32, "int"), "thermo.t_max": (0.5, 3.0, "float")},
    "tabu": {**_TABUCOL, "tabu.iters_per_step": (2_000, 100_000, "logint")},
    "memetic": {  # its local search is TabuCol with the tabu section's tenure
        **_TABUCOL,
        "memetic.population": (4, 20, "int"),
        "memetic.local_iters": (2_000, 100_000, "logint"),
        "memetic.mutation_rate": (0.0, 0.3, "float"),
    },
    "population": {  # its size stays the spec's (0: sized to the device or the CPU cores)
        "population.tenure_alpha": (0.2, 3.0, "float"),
        "population.tenure_a": (2, 30, "int"),
        "population.crossover_rate": (0.0, 0.5, "float"),
    },
}
"""Each phase's tuning dimensions, every range within :data:`LIMITS`. A parameter that no phase
of a spec reads is never searched: a dimension that changes nothing only costs TPE trials."""


def search_space(params: dict[str, Any] | None = None) -> dict[str, tuple[float, float, str]]:
    """The dimensions ``crucible tune`` searches for a spec's checked ``workload.params``: those
    of the phases it runs (None: of every phase), in the order of :data:`PHASES`.
    ``thermo.t_max`` starts at the spec's ``thermo.t_min`` (a proposal below it is no spec), and
    is left out when that is above the range."""
    phases = PHASES if params is None else params.get("phases", DEFAULTS["phases"])
    out: dict[str, tuple[float, float, str]] = {}
    for phase in PHASES:
        if phase in phases:
            out.update(PHASE_SEARCH[phase])
    if "thermo.t_max" in out and params is not None:
        lo, hi, kind = out["thermo.t_max"]
        t_min = float((params.get("thermo") or {}).get("t_min", lo))
        if t_min >= hi:
            del out["thermo.t_max"]
        else:
            out["thermo.t_max"] = (max(lo, t_min), hi, kind)
    return out


SEARCH_SPACE = search_space()
"""Every phase's dimensions: the colouring workload's declared search space."""


def merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``over`` on top of ``base``, table by table; a key ``base`` lacks is an error naming it."""
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"unknown colouring parameter {where}{k!r}; known: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and k != "graph":
            if not isinstance(v, dict):
                raise ValueError(f"{where}{k} must be a table")
            out[k] = merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def check_number(section: str, key: str, v: Any) -> Any:
    """``v`` if it is a finite number in the parameter's range (``ValueError`` naming it if not)."""
    lo, hi, integer = LIMITS[(section, key)]
    return Num(lo, hi, integer=integer).check(f"{section}.{key}", v)


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``workload.params`` with the defaults filled in, or ``ValueError`` naming the
    first bad key."""
    p = merge(DEFAULTS, params)
    p["graph"] = check_graph(p["graph"])
    p["init"] = check_init(p["init"])
    if not isinstance(p["phases"], list) or not p["phases"] or any(x not in PHASES for x in p["phases"]):
        raise ValueError(f"phases must be a non-empty list of {', '.join(PHASES)}, got {p['phases']!r}")
    if p["gpu"] not in ("auto", "gpu", "cpu"):
        raise ValueError(f"gpu must be auto, gpu or cpu, got {p['gpu']!r}")
    Num(0, MAX_VERTICES, integer=True).check("target", p["target"])
    if "file" not in p["graph"]:  # a generator's size is the spec's; a file's is known once it is read
        check_target(p["target"], p["graph"].get("n", DEFAULTS["graph"]["n"]))
    for section, key in LIMITS:
        check_number(section, key, p[section][key])
    if p["thermo"]["t_min"] > p["thermo"]["t_max"]:
        raise ValueError("thermo.t_min must be <= thermo.t_max")
    if not isinstance(p["iterative"]["enabled"], bool):
        raise ValueError("iterative.enabled must be true or false")
    return p


def check_target(target: int, n: int) -> None:
    """``ValueError`` for a ``target`` colour count above the graph's ``n`` vertices: a proper
    colouring always meets it, so a run aiming at it would end at its first colouring."""
    if target > n:
        raise ValueError(f"target must be between 1 and the number of vertices ({n}), got {target} (0: no target)")


def aim(k: int) -> int:
    """The k to attempt next, or 0 when there is none: one colour never does for a graph
    with an edge, and a graph without one has its single colour from the start."""
    return k if k >= 2 else 0
