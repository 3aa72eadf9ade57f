"""The daemon soak's split of resident memory by kind of mapping (bench/daemon.py): each
kind recognised from a /proc/PID/smaps text as the kernel writes it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bench.daemon import MAPPING_CLASSES, _thread_stack, classify, parse_maps, soak_summary


def entry(lo: int, hi: int, perm: str, name: str, rss_kb: int) -> str:
    head = f"{lo:012x}-{hi:012x} {perm} 00000000 00:00 0"
    return f"{head:<73}{name}\nSize: {(hi - lo) >> 10} kB\nRss: {rss_kb} kB\nPss: {rss_kb} kB\n"


MiB = 1 << 20
ARENA = 0x7F0000000000  # aligned on 64 MiB
SMAPS = "".join(
    [
        entry(0x555555554000, 0x555555556000, "r-xp", "/usr/bin/python3.11", 8),
        entry(0x555555600000, 0x555557600000, "rw-p", "[heap]", 20000),
        # a non-main arena's heap: 3 MiB in use, the rest of its 64 MiB reserved
        entry(ARENA, ARENA + 3 * MiB, "rw-p", "", 2000),
        entry(ARENA + 3 * MiB, ARENA + 64 * MiB, "---p", "", 0),
        # a thread's stack: a guard page, then 8 MiB less a page
        entry(0x7F1000000000, 0x7F1000001000, "---p", "", 0),
        entry(0x7F1000001000, 0x7F1000800000, "rw-p", "", 40),
        # a 1 MiB anonymous mapping (an obmalloc arena), not aligned on 64 MiB
        entry(0x7F2000100000, 0x7F2000200000, "rw-p", "", 1024),
        entry(0x7F3000000000, 0x7F3000008000, "rw-s", "/tmp/x/history.sqlite-shm", 32),
        entry(0x7F4000000000, 0x7F4000100000, "r-xp", "/usr/lib/libc.so.6", 900),
        entry(0x7FFFFFFDE000, 0x7FFFFFFFF000, "rw-p", "[stack]", 100),
        entry(0x7FFFFFFFF000, 0x800000000000, "r--p", "[vvar]", 4),
    ]
)


def test_classify_puts_each_kind_of_mapping_in_its_class():
    maps = parse_maps(SMAPS)
    assert len(maps) == 11 and maps[1].name == "[heap]" and maps[1].rss_kb == 20000
    assert classify(maps) == {"heap": 20000, "arenas": 2000, "stacks": 140, "anon": 1024, "files": 8 + 32 + 900 + 4}


def test_an_arena_heap_is_not_taken_for_a_stack_nor_a_big_mapping_for_an_arena():
    # an arena heap right above a guard-sized reserved page is still an arena's heap
    guard_then_arena = entry(ARENA - 4096, ARENA, "---p", "", 0) + entry(ARENA, ARENA + 64 * MiB, "rw-p", "", 64)
    assert classify(parse_maps(guard_then_arena))["arenas"] == 64
    # a 64 MiB-aligned mapping of 128 MiB (a big mmapped block) is anonymous memory, not an arena
    big = entry(ARENA, ARENA + 128 * MiB, "rw-p", "", 500)
    assert classify(parse_maps(big)) == {**dict.fromkeys(MAPPING_CLASSES, 0), "anon": 500}


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc")
def test_the_classes_add_up_to_the_rss_and_see_a_new_threads_stack():
    """On this process: the classes sum to its Rss (the kernel's own total), and a new
    thread's stack (glibc puts its descriptor and TLS at the top of it: resident) is a stack."""
    started, done = threading.Event(), threading.Event()

    def wait() -> None:
        started.set()
        done.wait(30)

    # a size no other thread has, to find its mapping among those of other tests' threads
    # (which may start or end meanwhile) and so that glibc cannot hand it an ended thread's stack
    default = threading.stack_size(12 << 20)
    try:
        t = threading.Thread(target=wait)
        t.start()
    finally:
        threading.stack_size(default)
    try:
        assert started.wait(30)
        text = Path("/proc/self/smaps").read_text()
        rollup = Path("/proc/self/smaps_rollup").read_text()
    finally:
        done.set()
        t.join()
    maps = parse_maps(text)
    kb = classify(maps)
    rss = next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Rss:"))
    assert sum(kb.values()) == sum(m.rss_kb for m in maps)  # every mapping in one class
    assert abs(sum(kb.values()) - rss) <= 0.1 * rss  # the rollup is read a moment later
    mine = [i for i, m in enumerate(maps) if abs(m.hi - m.lo - (12 << 20)) <= 64 << 10 and _thread_stack(maps, i)]
    assert len(mine) == 1 and maps[mine[0]].rss_kb > 0
    assert kb["stacks"] >= maps[mine[0]].rss_kb


def test_soak_summary_tells_growth_that_levels_off_from_growth_that_does_not():
    def run(level_off: bool) -> dict:
        rows = []
        for i in range(91):  # 15 min, a sample every 10 s
            s = i * 10.0
            grow = min(s, 600.0) if level_off else s  # KB
            row = dict.fromkeys(MAPPING_CLASSES, 1000) | {"anon": 1000 + grow}
            rows.append({"s": s, "rss": sum(row.values()) / 1024, "threads": 10, "exps": i * 10, **row})
        return soak_summary(rows, 900.0)

    flat, steady = run(True), run(False)
    assert steady["last_slope_mib_h"] == pytest.approx(steady["middle_slope_mib_h"])
    assert flat["last_slope_mib_h"] == pytest.approx(0.0, abs=1e-9)
    assert flat["middle_slope_mib_h"] > 1.0
    assert steady["late_mapping_slopes_kib_h"]["anon"] == pytest.approx(3600.0)
    assert steady["late_mapping_slopes_kib_h"]["heap"] == pytest.approx(0.0)
    assert "anon" in steady["text"] and "last third" in steady["text"]
