"""Workloads: what a Phase actor runs, step by step (see ``experiments.workloads.base``)."""

from __future__ import annotations

from typing import Any

from experiments.workloads.base import Workload
from experiments.workloads.latency import LatencyWorkload


def registry() -> dict[str, type[Any]]:
    """Workload name -> class. The colouring pipeline registers itself here when present."""
    found: dict[str, type[Any]] = {"latency": LatencyWorkload}
    try:
        from experiments.coloring.workload import ColoringWorkload
    except ImportError:
        pass
    else:
        found["coloring"] = ColoringWorkload
    return found


__all__ = ["LatencyWorkload", "Workload", "registry"]
