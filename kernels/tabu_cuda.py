"""A population of TabuCol chains on a CUDA device (numba.cuda), one thread block per chain.

Each block advances its chain for many iterations per launch; the host synchronises once
per generation. Per iteration the block's threads

1. compact the conflicting vertices into a shared list (``conf[v] = gamma[v, colour(v)]``
   is kept in shared memory, so the scan reads no global memory),
2. evaluate the (conflicting vertex, colour) moves strided over the threads, keeping the
   best non-tabu move (aspiration: a tabu move that beats the chain's best is allowed) and
   sampling uniformly among ties (reservoir sampling per thread, then a tree reduction
   whose merges pick either side in proportion to its tie count),
3. apply the move: threads split the moved vertex's neighbours and update their gamma
   rows and conflict counts; thread 0 recolours the vertex and sets its tabu tenure
   ``it + rand(tenure_a) + alpha * |conflicting vertices|``,

Steps 2 and 3 go in *load rounds* of ``batch`` pairs (or neighbours) per thread: a round
issues all its global loads (gamma entries, then the tabu entries a pair may need) before it
uses any, so a thread waits for one memory latency per round instead of one or two per pair.
Within a round the pairs are judged in the order of the one-pair walk, with the same draws,
so every load round gives the same search draw for draw (``tests/cudasim_checks.py`` checks
it). Past a thread's last pair the round loads a valid entry again and ignores it: loads
under a branch are not issued early by the compiler.
4. copy the colouring to the chain's best when it improves.

Colours, conflict counts and the candidate list live in shared memory (int16); the gamma
table lives in global memory, or in shared memory when asked and it fits (``gamma_in_shared``).
The tabu table (int32 iteration numbers, saturating: a chain would need 2**31 iterations,
days at these rates, before its tabu list stopped forbidding anything) is global. Random numbers: one 32-bit xorshift
state per thread, kept in ``rng`` between launches.

The same code runs under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``), which is how
the tests check it on machines without a GPU. Only ``syncthreads`` and shared-memory
atomics are used (no warp intrinsics), so the simulator runs exactly this code.
"""

from __future__ import annotations

import functools

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30 names it; numpy 2.5 removed it (it is vstack)
    np.row_stack = np.vstack

from numba import config, cuda, int16, int32

# 64 registers a thread: 16 blocks of 64 threads fill an SM's register file, as auto_size assumes.
# At a load round of 4 the compiler would take 68 (14 blocks); capped, it spills 8 bytes.
# The simulator's jit takes no such option.
_REGISTER_CAP = {} if config.ENABLE_CUDASIM else {"max_registers": 64}
MAX_THREADS = 128  # threads per block (per chain); the static reduction arrays' size
NO_MOVE = 1 << 30
SKIP = NO_MOVE + 1  # a pair that is no move: above every best delta


@cuda.jit(device=True, inline=True)
def xorshift(s):  # pragma: no cover - compiled
    """One step of Marsaglia's xorshift32 in 64-bit arithmetic (state in [1, 2**32))."""
    s ^= (s << 13) & 0xFFFFFFFF
    s ^= s >> 17
    s ^= (s << 5) & 0xFFFFFFFF
    return s


@cuda.jit(device=True, inline=True)
def below(s, m):  # pragma: no cover - compiled
    """A draw in [0, m) from a state (Lemire's multiply-shift, no modulo bias to speak of)."""
    return (s * m) >> 32


