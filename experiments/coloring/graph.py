"""Graphs for colouring: a DIMACS ``.col`` reader, seeded generators, CSR adjacency.

A :class:`Graph` holds ``n`` and the adjacency in CSR form (``indptr``, ``indices``, int32,
sorted, no duplicates, no self-loops), which is what the numba kernels take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class GraphError(ValueError):
    """A malformed graph file or a bad generator request (names the file and line)."""


@dataclass
class Graph:
    n: int
    indptr: np.ndarray
    indices: np.ndarray
    name: str = "graph"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return int(self.indices.size // 2)

    def degrees(self) -> np.ndarray:
        return np.diff(self.indptr).astype(np.int32)

    def neighbors(self, v: int) -> np.ndarray:
        return self.indices[self.indptr[v]:self.indptr[v + 1]]

    def edges(self) -> np.ndarray:
        """(m, 2) array of u < v pairs."""
        src = np.repeat(np.arange(self.n, dtype=np.int32), np.diff(self.indptr))
        keep = src < self.indices
        return np.column_stack([src[keep], self.indices[keep]])

    def density(self) -> float:
        return 2.0 * self.m / (self.n * (self.n - 1)) if self.n > 1 else 0.0


def from_edges(n: int, edges: np.ndarray, name: str = "graph", **meta: Any) -> Graph:
    """Build the CSR graph from an (m, 2) array of 0-based edges (duplicates merged)."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.size and (e.min() < 0 or e.max() >= n):
        raise GraphError(f"{name}: edge endpoint outside 0..{n - 1}")
    if e.size and (e[:, 0] == e[:, 1]).any():
        raise GraphError(f"{name}: self-loop")
    both = np.concatenate([e, e[:, ::-1]]) if e.size else e
    key = np.unique(both[:, 0] * n + both[:, 1]) if both.size else np.empty(0, dtype=np.int64)
    src, dst = key // n, key % n
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.add.at(indptr, src + 1, 1)
    np.cumsum(indptr, out=indptr)
    return Graph(n, indptr, dst.astype(np.int32), name, dict(meta))


def read_dimacs(path: str | Path) -> Graph:
    """Read a DIMACS ``.col`` file; errors name the file and the line."""
    path = Path(path)
    n = None
    declared = 0
    edges: list[tuple[int, int]] = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise GraphError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == "c":
            continue
        tag = parts[0]
        where = f"{path}:{lineno}"
        if tag == "p":
            if n is not None:
                raise GraphError(f"{where}: a second 'p' line")
            if len(parts) != 4 or parts[1] not in ("edge", "col"):
                raise GraphError(f"{where}: expected 'p edge N M', got {line.strip()!r}")
            try:
                n, declared = int(parts[2]), int(parts[3])
            except ValueError:
                raise GraphError(f"{where}: N and M must be integers, got {line.strip()!r}") from None
            if n < 1 or declared < 0:
                raise GraphError(f"{where}: N must be >= 1 and M >= 0")
        elif tag == "e":
            if n is None:
                raise GraphError(f"{where}: edge before the 'p edge N M' line")
            if len(parts) != 3:
                raise GraphError(f"{where}: expected 'e U V', got {line.strip()!r}")
            try:
                u, v = int(parts[1]), int(parts[2])
            except ValueError:
                raise GraphError(f"{where}: vertex ids must be integers, got {line.strip()!r}") from None
            if not (1 <= u <= n and 1 <= v <= n):
                raise GraphError(f"{where}: vertex id out of range 1..{n}: {line.strip()!r}")
            if u == v:
                raise GraphError(f"{where}: self-loop on vertex {u}")
            edges.append((u - 1, v - 1))
        elif tag in ("n", "x", "d", "v"):
            continue  # optional DIMACS lines (node weights, ...): not used for colouring
        else:
            raise GraphError(f"{where}: unknown line type {tag!r}")
    if n is None:
        raise GraphError(f"{path}: no 'p edge N M' line")
    g = from_edges(n, np.array(edges, dtype=np.int64).reshape(-1, 2), name=path.stem, source=str(path),
                   declared_edges=declared, edge_lines=len(edges))
    return g


def gnp(n: int, p: float, seed: int = 0) -> Graph:
    """G(n, p): each pair is an edge with probability p (the DSJC family)."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise GraphError(f"gnp needs n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    rng = np.random.default_rng(seed)
    iu, ju = np.triu_indices(n, 1)
    keep = rng.random(iu.size) < p
    return from_edges(n, np.column_stack([iu[keep], ju[keep]]), name=f"gnp_{n}_{p:g}_s{seed}", seed=seed)


def planted(n: int, k: int, p: float, seed: int = 0) -> Graph:
    """A graph with a planted k-colouring (the ``flat`` family's idea): vertices split into k
    near-equal classes, each pair from different classes an edge with probability p."""
    if not 1 <= k <= n or not 0.0 <= p <= 1.0:
        raise GraphError(f"planted needs 1 <= k <= n and 0 <= p <= 1, got n={n}, k={k}, p={p}")
    rng = np.random.default_rng(seed)
    cls = rng.permutation(np.arange(n) % k)
    iu, ju = np.triu_indices(n, 1)
    keep = (cls[iu] != cls[ju]) & (rng.random(iu.size) < p)
    g = from_edges(n, np.column_stack([iu[keep], ju[keep]]), name=f"planted_{n}_{k}_{p:g}_s{seed}", seed=seed)
    g.meta["planted_k"] = k
    g.meta["planted"] = cls.astype(np.int32)
    return g


def load_graph(spec: dict[str, Any]) -> Graph:
    """A graph from a workload spec: ``{"file": path}`` or ``{"generator": "gnp"|"planted", ...}``."""
    if spec.get("file"):
        return read_dimacs(spec["file"])
    gen = spec.get("generator", "gnp")
    n, seed = int(spec.get("n", 125)), int(spec.get("seed", 0))
    if gen == "gnp":
        return gnp(n, float(spec.get("p", 0.5)), seed)
    if gen == "planted":
        return planted(n, int(spec.get("k", 10)), float(spec.get("p", 0.5)), seed)
    raise GraphError(f"unknown graph generator {gen!r}; expected gnp or planted")
