"""Actor runtime benchmark: raw pykka vs our msgpack refs, columnar batches, restart latency.

Run: ``python -m bench.actors [--messages N] [--restarts N]``. Prints absolute figures and
the ratios against the anchor (raw pykka tell), all measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import pykka

from actors import Actor, Registry
from actors.log import configure_logging
from actors.runtime import freeze_startup_heap
from supervisor import ChildSpec, Supervisor


class RawCounter(pykka.ThreadingActor):
    use_daemon_thread = True

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def on_receive(self, message: Any) -> Any:
        if message.get("kind") == "get":
            return self.n
        self.n += 1
        return None


class Counter(Actor):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.events = 0
        self.acc = 0.0

    def handle_tick(self, msg: dict[str, Any]) -> None:
        self.n += 1

    def handle_events(self, msg: dict[str, Any]) -> None:
        v = msg["value"]
        self.events += len(v)
        self.acc += float(v.sum())

    def handle_get(self, msg: dict[str, Any]) -> list[int]:
        return [self.n, self.events]

    def handle_crash(self, msg: dict[str, Any]) -> None:
        raise RuntimeError("bench crash")

    def handle_ping(self, msg: dict[str, Any]) -> str:
        return "pong"


def bench_raw(n: int) -> float:
    ref = RawCounter.start()
    msg = {"kind": "tick", "n": 1}
    t0 = time.perf_counter()
    for _ in range(n):
        ref.tell(msg)
    got = ref.ask({"kind": "get"})
    dt = time.perf_counter() - t0
    assert got == n
    ref.stop()
    return n / dt


def bench_ours(n: int) -> float:
    ref = Counter.start()
    t0 = time.perf_counter()
    for i in range(n):
        ref.tell({"kind": "tick", "n": i})
    got = ref.ask({"kind": "get"})
    dt = time.perf_counter() - t0
    assert got[0] == n
    ref.stop()
    return n / dt


def bench_batches(n_events: int, batch: int = 1024) -> float:
    ref = Counter.start()
    rng = np.random.default_rng(0)
    base_ts = time.time()
    n_batches = max(1, n_events // batch)
    t0 = time.perf_counter()
    for b in range(n_batches):
        ref.tell(
            {
                "kind": "events",
                "ts": base_ts + np.arange(batch, dtype=np.float64) * 1e-6,
                "step": np.arange(b * batch, (b + 1) * batch, dtype=np.int64),
                "value": rng.random(batch),
            }
        )
    got = ref.ask({"kind": "get"})
    dt = time.perf_counter() - t0
    assert got[1] == n_batches * batch
    ref.stop()
    return n_batches * batch / dt


def bench_restart(n: int) -> list[float]:
    reg = Registry()
    sup = Supervisor.start([ChildSpec("w", Counter, name="w")], max_restarts=n + 10, max_seconds=3600, registry=reg)
    lat = []
    for _ in range(n):
        old = reg.whereis("w")
        t0 = time.perf_counter()
        old.tell({"kind": "crash"})
        new = reg.await_name("w", timeout=5, not_urn=old.urn)
        assert new is not None and new.ask({"kind": "ping"}) == "pong"
        lat.append(time.perf_counter() - t0)
    sup.stop()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=1000)
    args = ap.parse_args()
    configure_logging("CRITICAL")
    freeze_startup_heap()  # as `crucible` does after start-up (see actors/runtime.py)
    bench_raw(10_000), bench_ours(10_000)  # warm up
    # Interleaved rounds; the median of the per-round ratios (this machine is shared and noisy).
    rounds = [
        (bench_raw(args.messages), bench_ours(args.messages), bench_batches(args.events)) for _ in range(args.rounds)
    ]
    raw = statistics.median(r[0] for r in rounds)
    ours = statistics.median(r[1] for r in rounds)
    batches = statistics.median(r[2] for r in rounds)
    ratio_b = statistics.median(r[1] / r[0] for r in rounds)
    ratio_c = statistics.median(r[2] / r[0] for r in rounds)
    lat = bench_restart(args.restarts)
    q = statistics.quantiles(lat, n=100)
    p50, p99 = statistics.median(lat) * 1e3, q[98] * 1e3
    print(f"(a) raw pykka tell             {raw:>12,.0f} msg/s   (anchor)")
    print(f"(b) msgpack ActorRef.tell      {ours:>12,.0f} msg/s   {ratio_b:5.2f} x anchor   target >= 0.6")
    print(f"(c) columnar 1,024-event batch {batches:>12,.0f} ev/s    {ratio_c:5.2f} x anchor   target >= 6")
    print(f"    (medians over {args.rounds} interleaved rounds; ratios are medians of per-round ratios)")
    print(f"(d) restart latency            p50 {p50:.3f} ms  p99 {p99:.3f} ms   target p99 <= 5 ms")


if __name__ == "__main__":
    main()