def _make_iterate(batch: int):
    """The iteration loop with ``batch`` pairs (and neighbours) per load round: see the module's docstring."""

    @cuda.jit(device=True)
    def _iterate(
        indptr,
        indices,
        n,
        k,
        gam,
        col,
        conf,
        cand,
        cnt,
        red_d,
        red_n,
        red_v,
        red_c,
        tabu,
        best_row,
        f,
        best,
        it,
        iters,
        tenure_a,
        alpha,
        s,
    ):  # pragma: no cover - compiled
        """Run up to ``iters`` iterations of one chain (all threads of the block call this)."""
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        pv = cuda.local.array(batch, int32)  # per thread: a round's vertices (or neighbours),
        pc = cuda.local.array(batch, int32)  # colours,
        pd = cuda.local.array(batch, int32)  # deltas (or old-colour gamma entries)
        pt = cuda.local.array(batch, int32)  # and tabu entries (or new-colour gamma entries)
        done = 0
        while done < iters and f > 0:
            # 1. the conflicting vertices
            if t == 0:
                cnt[0] = 0
            cuda.syncthreads()
            for v in range(t, n, nt):
                if conf[v] > 0:
                    cand[cuda.atomic.add(cnt, 0, 1)] = v
            cuda.syncthreads()
            n_cand = cnt[0]
            # 2. the best move, ties sampled uniformly
            bd = NO_MOVE
            bn = 0
            bv = -1
            bc = -1
            i = t // k  # pair p = i * k + c, walked without a division per step (64-bit division is slow)
            c = t - i * k
            step_i = nt // k
            step_c = nt - step_i * k
            while i < n_cand:
                # this thread's next `batch` pairs, in the order of the one-pair walk; past the
                # end, the first pair again (a valid address whose loads are ignored)
                m = 0
                for b in range(batch):
                    if i < n_cand:
                        pv[b] = cand[i]
                        pc[b] = c
                        m += 1
                        i += step_i
                        c += step_c
                        if c >= k:
                            c -= k
                            i += 1
                    else:
                        pv[b] = pv[0]
                        pc[b] = pc[0]
                # their loads, unconditional so that they are issued together and their latencies
                # overlap; a pair that is no move (its own colour, or past the end) gets SKIP
                for b in range(batch):
                    v = pv[b]
                    d = gam[v * k + pc[b]] - conf[v]
                    no_move = (b >= m) | (pc[b] == col[v])  # no short cut: the load stays unconditional
                    pd[b] = SKIP if no_move else d
                for b in range(batch):  # a superset of the tabu entries the walk reads (bd only falls)
                    e = pv[b] * k + pc[b]
                    pt[b] = tabu[e if pd[b] <= bd else 0]
                for b in range(batch):
                    d = pd[b]
                    if d <= bd and not (pt[b] > it and f + d >= best):
                        if d < bd:
                            bd = d
                            bn = 1
                            bv = pv[b]
                            bc = pc[b]
                        else:
                            bn += 1
                            s = xorshift(s)
                            if below(s, bn) == 0:
                                bv = pv[b]
                                bc = pc[b]
            red_d[t] = bd
            red_n[t] = bn
            red_v[t] = bv
            red_c[t] = bc
            cuda.syncthreads()
            w = nt // 2
            while w > 0:
                if t < w:
                    n2 = red_n[t + w]
                    if n2 > 0:
                        d1 = red_d[t]
                        d2 = red_d[t + w]
                        n1 = red_n[t]
                        if n1 == 0 or d2 < d1:
                            red_d[t] = d2
                            red_n[t] = n2
                            red_v[t] = red_v[t + w]
                            red_c[t] = red_c[t + w]
                        elif d2 == d1:
                            s = xorshift(s)
                            if below(s, n1 + n2) < n2:
                                red_v[t] = red_v[t + w]
                                red_c[t] = red_c[t + w]
                            red_n[t] = n1 + n2
                cuda.syncthreads()
                w //= 2
            if t == 0 and red_n[0] == 0:
                # every move is tabu without aspiration: a random one
                s = xorshift(s)
                v = cand[below(s, n_cand)]
                s = xorshift(s)
                c = below(s, k - 1)
                if c >= col[v]:
                    c += 1
                red_v[0] = v
                red_c[0] = c
                red_d[0] = gam[v * k + c] - conf[v]
            cuda.syncthreads()
            mv = red_v[0]
            mc = red_c[0]
            md = red_d[0]
            old = col[mv]
            # 3. apply: the neighbours' gamma rows and conflict counts
            j = indptr[mv] + t
            end = indptr[mv + 1]
            while j < end:
                m = 0
                for b in range(batch):
                    if j < end:
                        pv[b] = indices[j]
                        m += 1
                        j += nt
                    else:
                        pv[b] = mv  # a valid row that no thread writes now: loaded, not stored
                for b in range(batch):  # loads first, all of them (old != mc: the entries never alias)
                    u = pv[b]
                    pd[b] = gam[u * k + old]
                    pt[b] = gam[u * k + mc]
                for b in range(batch):
                    if b < m:
                        u = pv[b]
                        gam[u * k + old] = pd[b] - 1
                        gam[u * k + mc] = pt[b] + 1
                        cu = col[u]
                        if cu == old:
                            conf[u] -= 1
                        elif cu == mc:
                            conf[u] += 1
            cuda.syncthreads()
            if t == 0:
                col[mv] = mc
                conf[mv] = gam[mv * k + mc]
                s = xorshift(s)
                until = it + below(s, tenure_a) + int(alpha * n_cand)
                tabu[mv * k + old] = until if until < 2147483647 else 2147483647
            f += md
            it += 1
            done += 1
            cuda.syncthreads()
            if f < best:  # 4. the chain's best (f and best are the same in every thread)
                best = f
                for v in range(t, n, nt):
                    best_row[v] = col[v]
        return f, best, it, done, s

    return _iterate


