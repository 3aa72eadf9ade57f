import math
import threading
import warnings

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst
from scipy import stats as st

from actors import Actor, Topics
from actors.anomaly import AnomalyDetection, anomaly_metrics, get_anomalies
from actors.messages import decode, encode
from actors.sampler import Sampler, check_sampling
from actors.streaming_metrics import StreamingMetrics, get_streaming_metrics
from telemetry import stats
from telemetry.schema import rows_to_batch

S = 1_000_000
T0 = 1_800_000_000 * S


class Sink(Actor):
    """Collects forwarded batches (and sampling figures)."""

    def __init__(self):
        super().__init__()
        self.batches, self.sampling, self.got = [], [], threading.Event()

    def handle_events(self, msg):
        self.batches.append(msg)
        self.got.set()

    def handle_sampling(self, msg):
        self.sampling.append(msg)

    def handle_counters(self, msg):
        pass

    def handle_rows(self, msg):
        out = []
        for b in self.batches:
            out += [int(s) for s in b["seq"]]
        return out

    def handle_batches(self, msg):
        return list(self.batches)

    def handle_figures(self, msg):
        return list(self.sampling)

    def handle_anomalous(self, msg):
        return [i for b in self.batches for i, a in b.get("sparse", {}).get("anomaly", []) if a["flag"]]


def batch(values, start_seq=0, ts0=T0, dt=1000, names=None, success=None, phase="tabu"):
    n = len(next(iter(values.values())))
    rows = []
    for i in range(n):
        r = {
            "seq": start_seq + i,
            "ts": ts0 + i * dt,
            "name": names[i] if names else "step",
            "phase": phase,
            "values": {k: float(v[i]) for k, v in values.items() if not np.isnan(v[i])},
        }
        if success is not None:
            r["success"] = bool(success[i])
        rows.append(r)
    return decode(encode(rows_to_batch(rows, "exp", "run")))


# --- StreamingMetrics -------------------------------------------------------------------------


def test_streaming_metrics_whole_run_and_windows():
    now = [T0 / S + 3600]
    sm = StreamingMetrics.start("exp", publish_interval=0, clock=lambda: now[0])
    rng = np.random.default_rng(1)
    old = rng.normal(100, 5, 5000)
    new = rng.normal(10, 1, 5000)
    # the old values are 30 minutes old, the new ones within the last minute
    sm.tell_bytes(encode(batch({"latency_ms": old}, ts0=T0 + 1800 * S, dt=10)))
    sm.tell_bytes(
        encode(
            batch(
                {"latency_ms": new, "cost_usd": np.full(5000, 0.01)},
                start_seq=5000,
                ts0=T0 + 3570 * S,
                dt=10,
                success=np.arange(5000) % 100 != 0,
            )
        )
    )
    snap = get_streaming_metrics(sm)
    both = np.r_[old, new]
    f = snap["fields"]["latency_ms"]
    assert f["count"] == 10000
    assert f["mean"] == pytest.approx(both.mean())
    assert f["std"] == pytest.approx(both.std(ddof=1))
    assert abs(np.mean(both <= f["p50"]) - 0.5) < 1e-3  # rank error (the median falls in the gap)
    assert abs(np.mean(both <= f["p99"]) - 0.99) < 1e-3
    one_min = snap["windows"]["60s"]["latency_ms"]
    assert one_min["count"] == 5000 and one_min["mean"] == pytest.approx(new.mean())
    assert snap["windows"]["3600s"]["latency_ms"]["count"] == 10000
    assert snap["success_rate"] == pytest.approx(0.99)
    assert snap["sla"] == {"99": True, "99.9": False, "99.99": False}
    assert snap["totals"]["cost_usd"] == pytest.approx(50.0)
    assert snap["by_name"] == {"step": 10000}
    sm.stop()


def test_streaming_metrics_publishes_on_the_metrics_topic():
    topics = Topics()
    sink_got = threading.Event()

    class Snap(Actor):
        def handle_metrics(self, msg):
            if msg["events"] == 3:
                sink_got.set()

    s = Snap.start()
    topics.subscribe("metrics", s)
    sm = StreamingMetrics.start("exp", topics, publish_interval=0.05)
    sm.tell_bytes(encode(batch({"x": np.array([1.0, np.nan, np.inf])})))
    assert sink_got.wait(5)
    snap = sm.ask({"kind": "get"})
    assert snap["fields"]["x"]["count"] == 1 and snap["rejected_values"] == 1
    sm.stop()
    s.stop()


def test_streaming_metrics_rejects_bad_settings():
    with pytest.raises(ValueError, match="windows"):
        StreamingMetrics("exp", windows=(0,))
    for bad in (-1, math.nan, math.inf, 1e300, "1", True):  # a bad timer would crash the actor later
        with pytest.raises(ValueError, match="publish_interval"):
            StreamingMetrics("exp", publish_interval=bad)


