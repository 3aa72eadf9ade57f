import datetime as dt
import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.messages import decode, encode
from telemetry.index import LiveIndex
from telemetry.query import (
    QueryError,
    QueryLimitError,
    Window,
    metrics_of,
    prepare_query,
    query_answer,
    query_error,
    windowed_metrics_arrays,
)
from telemetry.schema import full_event, rows_to_batch

pytest_plugins = ["tests.pg_server"]  # fixtures history_kind, history_target, new_store: both stores

S = 1_000_000  # one second in microseconds
T0 = 1_700_000_000 * S


def make_rows(ts_list, phases=("a", "b"), run_id="run"):
    rows = []
    for i, ts in enumerate(ts_list):
        rows.append(
            full_event(
                {
                    "v": 1,
                    "seq": i,
                    "ts": int(ts),
                    "experiment_id": "exp",
                    "run_id": run_id,
                    "pass": 0,
                    "phase": phases[i % len(phases)],
                    "step": i,
                    "name": "tick" if i % 3 else "eval",
                    "values": {"x": float(i)} if i % 4 else {"x": float(i), "y": 2.0 * i},
                    "success": i % 5 != 0,
                    "parameters": {"k": i % 2},
                }
            )
        )
    return rows


def sources(rows, store, batch=7):
    idx = LiveIndex("exp")

    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        b = rows_to_batch(part, "exp", part[0]["run_id"])
        idx.append_batch(b)
        store.insert_batch(
            "exp",
            part[0]["run_id"],
            [part[0]["seq"], part[-1]["seq"]],
            min(r["ts"] for r in part),
            max(r["ts"] for r in part),
            encode(b),
            n=len(part),
        )
    store.commit()
    return {
        "live": lambda spec, f=None, now=None, **limits: idx.query(spec, f, now, **limits),
        "history": lambda spec, f=None, now=None, **limits: store.query("exp", spec, f, now, **limits),
    }


@pytest.fixture
def data(new_store):
    rows = make_rows([T0 + k * S for k in range(100)])  # one event per second for 100 s
    return rows, sources(rows, new_store())


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


@pytest.mark.parametrize(
    "spec",
    [
        ("last", 5),
        ("last", -1, "minutes"),
        ("last", 5, "weeks"),
        ("range", 2, 1),
        ("sliding", 5, "minutes", 0),
        ("last_n", -3),
        ("between", 1, 2),
        "last",
        (),
    ],
)
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


