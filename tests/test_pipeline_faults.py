"""The telemetry pipeline under faults: sampling that empties batches, malformed batches,
a storage that fails (a full disk), and the accounting of every event through all of it."""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Actor, Topics
from actors.anomaly import AnomalyDetection
from actors.messages import decode, encode
from actors.recorder import Recorder
from actors.sampler import Sampler
from actors.streaming_metrics import StreamingMetrics
from supervisor import Lab
from telemetry.emitter import Emitter
from telemetry.jsonl import iter_run, run_segments
from telemetry.rundir import RESERVE_NAME
from telemetry.schema import SchemaError, check_batch, rows_to_batch
from telemetry.store import DB_NAME, HistoryStore

STRATEGIES = [
    ("all", {}),
    ("uniform", {"rate": 0.0}),
    ("uniform", {"rate": 0.1}),
    ("reservoir", {"k": 25}),
    ("stratified", {"by": "name", "rates": {"step": 0.02}, "default_rate": 0.0}),
    ("adaptive", {"base_rate": 0.01, "anomaly_rate": 1.0, "cooldown_s": 0.0}),
    ("importance", {"field": "latency_ms", "quantile": 0.99, "base_rate": 0.0}),
]


class StopProbe(Actor):
    """Stands in for the phase: records the stop requests it is told."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.got: list[dict[str, Any]] = []
        self.event = event

    def handle_stop(self, msg: dict[str, Any]) -> None:
        self.got.append(msg)
        self.event.set()

    def handle_stops(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return self.got


def emit_calls(em: Emitter, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    lat = rng.lognormal(0.0, 0.3, n)
    for i in range(n):
        em.emit("step", {"latency_ms": float(lat[i])}, phase="serve", step=start + i, success=True)


def on_disk(art: Path, exp: str, run: str) -> tuple[list[int], list[int]]:
    """The seqs in the run's JSONL files and in the history database."""
    jsonl = [ev["seq"] for ev in iter_run(art / exp / run)]
    store = HistoryStore(art / DB_NAME, readonly=True)
    try:
        hist = [ev["seq"] for ev in store.iter_events(run_id=run)]
    finally:
        store.db.close()
    return jsonl, hist


def assert_accounts(s: dict[str, Any], jsonl: list[int], hist: list[int]) -> None:
    """Every emitted event is persisted, dropped or sampled out, and the disk says the same."""
    a = s["accounting"]
    assert a["emitted"] == a["persisted"] + a["dropped"] + a["sampled_out"] + a["held"]
    assert a["balanced"]
    assert s["events_emitted"] == s["events_persisted"] + s["events_dropped"] + s["events_held_by_sampler"]
    assert s["events_persisted"] == len(jsonl) == len(hist)
    assert sorted(jsonl) == sorted(hist) and len(set(jsonl)) == len(jsonl)


# --- sampling through a real Recorder ------------------------------------------------------------------


@pytest.mark.parametrize(("strategy", "config"), STRATEGIES, ids=lambda x: str(x))
def test_every_sampling_strategy_feeds_a_real_recorder(tmp_path, strategy, config):
    """Batches the sampler empties must not crash the Recorder, and the figures must add up."""
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run")
    sampler = Sampler.start("exp", rec, strategy, config, seed=3)
    topics.subscribe("events", sampler)
    em = Emitter(topics, "exp", "run", batch_size=16)  # small batches: many are sampled out whole
    emit_calls(em, 1500)
    counters = em.close()
    counts = sampler.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    assert rec.is_alive() and s["recorder_incarnation"] == 1 and s["bad_batches"] == 0
    rec.ask({"kind": "flush"})
    assert s["events_emitted"] == counters["emitted"] == 1500
    assert s["events_sampled_out"] == counts["sampled_out"] == counts["seen"] - s["events_persisted"]
    assert s["events_lost_in_transit"] == 0 and s["accounting"]["dropped"] == 0
    if strategy == "reservoir":
        assert s["events_persisted"] == 25
    elif strategy != "all":
        assert s["events_persisted"] < 1500
    rec.stop()
    sampler.stop()
    assert_accounts(
        orjson.loads((tmp_path / "exp" / "run" / "summary.json").read_bytes()), *on_disk(tmp_path, "exp", "run")
    )