@functools.cache  # one dispatcher per round size: numba compiles and caches each once
def _make_tabu_chains(batch: int):
    """The population kernel with ``batch`` pairs (and neighbours) per load round."""
    iterate = _make_iterate(batch)

    @cuda.jit(cache=True, **_REGISTER_CAP)
    def tabu_chains(
        indptr,
        indices,
        n,
        k,
        colors,
        gamma,
        tabu,
        f_arr,
        best_f,
        best_colors,
        it_arr,
        iters,
        tenure_a,
        alpha,
        rng,
        gamma_in_shared,
        done_arr,
    ):  # pragma: no cover - compiled
        """Advance every chain (one block each) by up to ``iters`` TabuCol iterations.

        ``colors``/``best_colors``: P x n int32; ``gamma``: P x (n*k) int16; ``tabu``: P x (n*k)
        int32; ``f_arr``/``best_f``/``it_arr``/``done_arr``: P; ``rng``: P x blockDim uint32.
        Dynamic shared memory: int16 x (3n [+ n*k when ``gamma_in_shared``]).
        """
        b = cuda.blockIdx.x
        t = cuda.threadIdx.x
        nt = cuda.blockDim.x
        sm = cuda.shared.array(0, dtype=int16)
        col = sm[0:n]
        conf = sm[n : 2 * n]
        cand = sm[2 * n : 3 * n]
        cnt = cuda.shared.array(1, dtype=int32)
        red_d = cuda.shared.array(MAX_THREADS, dtype=int32)
        red_n = cuda.shared.array(MAX_THREADS, dtype=int32)
        red_v = cuda.shared.array(MAX_THREADS, dtype=int32)
        red_c = cuda.shared.array(MAX_THREADS, dtype=int32)
        grow = gamma[b]
        if gamma_in_shared:
            gam = sm[3 * n : 3 * n + n * k]
            for i in range(t, n * k, nt):
                gam[i] = grow[i]
        else:
            gam = grow
        crow = colors[b]
        for v in range(t, n, nt):
            col[v] = crow[v]
        cuda.syncthreads()
        for v in range(t, n, nt):
            conf[v] = gam[v * k + col[v]]
        s = np.int64(rng[b, t])
        cuda.syncthreads()
        f, best, it, done, s = iterate(
            indptr,
            indices,
            n,
            k,
            gam,
            col,
            conf,
            cand,
            cnt,
            red_d,
            red_n,
            red_v,
            red_c,
            tabu[b],
            best_colors[b],
            f_arr[b],
            best_f[b],
            it_arr[b],
            iters,
            tenure_a,
            alpha,
            s,
        )
        cuda.syncthreads()
        for v in range(t, n, nt):
            crow[v] = col[v]
        if gamma_in_shared:
            for i in range(t, n * k, nt):
                grow[i] = gam[i]
        rng[b, t] = s
        if t == 0:
            f_arr[b] = f
            best_f[b] = best
            it_arr[b] = it
            done_arr[b] = done

    return tabu_chains


