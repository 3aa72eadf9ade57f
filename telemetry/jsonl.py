"""A run's JSONL files: an appending writer with size-based rotation, and tolerant readers.

Layout of a run directory: rotated segments ``events.000001.jsonl``, ``events.000002.jsonl``
... and the active file ``events.jsonl``. Reopening a run (a restarted Recorder) first cuts
a torn last line (a write interrupted by a crash: never acknowledged), then finds the last
``seq`` written so that nothing is written twice.

The readers never stop at a bad line: a line that is not JSON, is torn, or is JSON whose
fields do not have the schema's types (``"ts": "x"``) is skipped and counted in the
:class:`ReadCounts` the caller passes. The first :data:`WARN_LINES` bad lines of a file are
warned about one by one (file and line), the rest in one closing warning with their count:
a file of garbage must not bury the output under a warning per line.

Every reader opens a run's file with :func:`open_for_reading`: without blocking, and only a
regular file (checked on the opened descriptor), so a FIFO or device put in a run folder is
an error naming it, never a hang.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from actors.files import file_kind
from actors.log import get_logger
from telemetry.schema import SchemaError, parse_line

log = get_logger("telemetry.jsonl")

ACTIVE = "events.jsonl"
WARN_LINES = 5  # bad lines of one file warned about one by one; the others are counted in one warning


class RunFileError(ValueError):
    """A run's file that is there but cannot be read (a folder in its place, no permission, an
    I/O error): the message names it. Readers of one run stop with it; listings show the run
    as unreadable and go on."""


def _anonymous_pipe(fd: int, path: str | Path) -> bool:
    """Whether the FIFO open on ``fd`` is an anonymous pipe (``/dev/stdin`` fed by ``|``,
    ``<(...)``), whose writer is a process the user started, not a named FIFO in a folder."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    except OSError:  # no /proc: trust only the names that stand for a descriptor
        return str(path) == "/dev/stdin" or str(path).startswith("/dev/fd/")


def open_for_reading(path: str | Path, *, pipe_ok: bool = False) -> IO[bytes]:
    """Open ``path`` for reading without ever waiting on it: opened non-blocking (a FIFO with
    no writer would block ``open`` forever), then checked on the descriptor itself (a swap
    between a check and the open cannot slip through). ``pipe_ok``: an anonymous pipe is
    taken too, read blocking to its end (a spec given as ``/dev/stdin``).

    Raises:
        FileNotFoundError: there is no such file.
        IsADirectoryError: it is a folder.
        OSError: it is not a regular file (a FIFO, a device, a socket: ``strerror`` says which),
            or it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(mode) and not (pipe_ok and stat.S_ISFIFO(mode) and _anonymous_pipe(fd, path)):
            raise OSError(errno.EINVAL, f"it is {file_kind(mode)}, not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_run_file(path: Path) -> IO[bytes]:
    """Open one of a run's files for reading, never blocking (:func:`open_for_reading`).

    Raises:
        FileNotFoundError: it is gone (rotated away since the listing: callers skip it).
        RunFileError: anything else that keeps it from being read (a folder, a FIFO or a
            device in its place, no permission).
    """
    try:
        return open_for_reading(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RunFileError(f"run file {str(path)!r} cannot be read: {exc.strerror or exc}") from None


_SEGMENT = re.compile(r"events\.(\d{6,})\.jsonl")


def _numbered(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's rotated segments with their numbers, in write order. Only names the writer
    gives (``events.000001.jsonl``): a copy kept beside them (``events.orig.jsonl``) is no
    segment, and its events are not read twice."""
    found = []
    for p in run_dir.glob("events.*.jsonl"):
        m = _SEGMENT.fullmatch(p.name)
        if m is not None:
            found.append((int(m.group(1)), p))
    return sorted(found)


def run_segments(run_dir: str | Path) -> list[Path]:
    """A run's JSONL files in write order: rotated segments, then the active file (a listing:
    a reader of the events uses :func:`open_segments`, which holds while the writer rotates)."""
    run_dir = Path(run_dir)
    active = run_dir / ACTIVE
    return [p for _, p in _numbered(run_dir)] + ([active] if active.exists() else [])


def _identity(fh: IO[bytes]) -> tuple[int, int]:
    st = os.fstat(fh.fileno())
    return st.st_dev, st.st_ino