FAST = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 50}


def fast_spec(name: str, budget: float = 60.0, batch_size: int = 32) -> dict[str, Any]:
    """A latency experiment of cheap calls, metrics published at every batch."""
    return {
        "name": name,
        "time_budget_s": budget,
        "workload": {"name": "latency", "params": FAST},
        "metrics": {"publish_interval_s": 0},
        "telemetry": {"batch_size": batch_size},
    }


@pytest.mark.parametrize(("strategy", "config"), [STRATEGIES[2], STRATEGIES[4]], ids=lambda x: str(x))
def test_a_sampled_experiment_runs_to_its_end(tmp_path, strategy, config):
    """The experiment of the report: a low sampling rate used to end it failed."""
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(
            {
                "name": "sampled",
                "time_budget_s": 60.0,
                "workload": {"name": "latency", "params": {**FAST, "calls": 3000}},
                "metrics": {"publish_interval_s": 0},
                "telemetry": {"batch_size": 16},
                "sampling": {"strategy": strategy, "config": config},
            }
        )
        assert exp.wait(60)
        assert exp.reason == "completed", exp.reason
        s = exp.summary()
    assert s["restarts"] == {}
    assert s["events_persisted"] < s["events_emitted"]
    assert_accounts(s, *on_disk(tmp_path / "art", exp.id, exp.run_id))


# --- malformed batches ----------------------------------------------------------------------------------


def good_batch(n: int = 40, start: int = 0) -> dict[str, Any]:
    rows = [
        {
            "seq": start + i,
            "ts": 1_800_000_000_000_000 + (start + i) * 1000,
            "name": "step" if i % 3 else "eval",
            "phase": "serve",
            "success": i % 7 != 0,
            "step": start + i,
            "parameters": {"k": i % 2} if i % 5 == 0 else None,
            "notes": "n" if i == 3 else None,
            "values": {"latency_ms": float(1 + i % 4)},
        }
        for i in range(n)
    ]
    return decode(encode(rows_to_batch(rows, "exp", "run")))