def test_windowed_metrics_same_on_both_stores(new_store):
    rows = make_rows([T0 + k * S // 2 for k in range(60)])
    idx = LiveIndex("exp")
    idx.append_batch(rows_to_batch(rows, "exp", "run"))
    live = idx.windowed_metrics(10, 5)
    assert metrics_of(np.array([np.nan]))["count"] == 0
    store = new_store()
    store.insert_batch(
        "exp", "run", [0, 59], rows[0]["ts"], rows[-1]["ts"], encode(rows_to_batch(rows, "exp", "run")), n=60
    )
    store.commit()
    hist = store.windowed_metrics("exp", 10, 5)
    assert live == hist
    assert live[0]["metrics"]["x"]["count"] == 20


def test_damaged_batches_in_the_history_are_skipped_and_counted(new_store):
    """A stored batch that is not msgpack, or msgpack of another shape, is skipped by every
    read (as a bad JSONL line is) and counted; the other batches answer as before."""
    rows = make_rows([T0 + k * S for k in range(60)])
    store = new_store()
    src = sources(rows, store)
    want = {
        "last_n": src["history"](["last_n", 1000]),
        "range": src["history"](["range", T0 / S, T0 / S + 30]),
        "run": list(store.iter_events(run_id="run")),
        "experiment": list(store.iter_events(experiment_id="exp")),
        "metrics": store.windowed_metrics("exp", 10.0, 10.0),
    }
    assert len(want["run"]) == len(want["experiment"]) == 60 and len(want["range"]) == 30
    for seq, data in ((100, b"\x00\xff\x00\xff"), (200, encode({"n": 3, "seq": "x"})), (300, encode([1, 2]))):
        store.insert_batch("exp", "run", [seq, seq + 2], T0 + 5 * S, T0 + 6 * S, data, n=3)
    store.commit()
    got = {
        "last_n": src["history"](["last_n", 1000]),
        "range": src["history"](["range", T0 / S, T0 / S + 30]),
        "run": list(store.iter_events(run_id="run")),
        "experiment": list(store.iter_events(experiment_id="exp")),
        "metrics": store.windowed_metrics("exp", 10.0, 10.0),
    }
    assert got == want
    assert store.skipped_batches == 3 * 5  # each of the five reads met the three


def test_a_batch_sent_again_with_other_boundaries_stores_every_event_once(new_store):
    """Events sent again in batches cut otherwise than the stored ones (a commit whose answer
    was lost, re-read from the run's files as one chunk from the first seq not known stored):
    the history keeps what it holds and takes every event it lacks, once, in batches that never
    overlap. A chunk that starts where a stored batch starts is not that batch."""
    rows = make_rows([T0 + k * S for k in range(100)])
    store = new_store()

    def put(lo: int, hi: int) -> None:
        part = rows[lo:hi]
        b = rows_to_batch(part, "exp", "run")
        store.insert_batch("exp", "run", [lo, hi - 1], part[0]["ts"], part[-1]["ts"], encode(b), n=len(part))

    for lo, hi in ((0, 10), (10, 20), (30, 40)):
        put(lo, hi)
        assert store.commit() == hi - lo
    put(10, 60)  # starts with a stored batch, spans a gap, a stored batch, and new events
    assert store.commit() == 30
    put(55, 80)  # starts inside a stored batch
    assert store.commit() == 20
    put(0, 80)  # all there
    put(80, 81)
    assert store.commit() == 1
    assert [e["seq"] for e in store.iter_events(run_id="run")] == list(range(81))
    assert store.query("exp", ("last_n", 1000)) == rows[:81]  # every field of every event, as sent
    ranges = list(store.seq_ranges("run"))
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges


def test_a_damaged_run_summary_in_the_history_reads_as_none(tmp_path):
    from telemetry.store import HistoryStore

    store = HistoryStore(tmp_path / "h.sqlite3")
    store.record_run("good", "exp", "d", 1, 2, {"events_persisted": 5})
    for run_id, text in (("bytes", b"\x00\xff"), ("list", b"[1, 2]"), ("text", "not json")):
        store.record_run(run_id, "exp", "d", 1, 2, {})
        with store.db:
            store.db.execute("UPDATE runs SET summary = ? WHERE run_id = ?", (text, run_id))
    got = {r["run_id"]: r["summary"] for r in store.runs()}
    assert got == {"good": {"events_persisted": 5}, "bytes": None, "list": None, "text": None}
    store.close()


def test_live_index_is_bounded_and_keeps_newest(tmp_path):
    idx = LiveIndex("exp", limit=100)
    rows = make_rows([T0 + k for k in range(1000)])
    for i in range(0, 1000, 50):
        idx.append_batch(rows_to_batch(rows[i : i + 50], "exp", "run"))
    assert idx.n <= 100
    assert idx.query(("last_n", 3)) == rows[-3:]


# --- validation and limits ------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "spec",
    [
        ("last", 5, "fortnights"),
        ("last", NAN, "s"),
        ("last", INF, "minutes"),
        ("last", 1e300, "hours"),
        ("last", 1e-9, "s"),
        ("sliding", 1, "s", 0),
        ("sliding", 1, "s", NAN),
        ("sliding", 1, "s", INF),
        ("sliding", 1, "s", 1e-9),
        ("sliding", NAN, "s", 1),
        ("range", NAN, 1),
        ("range", 0, INF),
        ("range", dt.datetime(2026, 1, 1), 5),
        ("last_n", 2.5),
        ("last", 5, ["s"]),
    ],
)
def test_prepare_query_refuses_bad_windows_in_the_callers_thread(spec):
    with pytest.raises(QueryError, match="accepted forms"):
        prepare_query(spec)


@pytest.mark.parametrize(
    "filters",
    [
        {"success": "yes"},
        {"name": 3},
        {"phase": ["a"]},
        {"run_id": None},
        {"parameters.k": [1]},
        {"colour": "red"},
        ["name"],
    ],
)
def test_prepare_query_refuses_bad_filters(filters):
    with pytest.raises(QueryError, match="filter"):
        prepare_query(("last_n", 1), filters)


def test_prepare_query_gives_a_wire_form():
    aware = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    spec, filters = prepare_query(("range", aware, aware + dt.timedelta(seconds=2)), {"name": "x"})
    assert spec == ["range", aware.timestamp(), aware.timestamp() + 2] and filters == {"name": "x"}
    assert decode(encode({"kind": "q", "spec": spec})) == {"kind": "q", "spec": spec}  # it can travel


def test_query_error_replies_round_trip():
    assert query_answer([1, 2]) == [1, 2]
    with pytest.raises(QueryLimitError, match="limit"):
        query_answer(decode(encode(query_error(QueryLimitError("over the limit")))))
    with pytest.raises(QueryError, match="boom"):
        query_answer(query_error(KeyError("boom")))


@pytest.mark.parametrize(
    ("spec", "limits", "match"),
    [
        (("range", T0 / S, T0 / S + 60), {"max_rows": 50}, "select 60 events"),
        (("last_n", 80), {"max_rows": 50}, "above the limit of 50"),
        (("sliding", 1, "s", 1e-3), {}, "windows"),
        (("sliding", 1, "s", 0.5), {"max_windows": 100}, "199 windows"),
        (("sliding", 30, "s", 10), {"max_rows": 200}, "return 270 events"),
    ],
)
def test_limits_give_the_same_error_on_both_stores(data, spec, limits, match):
    _rows, q = data
    for src in ("live", "history"):
        with pytest.raises(QueryLimitError, match=match):
            q[src](spec, None, None, **limits)
    assert len(q["live"](("last_n", 50), None, None, max_rows=50)) == 50  # at the limit is fine


def test_windowed_metrics_refuse_bad_or_too_fine_steps(tmp_path):
    rows = make_rows([T0 + k * S for k in range(100)])
    idx = LiveIndex("exp")
    idx.append_batch(rows_to_batch(rows, "exp", "run"))
    for bad in (0, NAN, INF, 1e-9, -1):
        with pytest.raises(QueryError, match="step_s"):
            idx.windowed_metrics(10, bad)
    with pytest.raises(QueryLimitError, match="windows"):
        idx.windowed_metrics(10, 1e-5)


# --- the same answer live and from the history ---------------------------------------------------------

NAMES, PHASES = ("tick", "eval", "ctl"), ("a", "b", None)


@st.composite
def runs(draw):
    """Events of one run (ts non-decreasing, some equal), cut into batches of random sizes."""
    n = draw(st.integers(0, 60))
    gaps = draw(st.lists(st.integers(0, 3 * S), min_size=n, max_size=n))
    ts = (T0 + np.cumsum(gaps)).tolist() if n else []
    rows = []
    for i in range(n):
        pick = draw(
            st.tuples(
                st.integers(0, 2),
                st.integers(0, 2),
                st.sampled_from([None, True, False]),
                st.sampled_from([None, {"k": 0}, {"k": 1}]),
                st.booleans(),
            )
        )
        rows.append(
            full_event(
                {
                    "v": 1,
                    "seq": i,
                    "ts": int(ts[i]),
                    "experiment_id": "exp",
                    "run_id": "r1",
                    "pass": 0,
                    "name": NAMES[pick[0]],
                    "phase": PHASES[pick[1]],
                    "success": pick[2],
                    "parameters": pick[3],
                    "step": i,
                    "values": {"x": float(i)} if pick[4] else {},
                    "notes": "n" if i % 7 == 3 else None,
                }
            )
        )
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6)))) if n > 1 else []
    return rows, [rows[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True) if b > a]


