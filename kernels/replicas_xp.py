"""Replica-exchange annealing on conflicts as array-API code: the same function runs on
cupy (a CUDA device) and on numpy (everywhere else, and in the tests).

All replicas move at once: at each sub-step every replica proposes one (vertex, colour)
move; the proposals are judged against each replica's own gamma table and temperature,
and accepted moves update gamma through the dense adjacency rows. Random draws come in as
arrays, so the numpy and cupy runs of one draw sequence are identical.
"""

from __future__ import annotations

from typing import Any


def dense_adjacency(xp: Any, n: int, indptr: Any, indices: Any) -> Any:
    """n x n int32 adjacency on the backend (the replicas' gamma updates read whole rows)."""
    import numpy as np

    a = np.zeros((n, n), dtype=np.int32)
    src = np.repeat(np.arange(n), np.diff(indptr))
    a[src, indices] = 1
    return xp.asarray(a)


def build_gamma_xp(xp: Any, adj: Any, colors: Any, k: int) -> Any:
    """gamma[r, v, c] = neighbours of v with colour c in replica r."""
    onehot = (colors[:, :, None] == xp.arange(k)[None, None, :]).astype(xp.int32)  # R x n x k
    return xp.einsum("uv,rvc->ruc", adj, onehot).astype(xp.int32)


def sweep_xp(
    xp: Any, adj: Any, colors: Any, gamma: Any, betas: Any, verts: Any, shifts: Any, uniforms: Any, k: int
) -> Any:
    """Apply ``verts.shape[1]`` sub-steps; ``verts``, ``shifts`` (1..k-1) and ``uniforms`` are
    R x S arrays of draws. Returns the conflict change per replica (R,)."""
    r_idx = xp.arange(colors.shape[0])
    delta = xp.zeros(colors.shape[0], dtype=xp.int64)
    for s in range(verts.shape[1]):
        v = verts[:, s]
        old = colors[r_idx, v]
        new = (old + shifts[:, s]) % k
        d = gamma[r_idx, v, new] - gamma[r_idx, v, old]
        accept = (d <= 0) | (uniforms[:, s] < xp.exp(-betas * d))
        rows = adj[v] * accept[:, None].astype(xp.int32)  # R x n, zero where rejected
        gamma[r_idx, :, old] -= rows
        gamma[r_idx, :, new] += rows
        colors[r_idx, v] = xp.where(accept, new, old)
        delta += xp.where(accept, d, 0)
    return delta


def conflicts_xp(xp: Any, adj: Any, colors: Any) -> Any:
    """Conflicting edges per replica."""
    same = colors[:, :, None] == colors[:, None, :]
    return (same * adj[None, :, :]).sum(axis=(1, 2)) // 2
