"""Reading graph files costs what their lines that say something cost: blank and comment
lines (the cheap gzip bomb) are skipped in bulk, the bounds hold on the bytes read, and
line numbers, parse results and errors are those of a reader that goes line by line."""

from __future__ import annotations

import gzip
import io
import sys

import numpy as np
import pytest
import structlog
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from experiments.coloring import graph as graph_mod
from experiments.coloring.graph import GraphError, read_dimacs

GRAPH = b"p edge 3 2\ne 1 2\ne 2 3\n"


def _calls(path) -> tuple[int, object]:
    """How many Python and C calls reading ``path`` makes (profile events: a measure of the
    work done, whatever the machine's speed), and the graph or the error."""
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        count += 1

    sys.setprofile(prof)
    try:
        result = read_dimacs(path)
    except GraphError as exc:
        result = exc
    finally:
        sys.setprofile(None)
    return count, result


@pytest.mark.parametrize("filler", [b"\n", b"   \t\r\n", b"c a comment\n", b"c\n"])
def test_blank_and_comment_lines_are_skipped_in_bulk_not_one_by_one(tmp_path, filler):
    few, many = tmp_path / "few.col.gz", tmp_path / "many.col.gz"
    few.write_bytes(gzip.compress(b"p edge 3 2\n" + filler * 10 + b"e 1 2\ne 2 3\n"))
    many.write_bytes(gzip.compress(b"p edge 3 2\n" + filler * 50_000 + b"e 1 2\ne 2 3\n"))
    calls_few, g_few = _calls(few)
    calls_many, g_many = _calls(many)
    assert g_few.m == g_many.m == 2
    # a reader that goes line by line makes a few calls per line: 150,000 and more here
    assert calls_many < calls_few + 1_000, (calls_few, calls_many)


def test_a_gzip_of_blank_lines_over_the_bound_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(graph_mod, "MAX_FILE_BYTES", 1 << 16)
    monkeypatch.setattr(graph_mod, "READ_BYTES", 1000)  # many pieces, one across the bound
    at_bound = GRAPH + b"\n" * ((1 << 16) - len(GRAPH))
    ok = tmp_path / "ok.col.gz"
    ok.write_bytes(gzip.compress(at_bound))
    assert read_dimacs(ok).m == 2  # exactly at the bound: read
    bomb = tmp_path / "bomb.col.gz"
    bomb.write_bytes(gzip.compress(at_bound + b"\n"))
    with pytest.raises(GraphError, match=r"bomb\.col\.gz: larger than 65,536 bytes once decompressed$"):
        read_dimacs(bomb)
    plain = tmp_path / "plain.col"
    plain.write_bytes(b"\n" * ((1 << 16) + 1))
    with pytest.raises(GraphError, match=r"plain\.col: larger than 65,536 bytes$"):
        read_dimacs(plain)


@pytest.mark.parametrize("read_bytes", [7, 4096, 1 << 20])
def test_line_numbers_count_every_skipped_line(monkeypatch, tmp_path, read_bytes):
    monkeypatch.setattr(graph_mod, "READ_BYTES", read_bytes)
    skipped = (b"\n" * 1000 + b"c comment\r\n" + b" \t \n" + b"c\n") * 100  # 100,300 lines
    p = tmp_path / "bad.col"
    p.write_bytes(b"c head\np edge 3 1\n" + skipped + b"e 1 2\r\n" + skipped + b"  e 1 x  \n")
    with pytest.raises(GraphError, match=r"bad\.col:200604: vertex ids must be integers, got 'e 1 x'$"):
        read_dimacs(p)
    p.write_bytes(skipped + b"e 1 2\n")
    with pytest.raises(GraphError, match=r"bad\.col:100301: edge before the 'p edge N M' line$"):
        read_dimacs(p)
    p.write_bytes(b"p edge 3 1\n" + skipped + b"\n e 1 2 3")  # the last line has no newline
    with pytest.raises(GraphError, match=r"bad\.col:100303: expected 'e U V', got 'e 1 2 3'$"):
        read_dimacs(p)
    p.write_bytes(gzip.compress(b"p edge 3 2\n" + skipped + b"e 1 2\n" + skipped + b"e 2 3"))
    g = read_dimacs(p)
    assert (g.m, g.meta["edge_lines"]) == (2, 2)


