"""``crucible list``, ``export`` and ``compare``: the runs already in an artifacts folder.

Which runs there are, and where, is :mod:`telemetry.rundir`'s to say (a run that is not
there is its :class:`~telemetry.rundir.RunNotFound`, a usage error here).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from cli import render
from cli.errors import UsageError
from telemetry import rundir
from telemetry.export import FORMATS, export_run
from telemetry.jsonl import ReadCounts, iter_run


def cmd_list(args: argparse.Namespace) -> int:
    art = Path(args.artifacts)
    infos = rundir.list_runs(art)
    if args.json:
        for i in infos:
            print(orjson.dumps(i).decode())
        return 0
    Console().print(render.runs_table(f"runs in {art}", infos))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run = rundir.resolve_run(args.run, Path(args.artifacts))
    out = Path(args.out) if args.out else Path(f"{run.name}.{args.format}")
    counts = ReadCounts()
    try:
        n = export_run(run, args.format, out, counts=counts)
    except OSError as exc:
        raise UsageError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    skipped = f"; skipped {counts.skipped:,} unreadable line(s)" if counts.skipped else ""
    Console().print(f"exported {n:,} events of {run} to {out}{skipped}", markup=False, highlight=False)
    return 0


def metric_values(run: Path, metric: str) -> list[float]:
    """Every numeric value of ``metric`` in the run's events, in order."""
    out = []
    for ev in iter_run(run):
        v = (ev.get("values") or {}).get(metric)
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from telemetry.stats import compare

    art = Path(args.artifacts)
    a, b = rundir.resolve_run(args.run_a, art), rundir.resolve_run(args.run_b, art)
    va, vb = metric_values(a, args.metric), metric_values(b, args.metric)
    if len(va) < 2 or len(vb) < 2:
        raise UsageError(
            f"metric {args.metric!r} has {len(va)} values in {a.name} and {len(vb)} in {b.name}; "
            "need at least 2 in each"
        )
    r = compare(va, vb, metric=args.metric)
    if args.json:
        print(orjson.dumps(r).decode())
        return 0
    Console().print(render.compare_table(f"{args.metric}: {a.name} (control) vs {b.name} (treatment)", r))
    return 0


def add_commands(sub: Any) -> None:
    ls = sub.add_parser("list", help="list the runs in an artifacts folder")
    ls.add_argument("--artifacts", default="artifacts")
    ls.add_argument("--json", action="store_true", help="one JSON object per run")
    ls.set_defaults(func=cmd_list)
    ex = sub.add_parser("export", help="export a run to CSV, JSONL or Parquet")
    ex.add_argument("run", help="run directory or run id")
    ex.add_argument("--format", choices=FORMATS, default="jsonl")
    ex.add_argument("--out", help="output file (default RUN.FORMAT)")
    ex.add_argument("--artifacts", default="artifacts")
    ex.set_defaults(func=cmd_export)
    cp = sub.add_parser("compare", help="statistical comparison of two runs on one metric")
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--metric", required=True)
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--artifacts", default="artifacts")
    cp.set_defaults(func=cmd_compare)
