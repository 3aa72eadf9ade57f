"""The ray backend: experiment trees in Ray actors across the nodes of a cluster (two nodes,
simulated on this machine and started here), supervised by the Lab across processes: a host
whose node dies is restarted on another node from its run's checkpoint, and its run still
accounts for every event. Bad addresses are one clear error, fast."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from experiments.lab import LifecycleError
from experiments.remote import RayBackendError
from experiments.spec import SpecError
from supervisor import Lab, TooManyChildren
from telemetry.jsonl import iter_run
from telemetry.query import QueryError
from telemetry.rundir import owner_alive
from tests.fault_helpers import check_accounts, latency_spec, persisted, seqs_on_disk, until
from tests.ray_cluster import ray_cluster  # noqa: F401 - the module's cluster (head node; tests add nodes)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("ray_turn")  # every test here starts Ray or joins the cluster


@pytest.fixture
def lab(ray_cluster, tmp_path):  # noqa: F811 - the fixture above
    lab = Lab(tmp_path / "art", backend="ray", address=ray_cluster.address)
    yield lab
    lab.shutdown()


def head_id(cluster) -> str:
    return cluster.head_node.node_id


def blocking_spec(name: str, **extra) -> dict:
    """A latency spec whose emitter waits for the pipeline (a loaded machine never drops on overflow)."""
    spec = latency_spec(name, budget=600, **extra)
    spec["telemetry"]["block_timeout_s"] = 120
    return spec


def events(exp, name: str) -> list[dict]:
    return [e for e in iter_run(exp.run_dir) if e["name"] == name]


def test_experiments_spread_over_nodes_and_a_dead_node_restarts_its_own_elsewhere(ray_cluster, tmp_path):  # noqa: F811
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    art = tmp_path / "art"
    lab = Lab(art, backend="ray", address=ray_cluster.address)
    try:
        exps = [lab.start_experiment(blocking_spec(f"spread-{i}")) for i in range(2)]
        assert {e.node_id for e in exps} == {head_id(ray_cluster), node.node_id}  # one per node
        for e in exps:
            until(lambda e=e: persisted(e) > 500, timeout=120, what="events persisted")
        victim = next(e for e in exps if e.node_id == node.node_id)
        survivor = next(e for e in exps if e is not victim)
        persisted(victim)  # a flush: what the store has acknowledged so far is committed
        acked = set(seqs_on_disk(art, victim.id, victim.run_id)[1])
        assert len(acked) > 500
        dead_pid = victim.pid

        ray_cluster.remove_node(node)  # the node and every process on it die

        until(lambda: victim.restarts and victim.node_id == head_id(ray_cluster), timeout=60, what="the restart")
        assert victim.status() == "running" and victim.pid != dead_pid
        assert owner_alive({"pid": dead_pid, "host": socket.gethostname()})[0] is False  # gone (or a zombie)
        down = victim.restarts[0]
        assert down["reason"].startswith("process_died: ") and "node" in down["reason"]
        assert down["from_node"] == node.node_id and down["node_id"] == head_id(ray_cluster)
        before = persisted(victim)
        until(lambda: persisted(victim) > before + 200, what="events after the restart")
        for e in exps:
            e.stop()
        assert survivor.restarts == [] and survivor.reason == victim.reason == "stopped"

        check_accounts(survivor, art, lossless=True)
        s = check_accounts(victim, art, lossless=False)  # emitted = persisted + dropped + sampled_out
        jsonl, hist = seqs_on_disk(art, victim.id, victim.run_id)
        assert acked <= set(jsonl) and acked <= set(hist)  # nothing the store acknowledged is lost
        assert s["restarts"] == {"process": 1}
        (resumed,) = events(victim, "resumed")  # the restart, and the work the dead process lost
        v = resumed["values"]
        assert v["resumes"] == 1 and v["last_seq_on_disk"] >= max(acked)
        assert {"checkpoint_steps", "checkpoint_published", "events_after_checkpoint"} <= set(v)
        assert s["events_dropped_overflow"] == 0 and s["events_lost_in_transit"] == s["events_dropped"]  # in flight
        (restart,) = events(victim, "process_restart")
        assert restart["values"]["restarts"] == 1 and down["reason"][:60] in restart["notes"]
        record = orjson.loads((victim.run_dir / "lifecycle.json").read_bytes())
        assert record["status"] == "stopped" and record["resumes"] == 1
    finally:
        lab.shutdown()


def test_a_killed_host_is_restarted_within_its_intensity_and_then_the_run_fails(lab):
    exp = lab.start_experiment(latency_spec("intense", budget=600, supervision={"max_restarts": 1, "max_seconds": 60}))
    until(lambda: persisted(exp) > 100, what="events")
    first = exp.pid
    os.kill(first, signal.SIGKILL)
    until(lambda: exp.restarts and exp.pid != first, timeout=60, what="the restart")
    until(lambda: events(exp, "process_restart"), what="the restart's events on disk")
    (resumed,) = events(exp, "resumed")
    assert resumed["values"]["resumes"] == 1
    exp.pause()  # the restarted tree takes control as the first did
    assert exp.status() == "paused" and exp.phase_status(max_age=0, wait=10)["paused"] is True
    os.kill(exp.pid, signal.SIGKILL)  # a second death in the window: over the intensity
    assert exp.wait(60)
    assert exp.status() == "failed"
    assert exp.reason.startswith("failed: reached_max_restart_intensity (process_died: ")
    assert len(exp.restarts) == 1
    assert "worker process has died" in exp.restarts[0]["reason"] and "Some common causes" not in exp.reason
    record = orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())
    assert record["status"] == "failed" and record["reason"] == exp.reason
    with pytest.raises(Exception, match="is failed; cannot pause"):
        exp.pause()


def test_the_remote_experiment_answers_reads_and_queries_like_a_local_one(lab):
    exp = lab.start_experiment(latency_spec("reads", budget=600))
    until(lambda: persisted(exp) > 200, what="events")
    s = exp.summary(max_age=0, wait=10)
    assert s["experiment_id"] == exp.id and s["run_id"] == exp.run_id and s["status"] == "running"
    assert s["events_persisted"] > 200 and s["stale"] is False
    assert exp.metrics(max_age=0, wait=10)["events"] > 0
    assert exp.phase_status(max_age=0, wait=10)["steps"] > 0
    phase = exp.registry.whereis("phase")  # urgent messages are marked on the host's side
    assert phase.ask({"kind": "status"}, timeout=30, urgent=True)["steps"] > 0
    assert phase.tell({"kind": "note", "name": "remote_note"}, urgent=True)
    rows = exp.query_window(["last_n", 5])
    assert len(rows) == 5
    with pytest.raises(QueryError):
        exp.query_window(["sideways", 1])  # refused here, before the host sees it
    with pytest.raises(LifecycleError, match="cannot restart a pass"):  # the host's error, typed alike
        exp.restart_pass()
    exp.stop()
    assert len(exp.query_window(["last_n", 5])) == 5  # from the history, once stopped
    assert exp.durations()["active_duration"] > 0
    exp.archive()
    assert exp.status() == "archived" and exp.summary()["status"] == "archived"
    assert orjson.loads((exp.run_dir / "lifecycle.json").read_bytes())["status"] == "archived"


def test_resources_are_checked_and_reserved(lab):
    with pytest.raises(SpecError, match=r"resources\.cpus: must be"):
        lab.start_experiment(latency_spec("bad", resources={"cpus": -1}))
    with pytest.raises(SpecError, match=r"resources\.tpus: unknown key"):
        lab.start_experiment(latency_spec("bad", resources={"tpus": 1}))
    with pytest.raises(RayBackendError, match=r"cpus=64 gpus=0: no node of the Ray cluster has that much"):
        lab.start_experiment(latency_spec("big", resources={"cpus": 64}))
    with pytest.raises(RayBackendError, match=r"gpus=1: no node"):
        lab.start_experiment(latency_spec("gpu", resources={"gpus": 1}))
    assert lab.list() == []  # nothing half-started is left behind
    exp = lab.start_experiment(latency_spec("half", budget=600, resources={"cpus": 0.5}))
    assert exp.assigned == {"CPU": 0.5}
    exp.stop()
    exp = lab.start_experiment(latency_spec("default", budget=600))
    assert exp.assigned == {"CPU": 1.0}  # one CPU unless the spec says otherwise
    exp.stop()


class Listener:
    """A TCP server on 127.0.0.1 that is not Ray: silent, or answering ``reply`` to anything."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.recv(64)
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize(
    ("address", "error", "match"),
    [
        ("127.0.0.1:1", RayBackendError, r"no Ray cluster at '127\.0\.0\.1:1': Connection refused"),
        ("ray://127.0.0.1:1", RayBackendError, r"no Ray cluster at 'ray://127\.0\.0\.1:1': Connection refused"),
        ("nonsense", ValueError, r"Ray address 'nonsense': expected auto, HOST:PORT or ray://HOST:PORT"),
        ("127.0.0.1:99999", ValueError, r"port 1 to 65535"),
        ("silent", RayBackendError, r"no answer within 3 s"),
        ("http", RayBackendError, r"something answers there, but not Ray"),
    ],
)
def test_a_bad_address_is_one_clear_error_and_no_hang(ray_cluster, tmp_path, address, error, match):  # noqa: F811
    server = Listener(b"HTTP/1.1 400 Bad Request\r\n\r\n" if address == "http" else None)
    if address in ("silent", "http"):
        address = f"127.0.0.1:{server.port}"
    t0 = time.monotonic()
    try:
        with pytest.raises(error, match=match):
            Lab(tmp_path / "art", backend="ray", address=address)
    finally:
        server.close()
    assert time.monotonic() - t0 < 10


