import math
from fractions import Fraction

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
@pytest.mark.parametrize(("q", "bound"), [(0.5, 1e-4), (0.99, 5e-5), (0.999, 5e-5)])
@pytest.mark.parametrize("seed", [20261122, 3])  # 3: one of the seeds where q = 0.99 is least accurate
def test_rank_error_against_exact_quantiles(kind, q, bound, seed):
    r = np.random.default_rng(seed)
    x = DATA[kind] if seed == 20261122 else (r.lognormal(size=10**6) if kind == "lognormal" else r.random(10**6))
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


@settings(max_examples=80, deadline=None)
@given(
    st.floats(-1e3, 1e3, allow_nan=False),
    st.integers(2, 3000),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=3000),
    st.sampled_from([20, 1000]),
    st.floats(0.001, 0.999),
)
def test_a_value_repeated_many_times_is_a_step_not_a_slope(repeated, times, others, compression, q):
    """A field that is often exactly one value (a run's conflicts: mostly 0) shares one
    centroid for every copy: its quantiles land on that value across its whole share of the
    weight, and the CDF at it counts all of it (before, the copies were spread over +-w/2
    around it: a median of 18.8 for a field that was 0 most of the time)."""
    x = np.r_[np.full(times, repeated), np.asarray(others)]
    d = TDigest(compression=compression, max_discrete=0)
    for i in range(0, x.size, 512):
        d.add_batch(x[i : i + 512])
    xs = np.sort(x)
    share = float(np.mean(x <= repeated))
    # "many times": more of the weight than one centroid may come to hold anywhere (k1: pi / delta for
    # one merge, up to about twice that across batches), so no neighbour can merge into its copies
    # (with fewer, 0.25 and two 0.5s may well be one centroid: its CDF at 0.5 is then a slope)
    if times / x.size > 2 * math.pi / compression:
        assert abs(d.cdf(repeated) - share) <= 0.5 / compression + 1e-9  # all its copies, and what lies below
    inside = (np.mean(x < repeated) + 1e-6, share - 1e-6)
    if compression == 1000 and x.size <= 2 * compression and inside[0] < inside[1]:  # singletons and the one step
        for qq in (inside[0], (inside[0] + inside[1]) / 2, inside[1]):
            assert d.quantile(qq) == repeated
    assert rank_error(xs, d.quantile(q), q) <= max(0.05, 1.0 / x.size)  # one value's rank, for a handful


def test_a_zero_inflated_stream_has_its_true_median():
    x = np.r_[np.zeros(600_000), RNG.lognormal(size=400_000)]
    RNG.shuffle(x)
    d = TDigest()
    for i in range(0, x.size, 1024):
        d.add_batch(x[i : i + 1024])
    assert d.quantile(0.5) == 0.0 and d.quantile(0.3) == 0.0 and d.cdf(0.0) == pytest.approx(0.6, abs=1e-9)
    assert rank_error(np.sort(x), d.quantile(0.9), 0.9) <= 1e-4


