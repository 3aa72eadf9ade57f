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


def objective_of(name: object) -> Objective | None:
    """The objective of the workload called ``name`` (as a spec or a run's records give it),
    or None when no workload has that name: for readers that have a name, not a class."""
    cls = registry().get(name) if isinstance(name, str) else None
    return cls.objective if cls is not None else None


def objectives() -> dict[str, Objective]:
    """Every workload's objective, by workload name (for readers that know no workload)."""
    return {name: cls.objective for name, cls in registry().items()}


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
