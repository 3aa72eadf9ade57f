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
import fnmatch
import glob
import itertools
import math
import os
import re
import sqlite3
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from rich.console import Console

from actors.files import file_kind, replace_file
from actors.log import get_logger
from cli import render
from cli.commands import help_of
from cli.errors import EXIT_FAILED, UsageError, folder_arg, history_error, not_recorded, one_line
from experiments.monitor import LABELED
from experiments.validate import brief
from experiments.workloads import objectives
from telemetry import rundir
from telemetry.batchstore import BatchStore
from telemetry.export import FORMATS, export_events, export_run
from telemetry.history import ENV, HistoryDamaged, HistoryError, HistoryUnavailable, describe_history, open_history
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import check_id

log = get_logger("cli.runs")


def history_target(args: argparse.Namespace) -> str | None:
    """The history a reader was pointed at: ``--history``, else ``$CRUCIBLE_HISTORY``; None: the
    files. An empty ``--history ''`` (an unset variable in a script) is an error, not the files."""
    given = getattr(args, "history", None)
    if given is not None and not given.strip():
        raise UsageError(f"--history: empty history target {given!r}; name a SQLite file or a postgresql:// URL")
    return given or os.environ.get(ENV) or None


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
    try:
        is_dir = art.is_dir()
    except OSError as exc:  # a name too long, a folder this user may not look into
        raise UsageError(f"--artifacts {str(art)!r}: cannot read it: {exc.strerror or exc}") from None
    if not is_dir:  # a mistyped --artifacts must not read as "no runs"
        raise UsageError(f"no artifacts folder {str(art)!r} (nothing has run there yet; give --artifacts DIR)")
    infos = rundir.list_runs(art, target, [(o.field, o.direction) for o in objectives().values()])
    if args.json:
        for i in infos:
            try:
                line = orjson.dumps(i)
            except TypeError:  # a name that is not UTF-8 in its evidence, say: shown as \xNN
                line = orjson.dumps(rundir.text_safe(i))
            print(line.decode())
        return 0
    render.listing_console().print(render.runs_table(f"runs in {art}", infos))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if history_target(args) is not None:
        return export_from_history(args)
    try:
        run = rundir.resolve_run(args.run, Path(args.artifacts))
    except OSError as exc:  # a name too long to look up, a folder this user may not read
        raise UsageError(f"{args.run!r}: cannot read it: {exc.strerror or exc}") from None
    out = output_file(args.out if args.out is not None else f"{run.name}.{args.format}")
    counts = ReadCounts()
    n = _write_whole(out, lambda into: export_run(run, args.format, into, counts=counts))
    skipped = f"; skipped {counts.skipped:,} unreadable line(s)" if counts.skipped else ""
    if counts.repeated:
        skipped += f"; passed over {counts.repeated:,} event(s) whose seq repeats an earlier one"
    render.say(_said_to(out), f"exported {n:,} events of {run} to {out.shown}{skipped}")
    if missing := rundir.events_missing(run, n):
        render.say(_said_to(out), gone_from_files(run, missing))
    return 0


def gone_from_files(run: Path, missing: int) -> str:
    """The warning for a run whose files hold fewer events than its summary says it recorded."""
    return (
        f"!! {missing:,} event(s) the run's summary says were recorded are not in its files (cut off or deleted "
        f"since); the history may hold them: add --history (the SQLite file in the artifacts folder, or your "
        f"PostgreSQL URL) to read {run.name} from it"
    )


def export_from_history(args: argparse.Namespace) -> int:
    with reading_history(args) as store:
        where = describe_history(history_target(args), args.artifacts)
        history_events(store, args.run, where)  # an unknown run fails before any file is made
        run_id = _named_run(args.run)
        out = output_file(args.out if args.out is not None else f"{run_id}.{args.format}")

        def events() -> Iterator[dict[str, Any]]:  # called once per pass over the events
            store.skipped_batches = 0  # each pass counts afresh
            return history_events(store, args.run, where)

        n = _write_whole(out, lambda into: export_events(events, args.format, into))
    skipped = f"; skipped {store.skipped_batches:,} damaged batch(es)" if store.skipped_batches else ""
    render.say(_said_to(out), f"exported {n:,} events of {run_id} from {where} to {out.shown}{skipped}")
    return 0


