"""Root of the tree: the supervision API, the Lab, and the ``crucible`` command line.

``crucible ...`` and ``python supervisor.py ...`` are the same program.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from actors.supervision import (
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    DynamicSupervisor,
    MaxRestartIntensity,
    Supervisor,
    SupervisorRef,
    TooManyChildren,
)
from experiments.lab import AlreadyPaused, Experiment, Lab, NotFound, NotPaused, NotRunning

__all__ = [
    "AlreadyPaused",
    "ChildNotFound",
    "ChildRunning",
    "ChildSpec",
    "DynamicSupervisor",
    "Experiment",
    "Lab",
    "MaxRestartIntensity",
    "NotFound",
    "NotPaused",
    "NotRunning",
    "Supervisor",
    "SupervisorRef",
    "TooManyChildren",
    "main",
]


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from actors.demo import run_demo

    console = Console()
    console.print(
        f"[bold]crucible demo[/]: a one_for_one supervisor over a counter and a worker "
        f"that crashes every 7th tick, for {args.seconds:g}s"
    )
    result = run_demo(seconds=args.seconds)
    table = Table(title="supervised demo tree")
    for col in ("child", "incarnations seen", "alive at end"):
        table.add_column(col)
    for ch in result["children"]:
        table.add_row(ch["id"], str(result[f"{ch['id']}_incarnations"]), str(ch["alive"]))
    console.print(table)
    console.print(
        f"ticks sent: {result['ticks']}; the counter (never crashed) counted "
        f"{result['counter_count']}; the flaky worker was restarted "
        f"{result['flaky_incarnations'] - 1} times; supervisor exit: {result['supervisor_exit']}"
    )
    ok = result["flaky_incarnations"] > 1 and result["counter_incarnations"] == 1
    return 0 if ok else 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``crucible color: error: argument --seed: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    from experiments.validate import Num

    p = _Parser(prog="crucible", description="Supervised actor trees for long experiments.")
    p.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, help="structlog level (default WARNING)"
    )
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a small supervised tree that shows restarts")
    d.add_argument("--seconds", type=Num(0.1, 3600).arg(), default=3.0, help="how long to run, 0.1 to 3600 (default 3)")
    d.set_defaults(func=_cmd_demo)
    from experiments.cli import add_commands

    add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``crucible`` console script."""
    from actors.log import configure_logging
    from actors.runtime import freeze_startup_heap

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=True if args.log_json else None)
    freeze_startup_heap()
    from experiments.cli import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        message = " ".join(str(exc).split())  # one line, whatever the error text holds
        parser.exit(2, f"crucible {args.command}: error: {message}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
