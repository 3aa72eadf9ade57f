"""JsonlWriter.abandon: a failed write is cut back to the last known-good end, buffer and all."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetry.jsonl import ACTIVE, JsonlWriter, iter_run


def line(seq: int, pad: int = 0) -> bytes:
    return b'{"v":1,"seq":%d,"ts":%d,"name":"step","notes":"%s"}\n' % (seq, 1_000 + seq, b"x" * pad)


def test_abandon_drops_the_buffered_tail_and_cuts_the_flushed_one(tmp_path):
    w = JsonlWriter(tmp_path)
    w.write(line(0) + line(1))
    w.flush()
    mark = w.size
    w.write(line(2))
    w.flush()  # on disk, but past the mark: cut
    w.write(line(3))  # still in the write buffer: dropped, never written
    w.abandon(mark)
    assert w.size == mark
    path = tmp_path / ACTIVE
    assert path.read_bytes() == line(0) + line(1)
    w.close()  # a no-op on an abandoned writer
    del w
    gc.collect()  # the buffered object is gone: nothing of the dropped tail reaches the file
    assert path.read_bytes() == line(0) + line(1)
    assert [e["seq"] for e in iter_run(tmp_path)] == [0, 1]
    again = JsonlWriter(tmp_path)  # a reopened run continues after the last kept event
    assert again.last_seq == 1 and again.torn_bytes == 0
    again.close()


def test_abandon_refuses_a_size_it_never_wrote(tmp_path):
    w = JsonlWriter(tmp_path)
    w.write(line(0))
    for bad in (-1, w.size + 1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"abandon: size must be an integer in \[0, \d+\] .*events\.jsonl"):
            w.abandon(bad)  # type: ignore[arg-type]
    w.close()
    assert (tmp_path / ACTIVE).read_bytes() == line(0)  # nothing was cut


@settings(max_examples=40, deadline=None)
@given(pads=st.lists(st.integers(0, 3000), min_size=1, max_size=12), data=st.data())
def test_abandon_leaves_exactly_the_lines_before_the_mark(tmp_path_factory, pads, data):
    """Property: whatever was written, flushed or left in the buffer after the mark, the file
    ends at the mark and holds exactly the whole lines written before it."""
    run_dir = tmp_path_factory.mktemp("run")
    flushes = data.draw(st.lists(st.booleans(), min_size=len(pads), max_size=len(pads)))
    keep = data.draw(st.integers(0, len(pads)))
    w = JsonlWriter(run_dir)
    mark = 0
    for i, (pad, flush) in enumerate(zip(pads, flushes, strict=True)):
        if i == keep:
            w.flush()
            mark = w.size
        w.write(line(i, pad))
        if flush:
            w.flush()
    if keep == len(pads):
        w.flush()
        mark = w.size
    w.abandon(mark)
    del w
    gc.collect()
    assert (run_dir / ACTIVE).read_bytes() == b"".join(line(i, p) for i, p in enumerate(pads[:keep]))
