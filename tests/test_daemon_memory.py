"""The lab daemon's memory over many experiments: what it keeps of an experiment it forgot,
and glibc's malloc arenas (where a 30-min soak found the growth; see docs/daemon.md, *Memory*)."""

from __future__ import annotations

import ctypes
import gc
import os
import subprocess
import sys
import threading

import pytest

from bench.daemon import arena_heaps
from cli.lab import DAEMON_MALLOC_ARENAS
from dashboard.client import LabClient
from dashboard.server import SENT_KEY, Dashboard, PushSource
from experiments.lab import Experiment
from experiments.service import LabService
from tests.fault_helpers import latency_spec
from tests.test_daemon import DEADLINE_S, ROOT, Daemon, wait_for


def glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return sys.platform.startswith("linux")


needs_glibc = pytest.mark.skipif(
    not glibc() or bool(os.environ.get("MALLOC_ARENA_MAX")),
    reason="glibc's malloc arenas, with no MALLOC_ARENA_MAX set from outside",
)


THREADS = """
import ctypes, os, sys, tempfile, threading
sys.path.insert(0, {root!r})
from cli.lab import limit_malloc_arenas
cap = limit_malloc_arenas() if sys.argv[1] == "cap" else None
gate = threading.Barrier(8)
def work():
    held = [bytes(4096) for _ in range(100)]  # past pymalloc's 512 bytes: glibc's malloc
    gate.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
with tempfile.NamedTemporaryFile(suffix=".xml") as xml:
    f = libc.fopen(xml.name.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(cap, open(xml.name).read().count("<heap nr="))  # one per arena, the main one included
"""


