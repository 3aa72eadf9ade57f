"""Telemetry data-path benchmark (one run; ratios against anchors measured in the same run).

Run: ``python -m bench.telemetry [--events N] [--stored N]``.

(a) events/s from ``emit()`` into an in-memory consumer (StreamingMetrics-style: it folds
    every batch into running sums), against raw pykka single-message tells (anchor);
(b) events/s from ``emit()`` to persisted JSONL + SQLite (Recorder, until acknowledged);
(c) ``emit()`` cost per event on the caller's thread (flushes included, no consumer);
(d) a ``("last", 5, "minutes")`` query over N stored events in the live index, against a
    full scan of the same columns, and the same query on the SQLite history.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from actors import Actor, Topics
from actors.log import configure_logging
from actors.recorder import Recorder
from actors.runtime import freeze_startup_heap
from bench.actors import bench_raw
from telemetry.emitter import Emitter
from telemetry.index import LiveIndex
from telemetry.schema import rows_to_batch
from telemetry.store import HistoryStore


class Folding(Actor):
    """Folds each batch into per-field count/sum/min/max (what a metrics consumer does)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.sums: dict[str, float] = {}

    def handle_events(self, msg: dict[str, Any]) -> None:
        self.n += int(msg["n"])
        for k, v in msg["values"].items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.nansum(v))

    def handle_counters(self, msg: dict[str, Any]) -> None:
        pass

    def handle_get(self, msg: dict[str, Any]) -> int:
        return self.n


def _emit_loop(em: Emitter, n: int) -> None:
    emit = em.emit
    for i in range(n):
        emit("step", {"conflicts": float(i & 1023), "colors": 48.0}, phase="tabu", step=i)


def bench_consumer(n: int) -> float:
    topics = Topics()
    sink = Folding.start()
    topics.subscribe("events", sink)
    em = Emitter(topics, "bench", "run")
    t0 = time.perf_counter()
    _emit_loop(em, n)
    em.close()
    got = sink.ask({"kind": "get"})
    dt = time.perf_counter() - t0
    assert got == n
    sink.stop()
    return n / dt


def bench_persisted(n: int, art: str) -> float:
    topics = Topics()
    rec = Recorder.start(art, "bench", "persist")
    topics.subscribe("events", rec)
    em = Emitter(topics, "bench", "persist")
    t0 = time.perf_counter()
    _emit_loop(em, n)
    em.close()
    got = rec.ask({"kind": "flush"})["persisted"]
    dt = time.perf_counter() - t0
    assert got == n, got
    rec.stop()
    return n / dt


def bench_emit_cost(n: int) -> float:
    em = Emitter(Topics(), "bench", "cost")  # no subscriber: only the caller's-thread work
    t0 = time.perf_counter()
    _emit_loop(em, n)
    em.flush()
    dt = time.perf_counter() - t0
    em.close()
    return dt / n * 1e6


