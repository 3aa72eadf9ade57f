"""``crucible list``, ``export`` and ``compare``: the runs already in an artifacts folder.

Which runs there are, and where, is :mod:`telemetry.rundir`'s to say (a run that is not
there is its :class:`~telemetry.rundir.RunNotFound`, a usage error here).

``--history URL`` (or ``$CRUCIBLE_HISTORY``) names the history to read (a ``postgresql://``
URL or a SQLite file; see :mod:`telemetry.history`): ``list`` takes the ended runs' figures
from it, ``export`` and ``compare`` read a run's events from it, by run id, whether or not
the run's folder is here. Without either, they read the run's files as before.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from cli import render
from cli.errors import EXIT_FAILED, UsageError, folder_arg, history_error, not_recorded, one_line
from telemetry import rundir
from telemetry.batchstore import BatchStore
from telemetry.export import FORMATS, export_events, export_run
from telemetry.history import ENV, HistoryError, describe_history, open_history
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import check_id


def history_target(args: argparse.Namespace) -> str | None:
    """The history a reader was pointed at: ``--history``, else ``$CRUCIBLE_HISTORY``; None: the files."""
    return getattr(args, "history", None) or os.environ.get(ENV) or None


def history_source(args: argparse.Namespace) -> str:
    """What named the history, for an error line: ``--history`` or ``$CRUCIBLE_HISTORY``."""
    return "--history" if getattr(args, "history", None) else f"${ENV}"


def _history_failure(args: argparse.Namespace, exc: BaseException, where: str) -> UsageError:
    """One line that names the setting, the history (password masked) and why, said once."""
    why = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and why.startswith("no such table"):  # an empty file, /dev/null
        why = f"no crucible history at {where} ({why})"
    elif where not in why:  # SQLite's and the OS's errors do not name the history; ours do
        why = f"cannot read the history at {where}: {why}"
    source = history_source(args)
    return UsageError(why if why.startswith(f"{source}: ") else f"{source}: {why}")


@contextlib.contextmanager
def reading_history(args: argparse.Namespace) -> Iterator[BatchStore]:
    """The named history, open for reading; what stops it, at open or later (a server that goes
    away mid-export), is a usage error that names the setting and the history."""
    target = history_target(args)
    where = describe_history(target, args.artifacts)
    try:
        store = open_history(target, artifacts=args.artifacts, readonly=True)
    except FileNotFoundError:
        raise UsageError(f"{history_source(args)}: no crucible history at {where}") from None
    except (HistoryError, sqlite3.Error, OSError) as exc:
        raise _history_failure(args, exc, where) from None
    try:
        yield store
    except (HistoryError, sqlite3.Error) as exc:
        raise _history_failure(args, exc, where) from None
    finally:
        with contextlib.suppress(HistoryError, sqlite3.Error):
            store.close()


def _named_run(arg: str) -> str:
    """The run id an argument names: the name of a run folder given as a path, else the argument."""
    try:
        return Path(arg).name if Path(arg).is_dir() else arg
    except (OSError, ValueError):  # a name too long for the file system, a NUL: not a folder, not an id
        return arg


def history_events(store: BatchStore, arg: str, where: str) -> Iterator[dict[str, Any]]:
    """A run's events from the history, by run id (or the name of a run folder), in order.

    Raises:
        RunNotFound: the history has neither events nor a record of that run.
    """
    run_id = _named_run(arg)
    try:
        check_id("run id", run_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    events = store.iter_events(run_id=run_id)
    first = next(events, None)  # asked now: an unknown run fails here, before anything is written
    if first is None and all(r["run_id"] != run_id for r in store.runs()):
        raise rundir.RunNotFound(f"no run {run_id!r} in the history at {where}")
    return itertools.chain([] if first is None else [first], events)


def cmd_list(args: argparse.Namespace) -> int:
    art = Path(args.artifacts)
    target = history_target(args)
    if target is not None:
        with reading_history(args) as store:  # a history named but unreachable or unreadable (not a
            store.runs()  # database, no tables) is an error here, not a quiet fall-back to the folders
    if not art.is_dir():  # a mistyped --artifacts must not read as "no runs"
        raise UsageError(f"no artifacts folder {str(art)!r} (nothing has run there yet; give --artifacts DIR)")
    infos = rundir.list_runs(art, target)
    if args.json:
        for i in infos:
            print(orjson.dumps(i).decode())
        return 0
    render.listing_console().print(render.runs_table(f"runs in {art}", infos))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if history_target(args) is not None:
        return export_from_history(args)
    run = rundir.resolve_run(args.run, Path(args.artifacts))
    out = not_recorded(args.out, "--out") if args.out else Path(f"{run.name}.{args.format}")
    counts = ReadCounts()
    n = _write_whole(out, lambda partial: export_run(run, args.format, partial, counts=counts))
    skipped = f"; skipped {counts.skipped:,} unreadable line(s)" if counts.skipped else ""
    render.say(Console(), f"exported {n:,} events of {run} to {out}{skipped}")
    return 0


def export_from_history(args: argparse.Namespace) -> int:
    with reading_history(args) as store:
        where = describe_history(history_target(args), args.artifacts)
        history_events(store, args.run, where)  # an unknown run fails before any file is made
        run_id = _named_run(args.run)
        out = not_recorded(args.out, "--out") if args.out else Path(f"{run_id}.{args.format}")

        def events() -> Iterator[dict[str, Any]]:  # called once per pass over the events
            store.skipped_batches = 0  # each pass counts afresh
            return history_events(store, args.run, where)

        n = _write_whole(out, lambda partial: export_events(events, args.format, partial))
    skipped = f"; skipped {store.skipped_batches:,} damaged batch(es)" if store.skipped_batches else ""
    render.say(Console(), f"exported {n:,} events of {run_id} from {where} to {out}{skipped}")
    return 0


def _write_whole(out: Path, write: Callable[[Path], int]) -> int:
    """``write`` into a file beside ``out``, renamed to it at the end: the file appears whole or
    not at all (a read that fails midway, a full disk, leave nothing half-written)."""
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        n = write(partial)
        partial.replace(out)
    except OSError as exc:
        raise UsageError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return n


def metric_values(run: Path | str, metric: str, store: BatchStore | None = None, where: str = "") -> list[float]:
    """Every numeric value of ``metric`` in the run's events, in order (from ``store`` if given)."""
    out = []
    for ev in iter_run(run) if store is None else history_events(store, str(run), where):
        v = (ev.get("values") or {}).get(metric)
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from telemetry.stats import compare

    art = Path(args.artifacts)
    if history_target(args) is not None:
        with reading_history(args) as store:
            where = describe_history(history_target(args), args.artifacts)
            va, vb = (metric_values(r, args.metric, store, where) for r in (args.run_a, args.run_b))
        a, b = Path(args.run_a), Path(args.run_b)
    else:
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


