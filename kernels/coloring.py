"""Graph-colouring kernels in numba (CPU, ``nogil``, ``cache=True``).

Every kernel works on the CSR adjacency (``indptr``, ``indices``) and runs a bounded chunk
per call, releasing the GIL, so telemetry actors run alongside on the other core.

* :func:`count_conflicts`, :func:`build_gamma` (the vertex x colour conflict table),
* :func:`greedy_color` (in a given order) and :func:`dsatur`,
* :func:`tabucol` (Hertz & de Werra's TabuCol with Galinier & Hao's reactive tenure and an
  incrementally maintained gamma table and conflicting-vertex list),
* :func:`anneal` (Metropolis sweeps on conflicts at fixed k, for replica exchange),
* :func:`gpx` (the greedy partition crossover of Galinier & Hao's HEA).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def seed_rng(seed):  # pragma: no cover - compiled
    """Seed numba's own generator (used by the kernels below) in this thread."""
    np.random.seed(seed)


@njit(cache=True, nogil=True)
def count_conflicts(indptr, indices, colors):  # pragma: no cover - compiled
    """Edges whose ends share a colour (each edge counted once)."""
    c = 0
    for v in range(indptr.shape[0] - 1):
        cv = colors[v]
        for j in range(indptr[v], indptr[v + 1]):
            u = indices[j]
            if u > v and colors[u] == cv:
                c += 1
    return c


@njit(cache=True, nogil=True)
def build_gamma(indptr, indices, colors, k):  # pragma: no cover - compiled
    """gamma[v, c] = number of neighbours of v coloured c."""
    n = indptr.shape[0] - 1
    gamma = np.zeros((n, k), dtype=np.int32)
    for v in range(n):
        for j in range(indptr[v], indptr[v + 1]):
            gamma[v, colors[indices[j]]] += 1
    return gamma


@njit(cache=True, nogil=True)
def greedy_color(indptr, indices, order):  # pragma: no cover - compiled
    """Each vertex, in ``order``, takes the smallest colour none of its coloured neighbours has."""
    n = indptr.shape[0] - 1
    colors = np.full(n, -1, dtype=np.int32)
    mark = np.full(n + 1, -1, dtype=np.int64)
    for i in range(order.shape[0]):
        v = order[i]
        for j in range(indptr[v], indptr[v + 1]):
            cu = colors[indices[j]]
            if cu >= 0:
                mark[cu] = v
        c = 0
        while mark[c] == v:
            c += 1
        colors[v] = c
    return colors


@njit(cache=True, nogil=True)
def _heap_push(heap, size, key):  # pragma: no cover - compiled
    """Push ``key`` on the binary max-heap ``heap[:size]``; return the new size."""
    i = size
    heap[i] = key
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] >= heap[i]:
            break
        heap[parent], heap[i] = heap[i], heap[parent]
        i = parent
    return size + 1


@njit(cache=True, nogil=True)
def _heap_pop(heap, size):  # pragma: no cover - compiled
    """Take the largest key off the max-heap ``heap[:size]`` (``size`` > 0): (key, new size)."""
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        big = left
        if left + 1 < size and heap[left + 1] > heap[left]:
            big = left + 1
        if heap[i] >= heap[big]:
            break
        heap[i], heap[big] = heap[big], heap[i]
        i = big
    return top, size


@njit(cache=True, nogil=True)
def dsatur(indptr, indices):  # pragma: no cover - compiled
    """Brelaz's DSATUR: next the vertex with most distinct neighbour colours (ties: degree, then
    the lowest id).

    The next vertex comes off a max-heap keyed by (saturation, degree, -id), with lazy
    deletion: a vertex is pushed again whenever its saturation grows, and stale entries are
    skipped when popped. O((n + m) log(n + m)), where a scan for the maximum is O(n^2) (13 s
    for 100,000 vertices)."""
    n = indptr.shape[0] - 1
    maxdeg = 0
    for v in range(n):
        maxdeg = max(maxdeg, indptr[v + 1] - indptr[v])
    cap = maxdeg + 2
    colors = np.full(n, -1, dtype=np.int32)
    seen = np.zeros((n, cap), dtype=np.int32)  # neighbour colour counts
    sat = np.zeros(n, dtype=np.int64)
    deg = np.empty(n, dtype=np.int64)
    span = np.int64(maxdeg + 1)  # degrees are in [0, maxdeg]: key = (sat * span + deg) * n + (n - 1 - v)
    nn = np.int64(n)
    heap = np.empty(n + indices.shape[0] + 1, dtype=np.int64)  # n first entries, then one per saturation rise
    size = 0
    for v in range(n):
        deg[v] = indptr[v + 1] - indptr[v]
        size = _heap_push(heap, size, deg[v] * nn + (nn - 1 - v))
    for _ in range(n):
        best = -1
        while best < 0:
            key, size = _heap_pop(heap, size)
            v = nn - 1 - key % nn
            if colors[v] < 0 and key // nn // span == sat[v]:
                best = v
        c = 0
        while seen[best, c] > 0:
            c += 1
        colors[best] = c
        for j in range(indptr[best], indptr[best + 1]):
            u = indices[j]
            if colors[u] < 0:
                if seen[u, c] == 0:
                    sat[u] += 1
                    size = _heap_push(heap, size, (sat[u] * span + deg[u]) * nn + (nn - 1 - u))
                seen[u, c] += 1
    return colors


