"""History write throughput: PostgreSQL against SQLite, from 1, 2 and 4 concurrent writers.

Run: ``python -m bench.history [--url postgresql://...] [--writers 1 2 4] [--batches N]``.

Each writer is a process of its own (as the Recorders of experiments on several hosts, or of
a Lab's experiments, write one history), writing one run of the same experiment:

* ``store``: encoded 1,024-event batches (the Emitter's default size) through the store's
  ``insert_batch`` + ``commit``, one transaction per batch (the Recorder's ``commit_every = 1``);
* ``recorder``: a Recorder actor fed the same batches as messages, until it acknowledges them
  (its JSONL file and the history: the whole persistence path).

Figures are events/s from the moment every writer is ready (a barrier) until the last one
is done, the median of ``--rounds`` rounds (PostgreSQL and SQLite interleaved, each round on
fresh databases), for PostgreSQL and for SQLite (one file for all writers, in WAL mode: SQLite lets
one writer in at a time), with their ratio. Without ``--url`` the benchmark starts a
throwaway PostgreSQL server (Debian's binaries, as the tests do) with ``fsync`` on, as a
production server runs; SQLite runs with the store's own ``synchronous=NORMAL``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 1024


def make_batches(run_id: str, writer: int, batches: int, batch: int) -> list[dict[str, Any]]:
    """A run's worth of columnar batches (what the Emitter sends), seqs and times increasing."""
    from telemetry.schema import rows_to_batch

    rng = np.random.default_rng(writer)
    t0 = 1_700_000_000_000_000 + writer
    proto = [
        {
            "v": 1,
            "seq": i,
            "ts": t0 + i * 100,
            "experiment_id": "bench",
            "run_id": run_id,
            "pass": 0,
            "phase": "tabu",
            "step": i,
            "name": "step",
            "values": {"conflicts": float(rng.integers(0, 1000)), "colors": 48.0},
            "success": True,
            "parameters": {"tenure": 7} if i % 100 == 0 else None,
        }
        for i in range(batch)
    ]
    base = rows_to_batch(proto, "bench", run_id)
    out = []
    for k in range(batches):
        b = dict(base)
        b["seq"] = base["seq"] + k * batch
        b["ts"] = base["ts"] + k * batch * 100
        b["step"] = base["step"] + k * batch
        b["values"] = {name: col.copy() for name, col in base["values"].items()}
        out.append(b)
    return out


def writer(mode: str, target: str, run_id: str, idx: int, batches: int, batch: int, ready: Any, out: Any) -> None:
    """One writer process: build its batches, open its store (or Recorder), wait, write, report."""
    from actors.messages import encode
    from telemetry.history import open_history

    bs = make_batches(run_id, idx, batches, batch)
    if mode == "store":
        store = open_history(target)
        wire = [(b, encode(b)) for b in bs]
        ready.wait()
        t0 = time.perf_counter()
        for b, data in wire:
            seq, ts = b["seq"], b["ts"]
            store.insert_batch("bench", run_id, [int(seq[0]), int(seq[-1])], int(ts[0]), int(ts[-1]), data, batch)
            store.commit()
        elapsed = time.perf_counter() - t0
        store.close()
    else:
        from actors.recorder import Recorder

        art = Path(tempfile.mkdtemp(prefix=f"bench-history-{idx}-"))
        warm = Recorder.start(art, "warm-up", "w", history=f"{art}/warm-up.sqlite3")  # numba's kernels loaded
        warm.tell_bytes(encode(make_batches("w", idx, 1, batch)[0]))
        warm.ask({"kind": "flush"})
        warm.stop()
        rec = Recorder.start(art, "bench", run_id, history=target, fsync_interval=1.0)
        msgs = [encode(b) for b in bs]
        ready.wait()
        t0 = time.perf_counter()
        for m in msgs:
            rec.tell_bytes(m)
        got = rec.ask({"kind": "flush"}, timeout=600)["persisted"]
        elapsed = time.perf_counter() - t0
        rec.stop()
        assert got == batches * batch, got
    out.put((idx, elapsed))


def run(kind: str, mode: str, target: str, tag: str, writers: int, batches: int, batch: int) -> float:
    """Events/s persisted by ``writers`` concurrent writers into ``target`` (all ready, then timed);
    writer ``i`` writes run ``{tag}-w{i}``."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(target=writer, args=(mode, target, f"{tag}-w{i}", i, batches, batch, ready, out))
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    times = [out.get(timeout=900)[1] for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a {kind} writer failed (exit {p.exitcode})")
    return writers * batches * batch / max(times)


def check(target: str, tag: str, writers: int, batches: int, batch: int) -> None:
    """Every event written is there (the benchmark measures nothing that was lost)."""
    from telemetry.history import open_history

    store = open_history(target, readonly=True)
    try:
        for w in range(writers):
            assert store.max_seq(f"{tag}-w{w}") == batches * batch - 1
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a PostgreSQL history to write into (default: start a throwaway server)")
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batches", type=int, default=400, help="batches per writer (default 400)")
    ap.add_argument("--batch", type=int, default=BATCH, help="events per batch (default 1024)")
    ap.add_argument("--modes", nargs="+", choices=("store", "recorder"), default=["store", "recorder"])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per figure, interleaved; medians (default 3)")
    args = ap.parse_args()

    from actors.log import configure_logging
    from telemetry.history import open_history

    configure_logging("WARNING")
    server = None
    if args.url is None:
        from tests.pg_server import PgServer, find_bin

        bindir = find_bin()
        if bindir is None:
            raise SystemExit("no PostgreSQL binaries (apt-get install postgresql), and no --url given")
        server = PgServer(bindir, fsync=True)
    try:
        rows = []
        for mode in args.modes:
            for n in args.writers:
                figures: dict[str, list[float]] = {"postgresql": [], "sqlite": []}
                for _ in range(args.rounds):
                    for kind in figures:
                        if kind == "postgresql":
                            target = server.new_database() if server is not None else args.url
                        else:
                            target = f"{tempfile.mkdtemp(prefix='bench-history-')}/history.sqlite3"
                        open_history(target).close()  # the schema, before the clock starts
                        tag = f"{mode}-{n}-{time.time_ns()}"
                        figures[kind].append(run(kind, mode, target, tag, n, args.batches, args.batch))
                        check(target, tag, n, args.batches, args.batch)
                pg, lite = statistics.median(figures["postgresql"]), statistics.median(figures["sqlite"])
                rows.append((mode, n, pg, lite))
                spread = ", ".join(f"{k} {min(v):,.0f}-{max(v):,.0f}" for k, v in figures.items())
                print(
                    f"{mode:8s} {n} writer(s): PostgreSQL {pg:>12,.0f} events/s, "
                    f"SQLite {lite:>12,.0f} events/s, ratio {pg / lite:.2f} x  (rounds: {spread})",
                    flush=True,
                )
        print()
        print("| mode | writers | PostgreSQL events/s | SQLite events/s | PostgreSQL / SQLite |")
        print("|---|---|---|---|---|")
        for mode, n, pg, lite in rows:
            print(f"| {mode} | {n} | {pg:,.0f} | {lite:,.0f} | {pg / lite:.2f} x |")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
