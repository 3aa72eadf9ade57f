"""``ab`` and ``tune`` with ``parallel=N``: the same runs as one after another, in worker
processes (spawn) or Ray tasks; a failing job is a failed row, never a hang; Ctrl-C stops
the workers' experiments.

The A/B's workload is a colouring with fixed work (tabu only, an iteration limit per k, no
time budget reached, hypertune's window longer than any run), so each run's result depends
only on its seed and the parallel report must equal the sequential one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from experiments.parallel import WORKER_DIED, Job, JobRunner, check_parallel, run_jobs
from experiments.tuning import ABFailed, ab, tune
from telemetry.jsonl import iter_run
from tests.ray_cluster import ray_or_skip

ROOT = Path(__file__).resolve().parent.parent

FIXED_WORK = {  # about 0.3 s a run; finals 13 or 14 colours by seed
    "name": "fixed",
    "time_budget_s": 120.0,
    "hypertune": {"window_s": 3600},
    "workload": {
        "name": "coloring",
        "params": {
            "graph": {"generator": "gnp", "n": 80, "p": 0.5, "seed": 5},
            "phases": ["tabu"],
            "gpu": "cpu",
            "tabu": {"iters_per_step": 500, "max_iters_per_k": 1000, "stall_iters": 1000},
        },
    },
    "telemetry": {"flush_interval_s": 0.05},
}
LATENCY = {  # a fixed number of calls: the run ends on its own
    "name": "lat",
    "time_budget_s": 60.0,
    "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0], "calls": 40}},
    "telemetry": {"flush_interval_s": 0.05},
}
TIMES = {"trace", "time_to_target", "ttt_median"}  # wall-clock figures: they differ between any two runs


def _without_times(rep: dict) -> dict:
    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in TIMES and k != "run_dir"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip({k: v for k, v in rep.items() if k != "parallel"})


def _history(artifacts: Path) -> dict[str, tuple[str, int]]:
    """run_id -> (experiment id, events stored) from the SQLite history."""
    db = sqlite3.connect(artifacts / "history.sqlite3")
    try:
        runs = dict(db.execute("SELECT run_id, experiment_id FROM runs"))
        events = dict(db.execute("SELECT run_id, SUM(n) FROM batches GROUP BY run_id"))
    finally:
        db.close()
    return {r: (e, int(events.get(r) or 0)) for r, e in runs.items()}


def _assert_history_matches_run_dirs(artifacts: Path, run_dirs: list[str]) -> None:
    hist = _history(artifacts)
    assert len(set(run_dirs)) == len(run_dirs)
    for rd in map(Path, run_dirs):
        exp_id, stored = hist[rd.name]
        assert exp_id == rd.parent.name
        assert stored == sum(1 for _ in iter_run(rd)) > 0  # every event of the run, once


def owners_of(rep: dict) -> set[int]:
    """The pids of the processes that ran the report's runs."""
    return {orjson.loads((Path(r["run_dir"]) / "lifecycle.json").read_bytes())["owner"]["pid"] for r in rep["runs"]}


