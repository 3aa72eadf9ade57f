"""The exit codes of a command cut short, and the line that says so: a module that imports
nothing heavy, so that :func:`cli.main` can use it while the seconds of other imports run
(:mod:`cli.errors` holds the other codes and re-exports these)."""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED = 130
"""A command ended by Ctrl-C before it could finish: 128 + SIGINT, as a shell reports one killed by it."""
EXIT_OUTPUT_CLOSED = 141
"""Output cut short by a closed pipe: 128 + SIGPIPE, as POSIX tools killed by SIGPIPE end."""


def interrupted(command: str | None, after: str = "", signum: int = signal.SIGINT) -> int:
    """Say on stderr, in one line, that a Ctrl-C (or the signal ``signum``) ended the command
    (``after``: what was done about it); the exit code to end with, 128 + the signal's number
    as a shell reports a command the signal killed (130 for SIGINT, 143 for SIGTERM)."""
    name = program(command)
    how = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    sys.stderr.write(f"{name}: {how}{f'; {after}' if after else ''}\n")
    return 128 + int(signum)


def program(command: str | None) -> str:
    """How a message names the command: ``crucible color``, or ``crucible`` before one is known."""
    return f"crucible {command}" if command else "crucible"