def arenas_after_threads(cap: bool, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", THREADS.format(root=str(ROOT)), "cap" if cap else "none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@needs_glibc
def test_limit_malloc_arenas_keeps_threads_on_two_arenas():
    """Eight threads at once: by default glibc makes an arena for each; capped, they share two
    (the main one and one more), so what one thread frees another reuses."""
    _, default = arenas_after_threads(cap=False)
    assert default > DAEMON_MALLOC_ARENAS, "glibc made no arena per thread: the test proves nothing"
    assert arenas_after_threads(cap=True) == (str(DAEMON_MALLOC_ARENAS), DAEMON_MALLOC_ARENAS)
    # an operator's MALLOC_ARENA_MAX wins: the function leaves it alone
    assert arenas_after_threads(cap=True, env={**os.environ, "MALLOC_ARENA_MAX": "4"}) == ("None", 4)


@needs_glibc
def test_the_daemon_runs_its_threads_on_two_malloc_arenas(tmp_path):
    """``crucible lab serve``: four experiments at a time (a dozen threads each, started and
    ended with them) leave the daemon with its two arenas, not one per thread."""
    d = Daemon(tmp_path / "art", max_experiments=4)
    try:
        c = d.client()
        for i in range(8):
            c.submit(latency_spec(f"m{i}", budget=0.3))
        wait_for(lambda: all(e["status"] == "stopped" for e in c.list(history=False)), "every experiment to end")
        # read from outside, where a heap's alignment can hide one: at most the cap, not a dozen
        assert arena_heaps(d.proc.pid) <= DAEMON_MALLOC_ARENAS
        assert d.terminate() == 0
    finally:
        d.kill()
    assert '"limit": 2' in (tmp_path / "art" / "daemon.log").read_text()


def test_forgotten_experiments_leave_nothing_behind(tmp_path):
    """Submitted over HTTP, run, ended and forgotten: no handle, no tree under the Lab's
    supervisor, no thread, no Prometheus sample, no live object is left for them; what
    stays is the last ``keep_ended``."""
    service = LabService(tmp_path / "art", max_running=2, keep_ended=3)
    dash = Dashboard(service, "127.0.0.1", 0)
    try:
        with LabClient(dash.url, dash.token) as c:
            ids = [c.submit(latency_spec(f"f{i}", budget=0.2))["id"] for i in range(10)]
            scrape = c.http.get("metrics").text  # the collector reads the Lab at scrape time
            assert any(f'experiment="{i}"' in scrape for i in ids)
            wait_for(
                lambda: (
                    all(e["status"] == "stopped" for e in c.list(history=False)) and len(service.lab.experiments) == 3
                ),
                "every experiment to end and the old ones to be forgotten",
            )
            # the last three to END are kept; two run at a time, so that need not be the last submitted
            kept = sorted(service.lab.experiments)
            forgotten = [i for i in ids if i not in kept]
            assert len(kept) == 3 and len(forgotten) == 7
            wait_for(lambda: service.lab.sup.count_children()["specs"] == 0, "the ended trees to leave the Lab")
            scrape = c.http.get("metrics").text
            assert not [i for i in forgotten if f'experiment="{i}"' in scrape]
            assert {e["id"] for e in c.list()} == set(ids)  # listed from their run folders
        wait_for(
            lambda: not [t.name for t in threading.enumerate() if any(i in t.name for i in ids)],
            "the experiments' threads to end",
        )
        gc.collect()
        alive = {o.id for o in gc.get_objects() if isinstance(o, Experiment)}
        assert alive & set(forgotten) == set()
    finally:
        dash.stop()
        service.shutdown()


def test_a_pages_push_state_drops_the_experiments_the_lab_forgot(tmp_path):
    """A dashboard page open on a daemon for months: its socket's per-experiment state (the
    last event seq pushed) keeps only the Lab's experiments, not one entry per experiment run."""
    service = LabService(tmp_path / "art", max_running=1, keep_ended=1)
    last_seq: dict[str, int] = {}
    source = PushSource(service.lab, service, max_age_s=0)
    try:
        ids = []
        for i in range(4):
            exp_id = service.submit(latency_spec(f"p{i}", budget=0.3))["id"]
            # queued, when the last one's end has not freed its slot yet: started as it does
            wait_for(lambda x=exp_id: x in service.lab.experiments, "the submission started")
            exp = service.get(exp_id)
            ids.append(exp.id)
            wait_for(lambda e=exp: source.push(last_seq)["events"].get(e.id), "events pushed")
            exp.wait(DEADLINE_S)
        wait_for(lambda: list(service.lab.experiments) == ids[-1:], "the older experiments to be forgotten")
        source.push(last_seq)
        assert [e["id"] for e in source.push({})["experiments"]] == ids[-1:]
        assert set(last_seq) - {SENT_KEY} <= set(ids[-1:])  # and the read it was last pushed from
    finally:
        service.shutdown()


@pytest.mark.skipif(not glibc(), reason="malloc_trim is glibc's")
def test_trim_heap_returns_scattered_free_memory_to_the_system():
    """Freed blocks between live ones cannot be released from the heap's top; malloc_trim
    (called by the service after it forgets experiments) hands their pages back."""
    from actors.runtime import trim_heap

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    blocks = [bytearray(8192) for _ in range(10_000)]  # 80 MiB in malloc's heap, not mmap
    keep = blocks[::50]  # one live block in fifty pins the heap around the freed ones
    del blocks
    before = rss()
    assert trim_heap() is True
    assert before - rss() > 40 * 2**20
    assert len(keep) == 200


CYCLES = """
import gc, sys, threading, weakref
sys.path.insert(0, {root!r})
from actors.runtime import collector, freeze_startup_heap
freeze_startup_heap(collect_every_s={every!r})
gc.collect()  # what the imports left behind, so the counts below start near zero
freed = threading.Event()

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: reference counting alone never frees it
weakref.finalize(a, freed.set)
del a, b
# a steady state: about as many containers freed as made, as in a daemon between experiments
for _ in range(2000):
    [[] for _ in range(10)]
print(freed.wait({wait!r}), gc.get_count()[0] < 50_000, collector.ran.wait({wait!r}))
"""


@pytest.mark.parametrize("every, freed", [(0.05, "True"), (3600.0, "False")])
def test_a_frozen_process_frees_cycles_without_allocation_pressure(every, freed):
    """The raised young-generation threshold counts allocations minus deallocations, which a
    steady state hardly moves: a cycle dropped then is freed by the periodic full collection,
    and (an hour's interval) not otherwise. The daemon's memory grew by this."""
    wait = 10.0 if every < 1 else 1.0
    out = subprocess.run(
        [sys.executable, "-c", CYCLES.format(root=str(ROOT), every=every, wait=wait)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [freed, "True", freed]
