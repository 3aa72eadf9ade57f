"""structlog set-up: human-readable on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import structlog

_configured = False


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


def configure_logging(level: str | int = "INFO", *, json: bool | None = None, also_to: Path | None = None) -> None:
    """Configure structlog once for the process (idempotent unless called with new args).

    ``json=None`` picks JSON lines when stderr is not a terminal. ``also_to``: a file that
    gets every line too (appended, line-buffered), as a lab daemon keeps its log.
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
            file=_Stderr(None if also_to is None else also_to.open("a", encoding="utf-8", buffering=1))
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