# --- Sampler ------------------------------------------------------------------------------------


def run_sampler(strategy, config, batches, seed=7):
    sink = Sink.start()
    s = Sampler.start("exp", sink, strategy, config, seed=seed)
    for b in batches:
        s.tell_bytes(encode(b))
    counts = s.ask({"kind": "flush"})
    rows = sink.ask({"kind": "rows"})
    s.stop()
    sink.stop()
    return counts, rows


def test_default_keeps_everything():
    counts, rows = run_sampler("all", {}, [batch({"x": np.arange(100.0)})])
    assert rows == list(range(100)) and counts["sampled_out"] == 0


def test_uniform_rate():
    bs = [batch({"x": np.arange(1000.0)}, start_seq=k * 1000) for k in range(20)]
    counts, rows = run_sampler("uniform", {"rate": 0.1}, bs)
    assert 1700 < len(rows) < 2300
    assert counts["sampled_out"] + len(rows) == 20_000


def test_reservoir_exact_size_and_uniform():
    bs = [batch({"x": np.arange(1000.0)}, start_seq=k * 1000) for k in range(10)]
    hits = np.zeros(10)
    for seed in range(30):
        counts, rows = run_sampler("reservoir", {"k": 200}, bs, seed=seed)
        assert len(rows) == 200 and len(set(rows)) == 200
        assert counts["sampled_out"] == 10_000 - 200
        hits += np.bincount(np.array(rows) // 1000, minlength=10)
    # every tenth of the stream is equally likely to be in the reservoir
    assert st.chisquare(hits).pvalue > 0.001


def test_stratified_rates_per_stratum():
    n = 20_000
    success = np.arange(n) % 10 != 0  # 10 % errors
    b = batch({"x": np.arange(float(n))}, success=success)
    counts, rows = run_sampler("stratified", {"by": "success", "rates": {"false": 1.0, "true": 0.1}}, [b])
    kept = np.array(rows)
    errors_kept = np.sum(kept % 10 == 0)
    assert errors_kept == 2000  # all errors
    assert 1500 < len(kept) - errors_kept < 2100  # ~10 % of 18,000 successes
    assert counts["kept"]["false"] == 2000


def test_min_samples_guarantee():
    _counts, rows = run_sampler("uniform", {"rate": 0.0, "min_samples": 25}, [batch({"x": np.arange(100.0)})])
    assert rows == list(range(25))


def test_reservoir_keeps_min_samples_and_draws_k_from_the_rest():
    """The first 100 events go on whatever k is; the reservoir's 10 come uniformly from the other 900."""
    bs = [batch({"x": np.arange(100.0)}, start_seq=k * 100) for k in range(10)]
    hits = np.zeros(9)
    for seed in range(40):
        counts, rows = run_sampler("reservoir", {"k": 10, "min_samples": 100}, bs, seed=seed)
        assert rows[:100] == list(range(100)) and len(rows) == 110 and len(set(rows)) == 110
        assert counts["sampled_out"] == 890 and counts["held"] == 0 and counts["kept"] == {"step": 110}
        hits += np.bincount(np.array(rows[100:]) // 100 - 1, minlength=9)
    assert st.chisquare(hits).pvalue > 0.001


def test_reservoir_min_samples_per_stratum_and_accounting_while_it_holds():
    names = ["step", "call"] * 50
    sink = Sink.start()
    s = Sampler.start("exp", sink, "reservoir", {"k": 5, "min_samples": 3}, seed=1)
    s.tell_bytes(encode(batch({"x": np.arange(100.0)}, names=names)))
    counts = s.ask({"kind": "counts"})
    assert sink.ask({"kind": "rows"}) == []  # held with the sample: nothing may go ahead of it
    assert counts["held"] == 6 + 5 and counts["sampled_out"] == 100 - 6 - 5
    figures = sink.ask({"kind": "figures"})[-1]
    assert figures["held"] == 11 and figures["sampled_out"] == 89  # the figures, alone
    counts = s.ask({"kind": "flush"})
    rows = sink.ask({"kind": "rows"})
    assert len(rows) == 11 and rows == sorted(rows) and rows[:6] == [0, 1, 2, 3, 4, 5]  # the first 3 of each
    assert counts["sampled_out"] == 89 and counts["held"] == 0
    s.stop()
    sink.stop()


def test_importance_keeps_the_tail():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 50_000)
    x[40_000] = 50.0
    bs = [batch({"lat": x[i : i + 1000]}, start_seq=i) for i in range(0, 50_000, 1000)]
    _counts, rows = run_sampler("importance", {"field": "lat", "quantile": 0.99, "base_rate": 0.0}, bs)
    assert 40_000 in rows
    assert len(rows) < 2500


def test_adaptive_rate_follows_anomaly_flags():
    b = batch({"x": np.arange(2000.0)}, dt=1000)
    b["sparse"]["anomaly"] = [[1000, {"flag": True, "score": 5.0}]]
    _counts, rows = run_sampler("adaptive", {"base_rate": 0.0, "anomaly_rate": 1.0, "cooldown_s": 0.1}, [b])
    assert rows == list(range(1000, 1101))  # the flagged event and the cooldown after it


@pytest.mark.parametrize(
    ("strategy", "cfg", "match"),
    [
        ("sometimes", {}, "sampling.strategy: unknown strategy"),
        ("uniform", {"rate": 1.5}, r"rate must be a rate in \[0, 1\]"),
        ("reservoir", {"k": 0}, "k must be an int > 0"),
        ("uniform", {"rate": 0.5, "colour": 1}, r"sampling\.config: unknown key"),
        ("stratified", {"rates": {}}, "rates"),
        ("all", {"seed": 1.5}, r"sampling\.config\.seed must be an integer in \[0, 4294967295\], got 1\.5"),
        ("all", {"seed": -1}, r"sampling\.config\.seed must be an integer"),
        ("all", {"min_samples": 2**70}, r"sampling\.config\.min_samples must be an integer"),
        (
            "adaptive",
            {"base_rate": 0.5, "cooldown_s": 1e308},
            r"sampling\.config\.cooldown_s must be in \[0, 31536000\]",
        ),
        ("adaptive", {"base_rate": 0.5, "cooldown_s": float("nan")}, r"sampling\.config\.cooldown_s"),
    ],
)
def test_bad_sampling_config(strategy, cfg, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(strategy, cfg)


# --- AnomalyDetection ---------------------------------------------------------------------------------


def injected(n=20_000, every=997, seed=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(50, 2, n)
    idx = np.arange(500, n, every)
    x[idx] += rng.choice([-1, 1], idx.size) * rng.uniform(15, 30, idx.size)
    return x, set(idx.tolist())


@pytest.mark.parametrize("method", ["z_score", "modified_z", "iqr", "ewma"])
def test_detection_recall_and_false_positive_rate(method):
    x, truth = injected()
    sink = Sink.start()
    ad = AnomalyDetection.start("exp", sink, methods=[method], metrics=["lat"])
    for i in range(0, x.size, 1000):
        ad.tell_bytes(encode(batch({"lat": x[i : i + 1000]}, start_seq=i, ts0=T0 + i * 1000)))
    flagged = set(i for i in (a["seq"] for a in get_anomalies(ad, timeout=60)))
    recall = len(flagged & truth) / len(truth)
    fpr = len(flagged - truth) / (x.size - len(truth))
    assert recall >= 0.9, recall
    assert fpr <= 0.01, fpr
    m = anomaly_metrics(ad)
    assert m["total"] == len(flagged) and m["by_type"][method] == len(flagged)
    assert m["periods"] and all(p["count"] >= 1 for p in m["periods"])
    assert len(sink.ask({"kind": "anomalous"})) == len(flagged)  # flags travel downstream with the events
    ad.stop()
    sink.stop()


def test_isolation_forest_multivariate():
    rng = np.random.default_rng(9)
    X = rng.normal(0, 1, (6000, 3))
    X[3000] = [3.2, 3.2, 3.2]
    X[4500] = [-3.2, 3.2, -3.2]  # jointly far out: rare in every direction at once
    ad = AnomalyDetection.start(
        "exp",
        methods=["isolation_forest"],
        metrics=["a", "b", "c"],
        threshold={"isolation_forest": 0.005},
        refit_every=1000,
    )
    for i in range(0, 6000, 500):
        cols = {k: X[i : i + 500, j] for j, k in enumerate("abc")}
        ad.tell_bytes(encode(batch(cols, start_seq=i)))
    flagged = {x["seq"] for x in get_anomalies(ad, timeout=60)}  # answered after every fit queued before it
    assert {3000, 4500} <= flagged
    assert len(flagged) < 100
    assert anomaly_metrics(ad)["by_type"] == {"isolation_forest": len(flagged)}
    ad.stop()


def test_one_threshold_for_all_methods_leaves_the_forest_its_contamination():
    """``threshold = 3`` with isolation_forest among the methods: 3 is a z cut-off, not a share of
    outliers (scikit-learn would refuse it at the first fit and the detector would crash)."""
    rng = np.random.default_rng(4)
    X = rng.normal(0, 1, (3000, 2))
    X[2000] = [40.0, 40.0]
    ad = AnomalyDetection.start(
        "exp", methods=["z_score", "isolation_forest"], metrics=["a", "b"], threshold=3.0, refit_every=1000
    )
    for i in range(0, 3000, 500):
        ad.tell_bytes(encode(batch({"a": X[i : i + 500, 0], "b": X[i : i + 500, 1]}, start_seq=i)))
    flagged = {x["seq"] for x in get_anomalies(ad, timeout=60)}
    assert 2000 in flagged
    assert set(anomaly_metrics(ad)["by_type"]) == {"z_score", "isolation_forest"}
    assert ad.is_alive()
    ad.stop()


def test_anomaly_topic_and_sample_more_action():
    topics = Topics()
    got = threading.Event()

    class Watch(Actor):
        def handle_anomalies(self, msg):
            got.set()

        def handle_anomaly_period(self, msg):
            pass

    w = Watch.start()
    topics.subscribe("anomalies", w)
    sink = Sink.start()
    samp = Sampler.start("exp", sink, "uniform", {"rate": 0.0})
    ad = AnomalyDetection.start("exp", samp, topics, methods=["z_score"], action="sample_more")
    x, truth = injected(5000)
    for i in range(0, 5000, 500):
        ad.tell_bytes(encode(batch({"lat": x[i : i + 500]}, start_seq=i)))
    assert got.wait(5)
    flagged = {a["seq"] for a in get_anomalies(ad)}  # the detector has forwarded every batch
    samp.ask({"kind": "counts"})  # and the sampler has passed on what it kept
    kept = set(sink.ask({"kind": "rows"}))
    assert kept == flagged  # a zero rate keeps exactly what the detector flagged
    assert truth <= flagged
    for r in (ad, samp, sink, w):
        r.stop()


def test_a_detector_without_warmup_judges_nothing_against_no_values():
    from actors.anomaly import METHODS, _FieldState

    det = AnomalyDetection("exp", methods=[m for m in METHODS if m != "isolation_forest"], warmup=0)
    st = _FieldState(det.window, det.ewma_lambda)
    first = det._score_field(st, np.array([1.0, 2.0, 3.0]))  # the first two: learnt, not judged
    assert all(not s[:2].any() for s in first.values())
    later = det._score_field(st, np.array([2.0, 1e9]))  # judged against the first three
    assert later["z_score"][1] > 1 and later["iqr"][1] > 1 and later["z_score"][0] < 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"methods": ["magic"]}, r"anomaly\.methods: unknown method"),
        ({"action": "panic"}, r"anomaly\.action: unknown action"),
        ({"threshold": -1}, "threshold"),
        ({"window": 2}, "window"),
    ],
)
def test_bad_anomaly_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        AnomalyDetection("exp", **kw)