def _specs(span_s):
    t = st.floats(0, span_s, allow_nan=False).map(lambda x: round(T0 / S + x, 6))
    return st.one_of(
        st.tuples(st.just("last_n"), st.integers(0, 70)),
        st.tuples(st.just("range"), t, t).map(lambda s: (s[0], min(s[1:]), max(s[1:]))),
        st.tuples(st.just("last"), st.integers(1, 200), st.sampled_from(["s", "seconds", "m"])),
        st.tuples(st.just("sliding"), st.integers(1, 30), st.just("s"), st.sampled_from([0.5, 1, 2.5, 7, 30])),
    )


FILTERS = st.dictionaries(
    st.sampled_from(["name", "phase", "success", "parameters.k"]), st.sampled_from(["tick", "eval"]), max_size=2
).map(
    lambda f: {
        k: (
            {
                "name": v,
                "phase": "a" if v == "tick" else None,
                "success": v == "tick",
                "parameters.k": int(v == "tick"),
            }[k]
        )
        for k, v in f.items()
    }
)


def _answer(fn):
    try:
        return fn()
    except QueryLimitError as exc:
        return ("limit", str(exc))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=runs(), data=st.data())
def test_the_same_query_gives_the_same_answer_live_and_from_the_history(new_store, run, data):
    """Property: whatever the window, filters and limits, the live index of a run and the history
    (with a newer and an older run of the same experiment beside it) agree, errors included;
    in either store (SQLite or PostgreSQL: each example gets an empty one)."""
    rows, parts = run
    spec = data.draw(_specs(200))
    filters = data.draw(FILTERS)
    limits = data.draw(
        st.fixed_dictionaries(
            {"max_rows": st.sampled_from([10, 40, 10_000]), "max_windows": st.sampled_from([5, 10_000])}
        )
    )
    now_us = T0 + data.draw(st.integers(0, 200 * S))
    idx = LiveIndex("exp")
    store = new_store()
    for part in parts:
        b = decode(encode(rows_to_batch(part, "exp", "r1")))
        idx.append_batch(b)
        store.insert_batch(
            "exp", "r1", [part[0]["seq"], part[-1]["seq"]], part[0]["ts"], part[-1]["ts"], encode(b), n=len(part)
        )
    for other, shift in (("r0", -S), ("r2", 5 * S)):  # runs of the same experiment, interleaved in time
        noise = [dict(r, run_id=other, ts=r["ts"] + shift) for r in rows[:30]]
        if noise:
            store.insert_batch(
                "exp",
                other,
                [0, len(noise) - 1],
                noise[0]["ts"],
                noise[-1]["ts"],
                encode(rows_to_batch(noise, "exp", other)),
                n=len(noise),
            )
    store.commit()
    live = _answer(lambda: idx.query(spec, filters, now_us, **limits))
    hist = _answer(lambda: store.query("exp", spec, filters, now_us, run_id="r1", **limits))
    assert live == hist
    if filters or spec[0] != "sliding":
        return
    wm_live = _answer(lambda: idx.windowed_metrics(spec[1], spec[3], max_windows=limits["max_windows"]))
    wm_hist = _answer(
        lambda: store.windowed_metrics("exp", spec[1], spec[3], run_id="r1", max_windows=limits["max_windows"])
    )
    assert wm_live == wm_hist


