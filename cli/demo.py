"""``crucible demo``: a small supervised tree whose worker crashes, to watch restarts happen."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from cli import render
from cli.commands import help_of
from experiments.validate import Num


def cmd_demo(args: argparse.Namespace) -> int:
    from actors.demo import run_demo

    console = render.console()
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


def add_commands(sub: Any) -> None:
    d = sub.add_parser("demo", help=help_of("demo"))
    d.add_argument("--seconds", type=Num(0.1, 3600).arg(), default=3.0, help="how long to run, 0.1 to 3600 (default 3)")
    d.set_defaults(func=cmd_demo)
