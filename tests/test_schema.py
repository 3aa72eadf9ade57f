import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.messages import decode, encode
from telemetry.schema import (
    GPU_MODES,
    EventBatch,
    SchemaError,
    batch_rows,
    check_batch,
    check_id,
    dumps_line,
    full_event,
    parse_line,
    rows_to_batch,
    select_rows,
)

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)

event = st.fixed_dictionaries(
    {
        "ts": st.integers(0, 2**53),
        "pass": st.integers(0, 1000),
        "name": names,
        "values": st.dictionaries(st.sampled_from(["conflicts", "chromatic_number", "latency_ms", "x y"]), finite),
    },
    optional={
        "phase": names,
        "step": st.integers(0, 2**40),
        "success": st.booleans(),
        "gpu_mode": st.sampled_from(GPU_MODES),
        "gpu_reason": st.text(max_size=20),
        "parameters": st.dictionaries(
            st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=3
        ),
        "notes": st.text(max_size=30),
        "anomaly": st.fixed_dictionaries({"flag": st.booleans(), "score": finite}),
    },
)


def _with_ids(evs):
    return [full_event({"v": 1, "seq": i, "experiment_id": "exp", "run_id": "run", **e}) for i, e in enumerate(evs)]


@given(st.lists(event, min_size=1, max_size=20))
def test_msgpack_batch_roundtrip(evs):
    rows = _with_ids(evs)
    batch = rows_to_batch(rows, "exp", "run")
    back = [full_event(r) for r in batch_rows(decode(encode(batch)))]
    assert back == rows


@given(st.lists(event, min_size=1, max_size=20))
def test_jsonl_roundtrip(evs):
    rows = _with_ids(evs)
    for r in rows:
        compact = {k: v for k, v in r.items() if v is not None}
        assert parse_line(dumps_line(compact)) == r


def test_check_id_rejects_paths():
    for bad in ["../x", "a/b", "", ".hidden", "a\\b", "x" * 200, None, "a b"]:
        try:
            check_id("run id", bad)
        except ValueError as exc:
            assert "run id" in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")
    assert check_id("run id", "run-2026.11_22") == "run-2026.11_22"


@given(st.lists(event, min_size=1, max_size=30))
def test_numba_jsonl_lines_parse_to_the_batch_rows(evs):
    from telemetry.jsonl_format import format_batch

    rows = _with_ids(evs)
    batch = decode(encode(rows_to_batch(rows, "exp", "run")))
    data = format_batch(batch)
    assert data.endswith(b"\n") and data.count(b"\n") == len(rows)
    assert [parse_line(line) for line in data.splitlines()] == rows
    assert data == b"".join(dumps_line(r) for r in batch_rows(batch))  # byte for byte what orjson writes


@given(st.lists(event, max_size=30), st.data())
def test_every_well_formed_batch_passes_the_batch_check(evs, data):
    """No false refusals: a batch built from valid events, sent, and cut by a sampler, is accepted."""
    rows = _with_ids(evs)
    batch = decode(encode(rows_to_batch(rows, "exp", "run")))
    check_batch(batch)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))), dtype=bool)
    check_batch(decode(encode(select_rows(batch, keep))))


def test_the_batch_check_requires_what_the_batch_type_declares():
    """EventBatch (the typed wire) and check_batch (the checker at every consumer) agree: a
    batch missing any required key, or ``seq`` (set when the emitter publishes), is refused."""
    rows = [{"seq": i, "ts": 10 + i, "name": "step", "values": {"x": float(i)}} for i in range(3)]
    good = rows_to_batch(rows, "exp", "run")
    check_batch(good)
    required = set(EventBatch.__required_keys__) - {"kind"}  # the kind is the dispatch, not the payload
    assert required >= {"n", "ts", "name", "names", "values", "pass"}
    for key in sorted(required | {"seq"}):
        bad = dict(good)
        del bad[key]
        with pytest.raises(SchemaError):
            check_batch(bad)
    for key in EventBatch.__optional_keys__ - {"seq"}:
        assert key in good or key in ("counters", "sampling", "sparse"), key
