"""Shared by the fault tests: small specs, waiting on the tree, and the accounting of a run
checked against what is on disk."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from telemetry.jsonl import iter_run
from telemetry.store import DB_NAME, HistoryStore

FAST_LATENCY = {"target": "math:sqrt", "args": [2.0], "calls_per_step": 20}
SMALL_GRAPH = {"generator": "gnp", "n": 60, "p": 0.5, "seed": 3}

# every sampling strategy, with a configuration that keeps some events and drops others
SAMPLING: dict[str, dict[str, Any]] = {
    "all": {},
    "uniform": {"rate": 0.2},
    "reservoir": {"k": 40},
    "stratified": {"by": "name", "rates": {"call": 0.1, "step": 0.3}, "default_rate": 1.0},
    "adaptive": {"base_rate": 0.05, "anomaly_rate": 1.0, "cooldown_s": 0.01},
    "importance": {"field": "latency_ms", "quantile": 0.9, "base_rate": 0.05},
}


def latency_spec(
    name: str, budget: float = 1.0, strategy: str = "all", anomaly: bool = True, **extra: Any
) -> dict[str, Any]:
    """A latency experiment that times a cheap call (many events per second)."""
    return {
        "name": name,
        "time_budget_s": budget,
        "seed": 5,
        "workload": {"name": "latency", "params": dict(FAST_LATENCY)},
        "metrics": {"publish_interval_s": 0.1},
        # the emitter blocks (the default policy) up to 30 s, not 1: on a loaded machine the
        # Recorder can be starved longer, and the lossless checks must not see a drop for it
        "telemetry": {"batch_size": 64, "flush_interval_s": 0.02, "block_timeout_s": 30.0},
        "sampling": {"strategy": strategy, "config": dict(SAMPLING[strategy])},
        "anomaly": {
            "enabled": anomaly,
            "methods": ["z_score", "ewma"],
            "metrics": ["latency_ms"],
            "action": "sample_more",
            "warmup": 20,
        },
        **extra,
    }


def coloring_spec(
    name: str,
    budget: float = 1.0,
    strategy: str = "all",
    anomaly: bool = True,
    phases: tuple[str, ...] = ("tabu", "memetic"),
    **extra: Any,
) -> dict[str, Any]:
    """A colouring experiment on a small generated graph, with short steps."""
    config = dict(SAMPLING[strategy])
    if strategy == "importance":
        config["field"] = "conflicts"
    if strategy == "stratified":
        config = {"by": "phase", "rates": {"tabu": 0.3, "memetic": 0.5}, "default_rate": 1.0}
    return {
        "name": name,
        "time_budget_s": budget,
        "seed": 2,
        "workload": {
            "name": "coloring",
            "params": {
                "graph": dict(SMALL_GRAPH),
                "phases": list(phases),
                "gpu": "cpu",
                "tabu": {"iters_per_step": 2000},
                "memetic": {"population": 4, "local_iters": 1000},
            },
        },
        "metrics": {"publish_interval_s": 0.1},
        "telemetry": {"batch_size": 16, "flush_interval_s": 0.02},
        "sampling": {"strategy": strategy, "config": config},
        "anomaly": {"enabled": anomaly, "methods": ["ewma"], "metrics": ["conflicts"], "warmup": 5},
        **extra,
    }


def until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``cond`` (a read of files or of the tree's figures) until it holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def persisted(exp: Any, timeout: float = 120.0) -> int:
    """Events the Recorder has acknowledged (asked now, after what is already queued). The
    bound is generous: on a loaded 2-core machine (a Ray cluster's processes beside the test's)
    a Recorder has been seen to take over 30 s to reach the question; a hung one still fails."""
    return exp.registry.whereis("recorder").ask({"kind": "flush"}, timeout=timeout)["persisted"]


def reached_recorder(exp: Any) -> int:
    """Events the Recorder has heard of: persisted, sampled out or held by a reservoir."""
    s = exp.registry.whereis("recorder").ask({"kind": "summary"}, timeout=30)
    return s["events_persisted"] + s["events_sampled_out"] + s["events_held_by_sampler"]


def seqs_on_disk(artifacts: Path, exp_id: str, run_id: str) -> tuple[list[int], list[int]]:
    """The event seqs in the run's JSONL files and in the SQLite history."""
    jsonl = [ev["seq"] for ev in iter_run(artifacts / exp_id / run_id)]
    store = HistoryStore(artifacts / DB_NAME, readonly=True)
    try:
        hist = [ev["seq"] for ev in store.iter_events(run_id=run_id)]
    finally:
        store.db.close()
    return jsonl, hist