@njit(cache=True, nogil=True)
def _move(indptr, indices, colors, gamma, conf_list, conf_pos, n_conf, v, new):  # pragma: no cover
    """Recolour v and keep gamma and the conflicting-vertex list exact; return the new list size."""
    old = colors[v]
    colors[v] = new
    uo = np.uint64(old)  # unsigned indices: numba adds no negative-index wraparound to these
    un = np.uint64(new)
    for j in range(indptr[v], indptr[v + 1]):
        u = np.uint64(indices[j])
        go = gamma[u, uo] - 1
        gamma[u, uo] = go
        gn = gamma[u, un] + 1
        gamma[u, un] = gn
        cu = colors[u]
        if cu == old and go == 0:  # u conflicted through v alone
            last = conf_list[n_conf - 1]
            conf_list[conf_pos[u]] = last
            conf_pos[last] = conf_pos[u]
            conf_pos[u] = -1
            n_conf -= 1
        elif cu == new and gn == 1:  # u conflicts now, through v alone
            conf_list[n_conf] = u
            conf_pos[u] = n_conf
            n_conf += 1
    conflicted = gamma[v, new] > 0
    if conflicted and conf_pos[v] < 0:
        conf_list[n_conf] = v
        conf_pos[v] = n_conf
        n_conf += 1
    elif not conflicted and conf_pos[v] >= 0:
        last = conf_list[n_conf - 1]
        conf_list[conf_pos[v]] = last
        conf_pos[last] = conf_pos[v]
        conf_pos[v] = -1
        n_conf -= 1
    return n_conf


@njit(cache=True, nogil=True)
def conflict_list(colors, gamma):  # pragma: no cover - compiled
    n = colors.shape[0]
    conf_list = np.empty(n, dtype=np.int32)
    conf_pos = np.full(n, -1, dtype=np.int32)
    m = 0
    for v in range(n):
        if gamma[v, colors[v]] > 0:
            conf_list[m] = v
            conf_pos[v] = m
            m += 1
    return conf_list, conf_pos, m


_U12, _U25, _U27, _U32 = np.uint64(12), np.uint64(25), np.uint64(27), np.uint64(32)
_XS_MUL = np.uint64(2685821657736338717)  # xorshift64* (Vigna)
TABU_REBASE = 1 << 30
"""Tabu tables hold int32 iteration numbers: past this many iterations a caller rebases them."""
_HOLD = np.int32(2**31 - 1)  # tabu entry of a vertex's own colour during a call: never a move


@njit(cache=True, nogil=True)
def rebase_tabu(tabu, it):  # pragma: no cover - compiled
    """Shift a tabu table so that iteration ``it`` becomes 0 (expired entries become 0); the
    caller goes on from iteration 0. Keeps int32 tabu tables from overflowing on long runs."""
    flat = tabu.reshape(-1)
    for i in range(flat.shape[0]):
        x = flat[i] - it
        flat[i] = x if x > 0 else 0