# --- where an export goes ----------------------------------------------------------------------------------------

# names a run folder's readers take for the run's own files (rundir, jsonl, recorder, lab, coloring):
# events, rotated, compressed or not, the records, the recorder's reserve, a lab's resume markers, results
RUN_FILE_PATTERNS = (
    "events*.jsonl*",
    rundir.SPEC,
    rundir.LIFECYCLE,
    rundir.SUMMARY,
    rundir.RECORDER_STATE,
    rundir.CHECKPOINT,
    rundir.RESERVE_NAME,
    ".resume.*",
    "coloring.json",
    "best_solution.pass*.json",
)
RUN_FOLDER_MARKS = (rundir.EVENTS, rundir.SUMMARY, rundir.LIFECYCLE, rundir.SPEC)  # as recorded_file tells one
PARTIAL_STEM = 200  # of the output's name, in its partial file's: the partial's name stays under NAME_MAX


@dataclass(frozen=True)
class Output:
    """Where an export goes: ``path``, what is written (for a regular file, the file a link names);
    ``stream``: a character device or FIFO (``/dev/stdout``, a pipe), written into in order and never
    replaced; ``shown``: the path as the user gave it."""

    path: Path
    stream: bool
    shown: str


def _reader_would_take(name: str) -> bool:
    """Whether a run folder's readers would take a file of this name for the run's own."""
    folded = name.casefold()
    return any(fnmatch.fnmatchcase(folded, pattern) for pattern in RUN_FILE_PATTERNS)


def _run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a run's folder (holds its events or one of its records)."""
    return any((folder / name).exists() for name in RUN_FOLDER_MARKS) or any(folder.glob("events.*.jsonl"))


