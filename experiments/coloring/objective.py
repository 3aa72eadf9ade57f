"""The colouring workload's objective, in a module of its own: readers of recorded runs
(``crucible list``, ``compare``, the monitor) learn it without importing the pipeline and its
numba kernels."""

from __future__ import annotations

from experiments.workloads.base import Objective

OBJECTIVE = Objective("chromatic_number", "min", "colors", progress="conflicts")
