"""Graphs for colouring: a DIMACS reader, seeded generators, CSR adjacency.

A :class:`Graph` holds ``n`` and the adjacency in CSR form (``indptr``, ``indices``, int32,
sorted, no duplicates, no self-loops), which is what the numba kernels take.

Where a graph comes from (the spec's ``graph`` table, ``crucible color GRAPH``):

* ``file``: a DIMACS ``.col`` or gzip-compressed ``.col.gz`` file, or the name of an
  instance shipped with the package (``"DSJC250.5"``; see :mod:`.catalog`). An existing
  path wins over an instance of the same name.
* ``generator``: ``gnp`` (``n``, ``p``, ``seed``) or ``planted`` (``n``, ``k``, ``p``, ``seed``).

Sizes are bounded before anything is allocated, so a hostile or mistyped header
(``p edge 2147483648 1``) is a clear error, not an 8 GiB allocation: at most
:data:`MAX_VERTICES` vertices and :data:`MAX_EDGES` edges (edge lines in a file), and
``n x (max degree + 2)`` at most :data:`MAX_TABLE_CELLS` (the size of the colouring
kernels' per-vertex tables). Generators take at most :data:`GENERATOR_MAX_N` vertices.
"""

from __future__ import annotations

import gzip
import re
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.log import get_logger
from experiments.coloring.catalog import instance_names, instance_path, strip_suffix
from experiments.validate import SEED, Num

log = get_logger("experiments.coloring.graph")
_told: set[tuple[str, int, int]] = set()  # the files whose edge count was warned about

MAX_VERTICES = 100_000
MAX_EDGES = 5_000_000
MAX_TABLE_CELLS = 1 << 27
GENERATOR_MAX_N = 20_000
MAX_FILE_BYTES = 256 << 20
"""A graph file's size once decompressed (a gzip bomb stops here)."""
MAX_LINE_BYTES = 1 << 20
"""The longest line a graph file may have (read in bounded pieces: memory stays small)."""
READ_BYTES = 1 << 20
"""A graph file is read this much (decompressed) at a time."""
_SAYS = re.compile(rb"\n[ \t\r\f\v]*+((?:[^\sc]|c\S)[^\n]*)")
"""A line that says something, from the newline before it: its first token is not ``c``."""
_EDGE_RUN = re.compile(
    rb"(?:\n[ \t\r\f\v]*+(?:e[ \t\r\f\v]++[0-9]{1,18}+[ \t\r\f\v]++[0-9]{1,18}+[ \t\r\f\v]*+)?(?=\n|\Z))++"
)
"""Lines that are ``e U V`` (plain ids) or blank, from the newline before the first: what
nearly every line of a graph file is, parsed in C (:func:`_edge_run`)."""
_PAIRS_PER_CHUNK = 1 << 22
_INT = re.compile(rb"-?[0-9]+")  # an integer as DIMACS writes it: ASCII digits, an optional minus
GRAPH_KEYS = ("file", "generator", "n", "p", "k", "seed")


class GraphError(ValueError):
    """A malformed graph file or a bad generator request (names the file and line)."""


