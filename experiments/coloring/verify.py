"""An independent check of a colouring: plain numpy over the edge list, no kernel shared
with the solver, so a solver bug cannot hide itself."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.coloring.graph import Graph


def check_coloring(g: Graph, coloring: Any) -> dict[str, Any]:
    """{"proper", "k" (colours actually used), "conflicts", "problems"} for a colouring."""
    c = np.asarray(coloring)
    problems = []
    if c.shape != (g.n,):
        return {"proper": False, "k": 0, "conflicts": None, "problems": [f"expected {g.n} colours, got {c.shape}"]}
    if not np.issubdtype(c.dtype, np.integer) or (c < 0).any():
        problems.append("colours must be non-negative integers")
    e = g.edges()
    conflicts = int((c[e[:, 0]] == c[e[:, 1]]).sum()) if e.size else 0
    if conflicts:
        problems.append(f"{conflicts} edges join vertices of the same colour")
    return {"proper": not problems, "k": int(np.unique(c).size), "conflicts": conflicts, "problems": problems}
