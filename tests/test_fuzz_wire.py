"""Fuzzing the wire and the query API.

* The msgpack codec: any bytes, any truncated or over-long frame, any ext type (numpy's
  included, with a damaged header) decode or raise ``DecodeError``, nothing else.
* A live experiment tree is sent garbage frames, messages of unknown kinds and event batches,
  counters and sampling figures of the wrong shape, directly by name to every actor: each
  is dropped and counted (``dropped_undecodable``, ``dropped_unknown``, ``bad_batches``), no
  actor crashes, and the tree goes on recording.
* Queries: ``Experiment.query_window`` (live and from the history, running and stopped) and
  the Recorder's query messages answer or raise ``QueryError`` / ``QueryLimitError`` only,
  and never crash the Recorder.

The fixed lists of bad batches and bad window specs live in test_pipeline_faults.py and
test_queries.py; these tests draw new ones.
"""

from __future__ import annotations

import datetime as dt
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors.base import call_local
from actors.messages import NDARRAY_EXT, DecodeError, decode, decode_message, encode
from supervisor import Lab
from telemetry.query import QueryError, QueryLimitError, prepare_query, query_answer
from telemetry.schema import rows_to_batch
from tests.fault_helpers import latency_spec, persisted, until

# --- the codec ------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
arrays = hnp.arrays(
    dtype=st.sampled_from(
        [np.int64, np.int32, np.int8, np.float64, np.float32, np.bool_, np.uint16, np.complex64, "U3", "M8[us]"]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=5),
)
# unknown ext types (code 1, numpy's, is drawn by `arrays`; its damaged forms by the codec tests and `garbage`)
exts = st.builds(msgpack.ExtType, st.integers(0, 127).filter(lambda c: c != NDARRAY_EXT), st.binary(max_size=24))
junk = st.recursive(
    scalars | arrays | exts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
messages = st.dictionaries(st.text(max_size=6), junk, max_size=5).map(lambda d: {"kind": "m", **d})


def only_decode_errors(data: bytes) -> None:
    """decode_message gives a dict with a string kind, or raises DecodeError; nothing else."""
    try:
        msg = decode_message(data)
    except DecodeError:
        return
    assert isinstance(msg, dict) and isinstance(msg["kind"], str)


@settings(max_examples=300)
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_message_or_a_decode_error(data):
    only_decode_errors(data)


@settings(max_examples=100)
@given(msg=messages, data=st.data())
def test_a_truncated_or_overlong_frame_is_a_decode_error(msg, data):
    frame = encode(msg)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(DecodeError):
        decode(frame[:cut])
    with pytest.raises(DecodeError):
        decode(frame + data.draw(st.binary(min_size=1, max_size=8)))


def ext_frame(code: int, payload: bytes) -> bytes:
    """``{"kind": "x", "f": <ext code, payload>}`` written by hand (msgpack's ExtType refuses the
    reserved negative codes, such as -1, the timestamp)."""
    ext = b"\xc7" + bytes([len(payload)]) + code.to_bytes(1, "big", signed=True) + payload
    return b"\x82" + msgpack.packb("kind") + msgpack.packb("x") + msgpack.packb("f") + ext


@settings(max_examples=200)
@given(code=st.integers(-128, 127), payload=st.binary(max_size=40))
def test_any_ext_type_decodes_or_is_a_decode_error(code, payload):
    frame = ext_frame(code, payload)
    try:
        msg = decode_message(frame)
    except DecodeError:
        return
    assert isinstance(msg["f"], (msgpack.ExtType, msgpack.Timestamp, np.ndarray))


@settings(max_examples=200)
@given(
    dt_str=st.binary(max_size=12),
    ndim=st.integers(0, 255),
    dims=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    body=st.binary(max_size=40),
)
def test_a_damaged_array_header_is_a_decode_error(dt_str, ndim, dims, body):
    head = (
        bytes([len(dt_str) & 0xFF, ndim]) + dt_str + b"".join(int(d).to_bytes(8, "little", signed=True) for d in dims)
    )
    frame = msgpack.packb({"kind": "x", "a": msgpack.ExtType(NDARRAY_EXT, head + body)}, use_bin_type=True)
    try:
        msg = decode_message(frame)
    except DecodeError:
        return
    arr = msg["a"]
    assert isinstance(arr, np.ndarray) and arr.ndim == ndim


# --- a live tree under fuzzed frames ----------------------------------------------------------------

NAMES = ("recorder", "metrics", "anomaly", "sampler", "phase", "hypertune")
CONSUMERS = ("recorder", "metrics", "anomaly", "sampler", "hypertune")


def good_batch(n: int = 8) -> dict:
    rows = [
        {
            "seq": i,
            "ts": 1_800_000_000_000_000 + i,
            "name": "call",
            "phase": "p",
            "success": True,
            "step": i,
            "values": {"latency_ms": 1.0 + i},
        }
        for i in range(n)
    ]
    return decode(encode(rows_to_batch(rows, "fz", "run")))


BATCH_KEYS = sorted(good_batch())


@st.composite
def bad_batches(draw) -> bytes:
    """An events batch with some of its fields replaced by junk or removed."""
    b = good_batch()
    for key in draw(st.lists(st.sampled_from([*BATCH_KEYS, "extra"]), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()) and key in b:
            del b[key]
        else:
            b[key] = draw(junk)
    b["kind"] = "events"
    return encode(b)


garbage = st.one_of(
    st.binary(max_size=64),  # not msgpack, or not a dict
    st.builds(lambda m, k: encode(m)[:k], messages, st.integers(0, 16)),  # cut short
    junk.map(lambda j: encode([j])),  # a value, not a message
    messages.map(lambda m: encode({**m, "kind": "no_such_kind"})),  # a kind no actor handles
    st.builds(ext_frame, st.integers(-128, 127), st.binary(max_size=16)),
)
to_consumers = st.one_of(
    bad_batches(),
    junk.map(lambda j: encode({"kind": "counters", "counters": j})),
    st.builds(lambda f, c: encode({"kind": "sampling", "sampled_out": f, "held": c}), junk, junk),
)


def _count(actor, attr: str) -> int:
    return getattr(actor, attr)


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


def test_fuzzed_frames_never_crash_an_actor_and_the_tree_goes_on(lab):
    exp = lab.start_experiment(latency_spec("fz", budget=600))
    until(lambda: persisted(exp) > 0, what="first events")
    exp.pause()  # the tree's own traffic stops: only the fuzz reaches the actors now
    refs = {n: exp.registry.whereis(n) for n in NAMES}
    sent = {"garbage": 0, "batches": 0}

    @settings(max_examples=120, suppress_health_check=list(HealthCheck), database=None)
    @given(frame=garbage, batch=to_consumers)
    def fuzz(frame, batch):  # each frame to every actor, each batch to every consumer
        for name in NAMES:
            exp.registry.send_bytes(name, frame)
            sent["garbage"] += 1
        for name in CONSUMERS:
            exp.registry.send_bytes(name, batch)
            sent["batches"] += 1

    fuzz()
    for name, ref in refs.items():  # each has handled everything sent to it, and is the same actor
        assert exp.registry.whereis(name) == ref and ref.is_alive(), name
        dropped = call_local(ref, _count, "dropped_undecodable", timeout=30) + call_local(
            ref, _count, "dropped_unknown", timeout=30
        )
        assert dropped > 0, name
    bad = {n: call_local(refs[n], _count, "bad_batches", timeout=30) for n in CONSUMERS}
    assert sum(bad.values()) > 0 and sent["batches"] > 0
    before = persisted(exp)
    exp.resume()
    until(lambda: persisted(exp) > before + 100, what="recording after the fuzz")
    exp.stop()
    s = exp.summary()
    assert s["restarts"] == {} and exp.reason == "stopped"
    assert s["bad_batches"] == bad["recorder"]


# --- queries ------------------------------------------------------------------------------------------------

units = st.sampled_from(["s", "m", "h", "seconds", "minutes", "hours", "second", "fortnights", "", "S"])
numbers = st.one_of(st.integers(-(2**64), 2**64), st.floats(), st.just(math.inf), st.just(1e-7), st.just(0))
times = st.one_of(numbers, st.datetimes(timezones=st.just(dt.UTC)), st.datetimes(), st.text(max_size=5))
specs = st.one_of(
    st.tuples(st.just("last"), numbers, units),
    st.tuples(st.just("last_n"), numbers),
    st.tuples(st.just("range"), times, times),
    st.tuples(st.just("sliding"), numbers, units, numbers),
    st.lists(junk, max_size=5),
    junk,
)
filter_values = st.one_of(st.none(), st.booleans(), st.text(max_size=6), st.integers(), junk)
filters = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["phase", "name", "success", "run_id", "parameters.k", "nope", "parameters."]),
        filter_values,
        max_size=3,
    ),
    junk,
)