@dataclass
class Graph:
    n: int
    indptr: np.ndarray
    indices: np.ndarray
    name: str = "graph"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def m(self) -> int:
        return int(self.indices.size // 2)

    def degrees(self) -> np.ndarray:
        return np.diff(self.indptr).astype(np.int32)

    def neighbors(self, v: int) -> np.ndarray:
        return self.indices[self.indptr[v] : self.indptr[v + 1]]

    def edges(self) -> np.ndarray:
        """(m, 2) array of u < v pairs."""
        src = np.repeat(np.arange(self.n, dtype=np.int32), np.diff(self.indptr))
        keep = src < self.indices
        return np.column_stack([src[keep], self.indices[keep]])

    def density(self) -> float:
        return 2.0 * self.m / (self.n * (self.n - 1)) if self.n > 1 else 0.0

    def fingerprint(self) -> str:
        """A digest of the vertices and edges (not the name): a checkpoint records it, so that a
        run resumed on a graph file changed since is refused, never coloured with a stale state."""
        import hashlib

        h = hashlib.sha256(f"n={self.n};".encode())
        h.update(np.ascontiguousarray(self.indptr, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.indices, dtype="<i8").tobytes())
        return h.hexdigest()[:32]


def _check(what: str, rule: Num, v: Any) -> Any:
    try:
        return rule.check(what, v)
    except ValueError as exc:
        raise GraphError(str(exc)) from None


def from_edges(n: int, edges: np.ndarray, name: str = "graph", **meta: Any) -> Graph:
    """Build the CSR graph from an (m, 2) array of 0-based edges (duplicates merged).

    Raises:
        GraphError: an endpoint outside ``0..n-1``, a self-loop, or a graph over the size bounds.
    """
    _check(f"{name}: the number of vertices", Num(1, MAX_VERTICES, integer=True), n)
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if e.shape[0] > MAX_EDGES:
        raise GraphError(f"{name}: {e.shape[0]:,} edges; at most {MAX_EDGES:,} are allowed")
    if e.size and (e.min() < 0 or e.max() >= n):
        raise GraphError(f"{name}: edge endpoint outside 0..{n - 1}")
    if e.size and (e[:, 0] == e[:, 1]).any():
        raise GraphError(f"{name}: self-loop")
    both = np.concatenate([e, e[:, ::-1]]) if e.size else e
    key = np.sort(both[:, 0] * n + both[:, 1]) if both.size else np.empty(0, dtype=np.int64)
    key = key[np.concatenate(([True], key[1:] != key[:-1]))] if key.size else key  # np.unique, without its cost
    src, dst = key // n, key % n
    indptr = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
    g = Graph(n, indptr, dst.astype(np.int32), name, dict(meta))
    cells = n * (int(g.degrees().max(initial=0)) + 2)
    if cells > MAX_TABLE_CELLS:
        raise GraphError(
            f"{name}: n x (max degree + 2) = {cells:,} exceeds {MAX_TABLE_CELLS:,} (the colouring "
            "tables would not fit in memory)"
        )
    return g


def _maybe_gunzip(raw: Any) -> tuple[Any, bool]:
    """``raw`` (a binary file at its start) to read from, decompressed if its magic bytes say
    gzip, and whether they did."""
    gz = raw.read(2) == b"\x1f\x8b"
    raw.seek(0)
    return (gzip.GzipFile(fileobj=raw) if gz else raw), gz


def _blocks(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """The lines of a plain or gzip-compressed file (by its magic bytes), a block at a time:
    ``(base, data, stop)``, where ``data[:stop]`` is the newline that ends line ``base`` and
    whole lines after it (the last one without its newline at the end of the file). Blocks of
    nothing but blank lines are not given.

    The file is read :data:`READ_BYTES` at a time. At most :data:`MAX_FILE_BYTES` bytes are
    read, and no line may be longer than :data:`MAX_LINE_BYTES` with its newline; the lines
    before either problem come first, as from a reader that goes line by line.

    Raises:
        GraphError: an unreadable file, or one over either bound.
    """
    base = 0  # the lines ended before ``data``

    def cannot_read(exc: BaseException) -> GraphError:
        what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return GraphError(f"{path}: cannot read{f' at line {base + 1}' if base else ''} ({what})")

    try:
        raw = path.open("rb")
    except OSError as exc:
        raise cannot_read(exc) from None
    with raw:
        try:
            fh, gz = _maybe_gunzip(raw)
        except OSError as exc:
            raise cannot_read(exc) from None
        total = 0
        data = b"\n"  # the newline that ends line ``base``, then the bytes read since
        while True:
            try:
                chunk = fh.read1(min(READ_BYTES, MAX_FILE_BYTES + 1 - total))  # one read: bounded output
            except (OSError, EOFError, zlib.error) as exc:
                raise cannot_read(exc) from None
            total += len(chunk)
            over = total > MAX_FILE_BYTES
            data += chunk[:-1] if over else chunk  # the byte past the bound is not read as the file's
            last = data.rfind(b"\n")  # the lines in data[1 : last + 1] are whole
            long_at = _long_line(data, last)
            if not data.isspace():  # blank lines say nothing, and are the common bomb
                yield base, data, long_at if long_at is not None else last if chunk else len(data)
            if long_at is not None or len(data) - last - 1 > MAX_LINE_BYTES:
                starts = long_at if long_at is not None else last  # the newline before the long line
                lineno = base + data.count(b"\n", 1, starts + 1) + 1
                raise GraphError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES:,} bytes")
            if over:
                raise GraphError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes{' once decompressed' if gz else ''}")
            if not chunk:
                return
            base += data.count(b"\n", 1, last + 1)
            data = data[last:]


def _says(data: bytes, start: int, stop: int, lineno: int) -> Iterator[tuple[int, bytes, int]]:
    """``(line number, line, end)`` for each line of ``data[start:stop]`` (``data[start]`` is
    the newline that ends line ``lineno``) that says something: not blank, not a ``c``
    comment. The line starts at its first token and has no newline; ``end`` is where it ends.
    Blank and comment lines are skipped and counted in C (a regex scan, ``bytes.count``),
    never one by one in Python: a file of nothing but newlines costs about what
    decompressing it does."""
    prev = start  # the newline that ends the line last given
    for m in _SAYS.finditer(data, start, stop):
        begin, end = m.span()
        lineno += 1 if begin == prev else data.count(b"\n", prev, begin + 1)  # the lines skipped
        prev = end
        yield lineno, m[1], end


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` for each line of the file that says something (see
    :func:`_blocks` and :func:`_says`): what a reader that goes line by line would give."""
    for base, data, stop in _blocks(path):
        for lineno, line, _end in _says(data, 0, stop, base):
            yield lineno, line


def _long_line(data: bytes, last: int) -> int | None:
    """The newline after which the first line in ``data[1 : last + 1]`` longer than
    :data:`MAX_LINE_BYTES` (with its newline) starts, or None. Jumps to the last newline of
    each window of that many bytes: a few ``rfind`` calls per window, however many lines."""
    at = 0
    while at < last:
        at_next = data.rfind(b"\n", at + 1, min(at + 1 + MAX_LINE_BYTES, last + 1))
        if at_next == -1:  # the line after ``at`` ends past the window
            return at
        at = at_next
    return None


def _show(line: bytes) -> str:
    text = line.decode("utf-8", "backslashreplace").strip()
    return repr(text if len(text) <= 80 else text[:77] + "...")


def read_dimacs(path: str | Path) -> Graph:
    """Read a DIMACS ``.col`` or ``.col.gz`` file; errors name the file and the line.

    Comment lines may hold any bytes; every other line must be ASCII DIMACS.

    Raises:
        GraphError: an unreadable or malformed file, or a graph over the size bounds.
    """
    path = Path(path)
    try:
        return _DimacsReader(path).read()
    except GraphError as exc:
        if _cr_only(path):
            raise GraphError(
                f"{exc} (the file ends its lines with CR only; convert them: tr '\\r' '\\n' < OLD > NEW)"
            ) from None
        raise


def read_dimacs_line_by_line(path: str | Path) -> Graph:
    """:func:`read_dimacs` without its C path for edge lines: every line read one by one in
    Python. The reference that the tests and ``bench.coloring --read-only`` compare it with."""
    r = _DimacsReader(Path(path))
    for lineno, line in _lines(r.path):
        r.line(lineno, line)
    return r.graph()


def _cr_only(path: Path) -> bool:
    """Whether the file's start has carriage returns and no newline: old Mac line ends, which
    make the whole file one line (a comment, when it starts with one)."""
    try:
        with path.open("rb") as raw:
            head = _maybe_gunzip(raw)[0].read(READ_BYTES)
    except (OSError, EOFError, zlib.error):
        return False
    return b"\r" in head and b"\n" not in head


def _edge_pairs(data: bytes, start: int, end: int, n: int, taken: int) -> np.ndarray | None:
    """The ``(U, V)`` pairs of ``data[start:end]``, lines that :data:`_EDGE_RUN` matched, read
    in C; None when one of them is wrong (an id outside ``1..n``, a self-loop, past the edge
    bound) or there are none: the line-by-line reader then reads them, and names the line."""
    lines = data.count(b"e", start, end)  # one per edge line: the others are blank
    if not lines or taken + lines > MAX_EDGES:
        return None
    ids = np.fromstring(data[start:end].translate(None, b"e"), dtype=np.int64, sep=" ")  # digits and blanks only
    if ids.size != 2 * lines:
        return None
    pairs = ids.reshape(-1, 2)
    if pairs.min() < 1 or pairs.max() > n or (pairs[:, 0] == pairs[:, 1]).any():
        return None
    return pairs


class _DimacsReader:
    """What a DIMACS file says so far: ``n`` and ``M`` once its ``p`` line is read, its edges."""

    N_RULE, M_RULE = Num(1, MAX_VERTICES, integer=True), Num(0, MAX_EDGES, integer=True)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.n: int | None = None
        self.declared = 0
        self.edges = array("i")  # u, v, u, v, ... (0-based)

    def read(self) -> Graph:
        for base, data, stop in _blocks(self.path):
            self._block(data, stop, base)
        return self.graph()

    def graph(self) -> Graph:
        """The graph read so far (the whole file's, once :meth:`read` has read it)."""
        if self.n is None:
            raise GraphError(f"{self.path}: no 'p edge N M' line")
        lines = len(self.edges) // 2
        try:
            g = from_edges(
                self.n,
                np.frombuffer(self.edges, dtype=np.int32).reshape(-1, 2),
                name=strip_suffix(self.path.name),
                source=str(self.path),
                declared_edges=self.declared,
                edge_lines=lines,
            )
        except GraphError as exc:  # a bound on the whole graph: the file is what the user must look at
            raise GraphError(f"{self.path}: {exc}") from None
        said = (str(self.path), self.declared, lines)
        if self.declared not in (lines, g.m, 2 * g.m) and said not in _told:  # files count edge lines,
            _told.add(said)  # edges, or both directions; said once a process (the CLI and its run read it)
            log.warning(
                "the graph file's 'p' line declares another number of edges than it holds: a file "
                "cut short or edited? The graph is coloured as read",
                file=str(self.path),
                declared=self.declared,
                edge_lines=lines,
                edges=g.m,
            )
        return g

    def _block(self, data: bytes, stop: int, lineno: int) -> None:
        """Runs of edge lines in C (:func:`_edge_pairs`), every other line one by one."""
        pos, slow_until = 0, 0
        while True:
            run = _EDGE_RUN.match(data, pos, stop) if self.n is not None and pos >= slow_until else None
            if run is not None:
                pairs = _edge_pairs(data, pos, run.end(), self.n or 0, len(self.edges) // 2)
                if pairs is None:
                    slow_until = run.end()  # a wrong line among them: read line by line, to name it
                else:
                    self.edges.frombytes((pairs - 1).astype(np.int32).tobytes())
                    lineno += data.count(b"\n", pos, run.end())
                    pos = run.end()
            for at, line, end in _says(data, pos, stop, lineno):
                self.line(at, line)
                lineno, pos = at, end
                if self.n is not None and pos >= slow_until and _EDGE_RUN.match(data, pos, stop) is not None:
                    break  # edge lines follow: back to reading them in C
            else:
                return

    def line(self, lineno: int, line: bytes) -> None:
        """Take one line that says something (see :func:`_says`)."""
        parts = line.split()
        tag = parts[0]
        where = f"{self.path}:{lineno}"
        if tag == b"e":
            if self.n is None:
                raise GraphError(f"{where}: edge before the 'p edge N M' line")
            if len(parts) != 3:
                raise GraphError(f"{where}: expected 'e U V', got {_show(line)}")
            try:
                if not (_INT.fullmatch(parts[1]) and _INT.fullmatch(parts[2])):  # int() takes "1_0", "+1"
                    raise ValueError
                u, v = int(parts[1]), int(parts[2])
            except ValueError:
                raise GraphError(f"{where}: vertex ids must be integers, got {_show(line)}") from None
            if not (1 <= u <= self.n and 1 <= v <= self.n):
                raise GraphError(f"{where}: vertex id out of range 1..{self.n}: {_show(line)}")
            if u == v:
                raise GraphError(f"{where}: self-loop on vertex {u}")
            if len(self.edges) >= 2 * MAX_EDGES:
                raise GraphError(f"{where}: more than {MAX_EDGES:,} edge lines")
            self.edges.append(u - 1)
            self.edges.append(v - 1)
        elif tag == b"p":
            if self.n is not None:
                raise GraphError(f"{where}: a second 'p' line")
            if len(parts) != 4 or parts[1] not in (b"edge", b"edges", b"col"):
                raise GraphError(f"{where}: expected 'p edge N M', got {_show(line)}")
            try:
                if not (_INT.fullmatch(parts[2]) and _INT.fullmatch(parts[3])):
                    raise ValueError
                n, m = int(parts[2]), int(parts[3])
            except ValueError:
                raise GraphError(f"{where}: N and M must be integers, got {_show(line)}") from None
            for what, rule, x in (("N (vertices)", self.N_RULE, n), ("M (edges)", self.M_RULE, m)):
                problem = rule.problem(x)
                if problem:
                    raise GraphError(f"{where}: {what} {problem}")
            self.n, self.declared = n, m
        elif tag not in (b"n", b"x", b"d", b"v"):  # those: optional DIMACS lines (node weights, ...)
            raise GraphError(f"{where}: unknown line type {_show(tag)}")


def resolve_graph_file(ref: str | Path) -> Path:
    """A graph file from a path or a shipped instance's name (an existing path wins).

    Raises:
        GraphError: naming the shipped instances when ``ref`` is neither.
    """
    p = Path(ref)
    if p.is_file():
        return p
    shipped = instance_path(str(ref))
    if shipped is not None:
        return shipped
    if p.exists():
        raise GraphError(f"graph file {str(ref)!r} is not a regular file")
    raise GraphError(
        f"graph file {str(ref)!r} does not exist and is not a shipped instance; shipped: {', '.join(instance_names())}"
    )


def _pairs(n: int, p: float, rng: np.random.Generator, cls: np.ndarray | None = None) -> np.ndarray:
    """The pairs i < j kept with probability ``p`` (and, with ``cls``, in different classes),
    in row-major order. Chunked by rows so memory stays O(edges), drawing ``rng.random`` in
    the same order as one draw over all n(n-1)/2 pairs would (the same graph for a seed)."""
    out = []
    rows = max(1, _PAIRS_PER_CHUNK // max(n, 1))
    for r0 in range(0, n - 1, rows):
        r = np.arange(r0, min(n - 1, r0 + rows))
        counts = n - 1 - r
        iu = np.repeat(r, counts)
        first = np.cumsum(counts) - counts
        ju = np.arange(iu.size) - np.repeat(first, counts) + iu + 1
        keep = rng.random(iu.size) < p
        if cls is not None:
            keep &= cls[iu] != cls[ju]
        out.append(np.column_stack([iu[keep], ju[keep]]))
    return np.concatenate(out) if out else np.empty((0, 2), dtype=np.int64)


def _check_generator(gen: str, n: Any, p: Any, seed: Any) -> None:
    _check(f"{gen}: n", Num(1, GENERATOR_MAX_N, integer=True), n)
    _check(f"{gen}: p", Num(0.0, 1.0), p)
    _check(f"{gen}: seed", SEED, seed)
    expected = p * n * (n - 1) / 2
    if expected > MAX_EDGES:
        raise GraphError(f"{gen}: n={n}, p={p:g} gives about {expected:,.0f} edges; at most {MAX_EDGES:,} are allowed")


def gnp(n: int, p: float, seed: int = 0) -> Graph:
    """G(n, p): each pair is an edge with probability p (the DSJC family)."""
    _check_generator("gnp", n, p, seed)
    rng = np.random.default_rng(seed)
    return from_edges(n, _pairs(n, p, rng), name=f"gnp_{n}_{p:g}_s{seed}", seed=seed)


def planted(n: int, k: int, p: float, seed: int = 0) -> Graph:
    """A graph with a planted k-colouring (the ``flat`` family's idea): vertices split into k
    near-equal classes, each pair from different classes an edge with probability p."""
    _check_generator("planted", n, p, seed)
    _check("planted: k", Num(1, n, integer=True), k)
    rng = np.random.default_rng(seed)
    cls = rng.permutation(np.arange(n) % k)
    g = from_edges(n, _pairs(n, p, rng, cls), name=f"planted_{n}_{k}_{p:g}_s{seed}", seed=seed)
    g.meta["planted_k"] = k
    g.meta["planted"] = cls.astype(np.int32)
    return g


def check_graph(spec: Any) -> dict[str, Any]:
    """Validate a ``graph`` table without building the graph: a file that exists (or a
    shipped instance's name), or a generator with parameters in range. Returns the table.

    Raises:
        GraphError: naming the key and the allowed values.
    """
    if not isinstance(spec, dict):
        raise GraphError(f"graph must be a table, got {spec!r}")
    unknown = sorted(set(spec) - set(GRAPH_KEYS))
    if unknown:
        raise GraphError(f"unknown graph key(s) {', '.join(map(repr, unknown))}; known: {', '.join(GRAPH_KEYS)}")
    if "file" in spec:
        extra = sorted(set(spec) - {"file"})
        if extra:
            raise GraphError(f"graph names a file and generator settings ({', '.join(extra)}): give one or the other")
        if not isinstance(spec["file"], str) or not spec["file"]:
            raise GraphError(f"graph.file must be a path or an instance name, got {spec['file']!r}")
        resolve_graph_file(spec["file"])
        return spec
    gen = spec.get("generator", "gnp")
    if gen not in ("gnp", "planted"):
        raise GraphError(f"unknown graph generator {gen!r}; expected gnp or planted")
    n, p, seed = spec.get("n", 125), spec.get("p", 0.5), spec.get("seed", 0)
    _check_generator(gen, n, p, seed)
    if gen == "planted":
        _check("planted: k", Num(1, n, integer=True), spec.get("k", 10))
    elif "k" in spec:
        raise GraphError("graph.k is a setting of the planted generator, not of gnp")
    return spec


def load_graph(spec: dict[str, Any]) -> Graph:
    """A graph from a workload spec: ``{"file": path or instance}`` or ``{"generator": "gnp"|"planted", ...}``.

    Raises:
        GraphError: see :func:`check_graph` and :func:`read_dimacs`.
    """
    check_graph(spec)
    if "file" in spec:
        return read_dimacs(resolve_graph_file(spec["file"]))
    gen = spec.get("generator", "gnp")
    n, p, seed = spec.get("n", 125), spec.get("p", 0.5), spec.get("seed", 0)
    if gen == "gnp":
        return gnp(n, p, seed)
    return planted(n, spec.get("k", 10), p, seed)
