"""The lab daemon: submit-to-first-event latency, resume time after ``kill -9``, and a soak.

Run: ``python -m bench.daemon [--rounds 5] [--recorded 10 100] [--soak-minutes 30] [--soak-log F]``.

Each figure comes with its anchor, measured in the same run:

* **submit -> first event**: a ``crucible lab serve`` process takes a spec over HTTP (the
  client), validates it, queues it on disk, starts its tree, and the first event lands in
  the run's JSONL file. Anchor: ``Lab.start_experiment`` in this process to the first event
  on disk (no HTTP, no queue, no other process). Reported: medians and their ratio.
* **resume after kill -9**: N experiments recorded in the folder (the last ``min(N, 10)``
  still running when the daemon is killed, the others stopped), then a new daemon on the
  folder: the time until it serves, and until every killed run has a new event on disk.
  Anchor: a daemon's start on an empty folder to serving.
* **soak**: a daemon takes a short experiment (``--experiment-s``, 3 s) about every second (at
  most ``--concurrent`` at once; a submission the daemon had to queue holds the next one back
  until it starts, so no backlog builds up) for ``--soak-minutes``; its RSS and thread count
  are sampled every 10 s and the least-squares slope per hour is reported (a bounded daemon
  has slopes near zero); so are the slope and the growth per experiment after the first third
  (the warm-up: modules imported by the first experiments, ``keep_ended`` handles filling up),
  and the heaps of glibc's malloc arenas the daemon maps at the end (:func:`arena_heaps`).
  Each sample also splits the resident memory by kind of mapping, read from
  ``/proc/PID/smaps`` (:func:`classify`: glibc's main heap, its other arenas, thread stacks,
  other anonymous memory, files), so that growth is seen where it happens; and the slopes of
  the middle and last thirds are reported apart, so that growth that levels off is told from
  growth that does not. ``--soak-log`` writes every sample as a JSON line, to follow a long
  soak while it runs. The experiments time ``time.sleep`` so the soak measures the daemon, not
  the workload. ``MALLOC_ARENA_MAX=16`` in the environment runs the daemon with glibc's
  default arenas on 2 cores (the daemon keeps an operator's setting).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from actors.log import configure_logging
from dashboard.client import LabClient

ROOT = Path(__file__).resolve().parent.parent
SERVE = (sys.executable, "-m", "supervisor", "lab", "serve", "--port", "0", "--allow-target", "time:sleep")


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
STACK_MAX = 16 << 20  # a thread's stack (8 MiB by default: RLIMIT_STACK) sits above a guard page


class Mapping(NamedTuple):
    lo: int
    hi: int
    perm: str
    name: str
    rss_kb: int


def parse_maps(text: str) -> list[Mapping]:
    """The mappings of a ``/proc/PID/maps`` or ``/proc/PID/smaps`` text, in address order;
    ``rss_kb`` is 0 for ``maps``, which has no ``Rss:`` lines."""
    out: list[Mapping] = []
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            out.append(Mapping(lo, hi, head[1], head[5].strip() if len(head) > 5 else "", 0))
        elif line.startswith("Rss:") and out:
            out[-1] = out[-1]._replace(rss_kb=int(line.split()[1]))
    return out


def _arena_heap(maps: list[Mapping], i: int) -> bool:
    """Mapping ``i`` is a heap of a glibc non-main arena: anonymous, aligned on 64 MiB and
    spanning 64 MiB with the reserved (``---p``) rest that follows it."""
    m = maps[i]
    if m.name or m.lo % HEAP_MAX or not m.perm.startswith("rw"):
        return False
    end = m.hi
    if i + 1 < len(maps) and maps[i + 1].lo == m.hi and maps[i + 1].perm.startswith("---") and not maps[i + 1].name:
        end = maps[i + 1].hi
    return end - m.lo == HEAP_MAX


def _thread_stack(maps: list[Mapping], i: int) -> bool:
    """Mapping ``i`` is a thread's stack: anonymous and writable, right above an anonymous
    guard page (``---p``), at most 16 MiB (glibc maps stack and guard at once)."""
    m = maps[i]
    if m.name or not m.perm.startswith("rw") or m.hi - m.lo > STACK_MAX or i == 0:
        return False
    g = maps[i - 1]
    return g.hi == m.lo and g.perm.startswith("---") and not g.name and g.hi - g.lo <= 64 << 10


MAPPING_CLASSES = ("heap", "arenas", "stacks", "anon", "files")


def classify(maps: list[Mapping]) -> dict[str, int]:
    """Resident KB by kind of mapping: ``heap`` (glibc's main arena, ``[heap]``), ``arenas``
    (the heaps of its other arenas), ``stacks`` (threads' and the main one), ``anon`` (other
    anonymous memory: Python's 1 MiB obmalloc arenas, glibc's mmapped large blocks), ``files``
    (file-backed: shared libraries, sqlite's ``-shm``; and the kernel's ``[vdso]``, ``[vvar]``)."""
    kb = dict.fromkeys(MAPPING_CLASSES, 0)
    for i, m in enumerate(maps):
        if m.name == "[heap]":
            kind = "heap"
        elif _arena_heap(maps, i):
            kind = "arenas"
        elif m.name == "[stack]" or _thread_stack(maps, i):
            kind = "stacks"
        elif not m.name or m.name.startswith("[anon"):
            kind = "anon"
        else:
            kind = "files"
        kb[kind] += m.rss_kb
    return kb


def arena_heaps(pid: int) -> int:
    """How many heaps of glibc's non-main malloc arenas process ``pid`` maps, read from
    outside. One arena per thread, by default, is where the daemon's memory went."""
    maps = parse_maps(Path(f"/proc/{pid}/maps").read_text())
    return sum(_arena_heap(maps, i) for i in range(len(maps)))


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 2:
        return 0.0
    fit = statistics.linear_regression(ts, ys)
    return fit.slope * 3600


WARMUP = 1 / 3  # of the soak: the first experiments import modules and fill keep_ended (100 handles)


def resident_by_mapping(pid: int) -> dict[str, int]:
    """Process ``pid``'s resident KB by kind of mapping (:func:`classify`)."""
    return classify(parse_maps(Path(f"/proc/{pid}/smaps").read_text()))


def bench_soak(
    minutes: float, concurrent: int, work: Path, log: Path | None = None, experiment_s: float = 3.0
) -> dict[str, Any]:
    d = Daemon(work / "soak", max_experiments=concurrent)
    t0 = time.monotonic()
    samples: list[dict[str, Any]] = []  # s, rss (MiB), threads, experiments submitted, KB by mapping
    k = next_sample = 0
    waiting: str | None = None  # a submission the daemon queued: no other until it starts
    out = log.open("w") if log else None
    try:
        while time.monotonic() - t0 < minutes * 60:
            if waiting is not None and not any(
                e["id"] == waiting and e["status"] == "queued" for e in d.client.list(history=False)
            ):
                waiting = None
            if waiting is None:
                reply = d.client.submit(spec(f"soak{k}", experiment_s, sleepy=True))
                k += 1
                if reply["status"] == "queued":
                    waiting = reply["id"]
            if time.monotonic() >= next_sample:
                rss, threads = rss_threads(d.proc.pid)
                sample = {"s": time.monotonic() - t0, "rss": rss, "threads": threads, "exps": k}
                sample.update(resident_by_mapping(d.proc.pid))
                samples.append(sample)
                if out:
                    out.write(json.dumps(sample) + "\n")
                    out.flush()
                next_sample = time.monotonic() + 10
            time.sleep(1.0)  # the soak's submission rate: at most one experiment a second
        heaps = arena_heaps(d.proc.pid)
    finally:
        d.stop()
        if out:
            out.close()
    result = soak_summary(samples, minutes * 60)
    result["arena_heaps"] = heaps
    print(f"{result['text']}; malloc arena heaps at the end: {heaps}")
    return result


def soak_summary(samples: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Slopes of RSS, threads and each kind of mapping; the middle and last thirds apart,
    so that growth that levels off shows as a last-third slope well under the middle one."""

    def slope(rows: list[dict[str, Any]], key: str) -> float:
        return slope_per_hour([r["s"] for r in rows], [r[key] for r in rows])

    first, last = samples[0], samples[-1]
    late = [r for r in samples if r["s"] >= seconds * WARMUP]
    middle = [r for r in late if r["s"] < seconds * 2 * WARMUP]
    end = [r for r in late if r["s"] >= seconds * 2 * WARMUP]
    per_exp_kb = (
        statistics.linear_regression([r["exps"] for r in late], [r["rss"] for r in late]).slope * 1024
        if len(late) > 1
        else 0.0
    )
    rss_slope, late_slope = slope(samples, "rss"), slope(late, "rss")
    start = late[0] if late else last
    kinds = ", ".join(
        f"{kind} {start[kind] / 1024:.1f} -> {last[kind] / 1024:.1f} MiB ({slope(late, kind) / 1024:+.1f} MiB/h)"
        for kind in MAPPING_CLASSES
    )
    text = (
        f"soak {seconds / 60:g} min, {last['exps']} experiments: RSS {first['rss']:.0f} -> {last['rss']:.0f} MiB "
        f"(slope {rss_slope:+.1f} MiB/h, {rss_slope / first['rss'] * 100:+.1f} % of the start per hour), "
        f"threads {first['threads']} -> {last['threads']} (slope {slope(samples, 'threads'):+.1f}/h); "
        f"after the first {WARMUP * seconds / 60:g} min ({start['exps']} experiments, {start['rss']:.0f} MiB): "
        f"slope {late_slope:+.1f} MiB/h, {per_exp_kb:+.1f} KB per experiment; middle third "
        f"{slope(middle, 'rss'):+.1f} MiB/h, last third {slope(end, 'rss'):+.1f} MiB/h; resident by mapping "
        f"after the first third: {kinds}"
    )
    return {
        "text": text,
        "rss_slope_mib_h": rss_slope,
        "threads_slope_h": slope(samples, "threads"),
        "experiments": last["exps"],
        "late_slope_mib_h": late_slope,
        "middle_slope_mib_h": slope(middle, "rss"),
        "last_slope_mib_h": slope(end, "rss"),
        "late_kb_per_experiment": per_exp_kb,
        "late_mapping_slopes_kib_h": {kind: slope(late, kind) for kind in MAPPING_CLASSES},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recorded", type=int, nargs="*", default=[10, 100])
    ap.add_argument("--soak-minutes", type=float, default=0.0, help="0 skips the soak")
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument(
        "--experiment-s",
        type=float,
        default=3.0,
        help="each soak experiment's time budget (default 3 s: experiments coming and going; "
        "long ones measure the daemon over time with few starts)",
    )
    ap.add_argument("--soak-log", type=Path, help="write each soak sample there, a JSON line each")
    args = ap.parse_args(argv)
    configure_logging("WARNING")  # the in-process anchor's Lab logs every start and end otherwise
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.rounds > 0:
            bench_submit(args.rounds, work)
        for n in args.recorded:
            bench_resume(n, work)
        if args.soak_minutes > 0:
            bench_soak(args.soak_minutes, args.concurrent, work, args.soak_log, args.experiment_s)


if __name__ == "__main__":
    main()
