"""The lab daemon: submit-to-first-event latency, resume time after ``kill -9``, and a soak.

Run: ``python -m bench.daemon [--rounds 5] [--recorded 10 100] [--soak-minutes 30]``.

Each figure comes with its anchor, measured in the same run:

* **submit -> first event**: a ``crucible lab serve`` process takes a spec over HTTP (the
  client), validates it, queues it on disk, starts its tree, and the first event lands in
  the run's JSONL file. Anchor: ``Lab.start_experiment`` in this process to the first event
  on disk (no HTTP, no queue, no other process). Reported: medians and their ratio.
* **resume after kill -9**: N experiments recorded in the folder (the last ``min(N, 10)``
  still running when the daemon is killed, the others stopped), then a new daemon on the
  folder: the time until it serves, and until every killed run has a new event on disk.
  Anchor: a daemon's start on an empty folder to serving.
* **soak**: a daemon takes a short experiment every few seconds (at most ``--concurrent``
  at once) for ``--soak-minutes``; its RSS and thread count are sampled every 10 s and the
  least-squares slope per hour is reported (a bounded daemon has slopes near zero); so are the
  slope and the growth per experiment after the first third (the warm-up: modules imported
  by the first experiments, ``keep_ended`` handles filling up), and the heaps of glibc's
  malloc arenas the daemon maps at the end (:func:`arena_heaps`). The experiments time
  ``time.sleep`` so the soak measures the daemon, not the workload. ``MALLOC_ARENA_MAX=16``
  in the environment runs the daemon with glibc's default arenas on 2 cores (the daemon
  keeps an operator's setting).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.log import configure_logging
from dashboard.client import LabClient

ROOT = Path(__file__).resolve().parent.parent
SERVE = (sys.executable, "-m", "supervisor", "lab", "serve", "--port", "0")


def spec(name: str, budget: float, sleepy: bool = False) -> dict[str, Any]:
    params = {"target": "time:sleep", "args": [0.005]} if sleepy else {"target": "math:sqrt", "args": [2.0]}
    return {
        "name": name,
        "time_budget_s": budget,
        "workload": {"name": "latency", "params": {**params, "calls_per_step": 5}},
        "telemetry": {"batch_size": 1, "flush_interval_s": 0.01},
    }


class Daemon:
    def __init__(self, artifacts: Path, max_experiments: int) -> None:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [*SERVE, "--artifacts", str(artifacts), "--max-experiments", str(max_experiments)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("lab daemon: "):
            self.proc.kill()
            raise SystemExit(f"the daemon did not start: {line!r}")
        self.serving_s = time.perf_counter() - t0
        self.client = LabClient(line.split()[2], (artifacts / "dashboard.token").read_text().strip())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def first_event(run_parent: Path, deadline_s: float = 120.0) -> float:
    """When the first event line appears under ``run_parent`` (an experiment's folder)."""
    end = time.perf_counter() + deadline_s
    while time.perf_counter() < end:
        for f in run_parent.glob("*/events.jsonl"):
            if f.stat().st_size > 0:
                return time.perf_counter()
        time.sleep(0.001)  # polling the file system: the measured quantity is a file appearing
    raise SystemExit(f"no event under {run_parent}")


def lines(run_parent: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in run_parent.glob("*/events*.jsonl"))


def bench_submit(rounds: int, work: Path) -> dict[str, float]:
    from experiments.lab import Lab

    daemon_s, lab_s = [], []
    d = Daemon(work / "daemon", max_experiments=rounds + 1)
    lab = Lab(work / "lab")
    try:
        for i in range(rounds):
            t0 = time.perf_counter()
            d.client.submit(spec(f"s{i}", 600))
            daemon_s.append(first_event(work / "daemon" / f"s{i}") - t0)
            t0 = time.perf_counter()
            exp = lab.start_experiment(spec(f"l{i}", 600))
            lab_s.append(first_event(work / "lab" / exp.id) - t0)
    finally:
        d.stop()
        lab.shutdown()
    a, b = statistics.median(daemon_s), statistics.median(lab_s)
    print(
        f"submit -> first event: daemon {a * 1e3:.0f} ms, in-process Lab {b * 1e3:.0f} ms (anchor); ratio {a / b:.2f}x"
    )
    return {"daemon_s": a, "lab_s": b}


def bench_resume(n: int, work: Path) -> dict[str, float]:
    art = work / f"resume{n}"
    running = min(n, 10)
    d = Daemon(art, max_experiments=running)
    for i in range(n - running):  # recorded and ended
        d.client.submit(spec(f"done{i}", 0.2))
    while any(e["status"] in ("running", "queued") for e in d.client.list()):
        time.sleep(0.05)  # waiting for the ended ones to end
    for i in range(running):
        d.client.submit(spec(f"live{i}", 600))
    for i in range(running):
        first_event(art / f"live{i}")
    d.kill()
    before = {i: lines(art / f"live{i}") for i in range(running)}
    t0 = time.perf_counter()
    d = Daemon(art, max_experiments=running)
    serving = time.perf_counter() - t0
    pending = set(range(running))
    while pending:
        pending = {i for i in pending if lines(art / f"live{i}") <= before[i]}
        time.sleep(0.002)  # polling files: the measured quantity is the events reappearing
    resumed = time.perf_counter() - t0
    d.stop()
    empty = Daemon(work / f"empty{n}", max_experiments=1)
    empty.stop()
    print(
        f"resume after kill -9, {n} recorded ({running} running): serving in {serving:.2f} s, every run "
        f"recording again in {resumed:.2f} s; empty-folder start (anchor) {empty.serving_s:.2f} s; "
        f"ratio {resumed / empty.serving_s:.2f}x"
    )
    return {"serving_s": serving, "resumed_s": resumed, "anchor_s": empty.serving_s}


def rss_threads(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


HEAP_MAX = 64 << 20  # a glibc arena other than the main one lives in heaps of this size, aligned on it


def arena_heaps(pid: int) -> int:
    """How many heaps of glibc's non-main malloc arenas process ``pid`` maps, read from
    outside: anonymous mappings aligned on 64 MiB that span 64 MiB (the part in use, then the
    reserved rest). One arena per thread, by default, is where the daemon's memory went."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        maps.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
    n = 0
    for i, (lo, hi, perm, name) in enumerate(maps):
        if name or lo % HEAP_MAX or not perm.startswith("rw"):
            continue
        end = hi
        if i + 1 < len(maps) and maps[i + 1][0] == hi and maps[i + 1][2].startswith("---") and not maps[i + 1][3]:
            end = maps[i + 1][1]
        n += end - lo == HEAP_MAX
    return n


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 2:
        return 0.0
    fit = statistics.linear_regression(ts, ys)
    return fit.slope * 3600


WARMUP = 1 / 3  # of the soak: the first experiments import modules and fill keep_ended (100 handles)


def bench_soak(minutes: float, concurrent: int, work: Path) -> dict[str, float]:
    d = Daemon(work / "soak", max_experiments=concurrent)
    t0 = time.monotonic()
    samples: list[tuple[float, float, int, int]] = []  # (s, RSS MiB, threads, experiments submitted)
    k = next_sample = 0
    try:
        while time.monotonic() - t0 < minutes * 60:
            d.client.submit(spec(f"soak{k}", 3.0, sleepy=True))
            k += 1
            if time.monotonic() >= next_sample:
                rss, threads = rss_threads(d.proc.pid)
                samples.append((time.monotonic() - t0, rss, threads, k))
                next_sample = time.monotonic() + 10
            time.sleep(1.0)  # the soak's submission rate: one experiment a second
        heaps = arena_heaps(d.proc.pid)
    finally:
        d.stop()
    ts = [s[0] for s in samples]
    rss_slope = slope_per_hour(ts, [s[1] for s in samples])
    thr_slope = slope_per_hour(ts, [s[2] for s in samples])
    late = [s for s in samples if s[0] >= minutes * 60 * WARMUP]
    late_slope = slope_per_hour([s[0] for s in late], [s[1] for s in late])
    per_exp_kb = (
        statistics.linear_regression([s[3] for s in late], [s[1] for s in late]).slope * 1024 if len(late) > 1 else 0.0
    )
    print(
        f"soak {minutes:g} min, {k} experiments: RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB "
        f"(slope {rss_slope:+.1f} MiB/h, {rss_slope / samples[0][1] * 100:+.1f} % of the start per hour), "
        f"threads {samples[0][2]} -> {samples[-1][2]} (slope {thr_slope:+.1f}/h); "
        f"after the first {WARMUP * minutes:g} min ({late[0][3] if late else k} experiments, "
        f"{late[0][1] if late else 0:.0f} MiB): slope {late_slope:+.1f} MiB/h, {per_exp_kb:+.1f} KB per experiment; "
        f"malloc arena heaps at the end: {heaps}"
    )
    return {
        "rss_slope_mib_h": rss_slope,
        "threads_slope_h": thr_slope,
        "experiments": k,
        "late_slope_mib_h": late_slope,
        "late_kb_per_experiment": per_exp_kb,
        "arena_heaps": heaps,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recorded", type=int, nargs="*", default=[10, 100])
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="0 skips the soak")
    ap.add_argument("--concurrent", type=int, default=4)
    args = ap.parse_args(argv)
    configure_logging("WARNING")  # the in-process anchor's Lab logs every start and end otherwise
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.rounds > 0:
            bench_submit(args.rounds, work)
        for n in args.recorded:
            bench_resume(n, work)
        if args.soak_minutes > 0:
            bench_soak(args.soak_minutes, args.concurrent, work)


if __name__ == "__main__":
    main()
