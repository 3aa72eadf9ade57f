"""The DIMACS instances shipped in the package, graph files as user input, and the generators."""

import fnmatch
import gzip
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring import graph as graph_mod
from experiments.coloring.catalog import INSTANCES_DIR, best_known, instance_names, instance_path
from experiments.coloring.graph import (
    MAX_EDGES,
    MAX_VERTICES,
    GraphError,
    check_graph,
    from_edges,
    gnp,
    load_graph,
    planted,
    read_dimacs,
    resolve_graph_file,
)

ROOT = Path(__file__).resolve().parents[1]
# name: (vertices, distinct edges), from the source collection's README
SHIPPED = {
    "DSJC125.1": (125, 736),
    "DSJC125.5": (125, 3891),
    "DSJC125.9": (125, 6961),
    "DSJC250.5": (250, 15668),
    "DSJC500.5": (500, 62624),
    "DSJC1000.5": (1000, 249826),
    "le450_15c": (450, 16680),
    "le450_25c": (450, 17343),
    "flat300_28_0": (300, 21695),
    "flat1000_76_0": (1000, 246708),
    "queen8_8": (64, 728),
    "myciel5": (47, 236),
    "myciel6": (95, 755),
    "r250.5": (250, 14849),
    "DSJR500.1c": (500, 121275),
}


def test_every_instance_is_shipped_small_with_its_licence_and_source():
    assert set(SHIPPED) <= set(instance_names())
    assert {"LICENSE", "README.md", "best_scores_gcp.txt"} <= {p.name for p in INSTANCES_DIR.iterdir()}
    assert "MIT License" in (INSTANCES_DIR / "LICENSE").read_text()
    assert sum(p.stat().st_size for p in INSTANCES_DIR.iterdir()) < 3_000_000
    # the build ships every file of the folder
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "experiments.coloring"
    ]
    for p in INSTANCES_DIR.iterdir():
        assert any(fnmatch.fnmatch(f"instances/{p.name}", pat) for pat in patterns), p.name


@pytest.mark.parametrize("name", ["DSJC125.1", "DSJC250.5", "queen8_8", "myciel5", "le450_15c"])
def test_shipped_instances_read_with_their_known_sizes(name):
    g = read_dimacs(instance_path(name))
    assert (g.n, g.m) == SHIPPED[name] and g.name == name
    assert g.meta["source"].endswith(f"{name}.col.gz")


def test_best_known_table():
    best = best_known()
    assert best["DSJC250.5"] == (28, False) and best["DSJC125.5"] == (17, True)
    assert all(name in best for name in SHIPPED)


def test_names_resolve_to_the_shipped_files_and_a_real_path_wins(tmp_path, monkeypatch):
    shipped = INSTANCES_DIR / "DSJC125.1.col.gz"
    for ref in ("DSJC125.1", "DSJC125.1.col", "DSJC125.1.col.gz"):
        assert resolve_graph_file(ref) == shipped
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DSJC125.1.col").write_text("p edge 2 1\ne 1 2\n")
    assert resolve_graph_file("DSJC125.1.col") == Path("DSJC125.1.col")
    assert read_dimacs(resolve_graph_file("DSJC125.1.col")).n == 2
    with pytest.raises(GraphError, match=r"'nope' does not exist and is not a shipped instance; shipped: .*DSJC250\.5"):
        resolve_graph_file("nope")
    for ref in ("../instances/DSJC125.1", "", "/"):
        with pytest.raises(GraphError):
            resolve_graph_file(ref)


def test_a_spec_names_an_instance_as_its_file():
    assert check_graph({"file": "DSJC125.1"}) == {"file": "DSJC125.1"}
    assert load_graph({"file": "DSJC125.1"}).m == 736
    with pytest.raises(GraphError, match="does not exist"):
        check_graph({"file": "DSJC999.9"})
    with pytest.raises(GraphError, match="give one or the other"):
        check_graph({"file": "DSJC125.1", "n": 5})
    with pytest.raises(GraphError, match="unknown graph key"):
        check_graph({"generator": "gnp", "nodes": 5})