# --- through an experiment ----------------------------------------------------------------------------------


def _spec(budget=600.0):
    return {
        "name": "q",
        "time_budget_s": budget,
        "metrics": {"publish_interval_s": 0},
        "workload": {"name": "latency", "params": {"target": "time:sleep", "args": [0.001], "calls_per_step": 5}},
    }


def _persisted(exp):
    return exp.registry.whereis("recorder").ask({"kind": "flush"}, timeout=30)["persisted"]


def _until(cond, timeout=30.0):
    """Wait for a condition no actor can signal (events on disk), with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _drain(exp):
    """Everything the paused phase sent has passed anomaly -> sampler -> recorder."""
    for name, kind in (("anomaly", "anomaly_metrics"), ("sampler", "counts"), ("recorder", "flush")):
        exp.registry.whereis(name).ask({"kind": kind}, timeout=30)


@pytest.fixture
def lab(tmp_path, history_target):
    from supervisor import Lab

    lab = Lab(tmp_path / "art", history=history_target)
    yield lab
    lab.shutdown()


BAD_SPECS = [
    ("last", 5, "fortnights"),
    ("last", NAN, "s"),
    ("last", INF, "s"),
    ("sliding", 1, "s", 0),
    ("sliding", 1, "s", NAN),
    ("range", 0, INF),
]


def test_bad_queries_never_reach_the_tree(lab):
    exp = lab.start_experiment(_spec())
    rec = exp.registry.whereis("recorder")
    _until(lambda: _persisted(exp) > 0)
    exp.pause()  # quiet mailboxes: every answer below comes at once
    for spec in BAD_SPECS * 2:  # more than the tree's restart intensity
        with pytest.raises(QueryError, match="accepted forms"):
            exp.query_window(spec)
    for spec in BAD_SPECS:  # sent to the Recorder unchecked: it answers an error, it does not crash
        with pytest.raises(QueryError):
            query_answer(rec.ask({"kind": "query_window", "spec": list(spec)}, timeout=10))
    with pytest.raises(QueryError):
        query_answer(rec.ask({"kind": "query_window", "spec": ["last_n", 1], "filters": {"success": "x"}}))
    with pytest.raises(QueryError):
        query_answer(rec.ask({"kind": "windowed_metrics", "window_s": 1, "step_s": 0}, timeout=10))
    with pytest.raises(QueryError):
        query_answer(rec.ask({"kind": "recent", "n": "all"}, timeout=10))
    t0 = time.monotonic()
    with pytest.raises(QueryLimitError, match="above the limit"):
        exp.query_window(("sliding", 1, "s", 2e-6))  # millions of windows: refused before any work
    assert time.monotonic() - t0 < 5
    before = _persisted(exp)
    exp.resume()
    _until(lambda: _persisted(exp) > before)  # recording goes on
    assert exp.registry.whereis("recorder") is rec and rec.is_alive()
    assert exp.status() == "running"
    exp.stop()
    assert exp.summary()["restarts"] == {}


CALLS = {"name": "call"}


def _answers(exp):
    t0 = dt.datetime.fromtimestamp(exp.query_window(("last_n", 1_000_000), CALLS)[0]["ts"] / S, dt.UTC)
    specs = [
        ("last_n", 40),
        ("last_n", 1_000_000),
        ("range", t0, t0 + dt.timedelta(milliseconds=300)),
        ("sliding", 0.2, "s", 0.1),
    ]
    return {str(s): exp.query_window(s, CALLS) for s in specs}


def test_queries_after_the_run_stops_give_the_live_answers(lab, tmp_path):
    from supervisor import Lab

    exp = lab.start_experiment(_spec())
    _until(lambda: _persisted(exp) > 300)
    exp.pause()
    _drain(exp)
    live = _answers(exp)  # aware datetimes travel to the Recorder too
    assert len(live["('last_n', 40)"]) == 40 and live["('sliding', 0.2, 's', 0.1)"]
    exp.stop()
    assert _answers(exp) == live  # from the history now
    with Lab(tmp_path / "art", history=lab.history) as again:  # a newer run of the same experiment
        newer = again.start_experiment(_spec())
        assert newer.id == exp.id and newer.run_id != exp.run_id
        _until(lambda: _persisted(newer) > 100)
        newer.stop()
    assert _answers(exp) == live
    assert all(e["run_id"] == exp.run_id for e in exp.query_window(("last_n", 10_000)))


def test_a_last_n_past_int64_is_a_query_error_not_an_encoding_failure():
    """The spec travels to the Recorder as msgpack, which carries at most 64-bit integers."""
    with pytest.raises(QueryError, match=r"N must be an integer in \[0, 2\*\*63\)"):
        Window(("last_n", 1 << 64), 0)
    assert Window(("last_n", (1 << 63) - 1), 0).last_n == (1 << 63) - 1


def test_the_live_index_takes_now_as_never_before_its_newest_event():
    """After the wall clock stepped back, event time runs ahead of it (telemetry.emitter): the
    last minute of a live run is the minute before its newest event, not an empty window in
    the wall clock's past."""
    import time

    ahead = int(time.time() * 1e6) + 3_600_000_000  # an hour ahead of the wall clock
    rows = [
        {"seq": i, "ts": ahead + i * 1_000_000, "name": "tick", "values": {"x": float(i)}, "pass": 0} for i in range(5)
    ]
    idx = LiveIndex("exp")
    idx.append_batch(rows_to_batch(rows, "exp", "run"))
    assert [e["seq"] for e in idx.query(("last", 60, "s"))] == [0, 1, 2, 3, 4]
    assert [e["seq"] for e in idx.query(("last", 2, "s"))] == [2, 3, 4]