class _Notes:
    def __init__(self):
        self.told = []

    def tell(self, msg, urgent=False):
        self.told.append(msg)
        return True


def test_a_metric_no_event_carries_is_said_once_naming_the_fields_seen():
    notes = _Notes()
    det = AnomalyDetection("exp", metrics=["latncy_ms", "score"], notes_to=notes, unseen_after=3)
    det.on_events(batch({"latency_ms": np.ones(5), "score": np.ones(5)}))
    det.on_events(batch({"steps": np.ones(2)}, start_seq=5))  # batches of other fields count too
    assert notes.told == []  # not yet: the fields may still come
    det.on_events(batch({"latency_ms": np.ones(5)}, start_seq=7))
    (note,) = notes.told  # the third batch carrying values made the check
    assert note["kind"] == "note" and note["name"] == "anomaly_unseen_metrics"
    assert note["values"] == {"unseen_metrics": 1.0}
    assert "anomaly.metrics: latncy_ms in none of the first 12 events (3 batches)" in note["notes"]
    assert "latency_ms, score, steps" in note["notes"]
    for i in range(5):
        det.on_events(batch({"other": np.ones(5)}, start_seq=200 + 5 * i))
    assert len(notes.told) == 1 and det.handle_anomaly_metrics({})["unseen_metrics"] == ["latncy_ms"]
    det.on_events(batch({"latncy_ms": np.ones(3)}, start_seq=300))  # seen at last: off the list
    assert det.handle_anomaly_metrics({})["unseen_metrics"] == []


