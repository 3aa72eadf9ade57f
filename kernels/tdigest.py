"""The merging t-digest (Dunning & Ertl, 2019) in numba, with an exact discrete mode.

* Values are buffered and merged in sorted order into centroids whose sizes are bounded
  by a scale function: ``k1`` (arcsine, the default) or ``k2`` (logistic). ``compression``
  (delta) bounds the number of centroids (at most about ``2 * delta``).
* A large batch is sorted by numpy and merged in one pass; small batches fill the buffer.
* Discrete data: while a digest has seen at most ``max_discrete`` distinct values it keeps
  exact counts (value -> count) and answers quantiles exactly (inverse CDF: the smallest
  value whose cumulative count reaches ``q * n``, numpy's ``inverted_cdf``). A die-roll
  stream therefore gives a die value as its median, never 3.5. Beyond ``max_discrete``
  distinct values it turns into an ordinary t-digest. In centroid mode identical values
  always merge (their mean stays exact), and a centroid whose values all equal its mean (a
  point mass, ``points``) is a step over its whole share of the weight, not an
  interpolation anchor (section 2.9 of the paper, for any weight, not only single values).
* NaN and infinite values are counted in ``rejected`` and never enter the digest.

``to_dict`` / ``update_from_dict`` speak the ``tdigest`` package's format
(``{"n", "delta", "K", "centroids": [{"m", "c"}, ...]}``); ``to_msg`` / ``from_msg``
give a msgpack-ready dict with numpy arrays.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

SCALES = ("k1", "k2")


@njit(cache=True, nogil=True)
def _k(q, delta, scale, total):  # pragma: no cover - compiled
    if scale == 1:
        return delta / (2.0 * math.pi) * math.asin(2.0 * q - 1.0)
    q = min(max(q, 1e-15), 1.0 - 1e-15)
    z = 4.0 * math.log(max(total / delta, 1.0)) + 24.0
    return delta / z * math.log(q / (1.0 - q))


@njit(cache=True, nogil=True)
def _kinv(k, delta, scale, total):  # pragma: no cover - compiled
    if scale == 1:
        x = k * 2.0 * math.pi / delta
        if x >= math.pi / 2:
            return 1.0
        return (math.sin(x) + 1.0) / 2.0
    z = 4.0 * math.log(max(total / delta, 1.0)) + 24.0
    return 1.0 / (1.0 + math.exp(-k * z / delta))


@njit(cache=True, nogil=True)
def _merge_compress(am, aw, ap, an, bm, bw, bp, bn, unit, total, delta, scale, out_m, out_w, out_p):  # pragma: no cover
    """Stream two mean-sorted lists (``b`` of unit weights, each a point, when ``unit``)
    through the compression pass without materialising their merge; return the centroid
    count. ``*p`` mark point masses: centroids whose every value equals their mean."""
    i = 0
    j = 0
    k = 0
    started = False
    cur_m = 0.0
    cur_w = 0.0
    cur_p = True
    so_far = 0.0
    limit = total * _kinv(_k(0.0, delta, scale, total) + 1.0, delta, scale, total)
    while i < an or j < bn:
        if j >= bn or (i < an and am[i] <= bm[j]):
            m = am[i]
            w = aw[i]
            p = ap[i]
            i += 1
        else:
            m = bm[j]
            w = 1.0 if unit else bw[j]
            p = True if unit else bp[j]
            j += 1
        if not started:
            cur_m = m
            cur_w = w
            cur_p = p
            started = True
        elif so_far + cur_w + w <= limit or m == cur_m or k >= out_m.shape[0] - 1:
            cur_p = cur_p and p and m == cur_m
            cur_w += w  # (the last clause is a guard: never write past the output arrays)
            cur_m += (m - cur_m) * w / cur_w
        else:
            out_m[k] = cur_m
            out_w[k] = cur_w
            out_p[k] = cur_p
            k += 1
            so_far += cur_w
            limit = total * _kinv(_k(so_far / total, delta, scale, total) + 1.0, delta, scale, total)
            cur_m = m
            cur_w = w
            cur_p = p
    if started:
        out_m[k] = cur_m
        out_w[k] = cur_w
        out_p[k] = cur_p
        k += 1
    return k


@njit(cache=True, nogil=True)
def _runs_up_to(v, limit):  # pragma: no cover - compiled
    """Number of runs of equal values in sorted ``v``, counting no further than ``limit + 1``."""
    if v.shape[0] == 0:
        return 0
    runs = 1
    for i in range(1, v.shape[0]):
        if v[i] != v[i - 1]:
            runs += 1
            if runs > limit:
                return runs
    return runs


@njit(cache=True, nogil=True)
def _merge_unique(av, ac, an, bv, bc, bn, ov, oc):  # pragma: no cover - compiled
    """Merge two sorted distinct-value tables, adding the counts of equal values."""
    i = 0
    j = 0
    k = 0
    while i < an and j < bn:
        if av[i] < bv[j]:
            ov[k] = av[i]
            oc[k] = ac[i]
            i += 1
        elif bv[j] < av[i]:
            ov[k] = bv[j]
            oc[k] = bc[j]
            j += 1
        else:
            ov[k] = av[i]
            oc[k] = ac[i] + bc[j]
            i += 1
            j += 1
        k += 1
    while i < an:
        ov[k] = av[i]
        oc[k] = ac[i]
        i += 1
        k += 1
    while j < bn:
        ov[k] = bv[j]
        oc[k] = bc[j]
        j += 1
        k += 1
    return k


@njit(cache=True, nogil=True)
def _anchors(m, w, p, n, total, vmin, vmax):  # pragma: no cover - compiled
    """The digest's estimate of its inverse CDF as (cumulative weight, value) anchors, linear
    between them: a point mass of weight ``w`` at ``v`` holds ``v`` over its whole share of
    the weight (a step), any other centroid sits at the middle of its share (section 2.9 of
    the paper), and the extreme values are one sample each at either end."""
    cum = np.empty(2 * n + 4)
    val = np.empty(2 * n + 4)
    k = 0
    if not p[0]:
        cum[0], val[0], cum[1], val[1] = 0.0, vmin, 1.0, vmin
        k = 2
    so_far = 0.0
    for i in range(n):
        if p[i]:
            cum[k], val[k], cum[k + 1], val[k + 1] = so_far, m[i], so_far + w[i], m[i]
            k += 2
        else:
            mid = so_far + w[i] / 2.0
            if i == 0:
                mid = max(mid, 1.0)
            if i == n - 1:
                mid = min(mid, total - 1.0)
            cum[k], val[k] = mid, m[i]
            k += 1
        so_far += w[i]
    if not p[n - 1]:
        cum[k], val[k], cum[k + 1], val[k + 1] = total - 1.0, vmax, total, vmax
        k += 2
    return cum[:k], val[:k]


@njit(cache=True, nogil=True)
def _quantile(m, w, p, n, total, vmin, vmax, q):  # pragma: no cover - compiled
    if n == 0:
        return np.nan
    if q <= 0.0:
        return vmin
    if q >= 1.0:
        return vmax
    cum, val = _anchors(m, w, p, n, total, vmin, vmax)
    x = q * total
    j = np.searchsorted(cum, x, "left")  # the first anchor that reaches x: the smallest value there
    if j >= cum.shape[0]:
        return val[cum.shape[0] - 1]
    if j == 0 or cum[j] == x:
        return val[j]
    return val[j - 1] + (x - cum[j - 1]) / (cum[j] - cum[j - 1]) * (val[j] - val[j - 1])


@njit(cache=True, nogil=True)
def _cdf(m, w, p, n, total, vmin, vmax, x):  # pragma: no cover - compiled
    """The fraction at or below ``x`` on the same anchors as :func:`_quantile`: all of a
    point mass at ``x`` counts (its step's top), linear between anchors of different values."""
    if n == 0:
        return np.nan
    if x < vmin:
        return 0.0
    if x >= vmax:
        return 1.0
    cum, val = _anchors(m, w, p, n, total, vmin, vmax)
    j = np.searchsorted(val, x, "right") - 1  # the last anchor whose value is at or below x
    if j < 0:
        return 0.0
    if val[j] == x or j >= val.shape[0] - 1:
        return cum[j] / total
    return (cum[j] + (x - val[j]) / (val[j + 1] - val[j]) * (cum[j + 1] - cum[j])) / total


class TDigest:
    """A mergeable quantile sketch; see the module docs."""

    def __init__(
        self, compression: float = 1000.0, scale: str = "k1", max_discrete: int = 100, buffer_size: int | None = None
    ) -> None:
        if not (isinstance(compression, (int, float)) and compression >= 10):
            raise ValueError(f"compression must be a number >= 10, got {compression!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if not isinstance(max_discrete, int) or max_discrete < 0:
            raise ValueError(f"max_discrete must be an int >= 0, got {max_discrete!r}")
        self.compression = float(compression)
        self.scale = scale
        self._scale_code = 1 if scale == "k1" else 2
        self.max_discrete = max_discrete
        self.cap = int(2 * compression) + 16
        self.means = np.zeros(self.cap)
        self.weights = np.zeros(self.cap)
        self.points = np.ones(self.cap, dtype=np.bool_)  # centroids whose every value equals their mean
        self.n = 0  # centroids (or distinct values in discrete mode)
        self.discrete = max_discrete > 0
        self.buf_cap = buffer_size or max(1024, int(5 * compression))
        self.buf = np.zeros(self.buf_cap)
        self.buf_n = 0
        self.total = 0.0  # weight merged into the centroids / discrete table
        self.min = math.inf
        self.max = -math.inf
        self.rejected = 0  # NaN / inf values refused

    # --- adding ------------------------------------------------------------------------

    @property
    def count(self) -> float:
        """Total weight (number of values) added, including the buffer."""
        return self.total + self.buf_n

    def add(self, x: float, w: float = 1.0) -> None:
        """Add ``x``, ``w`` times (a weight is a positive finite count: ValueError otherwise)."""
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w < math.inf):
            raise ValueError(f"a weight must be a positive finite number, got {w!r:.80}")
        if not math.isfinite(x):
            self.rejected += 1
            return
        if w != 1.0:
            self._absorb_weighted(np.array([x]), np.array([float(w)]), np.ones(1, dtype=np.bool_))
            return
        if self.buf_n == self.buf_cap:
            self._flush()
        self.buf[self.buf_n] = x
        self.buf_n += 1

    def add_batch(self, values: Any) -> None:
        """Add many values (any array-like of numbers); non-finite values are rejected."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        ok = np.isfinite(v)
        if not ok.all():
            self.rejected += int(v.size - ok.sum())
            v = v[ok]
        if v.size >= self.buf_cap // 2:
            self._flush()
            self._absorb_sorted(np.sort(v), None, None)
            return
        if self.buf_n + v.size > self.buf_cap:
            self._flush()
        self.buf[self.buf_n : self.buf_n + v.size] = v
        self.buf_n += v.size

    def _flush(self) -> None:
        if self.buf_n:
            v = np.sort(self.buf[: self.buf_n])
            self.buf_n = 0
            self._absorb_sorted(v, None, None)

    def _absorb_sorted(self, v: np.ndarray, w: np.ndarray | None, p: np.ndarray | None) -> None:
        """Merge mean-sorted values (weights 1 when ``w`` is None) into the digest; ``p`` marks
        the weighted ones that are point masses (another digest's centroids may not be)."""
        if v.size == 0:
            return
        self.min = min(self.min, float(v[0]))
        self.max = max(self.max, float(v[-1]))
        if w is None:
            if self.discrete:
                if _runs_up_to(v, self.max_discrete) <= self.max_discrete:  # v is sorted: few distinct values?
                    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
                    self._absorb_discrete(v[starts], np.diff(np.r_[starts, v.size]).astype(np.float64))
                    return
                self._to_centroids()
            self._absorb_centroids(v, None, None)
            return
        assert p is not None
        if self.discrete and p.all():  # exact values with counts: the table takes them
            vals, inv = np.unique(v, return_inverse=True)
            self._absorb_discrete(vals, np.bincount(inv, weights=w))
            return
        if self.discrete:  # a centroid that averages several values is no exact value
            self._to_centroids()
        self._absorb_centroids(v, w, p)

    def _absorb_discrete(self, vals: np.ndarray, counts: np.ndarray) -> None:
        size = self.n + vals.size
        ov, oc = np.empty(size), np.empty(size)
        k = _merge_unique(self.means, self.weights, self.n, vals, counts, vals.size, ov, oc)
        self.total += float(counts.sum())
        if k <= self.max_discrete:
            if k > self.cap:
                self._grow(k)
            self.means[:k], self.weights[:k], self.n = ov[:k], oc[:k], k
            return
        self.means[: min(k, self.cap)], self.weights[: min(k, self.cap)] = 0.0, 0.0
        self.discrete = False  # too many distinct values: an ordinary t-digest from now on
        self.n = 0
        self.total = 0.0  # all the weight is in (ov, oc): re-absorb it as centroids
        self._absorb_centroids(ov[:k], oc[:k], np.ones(k, dtype=np.bool_))

    def _to_centroids(self) -> None:
        """Leave discrete mode: the exact table becomes the first centroids."""
        m, w = self.means[: self.n].copy(), self.weights[: self.n].copy()
        self.discrete = False
        self.n = 0
        self.total = 0.0
        if m.size:
            self._absorb_centroids(m, w, np.ones(m.size, dtype=np.bool_))

    def _grow(self, k: int) -> None:
        self.cap = max(k, self.cap * 2)
        self.means = np.resize(self.means, self.cap)
        self.weights = np.resize(self.weights, self.cap)
        self.points = np.resize(self.points, self.cap)

    def _absorb_centroids(self, m: np.ndarray, w: np.ndarray | None, p: np.ndarray | None) -> None:
        """Merge mean-sorted centroids (unit weights, each a point, when ``w`` is None) and compress."""
        self.total += float(m.size if w is None else w.sum())
        if self.cap < int(2 * self.compression) + 16:
            self._grow(int(2 * self.compression) + 16)
        om, ow, op = np.empty(self.cap), np.empty(self.cap), np.empty(self.cap, dtype=np.bool_)
        unit = w is None
        self.n = _merge_compress(
            self.means,
            self.weights,
            self.points,
            self.n,
            m,
            m if unit else w,
            np.ones(1, dtype=np.bool_) if unit else p,
            m.size,
            unit,
            self.total,
            self.compression,
            self._scale_code,
            om,
            ow,
            op,
        )
        self.means, self.weights, self.points = om, ow, op

    def _absorb_weighted(self, m: np.ndarray, w: np.ndarray, p: np.ndarray) -> None:
        order = np.argsort(m, kind="stable")
        self._flush()
        self._absorb_sorted(m[order], w[order], p[order])

    def merge(self, other: TDigest) -> TDigest:
        """Fold ``other`` into this digest (``other`` is left unchanged); return self."""
        other._flush()
        self._flush()
        self.rejected += other.rejected
        if other.n:
            n = other.n
            self._absorb_weighted(other.means[:n].copy(), other.weights[:n].copy(), other.points[:n].copy())
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    # --- answering ----------------------------------------------------------------------------

    def quantile(self, q: float) -> float:
        """The value at quantile ``q`` in [0, 1] (NaN when empty)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        self._flush()
        if self.n == 0:
            return math.nan
        if self.discrete:
            cum = np.cumsum(self.weights[: self.n])
            i = int(np.searchsorted(cum, q * self.total, "left"))
            return float(self.means[min(i, self.n - 1)]) if q > 0 else self.min
        return float(_quantile(self.means, self.weights, self.points, self.n, self.total, self.min, self.max, q))

    def quantiles(self, qs: Any) -> list[float]:
        return [self.quantile(float(q)) for q in qs]

    def cdf(self, x: float) -> float:
        """Estimated fraction of values <= ``x`` (ValueError for NaN)."""
        if math.isnan(x):
            raise ValueError("cdf needs a number, got nan")
        self._flush()
        if self.n == 0:
            return math.nan
        if self.discrete:
            i = int(np.searchsorted(self.means[: self.n], x, "right"))
            return float(self.weights[:i].sum() / self.total)
        return float(_cdf(self.means, self.weights, self.points, self.n, self.total, self.min, self.max, float(x)))

    def centroids(self) -> tuple[np.ndarray, np.ndarray]:
        """(means, weights) after merging the buffer."""
        self._flush()
        return self.means[: self.n].copy(), self.weights[: self.n].copy()

    def __len__(self) -> int:
        self._flush()
        return self.n

    # --- exchange --------------------------------------------------------------------------------

    def to_msg(self) -> dict[str, Any]:
        m, w = self.centroids()
        return {
            "compression": self.compression,
            "scale": self.scale,
            "max_discrete": self.max_discrete,
            "discrete": self.discrete,
            "means": m,
            "weights": w,
            "points": self.points[: self.n].copy(),
            "min": self.min,
            "max": self.max,
            "rejected": self.rejected,
        }

    @classmethod
    def from_msg(cls, d: dict[str, Any]) -> TDigest:
        t = cls(d["compression"], d["scale"], d["max_discrete"])
        m, w = np.asarray(d["means"], dtype=np.float64), np.asarray(d["weights"], dtype=np.float64)
        t.discrete = bool(d["discrete"])
        if m.size > t.cap:
            t._grow(m.size)
        t.means[: m.size], t.weights[: m.size], t.n = m, w, m.size
        # a message without them (an older sender): only single values are known to be points
        pts = d.get("points")
        t.points[: m.size] = np.asarray(pts, dtype=np.bool_) if pts is not None else (w == 1.0)
        t.total = float(w.sum())
        t.min, t.max, t.rejected = float(d["min"]), float(d["max"]), int(d.get("rejected", 0))
        return t

    def to_dict(self) -> dict[str, Any]:
        """The ``tdigest`` package's dict format."""
        m, w = self.centroids()
        return {
            "n": round(self.total),
            "delta": 1.0 / self.compression,
            "K": 25,
            "centroids": [{"m": float(a), "c": float(b)} for a, b in zip(m, w, strict=True)],
        }

    def update_from_dict(self, d: dict[str, Any]) -> TDigest:
        """Merge a digest in the ``tdigest`` package's dict format into this one; return self."""
        cents = d.get("centroids")
        if not isinstance(cents, list):
            raise ValueError("tdigest dict needs a 'centroids' list of {'m', 'c'}")
        if not cents:
            return self
        m = np.array([float(c["m"]) for c in cents])
        w = np.array([float(c["c"]) for c in cents])
        if not (np.isfinite(m).all() and np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("tdigest dict has non-finite means or non-positive counts")
        self._absorb_weighted(m, w, w == 1.0)  # the format says nothing of points: single values are
        return self