def test_ab_in_parallel_reports_what_the_sequential_ab_reports(tmp_path):
    seen = []
    seq = ab(FIXED_WORK, 3, tmp_path / "seq")
    par = ab(FIXED_WORK, 3, tmp_path / "par", parallel=2, on_run=seen.append)
    assert par["parallel"] == 2 and not par["failed"]
    assert [(r["arm"], r["seed"], r["final"]) for r in par["runs"]] == [
        (r["arm"], r["seed"], r["final"]) for r in seq["runs"]
    ]
    assert sorted((r["arm"], r["seed"]) for r in seen) == sorted((r["arm"], r["seed"]) for r in par["runs"])
    assert _without_times(par) == _without_times(seq)  # finals, targets, reached counts, final_best statistics
    assert len({r["final"] for r in seq["runs"]}) > 1  # the seeds differ: the comparison is not trivial
    assert [Path(r["run_dir"]).parent.name for r in par["runs"]] == [  # each pair the other way round
        "ab-on-0", "ab-off-0", "ab-off-1", "ab-on-1", "ab-on-2", "ab-off-2"
    ]  # fmt: skip
    # a warm-up run in this process (sequential) and in each worker process, outside the report
    warm = [orjson.loads(p.read_bytes()) for p in (tmp_path / "par").glob("ab-warmup/*/lifecycle.json")]
    assert 1 <= len(warm) <= 2 and {w["owner"]["pid"] for w in warm} <= owners_of(par)
    assert len(list((tmp_path / "seq").glob("ab-warmup/*/lifecycle.json"))) == 1
    assert seq["warm_up"] is True and all(r["seed"] < 3 for r in seq["runs"])
    owners = set()
    for r in par["runs"]:
        life = orjson.loads((Path(r["run_dir"]) / "lifecycle.json").read_bytes())
        assert (life["status"], life["reason"]) == ("stopped", "completed")
        owners.add(life["owner"]["pid"])
    assert os.getpid() not in owners and len(owners) <= 2  # the worker processes ran them, not this one
    _assert_history_matches_run_dirs(tmp_path / "par", [r["run_dir"] for r in par["runs"]])


def test_tune_in_parallel_runs_every_trial_with_its_own_run_and_history(tmp_path):
    lines = []
    res = tune(LATENCY, 3, tmp_path / "art", seed=4, parallel=2, on_trial=lines.append)
    seq = tune(LATENCY, 3, tmp_path / "seq", seed=4)
    assert [r["trial"] for r in res["trials"]] == [0, 1, 2] and len(lines) == 3
    assert all("failed" not in r and r["latency_ms"] >= 0 for r in res["trials"])
    # within TPE's random start-up trials the proposals do not depend on the values: as sequential
    assert [r["params"] for r in res["trials"]] == [r["params"] for r in seq["trials"]]
    run_dirs = [r["run_dir"] for r in res["trials"]]
    assert [Path(rd).parent.name for rd in run_dirs] == ["lat", "lat-2", "lat-3"]
    assert [Path(r["run_dir"]).parent.name for r in seq["trials"]] == ["lat", "lat-2", "lat-3"]
    _assert_history_matches_run_dirs(tmp_path / "art", run_dirs)
    assert res["best_value"] == min(r["latency_ms"] for r in res["trials"])


def _unreadable(run_dir: Path) -> dict:
    raise OSError(f"no row in {run_dir.name}")


KILLER = {  # the call ends the process it runs in
    **LATENCY,
    "workload": {"name": "latency", "params": {"target": "os:_exit", "args": [3], "calls": 1}},
}


def test_a_failing_job_is_a_failed_result_and_the_others_go_on(tmp_path):
    bad_spec = {**LATENCY, "workload": {"name": "latency", "params": {"target": "math:sqrt", "calls": -1}}}
    died_so = f"{WORKER_DIED} (exit code 3)"
    with JobRunner(tmp_path / "art", 2) as runner:
        died = runner.run([Job(KILLER, experiment_id="killer")])  # its worker process dies mid-run
        assert died[0].error == died_so
        # a new worker takes the next jobs; a refused spec and an unreadable row fail alone
        res = runner.run(
            [Job(bad_spec, experiment_id="bad"), Job(LATENCY, (), "good"), Job(LATENCY, (), "row", _unreadable)]
        )
        assert res[0].failed and "calls" in res[0].error  # refused in the worker, named
        assert not res[1].failed and res[1].reason == "completed" and Path(res[1].run_dir).parent.name == "good"
        assert res[2].error == "OSError: no row in " + Path(res[2].run_dir).name
    rows = []
    with pytest.raises(ABFailed, match=r"needs two finished runs per arm.*worker process died"):
        ab(KILLER, 2, tmp_path / "ab", parallel=4, on_run=rows.append)  # every job fails: a clear error
    assert sorted((r["arm"], r["seed"], r["failed"]) for r in rows) == [
        (arm, seed, died_so) for arm in ("off", "on") for seed in (0, 1)
    ]


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_disk_below_min_free_fails_every_run_saying_why(tmp_path, parallel):
    """``min_free_bytes`` reaches the Lab of every run: the sequential one and the workers'."""
    rows = []
    with pytest.raises(ABFailed, match="needs two finished runs per arm") as err:
        ab(LATENCY, 2, tmp_path / "ab", parallel=parallel, on_run=rows.append, min_free_bytes=1 << 62)
    assert len(rows) == 4 and all("min_free_bytes" in r["failed"] for r in rows), rows
    assert "min_free_bytes" in str(err.value)
    assert not list((tmp_path / "ab").glob("ab-o*/*"))  # no run folder was made
    res = tune(LATENCY, 2, tmp_path / "tune", parallel=parallel, min_free_bytes=1 << 62)
    assert [r["trial"] for r in res["trials"]] == [0, 1]
    assert all("min_free_bytes" in r["failed"] for r in res["trials"])
    with pytest.raises(ValueError, match="min_free_bytes must be a whole number"):
        ab(LATENCY, 2, tmp_path / "ab", min_free_bytes=-1)