def open_segments(run_dir: str | Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A run's files opened one after the other, in write order (each is closed when the next
    is asked for): one consistent snapshot of the run even while its Recorder rotates the
    active file. A listing taken once would miss the segment rotated between it and the
    opening of ``events.jsonl`` (a whole segment missing from the middle of an export): the
    active file is opened first, then the segments are listed again, and one that has come
    since is read before it. Events written after the active file was opened are not in the
    snapshot (a tail, never a hole). A segment removed since the listing is passed over.

    Raises:
        RunFileError: a file of the run cannot be read (see :func:`open_run_file`).
    """
    run_dir = Path(run_dir)
    last = 0
    for n, p in _numbered(run_dir):
        try:
            fh = open_run_file(p)
        except FileNotFoundError:
            continue
        with fh:
            last = n
            yield p, fh
    try:
        active: IO[bytes] | None = open_run_file(run_dir / ACTIVE)
    except FileNotFoundError:
        active = None
    try:
        held = _identity(active) if active is not None else None
        for n, p in _numbered(run_dir):
            if n <= last:
                continue
            try:
                fh = open_run_file(p)
            except FileNotFoundError:
                continue
            with fh:
                if _identity(fh) == held:  # the active file as opened, rotated since: read below, once
                    break
                yield p, fh
        if active is not None:
            yield run_dir / ACTIVE, active
    finally:
        if active is not None:
            active.close()


@dataclass
class ReadCounts:
    """What a read met: events yielded and bad lines skipped."""

    events: int = 0
    skipped: int = 0
    repeated: int = 0  # events whose seq was not above the one before (a line written twice): passed over


def iter_jsonl(path: str | Path, counts: ReadCounts | None = None, warn: bool = True) -> Iterator[dict[str, Any]]:
    """Events of one JSONL file; a corrupt, truncated or mistyped line is skipped and counted in
    ``counts``, with a warning for each of the first :data:`WARN_LINES` and one for the rest
    (none with ``warn=False``: a second pass over what a first one reported)."""
    with open_run_file(Path(path)) as fh:
        yield from _iter_lines(fh, Path(path), counts if counts is not None else ReadCounts(), warn)


MAX_LINE_BYTES = 8 << 20
"""The longest line a reader takes as a possible event. An event is a few hundred bytes (its
notes and fields are bounded); a longer line is damage (a file of NUL bytes after a crash, a
binary written in its place), skipped as a bad line without holding it in memory whole."""


def _bounded_lines(fh: IO[bytes]) -> Iterator[bytes | None]:
    """The file's lines, each read at most :data:`MAX_LINE_BYTES` at a time; None for a line
    longer than that, whose rest is read past in pieces and dropped."""
    while line := fh.readline(MAX_LINE_BYTES):
        if len(line) < MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while (rest := fh.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
            pass
        yield None


def _iter_lines(fh: IO[bytes], path: Path, counts: ReadCounts, warn: bool) -> Iterator[dict[str, Any]]:
    bad = 0
    try:
        for lineno, line in enumerate(_bounded_lines(fh), 1):
            if line is None:  # damage, not an event: said as any bad line is
                counts.skipped += 1
                bad += 1
                if warn and bad <= WARN_LINES:
                    log.warning("skipping bad JSONL line", file=str(path), line=lineno, error="longer than 8 MiB")
                continue
            if not line.strip():
                continue
            try:
                ev = parse_line(line)
            except SchemaError as exc:
                counts.skipped += 1
                bad += 1
                if warn and bad <= WARN_LINES:
                    log.warning(
                        "skipping bad JSONL line",
                        file=str(path),
                        line=lineno,
                        error=str(exc)[:300],
                        truncated=not line.endswith(b"\n"),
                    )
                continue
            counts.events += 1
            yield ev
    finally:  # also when the reader stops early: what was skipped is said
        if warn and bad > WARN_LINES:
            log.warning(
                "bad JSONL lines skipped (only the first were named)", file=str(path), skipped=bad, named=WARN_LINES
            )


def iter_run(run_dir: str | Path, counts: ReadCounts | None = None, warn: bool = True) -> Iterator[dict[str, Any]]:
    """Every event of a run directory, in order, across rotated files, as one snapshot while
    the run writes (:func:`open_segments`); bad lines skipped and counted in ``counts``, with
    warnings unless ``warn`` is False. The run's seqs increase from line to line: an event
    whose seq is not above the one before (a line written twice by hand, a copy of a segment
    given a segment's name) is passed over and counted in ``counts.repeated``, not counted
    twice by every figure made from the events."""
    counts = counts if counts is not None else ReadCounts()
    last, first, before = -1, None, counts.repeated
    try:
        for path, fh in open_segments(run_dir):
            for ev in _iter_lines(fh, path, counts, warn):
                if ev["seq"] <= last:
                    counts.events -= 1  # read, but no event of the run's
                    counts.repeated += 1
                    first = first or (str(path), ev["seq"], last)
                    continue
                last = ev["seq"]
                yield ev
    finally:
        if warn and first is not None:
            log.warning(
                "events whose seq repeats an earlier one passed over",
                run_dir=str(run_dir),
                events=counts.repeated - before,
                first_file=first[0],
                first_seq=first[1],
                after_seq=first[2],
            )


def _last_line(path: Path, max_back: int = 1 << 20) -> bytes | None:
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("rb") as fh:
        back = min(size, 4096)
        while True:
            fh.seek(size - back)
            chunk = fh.read(back)
            body = chunk.rstrip(b"\n")
            nl = body.rfind(b"\n")
            if nl >= 0 or back >= size or back >= max_back:
                return body[nl + 1 :] if nl >= 0 else body
            back = min(size, back * 4)


class JsonlWriter:
    """Appends encoded lines to the active file; rotates it past ``rotate_bytes``."""

    def __init__(self, run_dir: Path, rotate_bytes: int = 256 << 20) -> None:
        self.run_dir = run_dir
        self.rotate_bytes = rotate_bytes
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ACTIVE
        self.torn_bytes = self._cut_torn_line()
        self.last_seq = self._find_last_seq()
        self._fh = self.path.open("ab")
        self.size = self._fh.tell()
        self._dirty = False

    def _cut_torn_line(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("r+b") as fh:
            data_end = fh.seek(0, os.SEEK_END)
            if data_end == 0:
                return 0
            fh.seek(data_end - 1)
            if fh.read(1) == b"\n":
                return 0
            keep, end = 0, data_end  # back to the last newline, however long the torn line
            while end > 0:
                start = max(0, end - (1 << 20))
                fh.seek(start)
                nl = fh.read(end - start).rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                end = start
            fh.truncate(keep)
        log.warning("cut a torn last line left by a crash", file=str(self.path), bytes=data_end - keep)
        return data_end - keep

    def _find_last_seq(self) -> int:
        for seg in reversed(run_segments(self.run_dir)):
            line = _last_line(seg)
            if line:
                try:
                    return int(parse_line(line)["seq"])
                except (SchemaError, ValueError):
                    log.warning("last line unreadable; scanning file", file=str(seg))
                    last = -1
                    for ev in iter_jsonl(seg):
                        last = ev["seq"]
                    if last >= 0:
                        return last
        return -1

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self.size += len(data)
        self._dirty = True
        if self.size >= self.rotate_bytes:
            self.rotate()

    def flush(self) -> None:
        self._fh.flush()

    def fsync(self) -> None:
        self._fh.flush()
        if self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False

    def rotate(self) -> Path:
        self.fsync()
        self._fh.close()
        numbered = _numbered(self.run_dir)
        n = (numbered[-1][0] if numbered else 0) + 1  # after the last: a gap in the numbers is no free slot
        target = self.run_dir / f"events.{n:06d}.jsonl"
        while target.exists():  # never over a file of that name, whatever it is
            n += 1
            target = self.run_dir / f"events.{n:06d}.jsonl"
        os.replace(self.path, target)
        self._fh = self.path.open("ab")
        self.size = 0
        return target

    def close(self) -> None:
        if not self._fh.closed:
            self.fsync()
            self._fh.close()

    def abandon(self, size: int) -> None:
        """Drop what is still buffered, close the file and cut it back to ``size`` bytes.

        For a write that failed (a full disk): the file ends where the caller last knew it
        whole. The raw file is closed before the cut, so the dropped tail can never be
        flushed after it (at garbage collection, once the cut has freed space) as a torn
        fragment. The writer is closed afterwards; ``close()`` is then a no-op.

        Raises:
            ValueError: if ``size`` is negative or past what this writer has written.
            OSError: if the file cannot be cut.
        """
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self.size:
            raise ValueError(
                f"abandon: size must be an integer in [0, {self.size}] (bytes written to {self.path}), got {size!r}"
            )
        if not self._fh.closed:
            self._fh.raw.close()  # the buffered tail goes with the buffer, unwritten
        if self.path.exists():
            os.truncate(self.path, size)
        self.size = size
