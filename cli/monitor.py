"""``crucible monitor``: follow a run from its files (tail, summary, full-screen follow, alerts).

``--summary`` with ``--history URL`` (or ``$CRUCIBLE_HISTORY``) reads the run's events from
that history (PostgreSQL or SQLite) instead of its files; the status still comes from the
run's folder. A run folder deleted while it is followed ends the follow with an error
(exit 2), not as a run that ended.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path
from typing import Any

from rich.live import Live

from cli import render
from cli.commands import help_of
from cli.errors import UsageError, folder_arg
from telemetry import rundir


def cmd_monitor(args: argparse.Namespace) -> int:
    from experiments.monitor import (
        Alert,
        AlertError,
        Tailer,
        check_still_there,
        format_event,
        has_record,
        known_fields,
        run_objectives,
        run_stopped,
        run_summary,
    )

    art = Path(args.artifacts)
    if args.summary:  # they shape an event stream: taken and ignored, they would mislead
        given = {"--phase": args.phase, "--name": args.name, "--alert": args.alert}
        given |= {"--from-end": args.from_end, "--no-wait": args.no_wait}
        stream_only = [flag for flag, value in given.items() if value]
        if stream_only:
            raise UsageError(f"{', '.join(stream_only)}: for --tail and --follow; --summary covers the whole run")
    if args.latest and args.run:
        raise UsageError(f"give a run ({args.run!r}) or --latest, not both")
    if args.latest:
        run = rundir.latest_run(art)
    elif args.run:
        try:
            run = rundir.resolve_run(args.run, art)
        except rundir.NotARunFolder as exc:
            if exc.kind != "artifacts":
                raise
            raise UsageError(f"{exc}, or --latest --artifacts {str(exc.folder)!r} for its newest") from None
    else:
        raise UsageError("give a run (directory or id) or --latest")
    try:
        alerts = [Alert(a) for a in args.alert or []]
    except ValueError as exc:  # AlertError, or a number the pattern let through that float() refuses
        raise UsageError(str(exc) if isinstance(exc, AlertError) else f"bad alert: {exc}") from None
    if alerts:
        fields = known_fields(run)
        for a in alerts:
            try:
                a.resolve(fields)
            except AlertError as exc:
                raise UsageError(str(exc)) from None
    console = render.console()
    if args.summary:
        from cli.runs import history_events, history_target, reading_history
        from telemetry.history import describe_history

        if history_target(args) is not None:
            with reading_history(args) as store:
                where = describe_history(history_target(args), args.artifacts)
                s = run_summary(run, history_events(store, run.name, where))
        else:
            s = run_summary(run)
        console.print(render.monitor_summary_table(f"{run.parent.name} / {run.name} ({s['status']})", s["phases"]))
        render.say(  # recorded text: shown as it is, never read as markup
            console,
            f"GPU vs CPU (events): {s['gpu_usage'] or 'not recorded'}; run {s['duration_s']:.1f} s; "
            f"persisted {s['events_persisted']}, dropped "
            + (str(s["dropped"]) if s["dropped"] is not None else "not known (no summary.json says)")
            + (f", sampled out {s['sampled_out']}" if s["sampled_out"] else "")  # on purpose: no loss
            + "; "
            f"anomalies {s['anomalies']}; hypertune actions {len(s['hypertune_actions'])}",
        )
        if history_target(args) is None and (missing := rundir.events_missing(run, s["events_read"])):
            from cli.runs import gone_from_files

            render.say(console, gone_from_files(run, missing))
        if s["nonfinite_values"]:  # a diverged value: no number in the files, so said here
            shown = ", ".join(f"{f} {n}" for f, n in sorted(s["nonfinite_values"].items()))
            render.say(console, f"!! values that were NaN or infinite (events): {shown}")
        for a in s["hypertune_actions"][-10:]:
            render.say(console, f"  action: {a}")
        if s["reason"]:
            render.say(console, f"status {s['status']} ({s['reason']})")
        return 0
    had_record = has_record(run)  # its disappearance later means the folder was deleted, not that the run ended
    tail = Tailer(run, from_start=not args.from_end)
    view = render.MonitorView(f"crucible monitor: {run.parent.name} / {run.name}", run_objectives(run))
    t0: int | None = None

    def consume() -> int:
        nonlocal t0
        n = 0
        for ev in tail.poll():
            t0 = ev["ts"] if t0 is None else t0
            if (args.phase and ev.get("phase") != args.phase) or (args.name and ev["name"] != args.name):
                continue
            n += 1
            line = format_event(ev, t0)
            fired = [a.shown for a in alerts if a.fires(ev)]
            if args.follow:
                view.add(ev.get("values") or {}, ("!! " if fired else "   ") + line)
            elif fired:
                console.file.write("\a")
                console.print(
                    f"[bold red]!! ALERT {render.shown(', '.join(fired))}:[/] {render.shown(line)}",
                    highlight=False,
                    soft_wrap=True,
                )
            else:
                render.say(console, line)
        return n

    waiter = threading.Event()
    try:
        if args.follow:
            with Live(view.table(), console=console, screen=console.is_terminal, refresh_per_second=4) as live:
                while True:
                    ended = args.no_wait or run_stopped(run)  # before reading: nothing written after is missed
                    got = consume()
                    live.update(view.table())
                    if ended and not got:
                        check_still_there(run, had_record)
                        break
                    waiter.wait(0.25)
        else:
            while True:
                ended = args.no_wait or run_stopped(run)
                got = consume()
                if ended and not got:
                    check_still_there(run, had_record)
                    break
                waiter.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        tail.close()
    return 0


def add_commands(sub: Any) -> None:
    mo = sub.add_parser("monitor", help=help_of("monitor"))
    mo.add_argument("run", nargs="?", help="run directory or run id")
    mo.add_argument("--latest", action="store_true", help="the newest run in the artifacts folder")
    mode = mo.add_mutually_exclusive_group()
    mode.add_argument("--tail", action="store_true", help="stream events as they are written (the default)")
    mode.add_argument("--summary", action="store_true", help="best per phase, GPU/CPU, drops, anomalies, actions")
    mode.add_argument("--follow", action="store_true", help="full-screen live view with sparklines")
    mo.add_argument("--phase", help="only this phase")
    mo.add_argument("--name", help="only this event name")
    mo.add_argument("--alert", action="append", metavar="EXPR", help="FIELD OP NUMBER on an event value (repeatable)")
    mo.add_argument("--from-end", action="store_true", help="start at the end of the file, not its beginning")
    mo.add_argument("--no-wait", action="store_true", help="print what is there and exit")
    mo.add_argument("--artifacts", default="artifacts", type=folder_arg)
    mo.add_argument(
        "--history", metavar="URL", help="--summary reads the events from this history (default $CRUCIBLE_HISTORY)"
    )
    mo.set_defaults(func=cmd_monitor, prints_result=True)
