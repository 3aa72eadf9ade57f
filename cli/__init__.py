"""The ``crucible`` command line: one module per group of commands, above experiments and dashboard.

=====================  ==========================================================================
module                 commands
=====================  ==========================================================================
:mod:`cli.demo`        ``demo``
:mod:`cli.run`         ``run`` (``--dashboard`` serves the web dashboard), ``color``
:mod:`cli.runs`        ``list``, ``export``, ``compare``, ``sync``
:mod:`cli.monitor`     ``monitor``
:mod:`cli.spec`        ``set``, ``get``, ``show``
:mod:`cli.tuning`      ``tune``, ``ab``
:mod:`cli.instances`   ``instances``
:mod:`cli.lab`         ``lab serve`` (the lab daemon), ``submit``, ``ls``, ``pause``, ``resume``, ``stop``
=====================  ==========================================================================

:mod:`cli.render` draws the tables and live views; :mod:`cli.errors` holds the usage
errors and the exit codes. ``crucible ...`` and ``python supervisor.py ...`` both end in
:func:`main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``crucible color: error: argument --seed: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole parser: global options, then each command group's subcommands."""
    from cli import demo, instances, lab, monitor, run, runs, spec, tuning

    p = _Parser(prog="crucible", description="Supervised actor trees for long experiments.")
    p.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, help="structlog level (default WARNING)"
    )
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (demo, run, runs, monitor, spec, tuning, instances, lab):
        group.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``crucible`` command; its exit code (see :mod:`cli.errors`)."""
    from actors.log import configure_logging
    from actors.runtime import freeze_startup_heap
    from cli.errors import EXIT_USAGE, USER_ERRORS, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=True if args.log_json else None)
    freeze_startup_heap()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        parser.exit(EXIT_USAGE, f"crucible {args.command}: error: {one_line(exc)}\n")
    return EXIT_USAGE


__all__ = ["build_parser", "main"]
