"""structlog set-up: human-readable on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import structlog

_configured = False

LOG_ROTATE_BYTES = 64 << 20  # a daemon's log file is rotated past this size
LOG_KEEP = 5  # rotated files kept beside it: name.1 (newest) to name.5
REOPEN_CHECK_S = 1.0  # how often a log file checks that its name still points at it


class LogFile:
    """A long-running process's log file: appended a line at a time, rotated by size
    (``name`` -> ``name.1`` -> ... -> ``name.<keep>``, the oldest dropped), and reopened when
    something else renamed or removed it (logrotate's default ``create`` mode), so a daemon
    that runs for months neither fills the disk nor keeps writing to a file nobody reads.

    ``rotate_bytes=0`` never rotates (an outside tool does). Writes that fail (full disk,
    a folder gone) are dropped: a log line never reaches the actor that logged it as an error.
    """

    def __init__(
        self, path: Path, rotate_bytes: int = LOG_ROTATE_BYTES, keep: int = LOG_KEEP, check_s: float = REOPEN_CHECK_S
    ) -> None:
        if rotate_bytes < 0 or keep < 1:
            raise ValueError(f"rotate_bytes must be >= 0 and keep >= 1, got {rotate_bytes!r}, {keep!r}")
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self.check_s = check_s  # how often the name is checked (a stat); 0: before every line
        self._lock = threading.Lock()
        self._fh: Any = None
        self._size = 0
        self._checked = 0.0
        self._line_start = True
        self._open()

    def _open(self) -> None:
        # the owner's only: a daemon's log names its experiments, their specs' errors and its clients
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = open(fd, "a", encoding="utf-8", buffering=1)
        self._size = os.fstat(self._fh.fileno()).st_size
        self._checked = time.monotonic()

    def _moved(self) -> bool:
        """The name no longer points at the open file (renamed, removed, replaced)."""
        try:
            named = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(self._fh.fileno())
        return (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino)

    def _rotate(self) -> None:
        self._fh.close()
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def write(self, text: str) -> int:
        with self._lock:
            try:
                if self._fh is None or self._fh.closed:
                    self._open()
                elif self._line_start and time.monotonic() - self._checked >= self.check_s:
                    self._checked = time.monotonic()
                    if self._moved():
                        self._fh.close()
                        self._open()
                    else:  # truncated from outside (copytruncate) counts from its new size
                        self._size = os.fstat(self._fh.fileno()).st_size
                self._fh.write(text)
                self._size += len(text) if text.isascii() else len(text.encode("utf-8"))
                # print() writes a line and its newline apart: files change only between lines
                self._line_start = text.endswith("\n")
                if self._line_start and self.rotate_bytes and self._size >= self.rotate_bytes:
                    self._rotate()
            except (ValueError, OSError):
                pass
        return len(text)

    def flush(self) -> None:
        with self._lock:
            try:
                if self._fh is not None:
                    self._fh.flush()
            except (ValueError, OSError):
                pass

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (a host may swap it), and to ``also``
    (a daemon's log file) when given; never lets a failed log write (a closed stream, a full
    disk) reach the actor that logged."""

    def __init__(self, also: Any = None) -> None:
        self.also = also

    def _streams(self) -> tuple[Any, ...]:
        return (sys.stderr,) if self.also is None else (sys.stderr, self.also)

    def write(self, text: str) -> int:
        for stream in self._streams():
            try:
                stream.write(text)
            except (ValueError, OSError):
                pass
        return len(text)

    def flush(self) -> None:
        for stream in self._streams():
            try:
                stream.flush()
            except (ValueError, OSError):
                pass


def configure_logging(
    level: str | int = "INFO",
    *,
    json: bool | None = None,
    also_to: Path | None = None,
    rotate_bytes: int = LOG_ROTATE_BYTES,
    keep: int = LOG_KEEP,
) -> None:
    """Configure structlog once for the process (idempotent unless called with new args).

    ``json=None`` picks JSON lines when stderr is not a terminal. ``also_to``: a file that
    gets every line too, as a lab daemon keeps its log (a :class:`LogFile`: rotated past
    ``rotate_bytes``, ``keep`` old files kept, reopened when rotated from outside).
    """
    global _configured
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(
            file=_Stderr(None if also_to is None else LogFile(also_to, rotate_bytes, keep))
        ),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # pykka logs through the standard library; keep its per-crash tracebacks quiet,
    # we log crashes ourselves with structlog.
    logging.getLogger("pykka").setLevel(logging.CRITICAL)
    _configured = True


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(name)