def test_a_run_too_short_for_the_check_is_judged_on_all_its_events_at_its_end():
    """The check waits for ``unseen_after`` batches; a run that ends before that is judged as
    its events end (the phase asks ``last_notes``), once, and only when some values came."""
    notes = _Notes()
    det = AnomalyDetection("exp", metrics=["latncy_ms", "score"], notes_to=notes, unseen_after=20)
    assert det.handle_last_notes({}) == []  # no values yet: nothing to judge by
    det.on_events(batch({"latency_ms": np.ones(5), "score": np.ones(5)}))
    det.on_events(batch({"steps": np.ones(2)}, start_seq=5))
    (note,) = det.handle_last_notes({})
    assert notes.told == []  # answered, not told: the phase records it before its events close
    assert note["name"] == "anomaly_unseen_metrics" and note["values"] == {"unseen_metrics": 1.0}
    assert "anomaly.metrics: latncy_ms in none of the run's 7 events (2 batches)" in note["notes"]
    assert "latency_ms, score, steps" in note["notes"]
    assert det.handle_last_notes({}) == []  # said once
    det.on_events(batch({"other": np.ones(5)}, start_seq=7))
    assert notes.told == [] and det.handle_anomaly_metrics({})["unseen_metrics"] == ["latncy_ms"]