def test_plain_and_gzip_files_read_the_same(tmp_path):
    text = gzip.decompress((INSTANCES_DIR / "myciel5.col.gz").read_bytes())
    (tmp_path / "a.col").write_bytes(text)
    (tmp_path / "b.col.gz").write_bytes(gzip.compress(text))
    (tmp_path / "c.col").write_bytes(gzip.compress(text))  # gzip recognised by content, not by name
    a, b, c = (read_dimacs(tmp_path / f) for f in ("a.col", "b.col.gz", "c.col"))
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.indices, c.indices)
    assert (a.name, b.name) == ("a", "b")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"p edge 2147483648 1\ne 1 2\n", r"bad\.col:1: N \(vertices\) must be <= 100_000"),
        (b"p edge 3 99999999999\n", r"bad\.col:1: M \(edges\) must be <= 5_000_000"),
        (b"p edge 0 0\n", r"bad\.col:1: N \(vertices\) must be >= 1"),
        (b"p edge -5 1\n", r"N \(vertices\) must be >= 1"),
        (b"p edge 3 1\ne 1 \xff\n", r"bad\.col:2: vertex ids must be integers, got 'e 1 \\\\xff'"),
        (b"\xff\xfe\x00p\x00", r"bad\.col:1: unknown line type"),
        (b"p edge 3 1\ne 1 2 3\n", r"bad\.col:2: expected 'e U V'"),
        (b"", r"bad\.col: no 'p edge N M' line"),
        (b"\x1f\x8b\x08\x00garbage", r"bad\.col: cannot read"),
        (gzip.compress(b"p edge 3 1\ne 1 2\n", mtime=0)[:-12], r"bad\.col: cannot read"),
    ],
)
def test_bad_graph_files_are_one_clear_error(tmp_path, data, match):
    p = tmp_path / "bad.col"
    p.write_bytes(data)
    t0 = time.perf_counter()
    with pytest.raises(GraphError, match=match):
        read_dimacs(p)
    assert time.perf_counter() - t0 < 2.0  # refused before any large allocation


def test_comments_may_hold_any_bytes(tmp_path):
    p = tmp_path / "latin1.col"
    p.write_bytes(b"c Graphe g\xe9n\xe9r\xe9\np edge 3 2\ne 1 2\ne 2 3\n")
    assert read_dimacs(p).m == 2


def test_unreadable_paths(tmp_path):
    with pytest.raises(GraphError, match="cannot read"):
        read_dimacs(tmp_path)  # a folder
    with pytest.raises(GraphError, match="cannot read"):
        read_dimacs(tmp_path / "absent.col")


def test_size_bounds(monkeypatch, tmp_path):
    with pytest.raises(GraphError, match="must be <= 100_000"):
        from_edges(MAX_VERTICES + 1, np.zeros((0, 2)))
    # a star: n x (max degree + 2) cells for the colouring tables
    monkeypatch.setattr(graph_mod, "MAX_TABLE_CELLS", 1000)
    with pytest.raises(GraphError, match=r"n x \(max degree \+ 2\)"):
        from_edges(40, np.column_stack([np.zeros(39, dtype=int), np.arange(1, 40)]))
    monkeypatch.setattr(graph_mod, "MAX_EDGES", 3)
    p = tmp_path / "many.col"
    p.write_text("p edge 5 2\ne 1 2\ne 1 3\ne 1 4\ne 1 5\n")
    with pytest.raises(GraphError, match=r"many\.col:5: more than 3 edge lines"):
        read_dimacs(p)
    assert MAX_EDGES == 5_000_000


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"generator": "gnp", "n": -5}, r"gnp: n must be >= 1, got -5"),
        ({"generator": "gnp", "n": 10**12}, r"gnp: n must be <= 20000"),
        ({"generator": "gnp", "n": 100, "p": float("nan")}, r"gnp: p must be a finite number in \[0, 1\], got nan"),
        ({"generator": "gnp", "n": 100, "p": 1.5}, r"gnp: p must be <= 1"),
        ({"generator": "gnp", "n": 100, "seed": -1}, r"gnp: seed must be >= 0"),
        ({"generator": "gnp", "n": 100, "seed": 2**70}, r"gnp: seed must be <= 4_294_967_295"),
        ({"generator": "gnp", "n": 10_000, "p": 0.5}, r"about 24,997,500 edges; at most 5,000,000"),
        ({"generator": "planted", "n": 10, "k": 11}, r"planted: k must be <= 10"),
        ({"generator": "gnp", "n": True}, r"gnp: n must be an integer"),
        ({"generator": "gnp", "k": 3}, r"planted generator"),
        ({"generator": "ring"}, r"unknown graph generator 'ring'"),
        ({"file": 5}, r"graph\.file must be a path or an instance name"),
        ("DSJC125.1", r"graph must be a table"),
    ],
)
def test_bad_generator_requests_are_graph_errors(spec, match):
    with pytest.raises(GraphError, match=match):
        check_graph(spec)
    with pytest.raises(GraphError, match=match):
        load_graph(spec)


