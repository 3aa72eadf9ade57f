"""Root of the tree: the supervision API, the Lab, and the ``crucible`` entry point.

``crucible ...`` and ``python supervisor.py ...`` are the same program: :func:`main` hands
the command line to :func:`cli.main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

if __name__ == "__main__":  # the command line at once, as the crucible script does: the commands
    from cli import main as _cli_main  # import what they need, and a Ctrl-C during that is one line

    sys.exit(_cli_main())

from actors.log import configure_logging  # below the fast path of the command line
from actors.supervision import (
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    DynamicSupervisor,
    Supervisor,
    SupervisorRef,
    TooManyChildren,
)
from experiments.lab import (
    AlreadyPaused,
    Experiment,
    Lab,
    LabFull,
    LifecycleError,
    NotFound,
    NotPaused,
    NotRunning,
    PauseTimedOut,
)
from experiments.remote import RayBackendError  # importing it registers Lab(backend="ray")

__all__ = [
    "AlreadyPaused",
    "ChildNotFound",
    "ChildRunning",
    "ChildSpec",
    "DynamicSupervisor",
    "Experiment",
    "Lab",
    "LabFull",
    "LifecycleError",
    "NotFound",
    "NotPaused",
    "NotRunning",
    "PauseTimedOut",
    "RayBackendError",
    "Supervisor",
    "SupervisorRef",
    "TooManyChildren",
    "configure_logging",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crucible`` console script (the commands live in :mod:`cli`)."""
    from cli import main as cli_main

    return cli_main(argv)
