"""The exit codes of a command cut short, and the line that says so: a module that imports
nothing heavy, so that :func:`cli.main` can use it while the seconds of other imports run
(:mod:`cli.errors` holds the other codes and re-exports these)."""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130
"""A command ended by Ctrl-C before it could finish: 128 + SIGINT, as a shell reports one killed by it."""
EXIT_OUTPUT_CLOSED = 141
"""Output cut short by a closed pipe: 128 + SIGPIPE, as POSIX tools killed by SIGPIPE end."""


def interrupted(command: str | None, after: str = "") -> int:
    """Say on stderr, in one line, that a Ctrl-C ended the command (``after``: what was done
    about it); the exit code to end with."""
    name = f"crucible {command}" if command else "crucible"
    sys.stderr.write(f"{name}: interrupted{f'; {after}' if after else ''}\n")
    return EXIT_INTERRUPTED