@njit(cache=True, nogil=True)
def tabucol(
    indptr, indices, k, colors, gamma, tabu, it0, max_iters, tenure_a, tenure_alpha, best_colors, best_f
):  # pragma: no cover - compiled
    """Run up to ``max_iters`` TabuCol iterations at k colours (stops early at 0 conflicts).

    ``colors``, ``gamma`` and ``tabu`` (n x k int32, iteration until which a move is
    forbidden; rebase it with :func:`rebase_tabu` before ``it0`` passes :data:`TABU_REBASE`)
    are updated in place; ``best_colors`` receives the best colouring seen when it improves
    on ``best_f``. Returns (iterations done, conflicts now, best conflicts).
    """
    n = indptr.shape[0] - 1
    conf_list, conf_pos, n_conf = conflict_list(colors, gamma)
    f = 0
    for i in range(n_conf):
        v = conf_list[i]
        f += gamma[v, colors[v]]
    f //= 2
    if f < best_f:
        best_f = f
        best_colors[:] = colors
    it = it0
    end = it0 + max_iters
    tie_v = np.empty(n * k, dtype=np.int32)
    tie_c = np.empty(n * k, dtype=np.int32)
    s = np.uint64(np.random.randint(1, 1 << 62))  # this call's xorshift64* stream, from numba's generator
    # The scan is two passes. The first takes, per conflicting vertex, the best allowed move
    # with a branch-free loop over its row that LLVM vectorises (int32 throughout; the own
    # colour is excluded by a tabu entry that never expires, not by a compare per colour).
    # The second lists the ties at the best value, in the order a one-pass scan would, from
    # the few rows that reach it, so the moves drawn are the same as the textbook loop's.
    row_best = np.empty(n, dtype=np.int32)
    for v in range(n):
        tabu[v, colors[v]] = _HOLD  # restored before returning
    big = np.int32(1 << 30)
    while it < end and f > 0:
        it32 = np.int32(it)
        bd = big
        for idx in range(n_conf):
            uv = np.uint64(conf_list[idx])  # unsigned indices: no negative-index wraparound
            gv = gamma[uv, np.uint64(colors[uv])]
            thr = np.int32(best_f - f + gv)  # gamma < thr  <=>  f + d < best_f: aspiration
            m = big
            for c in range(k):
                g = gamma[uv, np.uint64(c)]
                m = min(m, g if (tabu[uv, np.uint64(c)] <= it32) | (g < thr) else big)
            m = m - gv if m < big else big
            row_best[idx] = m
            bd = min(bd, m)
        ties = 0
        if bd < big:
            for idx in range(n_conf):
                if row_best[idx] != bd:
                    continue
                v = conf_list[idx]
                uv = np.uint64(v)
                gv = gamma[uv, np.uint64(colors[uv])]
                want = np.int32(bd + gv)
                thr = np.int32(best_f - f + gv)
                for c in range(k):
                    g = gamma[uv, np.uint64(c)]
                    if g == want and ((tabu[uv, np.uint64(c)] <= it32) | (g < thr)):
                        tie_v[ties] = v
                        tie_c[ties] = c
                        ties += 1
        s ^= s >> _U12
        s ^= s << _U25
        s ^= s >> _U27
        r = (s * _XS_MUL) >> _U32  # 32 random bits: an inline generator costs less than np.random here
        if ties:
            pick = np.int64((r * np.uint64(ties)) >> _U32)  # a uniform choice among the best moves
            bv = tie_v[pick]
            bc = tie_c[pick]
        else:  # every move is tabu: a random one
            bv = conf_list[np.random.randint(n_conf)]
            bc = np.random.randint(k - 1)
            if bc >= colors[bv]:
                bc += 1
            bd = gamma[bv, bc] - gamma[bv, colors[bv]]
        old = colors[bv]
        n_conf = _move(indptr, indices, colors, gamma, conf_list, conf_pos, n_conf, bv, bc)
        f += bd
        s ^= s >> _U12
        s ^= s << _U25
        s ^= s >> _U27
        r = (s * _XS_MUL) >> _U32
        tabu[bv, bc] = _HOLD
        tabu[bv, old] = it + np.int64((r * np.uint64(tenure_a)) >> _U32) + int(tenure_alpha * n_conf)
        it += 1
        if f < best_f:
            best_f = f
            best_colors[:] = colors
    for v in range(n):
        tabu[v, colors[v]] = 0  # never read while v keeps its colour; overwritten when it leaves
    return it - it0, f, best_f


@njit(cache=True, nogil=True)
def reduce_colors(indptr, indices, rows, k):  # pragma: no cover - compiled
    """Each row (a colouring) with its colours >= k moved, vertex by vertex, to the colour
    below k that the fewest of its neighbours (as coloured so far) have. Returns a copy."""
    out = rows.copy()
    n = indptr.shape[0] - 1
    count = np.zeros(max(k, 1), dtype=np.int64)
    for r in range(out.shape[0]):
        c = out[r]
        for v in range(n):
            if c[v] < k:
                continue
            count[:] = 0
            for j in range(indptr[v], indptr[v + 1]):
                cu = c[indices[j]]
                if cu < k:
                    count[cu] += 1
            best = 0
            for x in range(1, k):
                if count[x] < count[best]:
                    best = x
            c[v] = best
    return out


@njit(cache=True, nogil=True)
def anneal(indptr, indices, k, colors, gamma, beta, moves):  # pragma: no cover - compiled
    """``moves`` Metropolis proposals (random vertex, random other colour) on the conflict
    count at inverse temperature ``beta``; gamma kept exact. Returns the conflict change."""
    n = indptr.shape[0] - 1
    total = 0
    for _ in range(moves):
        v = np.random.randint(n)
        cv = colors[v]
        c = np.random.randint(k - 1)
        if c >= cv:
            c += 1
        d = gamma[v, c] - gamma[v, cv]
        if d <= 0 or np.random.random() < np.exp(-beta * d):
            colors[v] = c
            for j in range(indptr[v], indptr[v + 1]):
                u = indices[j]
                gamma[u, cv] -= 1
                gamma[u, c] += 1
            total += d
    return total


@njit(cache=True, nogil=True)
def gpx(p1, p2, k):  # pragma: no cover - compiled
    """Greedy partition crossover: alternately take the largest remaining colour class of each
    parent; vertices left over get random colours."""
    n = p1.shape[0]
    a = p1.copy()
    b = p2.copy()
    child = np.full(n, -1, dtype=np.int32)
    size = np.zeros(k, dtype=np.int64)
    for step in range(k):
        src = a if step % 2 == 0 else b
        size[:] = 0
        for v in range(n):
            if src[v] >= 0:
                size[src[v]] += 1
        best = 0
        for c in range(1, k):
            if size[c] > size[best]:
                best = c
        if size[best] == 0:
            break
        for v in range(n):
            if src[v] == best:
                child[v] = step
                a[v] = -1
                b[v] = -1
    for v in range(n):
        if child[v] < 0:
            child[v] = np.random.randint(k)
    return child