@pytest.mark.parametrize("command", ["ab", "tune"])
def test_min_free_mib_is_a_flag_of_ab_and_tune(tmp_path, capsys, command):
    from cli import main

    spec = tmp_path / "lat.toml"
    spec.write_text('name = "lat"\ntime_budget_s = 1.0\n[workload]\nname = "latency"\n')
    runs = ["--runs", "2"] if command == "ab" else ["--trials", "1"]
    argv = [command, str(spec), *runs, "--artifacts", str(tmp_path / "art"), "--min-free-mib", str(1 << 30)]
    assert main(argv) == 1
    assert "min_free_bytes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main([command, str(spec), "--min-free-mib", "-1"])
    assert bad.value.code == 2
    assert "--min-free-mib" in capsys.readouterr().err


def test_tune_whose_every_trial_fails_says_so_and_exits_1(tmp_path, capsys):
    """It printed 'best = None' and an empty proposal, and exited 0."""
    from cli import main

    spec = tmp_path / "killer.toml"
    spec.write_text(
        'name = "kill"\ntime_budget_s = 30.0\n[workload]\nname = "latency"\n'
        '[workload.params]\ntarget = "os:_exit"\nargs = [3]\ncalls = 1\n'
    )
    code = main(["tune", str(spec), "--trials", "2", "--parallel", "2", "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith("crucible tune: every trial failed; trial ") and "(exit code 3)" in err[-1], err


def _owner(run_dirs: list[Path]) -> int:
    return orjson.loads((run_dirs[0] / "lifecycle.json").read_bytes())["owner"]["pid"]


def test_a_worker_killed_mid_run_fails_its_job_alone(tmp_path):
    """SIGKILL to one worker process while both run: its job is a failed row that says so, the
    job beside it runs to its end, and the next job still runs."""
    short = {**LATENCY, "time_budget_s": 2.0, "workload": {"name": "latency", "params": {"target": "math:sqrt"}}}
    long = {**short, "time_budget_s": 600.0}
    art = tmp_path / "art"
    results: list = []
    with JobRunner(art, 2) as runner:
        t = threading.Thread(
            target=lambda: results.extend(
                runner.run([Job(long, (), "victim"), Job(short, (), "beside"), Job(LATENCY, (), "next")])
            )
        )
        t.start()
        deadline = time.monotonic() + 60
        while len(_producing(art)) < 2:
            assert t.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(_owner(list(art.glob("victim/*"))), signal.SIGKILL)
        t.join(90)
        assert not t.is_alive()
    victim, beside, after = results
    assert victim.error == f"{WORKER_DIED} (killed by SIGKILL)"
    assert not beside.failed and beside.reason == "budget"  # it ran to its own end
    assert not after.failed and after.reason == "completed"


def test_workers_left_by_a_killed_caller_stop_and_exit(tmp_path):
    """The caller dies without stopping its workers (SIGKILL: no handler runs): each worker
    stops its experiment (flushed, ended stopped) and exits on its own."""
    art = tmp_path / "art"
    proc = _long_ab(tmp_path, art, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(_producing(art)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = {_owner([p]) for p in art.glob("ab-*/*")}
    finally:
        proc.kill()
        proc.wait()
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their caller"
        time.sleep(0.1)
    lifes = [orjson.loads(p.read_bytes()) for p in art.glob("ab-*/*/lifecycle.json")]
    assert {life["status"] for life in lifes} == {"stopped"}


def _running(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_parallel_and_backend_are_checked():
    assert check_parallel(1) == 1 and check_parallel(1024, "ray") == 1024
    for bad in (0, 1025, 2.5, True, "2"):
        with pytest.raises(ValueError, match="parallel"):
            check_parallel(bad)
    with pytest.raises(ValueError, match="backend must be one of embedded, ray"):
        run_jobs([], "art", 2, backend="dask")
    with pytest.raises(ValueError, match="is for the ray backend"):
        run_jobs([], "art", 2, address="127.0.0.1:6379")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["ab", "--parallel", "0"], "argument --parallel: must be an integer in [1, 1024], got '0'"),
        (["tune", "--parallel", "1025"], "argument --parallel: must be an integer in [1, 1024], got '1025'"),
        (["ab", "--parallel", "two"], "argument --parallel: must be an integer in [1, 1024], got 'two'"),
        (["tune", "--backend", "dask"], "argument --backend: invalid choice: 'dask'"),
        (["ab", "--ray-address", "127.0.0.1:1"], "--ray-address '127.0.0.1:1' needs --backend ray"),
        (["ab", "--backend", "ray", "--ray-address", "127.0.0.1:x"], "Ray address '127.0.0.1:x': expected auto"),
    ],
)
def test_the_flags_are_checked_with_one_line_errors(tmp_path, capsys, argv, says):
    from cli import main

    spec = str(ROOT / "experiments" / "latency.toml")
    with pytest.raises(SystemExit) as e:
        main([argv[0], spec, *argv[1:], "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "art").exists()  # refused before any run


def _long_ab(tmp_path: Path, art: Path, extra: Sequence[str] = (), **popen: Any) -> subprocess.Popen:
    """``crucible ab`` of two 600 s latency runs, two at a time, as a process of its own."""
    spec = tmp_path / "long.toml"
    spec.write_text(
        'name = "long"\ntime_budget_s = 600.0\n[workload]\nname = "latency"\n'
        '[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'
    )
    cmd = [sys.executable, str(ROOT / "supervisor.py"), "ab", str(spec), "--runs", "2", "--parallel", "2"]
    return subprocess.Popen([*cmd, *extra, "--artifacts", str(art)], cwd=ROOT, **popen)


def _producing(art: Path) -> list[Path]:
    """The run directories whose phase has written events: their experiments are running (an
    A/B's warm-up runs left out: they end on their own)."""
    return [p.parent for p in art.glob("*/*/events.jsonl") if p.stat().st_size > 0 and p.parts[-3] != "ab-warmup"]


def test_ctrl_c_stops_the_workers_and_their_experiments(tmp_path):
    art = tmp_path / "art"
    proc = _long_ab(tmp_path, art, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_producing(art)) < 2:  # another process: its files are what we can see
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)  # an impatient second Ctrl-C while the workers stop: it must not cut their stop short
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    lifes = [orjson.loads(p.read_bytes()) for p in art.glob("ab-o*/*/lifecycle.json")]
    assert len(lifes) == 2 and {life["status"] for life in lifes} == {"stopped"}  # ended and flushed, not crashed
    assert not list(art.glob("ab-*-1"))  # the next seed's runs never started
    for pid in {life["owner"]["pid"] for life in lifes}:  # the worker processes are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("command", ["tune", "ab"])
def test_sigterm_stops_the_running_experiments_as_ctrl_c_does(tmp_path, command):
    """SIGTERM (a service manager, ``kill``) ends ``tune`` and ``ab`` gracefully: the running
    experiment is stopped and flushed, not left crashed by a killed process; exit 143."""
    art = tmp_path / "art"
    spec = tmp_path / "long.toml"
    spec.write_text(
        'name = "long"\ntime_budget_s = 600.0\n[workload]\nname = "latency"\n'
        '[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'
    )
    many = ["--trials", "3"] if command == "tune" else ["--runs", "2"]
    cmd = [sys.executable, str(ROOT / "supervisor.py"), command, str(spec), *many, "--artifacts", str(art)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _producing(art):  # another process: its files are what we can see
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 143 and f"crucible {command}: terminated (SIGTERM)" in err, err
    lifes = [orjson.loads(p.read_bytes()) for p in art.glob("*/*/lifecycle.json") if p.parts[-3] != "ab-warmup"]
    assert len(lifes) == 1 and lifes[0]["status"] == "stopped"  # ended and flushed, not crashed


def test_a_sigterm_to_the_whole_process_group_stops_every_run_and_ends(tmp_path):
    """``timeout``, systemd and a terminal signal the whole group: the workers leave the signal
    to their caller, which stops their experiments (flushed, not crashed) and exits 143. The
    workers used to die of it, and the caller's stop signal then waited for ever on a lock a
    dead worker held."""
    art = tmp_path / "art"
    proc = _long_ab(tmp_path, art, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_producing(art)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    lifes = [orjson.loads(p.read_bytes()) for p in art.glob("ab-o*/*/lifecycle.json")]
    assert len(lifes) == 2 and {life["status"] for life in lifes} == {"stopped"}  # ended and flushed, not crashed


@pytest.fixture(scope="module")
def local_ray(ray_turn):
    ray = ray_or_skip()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ab_on_ray_reports_what_the_sequential_ab_reports(tmp_path, local_ray):
    seq = ab(FIXED_WORK, 2, tmp_path / "seq")
    par = ab(FIXED_WORK, 2, tmp_path / "ray", parallel=2, backend="ray")
    assert _without_times(par) == _without_times(seq)
    assert local_ray.is_initialized()  # the test's Ray: the runner joined it and left it running
    # each Ray worker process that ran a measured run ran the warm-up first, once
    warm = [orjson.loads(p.read_bytes()) for p in (tmp_path / "ray").glob("ab-warmup/*/lifecycle.json")]
    assert warm and {w["owner"]["pid"] for w in warm} == owners_of(par)  # however many workers Ray used
    assert len({w["owner"]["pid"] for w in warm}) == len(warm)
    _assert_history_matches_run_dirs(tmp_path / "ray", [r["run_dir"] for r in par["runs"]])
    res = run_jobs([Job(KILLER, experiment_id="killer")], tmp_path / "ray", 1, backend="ray")
    assert res[0].failed and res[0].error  # the task's process died: Ray's reason, not a hang


def test_ctrl_c_cancels_the_ray_tasks_and_their_experiments_stop(tmp_path, local_ray):
    """``crucible ab --backend ray`` joined to a cluster, interrupted while two of its four runs
    go: it cancels its tasks, whose Labs stop their experiments (flushed, not crashed), the
    next seed's runs never start, and the command ends 130. (A process of its own, as a user's
    Ctrl-C is: the signal never reaches the test's process.)"""
    art = tmp_path / "art"
    address = local_ray.get_runtime_context().gcs_address
    log = tmp_path / "stderr.txt"  # a file, not a pipe: Ray's and the runs' lines could fill a pipe nobody reads yet
    with log.open("w") as stderr:
        proc = _long_ab(tmp_path, art, extra=["--backend", "ray", "--ray-address", address], stderr=stderr)
        try:
            deadline = time.monotonic() + 90
            while len(_producing(art)) < 2:  # the tasks run in Ray's processes: their files are what we can see
                assert proc.poll() is None, f"crucible ab ended early ({proc.returncode}): {log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=150)
        finally:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 130 and "cancelling the running Ray tasks" in err, err
    lifes = [orjson.loads(p.read_bytes()) for p in art.glob("ab-o*/*/lifecycle.json")]  # not the warm-ups
    assert len(lifes) == 2 and {(life["status"], life["reason"]) for life in lifes} == {("stopped", "stopped")}
    assert not list(art.glob("ab-*-1"))  # the next seed's runs never started
