"""Streaming-analytics benchmark (one run; anchors measured in the same run).

Run: ``python -m bench.stats [--values N] [--events N]``.

1. t-digest batch insert, values/s, and rank errors at q = 0.5, 0.99, 0.999, for ours
   (kernels/tdigest.py, default compression), fastdigest's ``batch_update`` (the anchor),
   the ``tdigest`` package (pure Python: measured on a smaller sample) and ``numpy.quantile``
   on the stored array (exact; its cost is the sort).
2. The amortised per-event cost of the analytics chain (StreamingMetrics + AnomalyDetection
   -> Sampler) fed 1,024-event batches: the handlers called in one thread (CPU cost per
   event), and the same batches through the running actors (wall time per event).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import fastdigest
import numpy as np
import tdigest as tdigest_pkg

from actors import Actor
from actors.anomaly import AnomalyDetection
from actors.log import configure_logging
from actors.messages import decode, encode
from actors.runtime import freeze_startup_heap
from actors.sampler import Sampler
from actors.streaming_metrics import StreamingMetrics
from kernels.tdigest import TDigest
from telemetry.schema import rows_to_batch


def rank_error(xs: np.ndarray, v: float, q: float) -> float:
    lo, hi = np.searchsorted(xs, v, "left") / xs.size, np.searchsorted(xs, v, "right") / xs.size
    return 0.0 if lo <= q <= hi else min(abs(lo - q), abs(hi - q))


QS = (0.5, 0.99, 0.999)


def bench_digests(n: int, n_slow: int) -> list[tuple[str, float, list[float]]]:
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=n)
    xs = np.sort(x)
    out = []
    TDigest().add_batch(x[:10_000])  # load the numba cache outside the timing
    d = TDigest()
    t0 = time.perf_counter()
    d.add_batch(x)
    d.quantile(0.5)  # includes the final buffer merge
    out.append(
        (
            "ours (numba, compression 1000)",
            n / (time.perf_counter() - t0),
            [rank_error(xs, d.quantile(q), q) for q in QS],
        )
    )
    d = TDigest()
    t0 = time.perf_counter()
    for i in range(0, n, 1024):
        d.add_batch(x[i : i + 1024])
    d.quantile(0.5)
    out.append(
        (
            "ours, fed 1,024-value batches",
            n / (time.perf_counter() - t0),
            [rank_error(xs, d.quantile(q), q) for q in QS],
        )
    )
    f = fastdigest.TDigest()
    t0 = time.perf_counter()
    f.batch_update(x)
    f.quantile(0.5)
    out.append(
        (
            "fastdigest batch_update (anchor)",
            n / (time.perf_counter() - t0),
            [rank_error(xs, f.quantile(q), q) for q in QS],
        )
    )
    small = x[:n_slow]
    ss = np.sort(small)
    t = tdigest_pkg.TDigest()
    t0 = time.perf_counter()
    t.batch_update(small)
    rate = n_slow / (time.perf_counter() - t0)
    out.append((f"tdigest package ({n_slow:,} values)", rate, [rank_error(ss, t.percentile(q * 100), q) for q in QS]))
    t0 = time.perf_counter()
    qv = np.quantile(x, QS)
    out.append(
        (
            "numpy.quantile on the stored array",
            n / (time.perf_counter() - t0),
            [rank_error(xs, v, q) for v, q in zip(qv, QS, strict=True)],
        )
    )
    return out


def make_batches(n_events: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    ts0 = int(time.time() * 1e6)
    out = []
    proto = rows_to_batch(
        [{"seq": 0, "ts": 0, "name": "call", "phase": "serve", "values": {"latency_ms": 1.0}}], "bench", "chain"
    )
    for a in range(0, n_events, 1024):
        m = min(1024, n_events - a)
        b = dict(proto, n=m, seq=np.arange(a, a + m), ts=ts0 + np.arange(a, a + m) * 10, step=np.arange(m))
        for k in ("pass", "name", "phase", "success", "gpu", "reason", "params"):
            b[k] = np.repeat(proto[k], m)
        b["success"] = (rng.random(m) > 0.01).astype(np.int8)
        b["values"] = {
            "latency_ms": rng.lognormal(3, 0.5, m),
            "cost_usd": np.full(m, 1e-4),
            "tokens_prompt": rng.integers(100, 900, m).astype(np.float64),
        }
        out.append(encode(b))
    return out


class Null(Actor):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def handle_events(self, msg: dict[str, Any]) -> None:
        self.n += int(msg["n"])

    def handle_sampling(self, msg: dict[str, Any]) -> None:
        pass

    def handle_get(self, msg: dict[str, Any]) -> int:
        return self.n


def bench_chain_direct(batches: list[bytes]) -> float:
    """CPU cost per event of the three analytics handlers, called in this thread."""
    sm = StreamingMetrics("bench", publish_interval=0)
    sink = Null.start()
    sp = Sampler("bench", sink, "uniform", {"rate": 0.1})
    ad = AnomalyDetection("bench", None, methods=("z_score", "ewma"))
    n = 0
    t0 = time.perf_counter()
    for data in batches:
        msg = decode(data)
        sm.handle_events(msg)
        ad.handle_events(msg)
        sp.handle_events(msg)
        n += int(msg["n"])
    dt = time.perf_counter() - t0
    sink.stop()
    return dt / n * 1e6


def bench_chain_actors(batches: list[bytes]) -> float:
    """Wall time per event through the running actors (metrics and anomaly in parallel)."""
    sink = Null.start()
    sp = Sampler.start("bench", sink, "uniform", {"rate": 0.1})
    ad = AnomalyDetection.start("bench", sp, methods=("z_score", "ewma"))
    sm = StreamingMetrics.start("bench", publish_interval=0)
    n = sum(int(decode(b)["n"]) for b in batches)
    t0 = time.perf_counter()
    for data in batches:
        sm.tell_bytes(data)
        ad.tell_bytes(data)
    sm.ask({"kind": "get"})
    ad.ask({"kind": "anomaly_metrics"})
    sp.ask({"kind": "counts"})
    dt = time.perf_counter() - t0
    for r in (sm, ad, sp, sink):
        r.stop()
    return dt / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--values", type=int, default=5_000_000)
    ap.add_argument("--slow-values", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    configure_logging("CRITICAL")
    freeze_startup_heap()
    rows = bench_digests(args.values, args.slow_values)
    anchor = rows[2][1]
    print(f"t-digest batch insert, {args.values:,} lognormal values; rank error at q = 0.5 / 0.99 / 0.999")
    for name, rate, errs in rows:
        print(
            f"  {name:<40} {rate / 1e6:9.2f} M values/s  {rate / anchor:6.2f} x anchor   "
            + " / ".join(f"{e:.1e}" for e in errs)
        )
    print("  targets: >= 2 x fastdigest; p50 rank error <= 1e-4, p99 <= 2e-5")
    batches = make_batches(args.events)
    bench_chain_direct(batches[:50])  # warm up (numba caches)
    direct = bench_chain_direct(batches)
    through = bench_chain_actors(batches)
    print(f"analytics chain (metrics + anomaly z_score/ewma + sampler), {args.events:,} events in 1,024-event batches:")
    print(f"  handlers in one thread: {direct:.3f} us/event   target <= 1 us")
    print(f"  through the running actors: {through:.3f} us/event (wall)")
    _ = threading  # actors run on their own threads


if __name__ == "__main__":
    main()