def test_merging_a_digest_into_an_exact_one_keeps_the_others_centroids_as_centroids():
    """A digest still exact (few distinct values) that takes in an ordinary one leaves exact
    mode: the other's centroids average several values and are not values themselves."""
    u = RNG.uniform(0, 100, 20_000)
    other = TDigest(compression=20, max_discrete=0)
    other.add_batch(u)
    merged = TDigest().merge(other)
    assert not merged.discrete and merged.count == u.size
    us = np.sort(u)
    for q in (0.1, 0.5, 0.9):
        assert rank_error(us, merged.quantile(q), q) <= 0.02
    back = TDigest.from_msg(decode(encode(merged.to_msg())))
    assert [back.quantile(q) for q in (0.1, 0.5)] == [merged.quantile(q) for q in (0.1, 0.5)]
    older = {k: v for k, v in merged.to_msg().items() if k != "points"}  # a message without the points
    assert TDigest.from_msg(older).count == u.size


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -1.0, 0.0, True, "2"])
def test_a_weight_must_be_a_positive_finite_count(w):
    d = TDigest()
    d.add(1.0)
    with pytest.raises(ValueError, match="weight"):
        d.add(2.0, w)
    assert d.count == 1 and d.quantile(0.5) == 1.0
    with pytest.raises(ValueError, match="nan"):
        d.cdf(float("nan"))


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


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([0.0, 1e6, -3e9, 1e13, 1e15, 2.0**53]),
    st.integers(0, 2**31),
    st.integers(1, 3),
    st.sampled_from([64, 1024]),
)
def test_moments_keep_their_precision_far_from_zero(offset, seed, parts, batch):
    """A series with a large offset and unit noise (timestamps, counters): the variance is as
    precise as the noise allows, in batches and across merges of digests that started apart."""
    x = offset + np.random.default_rng(seed).normal(size=3000)
    pieces = np.array_split(x, parts)
    merged = Moments()
    for piece in pieces:
        m = Moments()
        for i in range(0, piece.size, batch):
            m.add_batch(piece[i : i + batch])
        merged.merge(m)
    exact = np.var(x - x[0], ddof=1)  # the differences are exact here: no offset left to round
    assert merged.count == x.size and merged.min == x.min() and merged.max == x.max()
    assert merged.variance == pytest.approx(exact, rel=1e-6)
    assert merged.mean == pytest.approx(x[0] + np.mean(x - x[0]), rel=1e-15, abs=1e-9)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(-1.79e308, 1.79e308), st.sampled_from([1.7e308, -1.7e308, 1e308, -1e308])),
        min_size=2,
        max_size=40,
    ),
    st.integers(1, 4),
)
def test_moments_near_the_float_limit_of_both_signs_are_numbers_or_infinite_never_nan(values, parts):
    """Values near 1.8e308 of both signs: their differences overflow. The mean is still the
    mean (computed at a quarter of the values' size), a variance past the float64 range is
    +inf, and nothing is NaN, in batches, one by one or merged."""
    x = np.array(values)
    scale = float(np.max(np.abs(x)))
    exact = [Fraction(v) for v in values]  # the reference: exact arithmetic, rounded once
    mean = sum(exact) / len(exact)
    expected_mean = float(mean)
    try:
        expected_var = float(sum((v - mean) ** 2 for v in exact) / (len(exact) - 1))
    except OverflowError:
        expected_var = math.inf
    merged = Moments()
    for piece in np.array_split(x, parts):
        m = Moments()
        m.add_batch(piece)
        merged.merge(m)
    one = Moments()
    for v in values:
        one.add(v)
    for m in (merged, one):
        assert m.count == x.size and m.min == x.min() and m.max == x.max()
        assert m.mean == pytest.approx(expected_mean, abs=max(1e-12 * scale, math.ulp(0.0)))  # a subnormal's tie
        assert not math.isnan(m.variance) and m.variance >= 0
        if math.isinf(expected_var):
            assert m.variance > 1e300
        elif not math.isinf(m.variance):  # rounding at the values' scale is no variance
            noise = 1e-15 * scale
            assert m.variance == pytest.approx(expected_var, rel=1e-6, abs=noise * noise if noise < 1e150 else math.inf)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(10**6), 10**6).map(lambda i: i / 1000), min_size=2, max_size=60),  # 0 or >= 1e-3
    st.sampled_from([2.0**-600, 2.0**-520, 2.0**-300, 2.0**300, 2.0**520, 2.0**600]),
    st.integers(1, 4),
)
def test_moments_and_ewma_do_not_depend_on_the_fields_scale(values, k, parts):
    """The same series times a power of two (exact) has its std times that power, and the
    same z-scores: squares of spreads past 1e154 used to overflow (std inf), below 1e-154 to
    vanish (std 0, every value then infinitely far)."""
    x = np.array(values)
    ref, scaled = Moments(), Moments()
    for piece in np.array_split(x, parts):
        ref.add_batch(piece)
        m = Moments()
        m.add_batch(piece * k)
        scaled.merge(m)
    assert scaled.std == pytest.approx(ref.std * k, rel=1e-9, abs=1e-12 * k)
    assert scaled.mean == pytest.approx(ref.mean * k, rel=1e-9, abs=1e-12 * k)
    e1, e2 = Ewma(0.1), Ewma(0.1)
    z1 = np.concatenate([e1.update(p) for p in np.array_split(x, parts)])
    z2 = np.concatenate([e2.update(p * k) for p in np.array_split(x, parts)])
    finite = np.isfinite(z1)
    assert np.array_equal(finite, np.isfinite(z2)) and np.array_equal(np.isnan(z1), np.isnan(z2))
    assert z2[finite] == pytest.approx(z1[finite], rel=1e-9, abs=1e-9)
    assert e2.mean == pytest.approx(e1.mean * k, rel=1e-9, abs=1e-12 * k)


def test_the_std_of_a_field_near_1e300_or_1e_300_is_its_own():
    for values, std in (([1e200, 2e200, 3e200], 1e200), ([1e-170, 3e-170], math.sqrt(2) * 1e-170)):
        m = Moments()
        m.add_batch(values)
        assert m.std == pytest.approx(std, rel=1e-12)
    m = Moments()
    m.add_batch([1e200, 2e200, 3e200])
    assert m.variance == math.inf  # 1e400: past float64's range, said so


@pytest.mark.parametrize(
    "values",
    [[0.0, 1e-310], [0.0, 1e-308], [5e-324, 1e300], [1e-200, 1e200], [1e-310] * 5 + [1e300], [1.7e308, -1.7e308, 0.0]],
)
def test_an_ewma_takes_any_finite_values(values):
    """Magnitudes from subnormal to the float limit in one series: numbers or infinities,
    never a crash (a change of scale used to divide by an underflowed ratio)."""
    e = Ewma(0.1)
    z = e.update(np.array(values))
    assert np.isnan(z[0]) and not np.isnan(z[1:]).any()
    assert math.isfinite(e.mean) and e.seen == len(values)


def test_ewma_tracks_a_level_shift():
    e = Ewma(alpha=0.2)
    z = e.update(np.r_[np.full(200, 10.0) + RNG.normal(0, 0.1, 200), [20.0]])
    assert abs(z[-1]) > 10
    with pytest.raises(ValueError, match="lambda"):
        Ewma(0)