def bench_query(stored: int, art: str, history_events: int) -> dict[str, float]:
    now = int(time.time() * 1e6)
    span = 24 * 3600 * 1_000_000  # events spread over the last 24 hours
    idx = LiveIndex("bench", limit=stored + 1)
    batch = 8192
    rng = np.random.default_rng(1)
    tss = np.sort(now - rng.integers(0, span, stored)).astype(np.int64)
    proto = rows_to_batch(
        [{"seq": 0, "ts": 0, "name": "step", "phase": "tabu", "values": {"conflicts": 1.0}}], "bench", "q"
    )
    for a in range(0, stored, batch):
        ts = tss[a : a + batch]
        m = ts.size
        b = dict(
            proto,
            n=m,
            seq=np.arange(a, a + m),
            ts=ts,
            step=np.arange(m),
            **{k: np.repeat(proto[k], m) for k in ("pass", "name", "phase", "success", "gpu", "reason", "params")},
        )
        b["values"] = {"conflicts": rng.random(m)}
        idx.append_batch(b)
    lo = now - 5 * 60 * 1_000_000
    reps = 50
    ts = idx.ts
    t0 = time.perf_counter()
    for _ in range(reps):
        a = int(np.searchsorted(ts, lo, "left"))  # the index: a binary search
        sel_idx = np.arange(a, idx.n)
    t_sel = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        sel_scan = np.flatnonzero(ts >= lo)  # a full scan: every stored event compared (vectorised)
    t_sel_scan = (time.perf_counter() - t0) / reps
    assert np.array_equal(sel_idx, sel_scan)
    t0 = time.perf_counter()
    for _ in range(reps):
        got = idx.query(("last", 5, "minutes"), now_us=now)
    t_idx = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    scanned = idx.rows(np.flatnonzero(ts >= lo))
    t_scan = time.perf_counter() - t0
    assert len(got) == len(scanned)
    # SQLite history: the same query through the (experiment_id, ts_lo) index vs decoding every batch
    store = HistoryStore(f"{art}/bench-history.sqlite3")
    from actors.messages import encode

    htss = np.sort(now - rng.integers(0, span, history_events)).astype(np.int64)
    for a in range(0, history_events, 1024):
        ts = htss[a : a + 1024]
        m = ts.size
        b = dict(
            proto,
            n=m,
            seq=np.arange(a, a + m),
            ts=ts,
            step=np.arange(m),
            **{k: np.repeat(proto[k], m) for k in ("pass", "name", "phase", "success", "gpu", "reason", "params")},
        )
        b["values"] = {"conflicts": rng.random(m)}
        store.insert_batch("bench", "q", [a, a + m - 1], int(ts[0]), int(ts[-1]), encode(b), n=m)
    store.commit()
    t0 = time.perf_counter()
    hq = store.query("bench", ("last", 5, "minutes"), now_us=now)
    t_hist = time.perf_counter() - t0
    t0 = time.perf_counter()
    hscan = [e for e in store.iter_events(experiment_id="bench") if e["ts"] >= lo]
    t_hscan = time.perf_counter() - t0
    assert len(hq) == len(hscan)
    return {
        "matched": len(got),
        "t_idx": t_idx,
        "t_scan": t_scan,
        "h_matched": len(hq),
        "t_hist": t_hist,
        "t_hscan": t_hscan,
        "t_sel": t_sel,
        "t_sel_scan": t_sel_scan,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--stored", type=int, default=10_000_000)
    ap.add_argument("--history", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    configure_logging("CRITICAL")
    freeze_startup_heap()  # as `crucible` does after start-up (see actors/runtime.py)
    art = tempfile.mkdtemp(prefix="crucible-bench-")
    bench_consumer(20_000)
    bench_persisted(20_000, art)  # warm up (numba cache load, sqlite pages)
    rounds = [(bench_raw(100_000), bench_consumer(args.events)) for _ in range(args.rounds)]
    raw = statistics.median(r[0] for r in rounds)
    a = statistics.median(r[1] for r in rounds)
    ratio_a = statistics.median(r[1] / r[0] for r in rounds)
    b = bench_persisted(args.events, art)
    c = bench_emit_cost(args.events)
    d = bench_query(args.stored, art, args.history)
    print(f"anchor: raw pykka single-message tell   {raw:>12,.0f} msg/s")
    print(
        f"(a) emit -> in-memory consumer           {a:>12,.0f} ev/s   {ratio_a:6.2f} x anchor"
        "   target >= 1,000,000 and >= 6 x"
    )
    print(f"    (a: medians over {args.rounds} interleaved rounds, the ratio is the median of per-round ratios)")
    print(f"(b) emit -> persisted JSONL + SQLite     {b:>12,.0f} ev/s                     target >= 300,000")
    print(f"(c) emit() cost on the caller's thread   {c:>12.3f} us/event                 target <= 2 us")
    print(f"(d) last 5 min over {args.stored:,} stored events ({d['matched']:,} match), live index:")
    print(
        f"    selecting the rows: binary search {d['t_sel'] * 1e6:.1f} us vs full scan "
        f"{d['t_sel_scan'] * 1e3:.2f} ms: {d['t_sel_scan'] / d['t_sel']:.0f} x faster   target >= 100 x"
    )
    print(
        f"    whole query with row dicts: {d['t_idx'] * 1e3:.2f} ms vs full scan + the same dicts "
        f"{d['t_scan'] * 1e3:.2f} ms: {d['t_scan'] / d['t_idx']:.1f} x"
    )
    print(
        f"    same on SQLite history of {args.history:,}: {d['t_hist'] * 1e3:.2f} ms vs decoding every batch "
        f"{d['t_hscan'] * 1e3:.0f} ms: {d['t_hscan'] / d['t_hist']:.0f} x faster"
    )


if __name__ == "__main__":
    main()