def output_file(arg: str) -> Output:
    """The file ``--out`` names, checked before any work: a character device or a FIFO is written
    into; a folder, a block device or a socket (or a link to one) is refused, as is a file a run
    or the Lab would read as its own (:func:`_refuse_recorded`).

    Raises:
        UsageError: one line naming the path and what is wrong.
    """
    said = f"--out {arg!r}"
    if not arg:
        raise UsageError(f"{said}: must name a file")
    if os.path.basename(arg) in ("", ".", ".."):
        raise UsageError(f"{said}: names a folder; give a file name")
    path = Path(arg)
    try:
        st = os.stat(path)  # follows a link: the rules are the target's
    except FileNotFoundError:
        st = None
    except OSError as exc:  # no permission, a name too long, a file where a folder should be
        raise UsageError(f"{said}: cannot write there: {exc.strerror or exc}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            return Output(path, True, arg)
        raise UsageError(f"{said}: it is {file_kind(st.st_mode)}; refusing to write to it or replace it")
    try:
        target = Path(os.path.realpath(path))  # through a link, the file it names is written; the link stays
        _refuse_recorded(path, target, said)
    except OSError as exc:
        raise UsageError(f"{said}: cannot write there: {exc.strerror or exc}") from None
    return Output(target, False, arg)


def _refuse_recorded(path: Path, target: Path, said: str) -> None:
    """Refuse an output that a run or the Lab would take for its own: an existing recorded file,
    a name a run folder's readers take, anything inside a run folder, a name the artifacts
    root reserves there (or hypertune's folder), so an export can neither corrupt a run nor
    make up a phantom one."""
    not_recorded(path, "--out")
    for name in {path.name, target.name}:
        if _reader_would_take(name):
            raise UsageError(
                f"{said}: a run folder's readers would take a file named {name!r} for the run's own; give another name"
            )
    for folder in target.parents:
        if folder.is_dir() and _run_folder(folder):
            raise UsageError(f"{said}: it is inside the run folder {str(folder)!r}; write it elsewhere")
    parent = target.parent
    if any((parent / name).exists() for name in rundir.ROOT_FILES):
        reserved = rundir.root_file_name(target.name)
        if reserved is not None:
            raise UsageError(
                f"{said}: the artifacts folder {str(parent)!r} reserves names like {reserved!r}; give another name"
            )
    lab_files = [n for n in rundir.ROOT_FILES if n != rundir.HYPERTUNE_DIR]
    if parent.name == rundir.HYPERTUNE_DIR and any((parent.parent / n).exists() for n in lab_files):
        raise UsageError(f"{said}: {str(parent)!r} is hypertune's learned state; write it elsewhere")


def _said_to(out: Output) -> Console:
    """Where the closing line goes: stderr when the export streams (it may be stdout itself)."""
    return render.console(stderr=out.stream)


def _write_whole(out: Output, write: Callable[[Any], int]) -> int:
    """``write`` into a file beside ``out``, renamed to it at the end: the file appears whole or
    not at all (a read that fails midway, a full disk, leave nothing half-written). A stream
    (``out.stream``) is written into as it goes. Partial files that exports killed before their
    end left beside it (their process is gone) are removed first."""
    if out.stream:
        return _write_through(out, write)
    stem = out.path.name[:PARTIAL_STEM]
    _remove_dead_partials(out.path.parent, stem)
    partial = out.path.with_name(f".{stem}.{os.getpid()}.partial")
    try:
        n = write(partial)
        replace_file(partial, out.path)  # refused if a device or FIFO took the name meanwhile
    except OSError as exc:
        raise UsageError(f"cannot write {out.shown!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return n


def _pid_gone(pid: int) -> bool:
    """Whether no process has this pid (unsure, as for another user's, counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OverflowError, OSError):
        return False
    return False


def _remove_dead_partials(folder: Path, stem: str) -> None:
    """Remove ``.<stem>.<pid>.partial`` files in ``folder`` whose process is gone (a SIGKILL
    mid-export): nobody else would ever remove them."""
    shape = re.compile(rf"\.{re.escape(stem)}\.(\d+)\.partial")
    try:
        found = list(folder.glob(f".{glob.escape(stem)}.*.partial"))
    except OSError:
        return
    for p in found:
        m = shape.fullmatch(p.name)
        if m is None or int(m[1]) == os.getpid() or not _pid_gone(int(m[1])):
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            log.info("removed a partial export its dead process left", file=str(p), pid=int(m[1]))


def _write_through(out: Output, write: Callable[[Any], int]) -> int:
    """Stream into a character device or FIFO (opening a FIFO waits for its reader). A reader
    that goes away is a usage error, or, when it is our own stdout, the quiet end of a closed pipe."""
    try:
        fd = os.open(out.path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot write {out.shown!r}: {exc.strerror or exc}") from None
    fh: BinaryIO = os.fdopen(fd, "wb")
    st = os.fstat(fd)
    try:
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):  # replaced since it was checked
            raise UsageError(f"--out {out.shown!r}: it changed into {file_kind(st.st_mode)} while opening; not written")
        n = write(fh)
        fh.flush()
        return n
    except BrokenPipeError:
        if _is_stdout(st):
            raise  # `--out /dev/stdout | head`: cli.main ends it quietly (141)
        raise UsageError(f"cannot write {out.shown!r}: its reader closed it before the export ended") from None
    except OSError as exc:
        raise UsageError(f"cannot write {out.shown!r}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            fh.close()


def _is_stdout(st: os.stat_result) -> bool:
    """Whether ``st`` is the file our stdout writes to."""
    try:
        own = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def metric_values(
    run: Path | str, metric: str, store: BatchStore | None = None, where: str = "", seen: set[str] | None = None
) -> list[float]:
    """Every numeric value of ``metric`` in the run's events, in order (from ``store`` if given),
    with NaN for a value recorded as not finite (a gap between its neighbours); the names of
    the numeric value fields met go into ``seen``, for a message that names them."""
    from telemetry.stats import metric_value  # scipy: only for the commands that compare

    out = []
    for ev in iter_run(run) if store is None else history_events(store, str(run), where):
        values = ev.get("values") or {}
        v = metric_value(ev, metric)
        if v is not None:
            out.append(v)
        if seen is not None and len(seen) < 1000:
            seen.update(k for k, x in values.items() if isinstance(x, (int, float)) and not isinstance(x, bool))
    return out


def metric_hint(metric: str, seen: set[str]) -> str:
    """What ``--metric`` could have been: the field an objective's label stands for (tables
    show labels, events hold fields), else the numeric fields the runs record."""
    if LABELED.get(metric) in seen:
        return f"; {metric!r} is how tables label {LABELED[metric]!r}: give --metric {LABELED[metric]}"
    if not seen:
        return ""
    shown = sorted(seen)
    more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
    return f"; numeric fields recorded: {', '.join(brief(render.plain(f), 60) for f in shown[:20])}{more}"


def cmd_compare(args: argparse.Namespace) -> int:
    from telemetry.stats import compare

    art = Path(args.artifacts)
    seen: set[str] = set()
    if history_target(args) is not None:
        with reading_history(args) as store:
            where = describe_history(history_target(args), args.artifacts)
            va, vb = (metric_values(r, args.metric, store, where, seen) for r in (args.run_a, args.run_b))
        a, b = Path(args.run_a), Path(args.run_b)
    else:
        a, b = rundir.resolve_run(args.run_a, art), rundir.resolve_run(args.run_b, art)
        va, vb = metric_values(a, args.metric, seen=seen), metric_values(b, args.metric, seen=seen)
    na, nb = (sum(math.isfinite(v) for v in vs) for vs in (va, vb))
    if na < 2 or nb < 2:
        raise UsageError(
            f"metric {args.metric!r} has {na} finite values in {a.name} and {nb} in {b.name}; "
            f"need at least 2 in each{metric_hint(args.metric, seen)}"
        )
    same = a.name == b.name if history_target(args) is not None else a.resolve() == b.resolve()
    if same:  # the test would compare a sample with itself: a difference of 0, said as a finding
        raise UsageError(f"RUN_A and RUN_B are the same run ({a.name}): compare two runs")
    r = compare(va, vb, metric=args.metric)
    if args.json:
        print(orjson.dumps(r).decode())
        return 0
    render.console().print(render.compare_table(f"{args.metric}: {a.name} (control) vs {b.name} (treatment)", r))
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
    console = render.console(highlight=False)
    sent = problems = 0
    try:
        for run in runs:
            name = f"{run.parent.name}/{run.name}"
            try:
                r = sync_run(store, run, verify=args.verify)
            except (ValueError, OSError) as exc:  # an unreadable file, a folder name that is no run id
                render.say(console, f"{name}: not synced: {one_line(exc)}")
                problems += 1
                continue
            except HistoryDamaged as exc:  # for every run, and running it again will not help
                render.say(console, f"{name}: stopped: {one_line(exc)}")
                sys.stderr.write(
                    f"crucible sync: the history at {where} is damaged; what was sent before is kept: repair it "
                    "(or move it aside, with its -wal and -shm files), then run crucible sync again to fill it "
                    "from the run folders\n"
                )
                return EXIT_FAILED
            except (HistoryUnavailable, sqlite3.OperationalError) as exc:  # away, locked, full: for every run
                render.say(console, f"{name}: stopped: {one_line(exc)}")
                sys.stderr.write(
                    f"crucible sync: the history at {where} cannot be written now; what was sent is kept: "
                    "run it again\n"
                )
                return EXIT_FAILED
            except (HistoryError, sqlite3.Error) as exc:  # this run's writes refused: the next runs may go in
                render.say(console, f"{name}: not synced: the history refused it: {one_line(exc)}")
                problems += 1
                continue
            sent += r.sent
            if r.left_alone:
                said = f"left alone ({r.left_alone})"
            elif r.sent or r.recorded:
                said = f"sent {r.sent:,} event(s)" + ("; summary recorded" if r.recorded else "")
            else:
                said = "up to date"
            if r.filled:
                said += f"; {r.filled:,} of them filled a hole in the history's events"
            if r.out_of_order:
                said += f"; skipped {r.out_of_order:,} event(s) whose seq repeats or goes back"
            if r.unreadable:
                said += f"; skipped {r.unreadable:,} unreadable line(s)"
            if r.replaced:
                said += f"; replaced {r.replaced:,} damaged stored batch(es) from the run's files"
            if r.damaged > r.replaced:
                said += f"; {r.damaged - r.replaced:,} damaged stored batch(es) left: the files no longer hold them"
                problems += 1
            render.say(console, f"{name}: {said}")
    finally:
        with contextlib.suppress(HistoryError, sqlite3.Error):
            store.close()
    render.say(console, f"{len(runs)} run(s) checked, {sent:,} event(s) sent to {where}")
    return EXIT_FAILED if problems else 0


def history_help(reads: str, default: str) -> str:
    """A reading command's ``--history`` help: what it reads there and what it reads without
    one (each command its own: list falls back to a file, export and compare to the runs' files)."""
    return f"the history to read {reads} from: a postgresql:// URL or a SQLite file (default ${ENV}, else {default})"


def add_commands(sub: Any) -> None:
    ls = sub.add_parser("list", help=help_of("list"))
    ls.add_argument("--artifacts", default="artifacts", type=folder_arg)
    ls.add_argument(
        "--history", metavar="URL", help=history_help("the ended runs' figures", "<artifacts>/history.sqlite3")
    )
    ls.add_argument("--json", action="store_true", help="one JSON object per run")
    ls.set_defaults(func=cmd_list, prints_result=True)
    ex = sub.add_parser("export", help=help_of("export"))
    ex.add_argument("run", help="run directory or run id")
    ex.add_argument("--format", choices=FORMATS, default="jsonl", help="the output's format (default jsonl)")
    ex.add_argument("--out", help="output file (default RUN.FORMAT)")
    ex.add_argument("--artifacts", default="artifacts", type=folder_arg)
    ex.add_argument("--history", metavar="URL", help=history_help("the run's events (by its id)", "the run's files"))
    ex.set_defaults(func=cmd_export)
    cp = sub.add_parser("compare", help=help_of("compare"))
    cp.add_argument("run_a")
    cp.add_argument("run_b")
    cp.add_argument("--metric", required=True)
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--artifacts", default="artifacts", type=folder_arg)
    cp.add_argument("--history", metavar="URL", help=history_help("the runs' events (by their ids)", "the runs' files"))
    cp.set_defaults(func=cmd_compare, prints_result=True)
    sy = sub.add_parser("sync", help=help_of("sync"))
    sy.add_argument("runs", nargs="*", metavar="RUN", help="run directories or ids (default: every run)")
    sy.add_argument("--artifacts", default="artifacts", type=folder_arg)
    sy.add_argument(
        "--history",
        metavar="URL",
        help="the history to write: a postgresql:// URL or a SQLite file "
        f"(default ${ENV}, else <artifacts>/history.sqlite3)",
    )
    sy.add_argument(
        "--verify",
        action="store_true",
        help="also read every stored batch of each run and replace the damaged ones from the run's files "
        "(as long as reading the runs)",
    )
    sy.set_defaults(func=cmd_sync)
