"""``crucible set``, ``get`` and ``show``: read and edit experiment specs (validated, layout kept).

A spec that is wrong is :class:`~experiments.spec.SpecError`, one of the usage errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from cli.commands import help_of


def cmd_set(args: argparse.Namespace) -> int:
    from cli import render
    from experiments.specedit import brief, set_values

    set_values(args.spec, args.assignments)
    done = ", ".join(brief(a, 80) for a in args.assignments)  # a value of a megabyte is not echoed whole
    render.say(render.console(), f"{args.spec}: set {done}")  # the user's text, as typed
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from experiments.specedit import lookup

    v, note = lookup(args.spec, args.key)
    if note:  # the value a default amounts to: said on stderr, so that stdout stays the value alone
        sys.stderr.write(f"{args.spec}: {note}\n")
    print(orjson.dumps(v).decode() if not isinstance(v, str) else v)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from experiments.specedit import show

    print(show(args.spec), end="")
    return 0


def add_commands(sub: Any) -> None:
    se = sub.add_parser("set", help=help_of("set"))
    se.add_argument("spec")
    se.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    se.set_defaults(func=cmd_set)
    ge = sub.add_parser("get", help=help_of("get"))
    ge.add_argument("spec")
    ge.add_argument("key")
    ge.set_defaults(func=cmd_get, prints_result=True)
    sh = sub.add_parser("show", help=help_of("show"))
    sh.add_argument("spec")
    sh.set_defaults(func=cmd_show, prints_result=True)