def documented(call) -> None:
    """The call answers, or raises QueryError (QueryLimitError is one); nothing else."""
    try:
        out = call()
    except QueryError:
        return
    assert isinstance(out, list)


@pytest.mark.parametrize(
    "spec",
    [
        [np.array([0, 0])],
        (np.array(["last", "x"]), 5, "s"),
        [msgpack.ExtType(3, b"")],
        [["last"], 5, "s"],
        [{"k": 1}, 2],
    ],
)
def test_a_spec_whose_form_is_not_a_string_is_a_query_error(spec):
    with pytest.raises(QueryError, match="unknown form"):
        prepare_query(spec)


def test_query_window_answers_or_raises_only_query_errors(lab):
    assert issubclass(QueryLimitError, QueryError)
    exp = lab.start_experiment(latency_spec("fq", budget=600))
    until(lambda: persisted(exp) > 50, what="events to query")
    exp.pause()
    rec = exp.registry.whereis("recorder")

    @settings(max_examples=120, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=specs, flt=filters, source=st.sampled_from(["live", "history"]))
    def fuzz_live(spec, flt, source):
        documented(lambda: exp.query_window(spec, flt, source=source))

    @settings(max_examples=80, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=junk, flt=junk, n=junk, window=junk, step=junk, source=junk)
    def fuzz_recorder(spec, flt, n, window, step, source):  # sent as they are, unchecked
        documented(
            lambda: query_answer(
                rec.ask({"kind": "query_window", "spec": spec, "filters": flt, "source": source}, timeout=30)
            )
        )
        documented(
            lambda: query_answer(
                rec.ask(
                    {"kind": "windowed_metrics", "window_s": window, "step_s": step, "fields": flt, "source": source},
                    timeout=30,
                )
            )
        )
        documented(lambda: query_answer(rec.ask({"kind": "recent", "n": n}, timeout=30)))

    fuzz_live()
    fuzz_recorder()
    assert exp.registry.whereis("recorder") == rec and rec.is_alive()
    before = persisted(exp)
    exp.resume()
    until(lambda: persisted(exp) > before + 100, what="recording after the queries")
    exp.stop()
    assert exp.summary()["restarts"] == {}

    @settings(max_examples=60, suppress_health_check=list(HealthCheck), database=None)
    @given(spec=specs, flt=filters)
    def fuzz_stopped(spec, flt):  # from the history now
        documented(lambda: exp.query_window(spec, flt))

    fuzz_stopped()
    assert exp.query_window(("last_n", 5))  # and real answers still come