def _reference_pairs(n, p, seed, k=None):
    """The generators as first written: one draw over all pairs (O(n^2) memory)."""
    rng = np.random.default_rng(seed)
    cls = rng.permutation(np.arange(n) % k) if k else None
    iu, ju = np.triu_indices(n, 1)
    keep = rng.random(iu.size) < p
    if k:
        keep &= cls[iu] != cls[ju]
    return from_edges(n, np.column_stack([iu[keep], ju[keep]]))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 80),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
    chunk=st.integers(1, 500),
    k=st.integers(1, 6),
)
def test_chunked_generators_draw_the_same_graphs(n, p, seed, chunk, k):
    old = graph_mod._PAIRS_PER_CHUNK
    graph_mod._PAIRS_PER_CHUNK = chunk
    try:
        a, b = gnp(n, p, seed), _reference_pairs(n, p, seed)
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
        k = min(k, n)
        a, b = planted(n, k, p, seed), _reference_pairs(n, p, seed, k)
        assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    finally:
        graph_mod._PAIRS_PER_CHUNK = old


def test_a_one_line_bomb_or_a_sparse_file_is_refused_in_bounded_memory(tmp_path):
    """Lines are read in bounded pieces: the limits hold before anything large is in memory."""
    import gzip
    import subprocess
    import sys

    bomb = tmp_path / "bomb.col.gz"
    with gzip.open(bomb, "wb", 9) as fh:
        for _ in range(128):  # 128 MiB of one comment line, a few hundred kB on disk
            fh.write(b"A" * (1 << 20))
    sparse = tmp_path / "sparse.col"
    with sparse.open("wb") as fh:
        fh.truncate(512 << 20)  # 512 MiB of zero bytes, no newline, nothing on disk
    probe = (  # VmHWM: this process's peak RSS (ru_maxrss would carry the forking parent's over exec)
        "import re, sys\n"
        "def hwm():\n"
        "    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        "from experiments.coloring.graph import read_dimacs, GraphError\n"
        "print('base', hwm())\n"
        "for f in sys.argv[1:]:\n"
        "    try:\n"
        "        read_dimacs(f)\n"
        "    except GraphError as e:\n"
        "        print('refused', e)\n"
        "print('peak', hwm())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, str(bomb), str(sparse)], capture_output=True, text=True, timeout=120, check=True
    )
    lines = r.stdout.splitlines()
    assert lines[1].startswith("refused") and "a line longer than 1,048,576 bytes" in lines[1]
    assert lines[2].startswith("refused") and "a line longer than" in lines[2]
    grew = int(lines[3].split()[1]) - int(lines[0].split()[1])
    assert grew < 64  # MB: neither the 128 MiB line nor the 512 MiB file was ever held


@pytest.mark.parametrize("line", [b"e 1_0 2\n", b"e +1 2\n", b"e 1 0x2\n", b"e \xd9\xa1 2\n", b"e 1 2.0\n"])
def test_vertex_ids_are_plain_digits(tmp_path, line):
    f = tmp_path / "odd.col"
    f.write_bytes(b"p edge 12 1\n" + line)
    with pytest.raises(GraphError, match="vertex ids must be integers"):
        read_dimacs(f)


def test_an_edgeless_graph_takes_one_colour_with_every_initial_colouring():
    from experiments.coloring.graph import from_edges
    from experiments.coloring.init import STRATEGIES, initial_coloring

    g = from_edges(5, np.zeros((0, 2)))
    for strategy in STRATEGIES:
        assert initial_coloring(g, strategy).max() == 0, strategy