def _mutations() -> list[tuple[str, Any]]:
    """Ways a batch can decode and still be wrong (name, function of the batch)."""

    def put(key: str, value: Any):
        return lambda b: {**b, key: value}

    def drop(key: str):
        return lambda b: {k: v for k, v in b.items() if k != key}

    return [
        ("n too big", lambda b: {**b, "n": b["n"] + 5}),
        ("n negative", put("n", -1)),
        ("n a string", put("n", "40")),
        ("no seq", drop("seq")),
        ("no ts", drop("ts")),
        ("no names", drop("names")),
        ("ts a list", lambda b: {**b, "ts": b["ts"].tolist()}),
        ("ts of floats", lambda b: {**b, "ts": b["ts"].astype(np.float64)}),
        ("ts short", lambda b: {**b, "ts": b["ts"][:-1]}),
        ("ts 2-D", lambda b: {**b, "ts": b["ts"].reshape(-1, 1)}),
        ("name code past the table", lambda b: {**b, "name": np.full(b["n"], 7, dtype=np.int32)}),
        ("name code negative", lambda b: {**b, "name": np.full(b["n"], -1, dtype=np.int32)}),
        ("phase code past the table", lambda b: {**b, "phase": np.full(b["n"], 3, dtype=np.int32)}),
        ("params code past the table", lambda b: {**b, "params": np.full(b["n"], 9, dtype=np.int32)}),
        ("gpu code past the modes", lambda b: {**b, "gpu": np.full(b["n"], 5, dtype=np.int8)}),
        ("success out of range", lambda b: {**b, "success": np.full(b["n"], 4, dtype=np.int8)}),
        ("names not strings", put("names", [1, 2])),
        ("names a string", put("names", "step")),
        ("param text not JSON", put("param_texts", ["{nope"])),
        ("values a list", put("values", [1.0])),
        ("value column short", lambda b: {**b, "values": {"latency_ms": np.zeros(3)}}),
        ("value column of strings", lambda b: {**b, "values": {"latency_ms": ["x"] * b["n"]}}),
        ("sparse row out of range", lambda b: {**b, "sparse": {"anomaly": [[10_000, {"flag": True}]]}}),
        ("sparse entry not a pair", lambda b: {**b, "sparse": {"notes": [5]}}),
        ("sparse a list", put("sparse", [])),
        ("seq going back", lambda b: {**b, "seq": b["seq"][::-1].copy()}),
        ("run_id missing", drop("run_id")),
        ("counters a list", put("counters", [1])),
        ("counter a string", put("counters", {"emitted": "many"})),
        ("sampling figures a string", put("sampling", {"sampled_out": "x"})),
        # a table whose column is absent must still have its shape (consumers read it)
        (
            "param_texts a number without a params column",
            lambda b: {**{k: v for k, v in b.items() if k != "params"}, "param_texts": 3.5},
        ),
        (
            "reasons a number without a reason column",
            lambda b: {**{k: v for k, v in b.items() if k != "reason"}, "reasons": 3.5},
        ),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize(("why", "mutate"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_check_batch_names_what_is_wrong(why, mutate):
    check_batch(good_batch())
    with pytest.raises(SchemaError, match="batch"):
        check_batch(mutate(good_batch()))


class Sink(Actor):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def handle_events(self, msg: dict[str, Any]) -> None:
        self.n += int(msg["n"])

    def handle_sampling(self, msg: dict[str, Any]) -> None:
        pass

    def handle_count(self, msg: dict[str, Any]) -> int:
        return self.n


def _consumers(tmp_path: Path) -> dict[str, Any]:
    return {
        "metrics": StreamingMetrics.start("exp", None, publish_interval=0),
        "anomaly": AnomalyDetection.start("exp", None, None, warmup=5),
        "sampler": Sampler.start("exp", None, "uniform", {"rate": 0.5}, seed=1),
        "recorder": Recorder.start(tmp_path, "exp", "run"),
    }


def _bad_count(name: str, ref: Any) -> int:
    ask = {
        "metrics": {"kind": "get"},
        "anomaly": {"kind": "anomaly_metrics"},
        "sampler": {"kind": "counts"},
        "recorder": {"kind": "summary"},
    }[name]
    return ref.ask(ask, timeout=10)["bad_batches"]


def test_malformed_batches_never_crash_a_consumer(tmp_path):
    refs = _consumers(tmp_path)
    try:
        for _, mutate in MUTATIONS:
            data = encode(mutate(good_batch()))
            for ref in refs.values():
                ref.tell_bytes(data)
        good = encode(good_batch(start=0))
        for ref in refs.values():
            ref.tell_bytes(good)
        for name, ref in refs.items():
            assert _bad_count(name, ref) == len(MUTATIONS), name
            assert ref.is_alive(), name
        assert refs["metrics"].ask({"kind": "get"})["events"] == 40  # the good batch after them is handled
        assert refs["recorder"].ask({"kind": "flush"})["persisted"] == 40
        assert [e["seq"] for e in iter_run(tmp_path / "exp" / "run")] == list(range(40))
    finally:
        for ref in refs.values():
            ref.stop()


@settings(max_examples=60)
@given(data=st.data())
def test_any_corrupted_column_is_refused(data):
    """Property: replace any column with an array of any length and integer values: either the
    batch is still well-formed, or check_batch refuses it; the consumers' code never sees it."""
    b = good_batch(12)
    col = data.draw(
        st.sampled_from(["seq", "ts", "step", "pass", "name", "phase", "success", "gpu", "reason", "params"])
    )
    size = data.draw(st.integers(0, 20))
    vals = data.draw(st.lists(st.integers(-3, 12), min_size=size, max_size=size))
    bad = {**b, col: np.array(vals, dtype=np.int64)}
    try:
        check_batch(bad)
    except SchemaError:
        return
    # accepted: then every consumer-side use of the batch works
    from telemetry.jsonl_format import format_batch
    from telemetry.schema import batch_rows

    assert format_batch(bad).count(b"\n") == len(batch_rows(bad)) == bad["n"]


# --- storage failure ------------------------------------------------------------------------------------

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def failing_insert(monkeypatch, after: int, exc: BaseException) -> None:
    """The history's inserts fail (as on a full disk) once ``after`` batches are in."""
    real = HistoryStore.insert_batch
    calls = [0]

    def insert(self, *a, **kw):
        calls[0] += 1
        if calls[0] > after:
            raise exc
        return real(self, *a, **kw)

    monkeypatch.setattr(HistoryStore, "insert_batch", insert)


def no_tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix == ".tmp"]


@pytest.mark.parametrize(
    "exc", [ENOSPC, sqlite3.OperationalError("database or disk is full")], ids=["oserror", "sqlite"]
)
def test_history_failure_stops_the_run_with_figures_that_match_the_disk(tmp_path, monkeypatch, exc):
    failing_insert(monkeypatch, 5, exc)
    stopped = threading.Event()
    topics, probe = Topics(), StopProbe.start(stopped)
    rec = Recorder.start(tmp_path, "exp", "run", on_storage_failure=probe)
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=20, flush_interval=60)
    emit_calls(em, 400)
    em.close()
    assert stopped.wait(10)
    rec.ask({"kind": "flush"})
    s = rec.ask({"kind": "summary"})
    assert rec.is_alive()
    assert probe.ask({"kind": "stops"}) == [{"kind": "stop", "reason": s["storage_error"]}]
    assert s["storage_error"] == f"storage: {exc}"
    assert s["events_persisted"] == 100 and s["events_dropped_storage"] == 300
    rec.stop()
    probe.stop()
    summary = orjson.loads((tmp_path / "exp" / "run" / "summary.json").read_bytes())
    assert summary["storage_error"] == s["storage_error"]
    assert_accounts(summary, *on_disk(tmp_path, "exp", "run"))
    assert no_tmp_files(tmp_path) == [] and not (tmp_path / "exp" / "run" / RESERVE_NAME).exists()


def test_a_torn_jsonl_write_is_cut_back(tmp_path, monkeypatch):
    """A write that fails half-way (the disk filled mid-batch) leaves no partial line behind."""
    from telemetry.jsonl import JsonlWriter

    real = JsonlWriter.write
    calls = [0]

    def write(self, data):
        calls[0] += 1
        if calls[0] == 4:
            self._fh.write(data[: len(data) // 2])  # part of the batch reaches the file
            self._fh.flush()
            raise ENOSPC
        return real(self, data)

    monkeypatch.setattr(JsonlWriter, "write", write)
    stopped = threading.Event()
    topics, probe = Topics(), StopProbe.start(stopped)
    rec = Recorder.start(tmp_path, "exp", "run", on_storage_failure=probe, commit_every=2)
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=10, flush_interval=60)
    emit_calls(em, 100)
    em.close()
    assert stopped.wait(10)
    rec.stop()
    probe.stop()
    path = tmp_path / "exp" / "run" / "events.jsonl"
    assert path.read_bytes().endswith(b"\n")
    s = orjson.loads((tmp_path / "exp" / "run" / "summary.json").read_bytes())
    jsonl, hist = on_disk(tmp_path, "exp", "run")
    assert jsonl == list(range(20))  # two committed batches; the third was rolled back with the fourth
    assert_accounts(s, jsonl, hist)
    assert s["events_dropped_storage"] == 80


def test_storage_failure_ends_the_experiment_with_reason_storage(tmp_path, monkeypatch):
    failing_insert(monkeypatch, 20, ENOSPC)
    with Lab(tmp_path / "art") as lab:
        exp = lab.start_experiment(fast_spec("full"))
        assert exp.wait(30)
        s = exp.summary()
    assert exp.reason == "storage: [Errno 28] No space left on device"
    assert s["storage_error"] == exp.reason and s["restarts"] == {}
    assert s["events_dropped_storage"] > 0
    disk = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    assert_accounts(disk, *on_disk(tmp_path / "art", exp.id, exp.run_id))
    assert disk["events_persisted"] == s["events_persisted"]
    assert no_tmp_files(tmp_path) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (needs the right to mount; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk(small_tmpfs):
    with Lab(small_tmpfs / "art", min_free_bytes=0) as lab:  # past the guard at start: a disk that fills up
        exp = lab.start_experiment(fast_spec("full", batch_size=64))
        assert exp.wait(60)
    assert exp.reason.startswith("storage: "), exp.reason
    assert "No space left on device" in exp.reason or "full" in exp.reason
    disk = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    # the Recorder's write failed first, or the phase's checkpoint (then the reason names that file)
    assert disk["storage_error"] == exp.reason or exp.reason.endswith(f"(checkpoint {exp.run_dir / 'checkpoint.json'})")
    assert_accounts(disk, *on_disk(small_tmpfs / "art", exp.id, exp.run_id))
    assert all(p.read_bytes().endswith(b"\n") for p in run_segments(exp.run_dir))
    assert no_tmp_files(small_tmpfs) == []
    # the space the Recorder reserved let the files written after it stopped land too
    assert orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())["reason"] == exp.reason


def test_a_start_on_a_nearly_full_disk_is_refused_before_its_run_begins(small_tmpfs):
    """3 MiB free is less than a run needs (MIN_FREE_BYTES): the start fails as on a full
    disk, naming the folder and the figures, and leaves no run behind."""
    with Lab(small_tmpfs / "art") as lab:
        with pytest.raises(OSError) as err:
            lab.start_experiment(fast_spec("full", batch_size=64))
        assert err.value.errno == errno.ENOSPC
        assert str(small_tmpfs / "art") in str(err.value) and "min_free_bytes" in str(err.value)
        assert lab.experiments == {}
    assert not (small_tmpfs / "art" / "full").exists()


def test_an_experiment_folder_linked_onto_a_nearly_full_disk_is_checked_there(tmp_path, small_tmpfs):
    """The artifacts folder has room, the experiment's folder is a link onto a 3 MiB disk: the
    start is refused for that disk's sake (and a history file linked there likewise)."""
    art = tmp_path / "art"
    art.mkdir()
    (small_tmpfs / "full").mkdir()
    (art / "full").symlink_to(small_tmpfs / "full")
    with Lab(art) as lab:
        with pytest.raises(OSError, match="min_free_bytes") as err:
            lab.start_experiment(fast_spec("full", batch_size=64))
        assert err.value.errno == errno.ENOSPC and str(art / "full") in str(err.value)
    with Lab(tmp_path / "art2", history=small_tmpfs / "h.sqlite3", min_free_bytes=0) as lab:
        lab.min_free_bytes = 16 << 20
        with pytest.raises(OSError, match=str(small_tmpfs)):
            lab.start_experiment(fast_spec("other", batch_size=64))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "16", np.int64(-1)])