def test_the_end_of_a_run_says_nothing_when_the_check_was_made_or_all_were_seen():
    notes = _Notes()
    det = AnomalyDetection("exp", metrics=["latncy_ms"], notes_to=notes, unseen_after=2)
    for i in range(2):
        det.on_events(batch({"latency_ms": np.ones(5)}, start_seq=5 * i))
    assert len(notes.told) == 1 and det.handle_last_notes({}) == []  # made at the second batch
    for metrics, enabled in ((["latency_ms"], True), (None, True), (["latncy_ms"], False)):
        det = AnomalyDetection("exp", metrics=metrics, enabled=enabled, unseen_after=20)
        det.on_events(batch({"latency_ms": np.ones(5)}))
        assert det.handle_last_notes({}) == []


def test_metrics_every_event_carries_or_none_configured_say_nothing():
    for metrics in (["latency_ms"], None):
        notes = _Notes()
        det = AnomalyDetection("exp", metrics=metrics, notes_to=notes, unseen_after=2)
        for i in range(4):
            det.on_events(batch({"latency_ms": np.ones(5)}, start_seq=5 * i))
        assert notes.told == [] and det.handle_anomaly_metrics({})["unseen_metrics"] == []


def test_nan_values_never_crash_the_detector():
    ad = AnomalyDetection.start("exp", methods=list(("z_score", "modified_z", "iqr", "ewma")))
    ad.tell_bytes(encode(batch({"x": np.array([np.nan] * 10 + [1.0] * 40 + [np.inf])})))
    assert anomaly_metrics(ad)["total"] == 0
    ad.stop()


# --- statistics -------------------------------------------------------------------------------------------

A = [19.5, 21.2, 20.1, 22.3, 18.9, 20.7, 21.8, 19.9, 20.4, 21.1]
B = [22.1, 23.4, 21.9, 24.0, 22.8, 23.1, 21.7, 22.5, 23.9, 22.2]


def test_stats_match_scipy():
    assert stats.welch_t(A, B)["p_value"] == pytest.approx(st.ttest_ind(A, B, equal_var=False).pvalue)
    assert stats.paired_t(A, B)["p_value"] == pytest.approx(st.ttest_rel(A, B).pvalue)
    assert stats.mann_whitney(A, B)["p_value"] == pytest.approx(st.mannwhitneyu(A, B).pvalue)
    lo, hi = stats.t_interval(A)
    assert (lo, hi) == pytest.approx(st.t.interval(0.95, 9, loc=np.mean(A), scale=st.sem(A)))
    blo, bhi = stats.bootstrap_interval(A, n_resamples=2000)
    assert blo < np.mean(A) < bhi


def test_effect_sizes_worked_example():
    # pooled sd of A and B by hand
    a, b = np.array(A), np.array(B)
    sp = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    d = (b.mean() - a.mean()) / sp
    assert stats.cohens_d(A, B) == pytest.approx(d)
    assert stats.hedges_g(A, B) == pytest.approx(d * (1 - 3 / (4 * 20 - 9)))


def test_power_and_sample_size_published_values():
    # Cohen (1988): d = 0.5, alpha = 0.05 two-sided, power 0.80 -> 64 per group
    assert stats.sample_size_two_sample(0.5, 0.8) == 64
    assert stats.power_two_sample(0.5, 64) == pytest.approx(0.80, abs=0.01)
    assert stats.sample_size_two_sample(0.8, 0.8) == 26


def test_compare_runs_on_a_metric():
    ctl = [{"values": {"colors": v}} for v in A]
    trt = [{"values": {"colors": v}} for v in B]
    r = stats.compare(ctl, trt, metric="colors")
    assert r["p_value"] < 0.001 and r["effect_size"] > 1.5
    assert r["ci"][0] < np.mean(B) - np.mean(A) < r["ci"][1]
    with pytest.raises(ValueError, match="at least 2"):
        stats.compare([1.0], [2.0, 3.0])


