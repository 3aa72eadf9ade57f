import numpy as np
import pytest
import tdigest as tdigest_pkg
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.messages import decode, encode
from kernels.moments import Ewma, Moments
from kernels.tdigest import TDigest


def rank_error(sorted_x, v, q):
    """Distance from q to the rank interval [F(v-), F(v)] of value v in the data."""
    n = sorted_x.size
    lo, hi = np.searchsorted(sorted_x, v, "left") / n, np.searchsorted(sorted_x, v, "right") / n
    return 0.0 if lo <= q <= hi else min(abs(lo - q), abs(hi - q))


RNG = np.random.default_rng(20261122)
DATA = {
    "lognormal": RNG.lognormal(size=1_000_000),
    "uniform": RNG.random(1_000_000),
}


@pytest.mark.parametrize("kind", ["lognormal", "uniform"])
@pytest.mark.parametrize(("q", "bound"), [(0.5, 1e-4), (0.99, 2e-5), (0.999, 2e-5)])
def test_rank_error_against_exact_quantiles(kind, q, bound):
    x = DATA[kind]
    d = TDigest()
    for i in range(0, x.size, 1024):  # as the actors feed it: 1,024-value batches
        d.add_batch(x[i : i + 1024])
    assert rank_error(np.sort(x), d.quantile(q), q) <= bound


def test_discrete_values_are_exact():
    rolls = RNG.integers(1, 7, 200_001).astype(float)
    d = TDigest()
    d.add_batch(rolls)
    for q in (0.1, 0.5, 0.9, 0.99):
        assert d.quantile(q) == np.quantile(rolls, q, method="inverted_cdf")
    assert d.quantile(0.5) in (3.0, 4.0)  # a die value, never 3.5
    assert d.cdf(3.0) == pytest.approx(np.mean(rolls <= 3))


def test_many_distinct_integers_stay_close():
    x = RNG.integers(0, 5000, 500_000).astype(float)
    d = TDigest()
    d.add_batch(x)
    assert not d.discrete
    xs = np.sort(x)
    for q in (0.5, 0.99):
        assert rank_error(xs, d.quantile(q), q) <= 2e-4


def test_merged_digests_match_single_stream():
    x = DATA["lognormal"][:400_000]
    parts = [TDigest() for _ in range(4)]
    for i, p in enumerate(parts):
        p.add_batch(x[i * 100_000 : (i + 1) * 100_000])
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    single = TDigest()
    single.add_batch(x)
    xs = np.sort(x)
    assert merged.count == single.count == x.size
    for q in (0.5, 0.9, 0.99):
        assert rank_error(xs, merged.quantile(q), q) <= 5e-4
        assert rank_error(xs, single.quantile(q), q) <= 1e-4


def test_centroid_count_bounded_after_ten_million_values():
    d = TDigest(compression=100)
    chunk = RNG.lognormal(size=1_000_000)
    for k in range(10):
        d.add_batch(chunk * (1 + k * 1e-3))
    assert d.count == 10_000_000
    assert len(d) <= 2 * 100 + 16


def test_nan_and_inf_are_counted_and_excluded():
    d = TDigest()
    d.add_batch([1.0, np.nan, 2.0, np.inf, -np.inf, 3.0])
    d.add(float("nan"))
    assert d.rejected == 4
    assert d.count == 3
    assert d.quantile(1.0) == 3.0


def test_msgpack_and_tdigest_package_exchange():
    x = DATA["uniform"][:50_000]
    d = TDigest(compression=200)
    d.add_batch(x)
    back = TDigest.from_msg(decode(encode(d.to_msg())))
    assert back.quantile(0.5) == d.quantile(0.5)
    theirs = tdigest_pkg.TDigest()
    theirs.update_from_dict(d.to_dict())  # they read ours
    assert abs(theirs.percentile(50) - d.quantile(0.5)) < 0.01
    ours = TDigest().update_from_dict(theirs.to_dict())  # we read theirs
    assert ours.count == pytest.approx(x.size)
    assert abs(ours.quantile(0.9) - 0.9) < 0.01
    with pytest.raises(ValueError, match="centroids"):
        TDigest().update_from_dict({"n": 3})


@pytest.mark.parametrize("bad", [{"compression": 5}, {"scale": "k9"}, {"max_discrete": -1}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        TDigest(**bad)
    with pytest.raises(ValueError, match="quantile"):
        TDigest().quantile(1.5)


@settings(max_examples=60)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=400),
    st.floats(0, 1),
    st.sampled_from(["k1", "k2"]),
)
def test_quantiles_within_range_and_monotone(values, q, scale):
    d = TDigest(compression=20, scale=scale, max_discrete=0)
    d.add_batch(values)
    v = d.quantile(q)
    assert min(values) <= v <= max(values)
    assert d.quantile(min(1.0, q + 0.1)) >= v - 1e-9 * max(1.0, abs(v))
    assert 0.0 <= d.cdf(v) <= 1.0


@settings(max_examples=60)
@given(st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=50), min_size=1, max_size=8))
def test_moments_batches_equal_one_pass(batches):
    m = Moments()
    for b in batches:
        m.add_batch(b)
    allv = np.array([x for b in batches for x in b])
    assert m.count == allv.size
    if allv.size:
        assert m.mean == pytest.approx(allv.mean(), abs=1e-9)
        assert m.min == allv.min() and m.max == allv.max()
    if allv.size > 1:
        assert m.variance == pytest.approx(allv.var(ddof=1), rel=1e-9, abs=1e-9)


def test_ewma_tracks_a_level_shift():
    e = Ewma(alpha=0.2)
    z = e.update(np.r_[np.full(200, 10.0) + RNG.normal(0, 0.1, 200), [20.0]])
    assert abs(z[-1]) > 10
    with pytest.raises(ValueError, match="lambda"):
        Ewma(0)
