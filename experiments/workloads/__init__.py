"""Workloads: what a Phase actor runs, step by step (see ``experiments.workloads.base``)."""

from __future__ import annotations

from experiments.workloads.base import Arm, Control, Objective, Workload, declarations
from experiments.workloads.latency import LatencyWorkload


def registry() -> dict[str, type[Workload]]:
    """Workload name -> class. The colouring pipeline registers itself here when present."""
    found: dict[str, type[Workload]] = {"latency": LatencyWorkload}
    try:
        from experiments.coloring.workload import ColoringWorkload
    except ImportError:
        pass
    else:
        found["coloring"] = ColoringWorkload
    return found


def objectives() -> dict[str, Objective]:
    """Every workload's objective, by workload name (for readers that know no workload). The
    colouring pipeline declares its objective apart, so that readers of recorded runs (``list``,
    ``compare``, the monitor) need not import the pipeline and its numba kernels."""
    found = {"latency": LatencyWorkload.objective}
    try:
        from experiments.coloring.objective import OBJECTIVE
    except ImportError:
        pass
    else:
        found["coloring"] = OBJECTIVE
    return found


def objective_of(name: object) -> Objective | None:
    """The objective of the workload called ``name`` (as a spec or a run's records give it),
    or None when no workload has that name: for readers that have a name, not a class."""
    return objectives().get(name) if isinstance(name, str) else None


__all__ = [
    "Arm",
    "Control",
    "LatencyWorkload",
    "Objective",
    "Workload",
    "declarations",
    "objective_of",
    "objectives",
    "registry",
]