def test_auto_without_a_cluster_and_the_cli_say_so_in_one_line(tmp_path):
    """In a process of its own (this one has joined the test cluster): the CLI's exit 2, one line."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "supervisor.py"),
            "run",
            str(ROOT / "experiments" / "default.toml"),
            "--backend",
            "ray",
            "--ray-address",
            "auto",
            "--artifacts",
            str(tmp_path / "art"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "crucible run: error: --backend ray: no Ray cluster at '127.0.0.1:1': Connection refused"
    ]
    assert time.monotonic() - t0 < 30
    r = subprocess.run(
        [sys.executable, str(ROOT / "supervisor.py"), "run", "x.toml", "--ray-address", "auto"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--ray-address 'auto' needs --backend ray" in r.stderr


def test_crucible_run_on_ray_without_an_address_starts_a_ray_of_its_own(tmp_path):
    """The plain user path: no cluster named, so the run starts a local Ray, which must live
    as long as the run (Ray ties its processes to the thread that started them)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "supervisor.py"),
            "run",
            str(ROOT / "experiments" / "latency.toml"),
            "--backend",
            "ray",
            "--set",
            "time_budget_s=3",
            "--artifacts",
            str(tmp_path / "art"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (lifecycle,) = (tmp_path / "art").rglob("lifecycle.json")
    record = orjson.loads(lifecycle.read_bytes())
    assert (record["status"], record["reason"]) == ("stopped", "budget")
    assert record["active_duration"] >= 3
    assert len(list(iter_run(lifecycle.parent))) > 10  # it worked (92 events in 3 s on a loaded machine)


# an embedded Lab in a process of its own, which the test kills (SIGKILL) once its runs have events
HOST = """
import sys, threading
from experiments.lab import Lab
from telemetry.rundir import count_events
from tests.fault_helpers import latency_spec, until
lab = Lab(sys.argv[1])
run = lab.start_experiment(latency_spec("crashed-run", budget=600))
paused = lab.start_experiment(latency_spec("crashed-paused", budget=600))
until(lambda: count_events(run.run_dir) > 200 and count_events(paused.run_dir) > 200, 60, "events")
paused.pause()
print("ready", flush=True)
threading.Event().wait()
"""


def killed_after_ready(script: str, art: Path) -> int:
    """Run ``script`` on ``art`` in a process of its own and kill -9 it once it says ready; its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(art)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        for line in proc.stdout:
            if line.strip() == b"ready":
                break
        else:
            raise AssertionError("the process ended before it was ready")
    finally:
        proc.kill()
        proc.wait()
    return proc.pid


def test_recover_resumes_crashed_runs_on_ray_as_they_were(ray_cluster, tmp_path):  # noqa: F811
    art = tmp_path / "art"
    pid = killed_after_ready(HOST, art)
    lab = Lab(art, backend="ray", address=ray_cluster.address)
    try:
        resumed = {e.id: e for e in lab.recover()}
        assert set(resumed) == {"crashed-run", "crashed-paused"}
        run, paused = resumed["crashed-run"], resumed["crashed-paused"]
        assert run.status() == "running" and paused.status() == "paused"  # as they were at the kill
        assert run.pid != pid and run.assigned == {"CPU": 1.0}
        until(lambda: events(run, "resumed"), what="the resumed event")
        paused.resume()
        for e in (run, paused):
            e.stop()
            s = check_accounts(e, art, lossless=False)
            assert s["events_emitted"] == s["events_persisted"] + s["events_dropped"]
            assert len(events(e, "resumed")) == 1 and events(e, "process_restart") == []  # a recovery, not a restart
            assert orjson.loads((e.run_dir / "lifecycle.json").read_bytes())["resumes"] == 1
        assert lab.recover() == []  # nothing left to take over
    finally:
        lab.shutdown()


TWO_OF_ONE_ID = """
import sys, threading
from experiments.lab import Lab
from telemetry.rundir import count_events
from tests.fault_helpers import latency_spec, until
runs = [Lab(sys.argv[1]).start_experiment(latency_spec("lat", budget=4), experiment_id="lat") for _ in range(2)]
until(lambda: all(count_events(r.run_dir) > 100 for r in runs), 60, "events")
print("ready", flush=True)
threading.Event().wait()
"""


def test_recover_on_ray_takes_the_named_runs_first_and_the_others_of_their_id_wait(ray_cluster, tmp_path):  # noqa: F811
    """As on the embedded backend (a daemon's own submissions first): of two crashed runs of one
    id, the named one is resumed and the other waits for the id, then is resumed by
    ``resume_waiting`` once the first has ended. Before, the Ray backend took the oldest and
    skipped the other for good."""
    art = tmp_path / "art"
    killed_after_ready(TWO_OF_ONE_ID, art)
    older, newer = sorted((art / "lat").iterdir(), key=lambda p: p.name)
    now = time.time()
    os.utime(older, (now - 100, now - 100))  # oldest first, unless named
    os.utime(newer, (now, now))
    lab = Lab(art, backend="ray", address=ray_cluster.address)
    try:
        resumed = lab.recover(first=[newer.name])
        assert [e.run_id for e in resumed] == [newer.name]
        assert lab.waiting() == {older.name: "lat"}
        assert lab.resume_waiting("lat") is None  # the id is still live
        assert resumed[0].wait(60) and resumed[0].reason == "budget"
        later = lab.resume_waiting("lat")
        assert later is not None and later.run_id == older.name and lab.waiting() == {}
        assert later.assigned == {"CPU": 1.0}  # in a host of its own, on Ray
        assert later.wait(60) and later.reason == "budget"
        assert lab.resume_waiting("lat") is None
    finally:
        lab.shutdown()
    for run in (older, newer):
        record = orjson.loads((run / "lifecycle.json").read_bytes())
        assert (record["status"], record["reason"], record["resumes"]) == ("stopped", "budget", 1)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # its watchers read the handles
def test_the_lab_service_runs_its_queue_on_ray(ray_cluster, tmp_path):  # noqa: F811
    """What ``crucible lab serve --backend ray`` hosts: the queue's experiments start as Ray actors."""
    from experiments.service import LabService

    svc = LabService(tmp_path / "art", max_running=1, backend="ray", address=ray_cluster.address)
    try:
        first = svc.submit(latency_spec("queued-a", budget=600))
        second = svc.submit(latency_spec("queued-b", budget=600))
        assert (first["status"], second["status"]) == ("running", "queued")
        a = svc.get(first["id"])
        assert a.node_id is not None and a.pid != os.getpid()
        assert svc.pause(first["id"])["status"] == "paused"
        assert svc.stop(first["id"])["status"] == "stopped"
        until(lambda: any(r["id"] == second["id"] and r["status"] == "running" for r in svc.list()), what="the next")
        assert svc.get(second["id"]).node_id is not None
    finally:
        svc.shutdown()
    assert svc.lab.list()[-1]["status"] == "stopped"  # the shutdown stopped it, flushed


def test_max_experiments_counts_the_live_remote_trees(ray_cluster, tmp_path):  # noqa: F811
    lab = Lab(tmp_path / "art", max_experiments=1, backend="ray", address=ray_cluster.address)
    try:
        first = lab.start_experiment(latency_spec("one", budget=600))
        with pytest.raises(TooManyChildren, match="max_experiments=1"):
            lab.start_experiment(latency_spec("two", budget=600))
        assert [e["id"] for e in lab.list()] == ["one"]
        first.stop()
        lab.start_experiment(latency_spec("two", budget=600)).stop()  # an ended tree leaves room
    finally:
        lab.shutdown()


def test_the_free_disk_a_run_needs_is_checked_in_its_host_and_said_as_on_one_machine(ray_cluster, tmp_path):  # noqa: F811
    """The Lab's min_free_bytes reaches the hosts (0 there too: any disk), and a host's full
    disk comes back as the OSError (ENOSPC) an embedded Lab raises, not a RemoteError."""
    import errno
    import shutil

    huge = shutil.disk_usage(tmp_path).free + (1 << 40)
    lab = Lab(tmp_path / "art", backend="ray", address=ray_cluster.address, min_free_bytes=huge)
    try:
        with pytest.raises(OSError) as err:
            lab.start_experiment(latency_spec("full", budget=600))
        assert err.value.errno == errno.ENOSPC and "min_free_bytes" in str(err.value)
        lab.min_free_bytes = 0
        lab.start_experiment(latency_spec("any", budget=600)).stop()  # the host takes the Lab's figure
    finally:
        lab.shutdown()


def test_shutdown_returns_only_once_no_thread_of_the_lab_uses_ray(ray_cluster, tmp_path):  # noqa: F811
    """A Ray call after ray.shutdown() ends the whole process, and the caller may shut Ray down
    (or join it again) as soon as the Lab's shutdown returns: the watchers must be done by then."""
    lab = Lab(tmp_path / "art", backend="ray", address=ray_cluster.address)
    try:
        exps = [lab.start_experiment(latency_spec(f"w{i}", budget=600)) for i in range(2)]  # the head has 2 CPUs
        watching = {t.name for t in threading.enumerate() if t.name.startswith("ray-watch-")}
        assert {f"ray-watch-{e.id}" for e in exps} <= watching
    finally:
        lab.shutdown()
    assert [t.name for t in threading.enumerate() if t.name.startswith("ray-watch-")] == []
    assert {e.status() for e in exps} == {"stopped"}