def cmd_sync(args: argparse.Namespace) -> int:
    from telemetry.sync import sync_run

    art = Path(args.artifacts)
    if not art.is_dir():
        raise UsageError(f"no artifacts folder {str(art)!r} (nothing has run there yet; give --artifacts DIR)")
    runs = [rundir.resolve_run(r, art) for r in args.runs] if args.runs else rundir.find_runs(art)
    try:
        store = open_history(args.history, artifacts=art)
    except HistoryError as exc:
        raise history_error(args.history, exc) from None
    where = describe_history(args.history, art)
    console = Console(highlight=False)
    sent = problems = 0
    try:
        for run in runs:
            name = f"{run.parent.name}/{run.name}"
            try:
                r = sync_run(store, run)
            except (ValueError, OSError) as exc:  # an unreadable file, a folder name that is no run id
                render.say(console, f"{name}: not synced: {one_line(exc)}")
                problems += 1
                continue
            except (HistoryError, sqlite3.Error) as exc:
                render.say(console, f"{name}: stopped: {one_line(exc)}")
                sys.stderr.write(
                    f"crucible sync: the history at {where} refused a write; what was sent is kept: run it again\n"
                )
                return EXIT_FAILED
            sent += r.sent
            if r.left_alone:
                said = f"left alone ({r.left_alone})"
            elif r.sent or r.recorded:
                said = f"sent {r.sent:,} event(s)" + ("; summary recorded" if r.recorded else "")
            else:
                said = "up to date"
            render.say(console, f"{name}: {said}")
    finally:
        with contextlib.suppress(HistoryError, sqlite3.Error):
            store.close()
    render.say(console, f"{len(runs)} run(s) checked, {sent:,} event(s) sent to {where}")
    return EXIT_FAILED if problems else 0


HISTORY_HELP = (
    "the history to read: a postgresql:// URL or a SQLite file "
    f"(default ${ENV}, else the run's files; list: <artifacts>/history.sqlite3)"
)


def add_commands(sub: Any) -> None:
    ls = sub.add_parser("list", help="list the runs in an artifacts folder")
    ls.add_argument("--artifacts", default="artifacts", type=folder_arg)
    ls.add_argument("--history", metavar="URL", help=HISTORY_HELP)
    ls.add_argument("--json", action="store_true", help="one JSON object per run")
    ls.set_defaults(func=cmd_list)
    ex = sub.add_parser("export", help="export a run to CSV, JSONL or Parquet")
    ex.add_argument("run", help="run directory or run id")
    ex.add_argument("--format", choices=FORMATS, default="jsonl")
    ex.add_argument("--out", help="output file (default RUN.FORMAT)")
    ex.add_argument("--artifacts", default="artifacts", type=folder_arg)
    ex.add_argument("--history", metavar="URL", help=HISTORY_HELP)
    ex.set_defaults(func=cmd_export)
    cp = sub.add_parser("compare", help="statistical comparison of two runs on one metric")
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--metric", required=True)
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--artifacts", default="artifacts", type=folder_arg)
    cp.add_argument("--history", metavar="URL", help=HISTORY_HELP)
    cp.set_defaults(func=cmd_compare)
    sy = sub.add_parser(
        "sync",
        help="send to the history what runs that ended hold in their files and it lacks "
        "(events a stop could not send, a missing run record)",
    )
    sy.add_argument("runs", nargs="*", metavar="RUN", help="run directories or ids (default: every run)")
    sy.add_argument("--artifacts", default="artifacts", type=folder_arg)
    sy.add_argument(
        "--history",
        metavar="URL",
        help="the history to write: a postgresql:// URL or a SQLite file "
        f"(default ${ENV}, else <artifacts>/history.sqlite3)",
    )
    sy.set_defaults(func=cmd_sync)
