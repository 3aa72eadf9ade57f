"""``crucible instances``: the DIMACS graphs shipped with the package, their size and best known colour count."""

from __future__ import annotations

import argparse
from typing import Any

import orjson

from cli import render
from cli.commands import help_of


def instance_rows() -> list[dict[str, Any]]:
    """One dict per shipped instance: name, vertices, edges, density, best known colour count, proved or not."""
    from experiments.coloring.catalog import best_known, instance_names, instance_path
    from experiments.coloring.graph import read_dimacs

    best = best_known()
    rows = []
    for name in instance_names():
        g = read_dimacs(instance_path(name))  # type: ignore[arg-type]
        k, proved = best.get(name, (None, None))
        rows.append(
            {
                "name": name,
                "vertices": g.n,
                "edges": g.m,
                "density": round(g.density(), 4),
                "best_known": k,
                "proved_optimal": proved,
            }
        )
    return rows


def cmd_instances(args: argparse.Namespace) -> int:
    rows = instance_rows()
    if args.json:
        for r in rows:
            print(orjson.dumps(r).decode())
        return 0
    console = render.console()
    console.print(render.instances_table(rows))
    console.print("* proved optimal")
    return 0


def add_commands(sub: Any) -> None:
    ins = sub.add_parser("instances", help=help_of("instances"))
    ins.add_argument("--json", action="store_true", help="one JSON object per instance")
    ins.set_defaults(func=cmd_instances, prints_result=True)
