"""The lab daemon's clients: ``submit``, ``ls``, ``pause``, ``resume``, ``stop``, ``steer``, ``open``.

They talk to a daemon (``crucible lab serve``, :mod:`cli.lab`) over HTTP (``--to URL``) with
the token from ``CRUCIBLE_TOKEN`` or ``--token-file``, through
:class:`dashboard.client.LabClient`; they import nothing of the Lab itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import orjson

from cli.commands import help_of
from cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from experiments.validate import tree_problem


def client(args: argparse.Namespace) -> Any:
    from dashboard.client import LabClient, LabClientError

    try:
        return LabClient(args.to, token_file=args.token_file)
    except LabClientError as exc:
        raise UsageError(str(exc)) from None


def _call(fn: Any, *a: Any) -> Any:
    from dashboard.client import LabClientError

    try:
        return fn(*a)
    except LabClientError as exc:
        raise UsageError(str(exc)) from None


def cmd_submit(args: argparse.Namespace) -> int:
    spec = Path(args.spec)
    if not spec.is_file():
        raise UsageError(f"spec {args.spec!r}: {'a folder, not a file' if spec.is_dir() else 'no such file'}")
    bad = tree_problem({"--set": args.set or [], "--id": args.id})  # what no request can carry
    if bad is not None:
        raise UsageError(f"{bad[0]}: {bad[1]}")
    with client(args) as c:
        entry = _call(c.submit, spec, args.set or [], args.id, args.key)
    sys.stdout.write(orjson.dumps(entry).decode() + "\n")
    if entry.get("repeated") and args.key is not None and not entry.get("retried"):  # given before: nothing queued
        # (without --key, or after the client's own retry, the repeat may well be this very submission)
        sys.stderr.write(f"crucible submit: already submitted with this --key, as {entry['id']}\n")
    if entry.get("status") == "failed":  # taken, then could not start: a script must see that nothing runs
        reason = str(entry.get("reason") or "failed").removeprefix("could not start: ")
        sys.stderr.write(f"crucible submit: {entry['id']} could not start: {reason}\n")
        return EXIT_FAILED
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = _call(c.list)
    if args.json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return EXIT_OK
    sys.stdout.write(f"{'ID':<32} {'STATUS':<10} {'POS':>4}  REASON\n")
    for r in rows:
        pos = "" if r.get("position") is None else str(r["position"])
        sys.stdout.write(f"{r['id']:<32} {r['status']:<10} {pos:>4}  {r.get('reason') or ''}\n")
    return EXIT_OK


def cmd_control(args: argparse.Namespace) -> int:
    with client(args) as c:
        entry = _call(getattr(c, args.command), args.id)
    sys.stdout.write(f"{entry['experiment']}: {entry['status']}\n")
    return EXIT_OK


NONFINITE_TEXT = re.compile(r"[+-]?(nan|inf|infinity)", re.IGNORECASE)


def control_value(text: str) -> Any:
    """A control's value from the command line: JSON where it reads as JSON (``0.8``, ``true``,
    ``[1, 2]``, ``"x"``), else the text itself (``spectral``). UsageError for what no request
    can carry (NaN, an infinity, an integer past 64 bits, text that is not UTF-8)."""
    try:
        value = json.loads(text)  # the standard reader: integers exact, NaN and 1e400 read (then refused)
    except (ValueError, RecursionError):
        if NONFINITE_TEXT.fullmatch(text):  # nan, inf as Python and numpy print them: meant as numbers
            raise UsageError(
                f"value {text!r} is not a finite number (a control takes finite numbers; "
                f"to send the text, give it as JSON: '\"{text}\"')"
            ) from None
        value = text
    bad = tree_problem({"value": value})
    if bad is not None:
        raise UsageError(f"{bad[0]}: {bad[1]}")
    return value


def cmd_steer(args: argparse.Namespace) -> int:
    key, sep, text = args.assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"expected KEY=VALUE (one of the workload's controls, its new value), got {args.assignment!r}")
    value = control_value(text.strip())
    bad = tree_problem({"key": key, "--why": args.why})
    if bad is not None:
        raise UsageError(f"{bad[0]}: {bad[1]}")
    with client(args) as c:
        entry = _call(c.set_param, args.id, key.strip(), value, args.why)
    if args.json:
        sys.stdout.write(orjson.dumps(entry).decode() + "\n")
    else:
        r = entry.get("result") or {}
        before, after = orjson.dumps(r.get("before")).decode(), orjson.dumps(r.get("after")).decode()
        sys.stdout.write(f"{entry['experiment']}: {r.get('key', key)} {before} -> {after} ({entry['status']})\n")
    return EXIT_OK


def cmd_open(args: argparse.Namespace) -> int:
    with client(args) as c:
        url = _call(c.sign_in_link)
    sys.stdout.write(url + "\n")
    return EXIT_OK


def _client_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", required=True, metavar="URL", help="the lab daemon's URL (crucible lab serve prints it)")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="the daemon's <artifacts>/dashboard.token (wins over CRUCIBLE_TOKEN, which is the default)",
    )


def add_commands(sub: Any) -> None:
    su = sub.add_parser("submit", help=help_of("submit"))
    su.add_argument("spec", help="experiment spec (TOML)")
    su.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec value (dotted key)")
    su.add_argument("--id", help="experiment id (default: the spec's name, made unique)")
    su.add_argument(
        "--key",
        help="idempotency key (printable ASCII, no spaces): the same submission sent again with it "
        "(a script run again after a lost answer) gets the first one's entry, not a second experiment",
    )
    _client_opts(su)
    su.set_defaults(func=cmd_submit)
    ls = sub.add_parser("ls", help=help_of("ls"))
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")
    _client_opts(ls)
    ls.set_defaults(func=cmd_ls, prints_result=True)
    for action in ("pause", "resume", "stop"):
        c = sub.add_parser(action, help=help_of(action))
        c.add_argument("id", help="experiment id")
        _client_opts(c)
        c.set_defaults(func=cmd_control)
    st = sub.add_parser(
        "steer",
        help=help_of("steer"),
        description="Set one control of a running experiment at its phase's next safe point (recorded as a "
        "control event and checkpointed). KEY is one of the controls the experiment's workload declares "
        "(docs/daemon.md lists them; an unknown KEY is refused with the list); VALUE is read as JSON, else as text.",
    )
    st.add_argument("id", help="experiment id")
    st.add_argument("assignment", metavar="KEY=VALUE", help="the control and its new value (VALUE read as JSON)")
    st.add_argument("--why", default="crucible steer", help="a note recorded with the change")
    st.add_argument("--json", action="store_true", help="print the daemon's answer as one JSON object")
    _client_opts(st)
    st.set_defaults(func=cmd_steer)
    op = sub.add_parser(
        "open",
        help=help_of("open"),
        description="Print a new link that opens the dashboard signed in. Each link works once (it is "
        "traded for the token, which the page keeps): another browser, or one whose storage was cleared, "
        "needs a new one.",
    )
    _client_opts(op)
    op.set_defaults(func=cmd_open, prints_result=True)