def test_min_free_bytes_is_a_whole_number(tmp_path, bad):
    with pytest.raises(ValueError, match="min_free_bytes"):
        Lab(tmp_path / "art", min_free_bytes=bad)
    with Lab(tmp_path / "art", min_free_bytes=np.int64(1 << 20)) as lab:
        assert lab.min_free_bytes == 1 << 20 and type(lab.min_free_bytes) is int


def test_a_backfill_that_fails_at_start_stops_recording(tmp_path, monkeypatch):
    """A restarted Recorder that cannot back-fill the history keeps what the JSONL holds,
    writes nothing more, and stops the run when events come."""
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=10, flush_interval=60)
    emit_calls(em, 50)
    em.close()
    rec.stop()
    db = sqlite3.connect(tmp_path / DB_NAME)
    with db:
        db.execute("DELETE FROM batches WHERE seq_lo >= 30")  # as if the history had fallen behind
    db.close()
    failing_insert(monkeypatch, 0, ENOSPC)
    stopped = threading.Event()
    probe = StopProbe.start(stopped)
    rec2 = Recorder.start(tmp_path, "exp", "run", on_storage_failure=probe)
    s = rec2.ask({"kind": "summary"})
    assert s["storage_error"] == f"storage: {ENOSPC}" and s["events_persisted"] == 50
    topics2 = Topics()
    topics2.subscribe("events", rec2)
    em2 = Emitter(topics2, "exp", "run", batch_size=10, flush_interval=60, seq_start=50)
    emit_calls(em2, 20, start=50)
    em2.close()
    assert stopped.wait(10)
    s = rec2.ask({"kind": "summary"})
    assert s["events_persisted"] == 50 and s["events_dropped_storage"] == 20 and rec2.is_alive()
    rec2.stop()
    probe.stop()
    assert [e["seq"] for e in iter_run(tmp_path / "exp" / "run")] == list(range(50))