BATCH = 4  # the default load round; `python -m bench.gpu rates --batches 1,2,4,8` compares them
MAX_BATCH = 8


def tabu_chains_for(batch: int = BATCH):
    """The population kernel for a load round of ``batch`` (1 to MAX_BATCH), built once per process."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"the load round must be 1 to {MAX_BATCH} pairs, got {batch}")
    return _make_tabu_chains(batch)


@cuda.jit(cache=True)
def init_chains(
    indptr, indices, n, k, chains, colors, gamma, tabu, f_arr, best_f, best_colors, it_arr
):  # pragma: no cover - compiled
    """(Re)start the chains named in ``chains`` from their ``colors`` rows: gamma rebuilt,
    tabu cleared, f counted, best = current. One block per listed chain."""
    b = chains[cuda.blockIdx.x]
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    total = cuda.shared.array(1, dtype=int32)
    if t == 0:
        total[0] = 0
    grow = gamma[b]
    trow = tabu[b]
    crow = colors[b]
    for i in range(t, n * k, nt):
        grow[i] = 0
        trow[i] = 0
    cuda.syncthreads()
    mine = 0
    for v in range(t, n, nt):  # each thread owns whole rows: no races
        cv = crow[v]
        for j in range(indptr[v], indptr[v + 1]):
            cu = crow[indices[j]]
            grow[v * k + cu] += 1
            if cu == cv:
                mine += 1
    cuda.atomic.add(total, 0, mine)
    cuda.syncthreads()
    brow = best_colors[b]
    for v in range(t, n, nt):
        brow[v] = crow[v]
    if t == 0:
        f_arr[b] = total[0] // 2
        best_f[b] = total[0] // 2
        it_arr[b] = 0


@cuda.jit(cache=True)
def gpx_children(parents, pa, pb, children, victims, n, k, rng):  # pragma: no cover - compiled
    """Greedy partition crossover, one block per child: alternately take the largest colour
    class left in each parent (rows ``pa[i]``, ``pb[i]`` of ``parents``) as the child's next
    colour; leftover vertices get random colours. The child is written to row
    ``victims[i]`` of ``children`` (never a parent's row). Dynamic shared memory: int32 x
    (n + k)."""
    i = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    sm = cuda.shared.array(0, dtype=int32)
    taken = sm[0:n]
    size = sm[n : n + k]
    pick = cuda.shared.array(1, dtype=int32)
    a = parents[pa[i]]
    bb = parents[pb[i]]
    out = children[victims[i]]
    for v in range(t, n, nt):
        taken[v] = 0
        out[v] = -1
    s = np.int64(rng[i, t])
    cuda.syncthreads()
    for step in range(k):
        for c in range(t, k, nt):
            size[c] = 0
        cuda.syncthreads()
        for v in range(t, n, nt):
            if taken[v] == 0:
                src = a[v] if step % 2 == 0 else bb[v]
                cuda.atomic.add(size, src, 1)
        cuda.syncthreads()
        if t == 0:
            best = 0
            for c in range(1, k):
                if size[c] > size[best]:
                    best = c
            pick[0] = best if size[best] > 0 else -1
        cuda.syncthreads()
        cls = pick[0]
        if cls < 0:
            break
        for v in range(t, n, nt):
            if taken[v] == 0:
                src = a[v] if step % 2 == 0 else bb[v]
                if src == cls:
                    out[v] = step
                    taken[v] = 1
        cuda.syncthreads()
    for v in range(t, n, nt):
        if out[v] < 0:
            s = xorshift(s)
            out[v] = below(s, k)
    rng[i, t] = s


def shared_bytes(n: int, k: int, gamma_in_shared: bool) -> int:
    """Dynamic shared memory of :func:`tabu_chains` for a graph of n vertices at k colours."""
    return 2 * (3 * n + (n * k if gamma_in_shared else 0))


def seed_states(rows: int, cols: int, seed: int) -> np.ndarray:
    """Non-zero 32-bit xorshift states, one per thread."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**32, size=(rows, cols), dtype=np.uint64).astype(np.uint32)