def test_a_long_blank_line_is_still_a_line_too_long(monkeypatch, tmp_path):
    monkeypatch.setattr(graph_mod, "MAX_LINE_BYTES", 100)
    monkeypatch.setattr(graph_mod, "READ_BYTES", 30)
    p = tmp_path / "wide.col"
    p.write_bytes(GRAPH + b" " * 99 + b"\n")  # 100 bytes with its newline: allowed
    assert read_dimacs(p).m == 2
    p.write_bytes(GRAPH + b" " * 100 + b"\n" + GRAPH)
    with pytest.raises(GraphError, match=r"wide\.col:4: a line longer than 100 bytes$"):
        read_dimacs(p)
    p.write_bytes(b"p edge 3 2\ne 1 x\n" + b" " * 100 + b"\n")  # the malformed line comes first
    with pytest.raises(GraphError, match=r"wide\.col:2: vertex ids must be integers"):
        read_dimacs(p)


def _line_by_line(data: bytes, max_line: int, max_file: int) -> tuple[list[tuple[int, bytes]], str | None]:
    """What a reader that goes line by line (``readline`` with the same bounds) yields: the
    numbered lines that are neither blank nor comments, from their first token, and the
    error that stops it (what follows the file's name)."""
    fh, total, out = io.BytesIO(data), 0, []
    for lineno, line in enumerate(iter(lambda: fh.readline(max_line + 1), b""), 1):
        total += len(line)
        if total > max_file:
            return out, f": larger than {max_file:,} bytes"
        if len(line) > max_line:
            return out, f":{lineno}: a line longer than {max_line:,} bytes"
        parts = line.split()
        if parts and parts[0] != b"c":
            out.append((lineno, line.removesuffix(b"\n").lstrip()))
    return out, None


PIECES = st.sampled_from(
    [b"\n", b" ", b"\t", b"\r", b"\x0b", b"\x0c", b"c", b"c x", b"cc", b"e 1 2", b"p", b"\xff", b"x"]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(st.lists(PIECES, max_size=60).map(b"".join), st.binary(max_size=80)),
    read_bytes=st.integers(1, 20),
    max_line=st.integers(1, 12),
    max_file=st.integers(1, 120),
    gz=st.booleans(),
)
def test_lines_are_those_of_a_line_by_line_reader(tmp_path, data, read_bytes, max_line, max_file, gz):
    assume(gz or not data.startswith(b"\x1f\x8b"))  # a plain file that opens like a gzip is read as one
    p = tmp_path / "g.col"
    p.write_bytes(gzip.compress(data) if gz else data)
    expected, error = _line_by_line(data, max_line, max_file)
    got: list[tuple[int, bytes]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_mod, "READ_BYTES", read_bytes)
        mp.setattr(graph_mod, "MAX_LINE_BYTES", max_line)
        mp.setattr(graph_mod, "MAX_FILE_BYTES", max_file)
        if error is None:
            got = list(graph_mod._lines(p))
        else:
            with pytest.raises(GraphError) as e:
                for item in graph_mod._lines(p):
                    got.append(item)
            assert str(e.value) == f"{p}{error}" + (" once decompressed" if gz and "larger" in error else "")
    assert got == expected


def test_shipped_instances_read_the_same_in_pieces_of_any_size(monkeypatch):
    whole = read_dimacs(graph_mod.instance_path("myciel6"))
    monkeypatch.setattr(graph_mod, "READ_BYTES", 13)
    pieces = read_dimacs(graph_mod.instance_path("myciel6"))
    assert np.array_equal(whole.indptr, pieces.indptr) and np.array_equal(whole.indices, pieces.indices)
    assert whole.meta == pieces.meta