def test_a_test_that_is_undefined_answers_nan_without_a_warning():
    """Two constant samples (a metric that never moved): no variance, no test; the answer is
    NaN, and scipy's RuntimeWarning does not reach the user's terminal."""
    import warnings

    from telemetry import stats as ts

    same = np.full(30, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for result in (ts.welch_t(same, same), ts.paired_t(same, same + 0.0)):
            assert math.isnan(result["p_value"])
        lo, hi = ts.t_interval(same)
        assert (math.isnan(lo) and math.isnan(hi)) or lo == hi == 4.0


def test_paired_comparison_drops_a_pair_with_a_gap_on_either_side_whole():
    """A missing value in row 3 of the control and row 40 of the treatment: dropped per side,
    every pair after row 3 would meet the wrong partner."""
    rng = np.random.default_rng(0)
    c = rng.normal(0, 1, 50)
    t = c + 0.3 + rng.normal(0, 0.1, 50)
    c[3], t[40] = np.nan, np.inf
    whole = np.isfinite(c) & np.isfinite(t)
    ref = st.ttest_rel(t[whole], c[whole])
    r = stats.compare(c, t, paired=True)
    assert r["p_value"] == pytest.approx(ref.pvalue) and r["p_value"] < 1e-20
    assert r["statistic"] == pytest.approx(ref.statistic)
    assert r["pairs_dropped"] == 2 and r["n_control"] == r["n_treatment"] == 48
    assert r["ci"] == pytest.approx(st.ttest_rel(t[whole], c[whole]).confidence_interval())
    p = stats.paired_t(c, t)
    assert p["p_value"] == pytest.approx(ref.pvalue) and p["pairs_dropped"] == 2
    assert stats.compare(c, t)["pairs_dropped"] is None


@settings(max_examples=60, deadline=None)
@given(
    hst.lists(
        hst.tuples(
            # rounded: no value so tiny that the reference's squares underflow (1e-192 ** 2 == 0)
            hst.one_of(hst.floats(-1e6, 1e6).map(lambda v: round(v, 6)), hst.just(math.nan), hst.just(math.inf)),
            hst.one_of(hst.floats(-1e6, 1e6).map(lambda v: round(v, 6)), hst.just(math.nan), hst.just(-math.inf)),
        ),
        min_size=2,
        max_size=40,
    )
)
def test_paired_tests_equal_scipy_on_the_whole_pairs(rows):
    a, b = (np.array(col, dtype=float) for col in zip(*rows, strict=True))
    whole = np.isfinite(a) & np.isfinite(b)
    if whole.sum() < 2:
        with pytest.raises(ValueError, match="at least 2 pairs"):
            stats.paired_t(a, b)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = st.ttest_rel(a[whole], b[whole])
    got = stats.paired_t(a, b)
    assert got["pairs_dropped"] == int((~whole).sum())
    assert got["df"] == whole.sum() - 1
    if math.isnan(ref.pvalue):
        assert math.isnan(got["p_value"])
    else:
        assert got["p_value"] == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)


