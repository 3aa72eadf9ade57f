import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.index import LiveIndex
from telemetry.query import metrics_of, windowed_metrics_arrays
from telemetry.schema import full_event, rows_to_batch
from telemetry.store import HistoryStore

S = 1_000_000  # one second in microseconds
T0 = 1_700_000_000 * S


def make_rows(ts_list, phases=("a", "b"), run_id="run"):
    rows = []
    for i, ts in enumerate(ts_list):
        rows.append(full_event({
            "v": 1, "seq": i, "ts": int(ts), "experiment_id": "exp", "run_id": run_id, "pass": 0,
            "phase": phases[i % len(phases)], "step": i, "name": "tick" if i % 3 else "eval",
            "values": {"x": float(i)} if i % 4 else {"x": float(i), "y": 2.0 * i},
            "success": i % 5 != 0, "parameters": {"k": i % 2},
        }))
    return rows


def sources(rows, tmp_path, batch=7):
    idx = LiveIndex("exp")
    store = HistoryStore(tmp_path / "h.sqlite3")
    from actors.messages import encode

    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        b = rows_to_batch(part, "exp", part[0]["run_id"])
        idx.append_batch(b)
        store.insert_batch("exp", part[0]["run_id"], [part[0]["seq"], part[-1]["seq"]],
                           min(r["ts"] for r in part), max(r["ts"] for r in part), encode(b), n=len(part))
    store.commit()
    return {"live": lambda spec, f=None, now=None: idx.query(spec, f, now),
            "history": lambda spec, f=None, now=None: store.query("exp", spec, f, now)}


@pytest.fixture
def data(tmp_path):
    rows = make_rows([T0 + k * S for k in range(100)])  # one event per second for 100 s
    return rows, sources(rows, tmp_path)


@pytest.mark.parametrize("src", ["live", "history"])
def test_range_is_half_open(data, src):
    _rows, q = data
    got = q[src](("range", T0 / S + 10, T0 / S + 20))
    assert [r["seq"] for r in got] == list(range(10, 20))  # t0 included, t1 excluded
    aware = dt.datetime.fromtimestamp(T0 / S + 10, dt.UTC)
    assert [r["seq"] for r in q[src](("range", aware, aware + dt.timedelta(seconds=1)))] == [10]


@pytest.mark.parametrize("src", ["live", "history"])
def test_last_duration_includes_lower_bound(data, src):
    rows, q = data
    now = T0 + 99 * S
    got = q[src](("last", 1, "minutes"), None, now)
    assert [r["seq"] for r in got] == list(range(39, 100))
    assert q[src](("last", 2, "s"), None, now) == rows[97:]


@pytest.mark.parametrize("src", ["live", "history"])
def test_last_n_and_filters(data, src):
    rows, q = data
    assert q[src](("last_n", 5)) == rows[-5:]
    assert q[src](("last_n", 0)) == []
    want = [r for r in rows if r["phase"] == "a" and r["name"] == "tick" and r["success"]][-4:]
    assert q[src](("last_n", 4), {"phase": "a", "name": "tick", "success": True}) == want
    assert q[src](("last_n", 3), {"parameters.k": 1}) == [r for r in rows if r["parameters"]["k"] == 1][-3:]
    assert q[src](("last_n", 3), {"run_id": "nope"}) == []


@pytest.mark.parametrize("src", ["live", "history"])
def test_sliding_windows(data, src):
    _rows, q = data
    wins = q[src](("sliding", 30, "seconds", 30))
    assert [w["window_start"] for w in wins] == [T0, T0 + 30 * S, T0 + 60 * S, T0 + 90 * S]
    assert [len(w["events"]) for w in wins] == [30, 30, 30, 10]


@pytest.mark.parametrize("spec", [("last", 5), ("last", -1, "minutes"), ("last", 5, "weeks"), ("range", 2, 1),
                                  ("sliding", 5, "minutes", 0), ("last_n", -3), ("between", 1, 2), "last", ()])
def test_bad_window_specs_name_the_accepted_forms(data, spec):
    _, q = data
    with pytest.raises(ValueError, match="accepted forms"):
        q["live"](spec)


def test_unknown_filter_is_an_error(data):
    _, q = data
    with pytest.raises(ValueError, match="unknown filter 'colour'"):
        q["live"](("last_n", 1), {"colour": "red"})


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 120 * S), min_size=1, max_size=200),
    window=st.sampled_from([1, 5, 10, 30]),
    step=st.sampled_from([1, 5, 10, 25]),
)
def test_windowed_metrics_equals_brute_force(tmp_path_factory, offsets, window, step):
    ts = np.sort(np.array(offsets, dtype=np.int64) + T0)
    rng = np.random.default_rng(len(offsets))
    x = rng.lognormal(size=ts.size)
    x[rng.random(ts.size) < 0.2] = np.nan  # some events lack the field
    got = windowed_metrics_arrays(ts, {"x": x}, window, step)
    starts = list(range(int(ts[0]), int(ts[-1]) + 1, step * S))
    assert [g["window_start"] for g in got] == starts
    for g, s in zip(got, starts, strict=True):
        inside = (ts >= s) & (ts < s + window * S)
        vals = x[inside & ~np.isnan(x)]
        m = g["metrics"]["x"]
        assert g["count"] == int(inside.sum())
        assert m["count"] == vals.size
        if vals.size:
            assert m["mean"] == pytest.approx(vals.mean())
            assert m["sum"] == pytest.approx(vals.sum())
            for p in (50, 95, 99):
                assert m[f"p{p}"] == pytest.approx(np.percentile(vals, p))


@pytest.mark.parametrize("src", ["live", "history"])
def test_windowed_metrics_same_on_both_stores(tmp_path, src):
    rows = make_rows([T0 + k * S // 2 for k in range(60)])
    idx = LiveIndex("exp")
    idx.append_batch(rows_to_batch(rows, "exp", "run"))
    live = idx.windowed_metrics(10, 5)
    assert metrics_of(np.array([np.nan]))["count"] == 0
    store = HistoryStore(tmp_path / "h.sqlite3")
    from actors.messages import encode

    store.insert_batch("exp", "run", [0, 59], rows[0]["ts"], rows[-1]["ts"],
                       encode(rows_to_batch(rows, "exp", "run")), n=60)
    hist = store.windowed_metrics("exp", 10, 5)
    assert live == hist
    assert live[0]["metrics"]["x"]["count"] == 20


def test_live_index_is_bounded_and_keeps_newest(tmp_path):
    idx = LiveIndex("exp", limit=100)
    rows = make_rows([T0 + k for k in range(1000)])
    for i in range(0, 1000, 50):
        idx.append_batch(rows_to_batch(rows[i:i + 50], "exp", "run"))
    assert idx.n <= 100
    assert idx.query(("last_n", 3)) == rows[-3:]
