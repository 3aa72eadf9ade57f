"""Initial colourings (``init.strategy``): greedy, dsatur, spectral, community, multistart.

Every strategy returns a proper colouring (int32 array, colours 0..k-1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.coloring.graph import Graph
from experiments.validate import Num
from kernels.coloring import dsatur, greedy_color

STRATEGIES = ("greedy", "dsatur", "spectral", "community", "multistart")
TRIES = Num(1, 100_000, integer=True)
"""``init.tries``: the greedy orders multistart draws."""


def greedy_lf(g: Graph, seed: int = 0) -> np.ndarray:
    """Largest degree first (Welsh-Powell order), greedy smallest colour."""
    order = np.argsort(-g.degrees(), kind="stable").astype(np.int32)
    return greedy_color(g.indptr, g.indices, order)


def dsatur_init(g: Graph, seed: int = 0) -> np.ndarray:
    return dsatur(g.indptr, g.indices)


def spectral(g: Graph, seed: int = 0) -> np.ndarray:
    """Greedy in the order of the Laplacian's leading eigenvector (scipy): vertices that the
    spectrum separates are coloured apart, densely linked ones first."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    a = sp.csr_matrix((np.ones(g.indices.size), g.indices, g.indptr), shape=(g.n, g.n))
    lap = sp.diags(np.asarray(a.sum(axis=1)).ravel()) - a
    if g.n < 3 or g.m == 0:  # nothing to separate (and ARPACK refuses the zero matrix)
        order = np.arange(g.n)
    else:
        k = min(3, g.n - 1)
        vals, vecs = eigsh(lap.astype(np.float64), k=k, which="LA", v0=np.random.default_rng(seed).random(g.n))
        lead = vecs[:, int(np.argmax(vals))]
        order = np.lexsort((-g.degrees(), -np.abs(lead)))
    return greedy_color(g.indptr, g.indices, order.astype(np.int32))


def community(g: Graph, seed: int = 0) -> np.ndarray:
    """Louvain communities (networkx), densest community first, greedy within."""
    import networkx as nx

    G = nx.Graph()
    G.add_nodes_from(range(g.n))
    G.add_edges_from(g.edges().tolist())
    comms = nx.community.louvain_communities(G, seed=seed)

    def density(c: set[int]) -> float:
        s = len(c)
        return G.subgraph(c).number_of_edges() / (s * (s - 1) / 2) if s > 1 else 0.0

    deg = g.degrees()
    order = [v for c in sorted(comms, key=density, reverse=True) for v in sorted(c, key=lambda v: -deg[v])]
    return greedy_color(g.indptr, g.indices, np.array(order, dtype=np.int32))


def multistart(g: Graph, seed: int = 0, tries: int = 64) -> np.ndarray:
    """The best of ``tries`` greedy colourings in random orders (biased towards high degree)."""
    TRIES.check("init.tries", tries)
    rng = np.random.default_rng(seed)
    best = greedy_lf(g)
    deg = g.degrees().astype(np.float64)
    for _ in range(tries):
        keys = rng.random(g.n) * (1.0 + deg)
        c = greedy_color(g.indptr, g.indices, np.argsort(-keys).astype(np.int32))
        if c.max() < best.max():
            best = c
    return best


INIT: dict[str, Callable[..., np.ndarray]] = {
    "greedy": greedy_lf,
    "dsatur": dsatur_init,
    "spectral": spectral,
    "community": community,
    "multistart": multistart,
}


def check_init(init: Any) -> dict[str, Any]:
    """Validate the ``init`` table (``strategy``, ``tries``); ValueError naming the key."""
    if not isinstance(init, dict):
        raise ValueError(f"init must be a table, got {init!r}")
    unknown = sorted(set(init) - {"strategy", "tries"})
    if unknown:
        raise ValueError(f"unknown init key(s) {', '.join(unknown)}; known: strategy, tries")
    if init.get("strategy", "dsatur") not in STRATEGIES:
        raise ValueError(f"init.strategy must be one of {', '.join(STRATEGIES)}, got {init.get('strategy')!r}")
    TRIES.check("init.tries", init.get("tries", 64))
    return init


def initial_coloring(g: Graph, strategy: str, seed: int = 0, **kw: Any) -> np.ndarray:
    if strategy not in INIT:
        raise ValueError(f"unknown init.strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if g.n == 0:
        return np.zeros(0, dtype=np.int32)
    return INIT[strategy](g, seed, **kw).astype(np.int32)
