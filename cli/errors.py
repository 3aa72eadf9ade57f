"""What ``crucible`` does with errors, and its exit codes, in one place.

Exit codes: 0 the command did what was asked; 1 it ran but the result is a failure (a run
whose tree gave up or whose storage failed, a colouring that is not proper); 2 the user has
something to fix (a bad spec, flag, file, port, or a run that does not exist); 130 a Ctrl-C
ended it before it could finish (a run it stops still reports, and ends 0 or 1), 143 a
SIGTERM did (``crucible color`` before its run started); 141 its
output was cut short by a closed pipe (``crucible list | head``), a quiet end. A user error
is one line on stderr, never a traceback: a command raises :class:`UsageError`, or lets one
of the domain errors in :data:`USER_ERRORS` through, and :func:`cli.main` prints it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cli.exits import EXIT_INTERRUPTED as EXIT_INTERRUPTED  # defined there: they work before
from cli.exits import EXIT_OUTPUT_CLOSED as EXIT_OUTPUT_CLOSED  # the seconds of imports here are done
from cli.exits import interrupted as interrupted
from experiments.coloring.graph import GraphError
from experiments.validate import SpecError
from telemetry.history import HistoryConfigError, HistoryConnectError
from telemetry.jsonl import RunFileError
from telemetry.rundir import ArtifactsError, RunNotFound, recorded_file

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line problem; printed without a traceback, exit code 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    SpecError,
    GraphError,
    ArtifactsError,
    RunNotFound,
    RunFileError,  # a run's file that cannot be read (a folder in its place, no permission)
    HistoryConfigError,  # a malformed --history URL
    HistoryConnectError,  # a history server that refuses, times out or rejects the credentials
)
"""Errors that are the user's to fix: ``crucible`` prints them as one line and exits 2."""

FAILED_REASONS = ("failed", "storage:")  # a tree that gave up; a storage failure that stopped the run


def folder_arg(value: str) -> str:
    """``--artifacts``: a folder's name; an empty one (``--artifacts ""``, an unset variable)
    would put runs and the history in the current folder without a word."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must name a folder (default ./artifacts), got an empty string")
    return value


def history_error(flag: str | None, exc: BaseException) -> UsageError:
    """A history that cannot be opened for writing (``run``, ``lab serve``), named by
    ``--history`` when the flag gave it (a ``$CRUCIBLE_HISTORY`` one says so already)."""
    return UsageError(f"--history: {exc}" if flag else str(exc))


def one_line(exc: BaseException) -> str:
    """The error's message on one line, whatever its text holds."""
    return " ".join(str(exc).split())


def run_failed(summary: dict[str, Any]) -> bool:
    """Whether a run ended in failure: its reason says the tree gave up (``failed: ...``) or
    the storage failed (``storage: ...``), or its events were not all stored (a storage error
    after the phase had already ended)."""
    return reason_failed(summary.get("reason")) or bool(summary.get("storage_error"))


def reason_failed(reason: str | None) -> bool:
    """Whether a run's end reason is a failure (exit code 1)."""
    return str(reason or "").startswith(FAILED_REASONS)


def writable_file(path: str, what: str) -> Path:
    """Refuse, before the work starts, an output file whose folder cannot take it, or that holds
    recorded data (see :func:`not_recorded`)."""
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise UsageError(f"{what} {path!r}: cannot write there (a folder, or a folder that is missing or read-only)")
    return not_recorded(p, what)


def not_recorded(path: str | Path, what: str) -> Path:
    """``path``, unless it holds recorded data (a run folder's file, a history): an output
    option must never replace a run."""
    p = Path(path)
    recorded = recorded_file(p)
    if recorded is not None:
        raise UsageError(f"{what} {str(path)!r}: refusing to replace {recorded}; give another file")
    return p