def test_paired_samples_of_different_lengths_are_an_error_naming_both():
    with pytest.raises(ValueError, match=r"same length, got 3 \(control\) and 2 \(treatment\)"):
        stats.compare([1.0, 2.0, 3.0], [1.0, 2.0], paired=True)
    with pytest.raises(ValueError, match=r"same length, got 4 \(a\) and 3 \(b\)"):  # a gap is no excuse
        stats.paired_t([1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("paired", [False, True])
def test_compare_signs_every_figure_treatment_minus_control(paired):
    ctl, trt = np.array([10, 11, 12, 10.5]), np.array([20, 21, 22.5, 20.5])
    r = stats.compare(ctl, trt, paired=paired)
    ref = st.ttest_rel(trt, ctl) if paired else st.ttest_ind(trt, ctl, equal_var=False)
    assert r["statistic"] == pytest.approx(ref.statistic) and r["statistic"] > 0
    assert r["ci"][0] > 0 and r["cohens_d"] > 0 and r["effect_size"] > 0
    assert stats.compare(trt, ctl, paired=paired)["statistic"] == pytest.approx(-ref.statistic)


def test_bootstrap_interval_near_the_float64_limit_neither_overflows_nor_warns():
    x = np.array([1.7e308, 1.6e308, 1.65e308, 1.7e308, 1.5e308])
    s = 2.0**1023
    ref = st.bootstrap((x / s,), np.mean, n_resamples=999, random_state=np.random.default_rng(0), method="BCa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = stats.bootstrap_interval(x, n_resamples=999)
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low * s, ref.confidence_interval.high * s))
    assert x.min() <= lo < np.mean(x / s) * s < hi <= x.max()


def test_bootstrap_interval_of_a_statistic_that_does_not_scale_with_the_data():
    x = np.array([1.0, 2.5, 3.0, 4.0, 5.5, 7.0])
    ref = st.bootstrap((x,), np.var, n_resamples=999, random_state=np.random.default_rng(0), method="BCa")
    got = stats.bootstrap_interval(x, statistic=np.var, n_resamples=999)
    assert got == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    med = st.bootstrap((x,), np.median, n_resamples=999, random_state=np.random.default_rng(0), method="BCa")
    assert stats.bootstrap_interval(x, statistic=np.median, n_resamples=999) == pytest.approx(
        (med.confidence_interval.low, med.confidence_interval.high)
    )


def _ar1(phi: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


def test_compare_warns_when_a_runs_values_follow_each_other():
    """Per-event values of one run (a search's conflicts step after step) are serially
    correlated: the tests' p-values assume they are not, so compare says so, with the lag-1
    autocorrelation and what the values are worth as independent ones; independent values
    get no warning."""
    a, b = _ar1(0.9, 2000, 1), _ar1(0.9, 1500, 2) + 0.3
    r = stats.compare(list(a), list(b))
    assert r["serial_correlation"]["control"] == pytest.approx(0.9, abs=0.05)
    assert r["serial_correlation"]["treatment"] == pytest.approx(0.9, abs=0.05)
    expected = a.size * (1 - r["serial_correlation"]["control"]) / (1 + r["serial_correlation"]["control"])
    assert r["n_effective"]["control"] == pytest.approx(expected)
    assert r["warning"] and "serially correlated" in r["warning"] and "2000 values worth about" in r["warning"]
    rng = np.random.default_rng(3)
    calm = stats.compare(list(rng.normal(size=2000)), list(rng.normal(size=1500)))
    assert calm["warning"] is None and calm["n_effective"]["control"] > 0.9 * 2000
    paired = stats.compare(list(a), list(a + _ar1(0.95, 2000, 4)), paired=True)
    assert set(paired["serial_correlation"]) == {"differences"} and paired["warning"]
    assert stats.lag1(np.array([1.0, 1.0, 1.0])) is None and stats.lag1(np.array([1.0, 2.0])) is None


def test_values_on_either_side_of_a_missing_one_are_no_neighbours():
    """A value recorded as not finite is a gap in the series: a run whose every other value is
    NaN has no neighbours at all, not the strong correlation of the values two steps apart.
    Events without the field are no observations of it (passed over), while an event whose
    value was not finite (its ``nonfinite`` mark) is a gap."""
    x = np.arange(400.0)
    x[1::2] = np.nan  # a ramp, every other value missing
    assert stats.lag1(x) is None  # no two finite values side by side
    assert stats.lag1(x[np.isfinite(x)]) > 0.9  # read without the gaps: neighbours that were not
    ar = _ar1(0.9, 3000, 5)
    holes = ar.copy()
    holes[::7] = np.nan
    assert stats.lag1(holes) == pytest.approx(stats.lag1(ar), abs=0.03)
    assert stats.effective_size(holes, 0.0) == int(np.isfinite(holes).sum())
    steps = [{"name": "step", "values": {"loss": v}} for v in (1.0, 9.0, 2.0)]
    events = [steps[0], {"name": "phase_start", "values": {}}, steps[1], {"name": "step", "nonfinite": {"loss": "nan"}}]
    got = stats._metric_values([*events, steps[2]], "loss")
    assert np.array_equal(got, [1.0, 9.0, np.nan, 2.0], equal_nan=True)
    assert stats._metric_values(events, "loss", rows=True).size == 4


def test_compare_reads_gaps_in_a_run_from_its_nonfinite_marks(tmp_path):
    """The CLI's values keep a NaN where an event's value was not finite: compare's serial
    correlation pairs no values across it, and its count of values counts the finite ones."""
    from cli.runs import metric_values

    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for i in range(40):
        ev = {"seq": i, "ts": i, "name": "step", "run_id": "r", "experiment": "e", "values": {"loss": float(i % 2)}}
        if i % 2:
            ev["values"] = {}
            ev["nonfinite"] = {"loss": "nan"}
        rows.append(orjson.dumps(ev).decode())
    (run / "events.jsonl").write_text("\n".join(rows) + "\n")
    got = metric_values(run, "loss")
    assert len(got) == 40 and sum(math.isnan(v) for v in got) == 20


@pytest.mark.parametrize(
    ("strategy", "cfg"),
    [("uniform", {"rate": 0.0}), ("stratified", {"by": "name", "rates": {"call": 0.0}, "default_rate": 0.0})],
)
def test_the_runs_record_is_never_sampled_out(strategy, cfg):
    """A control action, a pause mark or a phase's end is the run's record, not a sample of a
    measurement: a strategy that keeps nothing still keeps them."""
    names = ["call"] * 50 + ["control", "paused", "unpaused", "phase_end"]
    b = batch({"x": np.arange(54.0)}, names=names)
    _counts, rows = run_sampler(strategy, cfg, [b])
    assert rows == [50, 51, 52, 53]


@settings(max_examples=15, deadline=None)
@given(
    hst.lists(hst.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
    hst.sampled_from(
        [
            ("uniform", {"rate": 0.0}),
            ("uniform", {"rate": 0.3}),
            ("reservoir", {"k": 3}),
            ("importance", {"field": "y"}),
        ]
    ),
    hst.integers(1, 5),
    hst.integers(0, 2**16),
)
def test_a_sampled_runs_extremes_are_the_runs_own(tmp_path_factory, values, strategy, parts, seed):
    """Whatever the strategy drops, the Recorder's min, max and best (over the events not
    marked failed) are those of every event emitted, not of the sample it persists: the
    Sampler sends the extremes of what it drops with its figures."""
    from actors.recorder import Recorder

    x = np.array(values)
    success = np.random.default_rng(seed).random(x.size) < 0.8
    rec = Recorder.start(tmp_path_factory.mktemp("rec"), "exp", "run", maximize=["y"])
    s = Sampler.start("exp", rec, *strategy, seed=seed)
    try:
        start = 0
        for piece, ok in zip(np.array_split(x, parts), np.array_split(success, parts), strict=True):
            if piece.size:
                s.tell_bytes(encode(batch({"x": piece, "y": piece}, start_seq=start, success=ok)))
                start += piece.size
        s.ask({"kind": "flush"})
        rec.ask({"kind": "flush"})
        summary = rec.ask({"kind": "summary"})
    finally:
        s.stop()
        rec.stop()
    (ph,) = summary["phases"].values()
    assert ph["min"]["x"] == x.min() and ph["max"]["x"] == x.max()
    if success.any():
        assert ph["best"]["x"] == x[success].min() and ph["best"]["y"] == x[success].max()  # y is maximised
    else:
        assert "x" not in ph["best"]
    assert summary["events_persisted"] + summary["events_sampled_out"] == x.size


def test_a_restarted_recorder_keeps_the_extremes_of_what_was_sampled_out(tmp_path):
    """The dropped events are in no file a restarted Recorder (a resumed run) rebuilds from:
    their extremes live in recorder.json."""
    from actors.recorder import Recorder

    rec = Recorder.start(tmp_path, "exp", "run")
    s = Sampler.start("exp", rec, "uniform", {"rate": 0.0, "min_samples": 1})
    s.tell_bytes(encode(batch({"x": np.array([5.0, -3.0, 9.0])}, success=np.array([True, True, False]))))
    s.ask({"kind": "flush"})
    rec.ask({"kind": "flush"})
    s.stop()
    rec.stop()
    again = Recorder.start(tmp_path, "exp", "run")
    try:
        (ph,) = again.ask({"kind": "summary"})["phases"].values()
    finally:
        again.stop()
    assert (ph["min"]["x"], ph["max"]["x"], ph["best"]["x"], ph["max_ok"]["x"]) == (-3.0, 9.0, -3.0, 5.0)
    assert ph["events"] == 1  # the one min_samples kept, on disk


def test_an_interval_past_the_float_range_says_whether_the_difference_or_the_spread_is():
    wide = stats.compare([1.7e308, -1.7e308, 1.7e308], [1.7e308, -1.7e308, 1.6e308])
    assert math.isinf(wide["ci"][1]) and "the values spread so wide" in wide["note"]
    far = stats.compare([-1.7e308, -1.6e308, -1.5e308], [1.7e308, 1.6e308, 1.5e308])
    assert math.isinf(far["ci"][1]) and "is beyond the float64 range" in far["note"]


def test_a_reservoir_with_guarantees_and_the_runs_record_reaches_the_disk_whole(tmp_path):
    """Through a real Recorder, which takes no event older than one it has written: the k, the
    min_samples guarantees and the record (phase_start at seq 0, phase_end last) all arrive."""
    from actors.recorder import Recorder
    from telemetry.jsonl import iter_run

    rec = Recorder.start(tmp_path, "exp", "run")
    s = Sampler.start("exp", rec, "reservoir", {"k": 5, "min_samples": 3}, seed=1)
    names = ["phase_start"] + ["call"] * 30 + ["phase_end"] + ["warn"]
    s.tell_bytes(encode(batch({"x": np.arange(float(len(names)))}, names=names)))
    s.ask({"kind": "flush"})
    rec.ask({"kind": "flush"})
    on_disk = [(e["seq"], e["name"]) for e in iter_run(tmp_path / "exp" / "run")]
    summary = rec.ask({"kind": "summary"})
    s.stop()
    rec.stop()
    assert on_disk[0] == (0, "phase_start") and (31, "phase_end") in on_disk and (32, "warn") in on_disk
    calls = [q for q, n in on_disk if n == "call"]
    assert len(calls) == 3 + 5 and calls[:3] == [1, 2, 3]  # min_samples' three, and the k
    assert summary["events_persisted"] == len(on_disk) == 11 and summary["events_lost_in_transit"] == 0


def test_the_extremes_of_a_batch_of_very_many_phases_and_fields_stay_within_what_a_message_may_carry():
    """50 phases x 100 fields: past MAX_EXTREMES rows the message carrying them would be
    refused whole, and the batch's kept events with it; the first ones are sent."""
    from telemetry.schema import MAX_EXTREMES, batch_extremes, check_sampling_figures

    rows = [
        {"seq": i, "ts": i, "name": "s", "phase": f"p{i % 50}", "values": {f"f{j}": float(j) for j in range(100)}}
        for i in range(200)
    ]
    b = decode(encode(rows_to_batch(rows, "exp", "run")))
    ext = batch_extremes(b, np.ones(200, dtype=bool))
    assert len(ext) == MAX_EXTREMES
    check_sampling_figures({"extremes": ext})