def check_accounts(exp: Any, artifacts: Path, lossless: bool = True) -> dict[str, Any]:
    """The run's final summary accounts for every event, and the disk agrees with it.

    ``lossless``: no fault on the path to the Recorder, so nothing may be lost in transit or
    dropped for any reason but sampling.
    """
    s = orjson.loads((exp.run_dir / "summary.json").read_bytes())
    a = s["accounting"]
    assert a["balanced"], a
    assert a["held"] == s["events_held_by_sampler"] == 0  # the run has ended: a reservoir has gone out
    assert s["events_emitted"] == a["emitted"] == a["persisted"] + a["dropped"] + a["sampled_out"]
    assert s["events_emitted"] == s["events_persisted"] + s["events_dropped"]
    assert a["dropped"] == s["events_dropped_overflow"] + s["events_lost_in_transit"] + s["events_dropped_storage"]
    assert s["events_dropped_storage"] == 0 and s["storage_error"] is None and s["bad_batches"] == 0
    if lossless:
        assert a["dropped"] == 0, s
    jsonl, hist = seqs_on_disk(artifacts, exp.id, exp.run_id)
    assert s["events_persisted"] == len(jsonl) == len(hist) > 0
    assert jsonl == sorted(jsonl) and len(set(jsonl)) == len(jsonl)  # in order, never twice
    assert sorted(hist) == jsonl
    assert jsonl[-1] < s["events_emitted"]  # seqs number the emitted events
    final = exp.summary()
    assert final["events_persisted"] == s["events_persisted"] and final["stale"] is False
    return s


def crucible_run(
    tmp_path: Path, name: str, target: str = "math:sqrt", args: str = "[2.0]", calls_per_step: int = 5, **popen: Any
) -> tuple[subprocess.Popen[str], Path]:
    """``crucible run`` in a process of its own on a latency spec with a 600 s budget (it runs
    until a signal ends it): the process and its artifacts folder. ``popen``: the pipes."""
    art = tmp_path / "art"
    specfile = tmp_path / f"{name}.toml"
    specfile.write_text(
        f'name = "{name}"\ntime_budget_s = 600\n[workload.params]\ntarget = "{target}"\n'
        f"args = {args}\ncalls_per_step = {calls_per_step}\n"
    )
    argv = [sys.executable, "supervisor.py", "run", str(specfile), "--artifacts", str(art), "--no-live"]
    return subprocess.Popen(argv, cwd=Path(__file__).resolve().parent.parent, text=True, **popen), art


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
"""Run a command as the user nobody (the tests that need one run as root)."""


def nobody_env(**extra: str) -> dict[str, str]:
    """The environment for a command run as nobody: this checkout importable, and coverage's
    subprocess hooks off (that user may not write the suite's data files)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("COV_CORE", "COVERAGE"))}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return {**env, **extra}


def skip_unless_nobody_can_run_this_checkout() -> None:
    """Skip unless root, ``setpriv`` and a checkout (and interpreter) that the user nobody may
    read: a clone under a folder only root may enter (``mktemp -d``) is not one."""
    import os
    import shutil

    import pytest

    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as nobody")
    probe = subprocess.run(
        [*NOBODY, sys.executable, "-c", "import cli"], cwd="/", env=nobody_env(), capture_output=True, timeout=120
    )
    if probe.returncode != 0:
        why = (probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        pytest.skip(f"the user nobody cannot run this checkout ({why})")


def feed_fifo_eof(fifo: Path) -> None:
    """Open a writer on ``fifo`` and close it: a reader stuck in open() or read() gets EOF."""
    import contextlib
    import os

    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def ends_within(
    fn: Callable[[], Any], deadline: float, free: Callable[[], None], left: Callable[[Any], None] | None = None
) -> Any:
    """``fn()`` on a thread, which must end within ``deadline`` seconds; its value, or its
    exception raised here. If it hangs (the defect a test looks for), ``free`` is called until
    the thread ends (``left`` tidies what it returned late, an actor it started, say) and the
    test fails, leaving no stuck thread behind."""
    import threading

    import pytest

    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = exc
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    if not done.wait(deadline):
        for _ in range(50):  # it may block more than once: free each
            free()
            if done.wait(0.1):
                break
        if left is not None and "value" in box:
            left(box["value"])
        pytest.fail(f"blocked for {deadline} s")
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