@pytest.mark.parametrize("head", [b"c made on an old Mac\r", b""])
@pytest.mark.parametrize("gz", [False, True])
def test_a_file_with_cr_only_line_ends_says_so(tmp_path, head, gz):
    """Without a newline the whole file is one line: the error names the line ends."""
    data = head + GRAPH.replace(b"\n", b"\r")
    p = tmp_path / ("mac.col.gz" if gz else "mac.col")
    p.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(GraphError, match=r"CR only") as err:
        read_dimacs(p)
    assert str(p) in str(err.value)
    crlf = tmp_path / "win.col"
    crlf.write_bytes(head.replace(b"\r", b"\r\n") + GRAPH.replace(b"\n", b"\r\n"))
    assert read_dimacs(crlf).m == 2  # CRLF is read as it is
    broken = tmp_path / "broken.col"
    broken.write_bytes(b"p edge 3 2\ne 1 9\n")
    with pytest.raises(GraphError) as err:
        read_dimacs(broken)
    assert "CR only" not in str(err.value)


DIMACS_PIECES = st.sampled_from(
    [
        b"p edge 5 4\n",
        b"p edge 3 1\n",
        b"e 1 2\n",
        b"e 2 5\n",
        b"e 5 4\n",
        b"e 3 3\n",  # a self-loop
        b"e 0 1\n",  # out of range
        b"e 4 6\n",  # out of range on a 5-vertex graph
        b"e 1 2 3\n",
        b"e 1\n",
        b"e 1 x\n",
        b"e -1 2\n",
        b"e 0002 3\n",
        b"e 12345678901234567890 1\n",
        b"e\t2\x0b3\r\n",
        b"  e 3 4  \n",
        b"e1 2\n",
        b"c e 1 2\n",
        b"c\n",
        b"\n",
        b" \t\n",
        b"n 1 3\n",
        b"x\n",
        b"e 1 2",  # no newline
    ]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(DIMACS_PIECES, max_size=40), read_bytes=st.integers(1, 64), max_edges=st.integers(1, 12))
def test_edge_lines_read_in_c_give_what_a_line_by_line_read_gives(tmp_path, pieces, read_bytes, max_edges):
    p = tmp_path / "g.col"
    p.write_bytes(b"".join(pieces))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_mod, "READ_BYTES", read_bytes)
        mp.setattr(graph_mod, "MAX_EDGES", max_edges)
        mp.setattr(graph_mod._DimacsReader, "M_RULE", graph_mod.Num(0, max_edges, integer=True))
        try:
            expected = graph_mod.read_dimacs_line_by_line(p)
        except GraphError as exc:
            with pytest.raises(GraphError) as e:
                graph_mod._DimacsReader(p).read()  # read_dimacs adds a hint on CR-only files to both
            assert str(e.value) == str(exc)
        else:
            g = graph_mod._DimacsReader(p).read()
            assert (g.n, g.fingerprint(), g.meta) == (expected.n, expected.fingerprint(), expected.meta)


def test_a_file_with_fewer_edges_than_its_p_line_declares_is_read_with_a_warning(tmp_path):
    """A file cut short (a download that stopped) still reads, as it is, but says so once."""
    cut = tmp_path / "cut.col"
    cut.write_text("p edge 4 5\ne 1 2\ne 2 3\n")
    twice = tmp_path / "twice.col"  # every edge listed in both directions, counted once: fine
    twice.write_text("p edge 3 2\ne 1 2\ne 2 1\ne 2 3\ne 3 2\n")
    with structlog.testing.capture_logs() as logs:
        g = read_dimacs(cut)
        read_dimacs(cut)
        assert read_dimacs(twice).m == 2
    assert (g.n, g.m) == (4, 2)
    said = [e for e in logs if e["log_level"] == "warning"]
    assert len(said) == 1 and (said[0]["declared"], said[0]["edge_lines"]) == (5, 2), logs
    assert said[0]["file"] == str(cut)
