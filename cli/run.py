"""``crucible run`` and ``crucible color``: an experiment under a Lab in the foreground.

Both stop cleanly on SIGINT or SIGTERM (the run is stopped and flushed, its result still
reported). ``run --dashboard`` serves the web dashboard beside the Lab for as long as it runs.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live

from cli import render
from cli.commands import help_of
from cli.errors import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    folder_arg,
    history_error,
    interrupted,
    reason_failed,
    run_failed,
    writable_file,
)
from experiments.coloring.graph import MAX_VERTICES
from experiments.lab import BACKENDS, MIN_FREE_BYTES, Experiment, Lab
from experiments.remote import RayBackendError  # importing it registers the ray backend
from experiments.spec import load_spec
from experiments.validate import PORT, SECONDS, SEED, YEAR_S, Num
from experiments.workloads import Objective, objective_of
from experiments.workloads import registry as workload_registry
from telemetry.batchstore import HistoryError
from telemetry.schema import check_id

DEFAULT_DASH_PORT = 7878
COLOR_WORKLOAD = "coloring"  # what ``crucible color`` runs; its words come from its declared objective


def color_objective() -> Objective:
    """The colouring workload's declared objective (its field, label and progress value)."""
    obj = objective_of(COLOR_WORKLOAD)
    if obj is None:  # pragma: no cover - the colouring package ships with the CLI
        raise UsageError(f"workload {COLOR_WORKLOAD!r} is not installed")
    return obj


def dash_port(args: argparse.Namespace) -> int:
    """``--dash-port``, else ``CRUCIBLE_DASH_PORT``, else 7878 (checked here, so a bad value is a usage error)."""
    if args.dash_port is not None:
        return int(args.dash_port)
    env = os.environ.get("CRUCIBLE_DASH_PORT")
    if env is None:
        return DEFAULT_DASH_PORT
    try:
        return int(PORT.parse(env))
    except ValueError as exc:
        raise UsageError(f"CRUCIBLE_DASH_PORT {exc}") from None


class SignalStop(threading.Event):
    """Set by a stopping signal; ``signum`` says which (the first that came), for the exit code."""

    signum: int | None = None


REPEAT_SIGNAL_S = 0.5  # a second signal sooner is the first one delivered twice


@contextmanager
def stop_on_signals() -> Iterator[SignalStop]:
    """An event set by SIGINT or SIGTERM while the block runs (the handlers before it come back after).

    A second signal ends the process at once (exit 128 + its number): the graceful stop the
    first one asked for may wait on a step that does not return (a call that hangs). What was
    recorded stays; the run's owner is then gone, so it reads ``crashed`` and a Lab's
    recovery (``crucible lab serve``) resumes it. A signal within :data:`REPEAT_SIGNAL_S` of
    the first is the same request delivered twice (``timeout`` signals the command and then
    its process group), not a second one."""
    stop_now = SignalStop()
    first_at: list[float] = []

    def on_signal(signum: int, frame: Any) -> None:
        if first_at and time.monotonic() - first_at[0] < REPEAT_SIGNAL_S:
            return
        if stop_now.is_set():
            os.write(2, b"crucible: second signal: exiting now, not waiting for the stop; what was recorded stays\n")
            os._exit(128 + signum)
        if stop_now.signum is None:
            stop_now.signum = signum
            first_at.append(time.monotonic())
        stop_now.set()

    # a signal the process was started ignoring stays ignored (a shell's background job ignores
    # SIGINT: the terminal's Ctrl-C is not for it), as Python leaves KeyboardInterrupt off then
    taken = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    old = {s: signal.signal(s, on_signal) for s in taken}
    try:
        yield stop_now
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def backend_options(args: argparse.Namespace) -> tuple[str, str | None]:
    """``--backend`` and ``--ray-address``, which only the ray backend takes."""
    backend, address = getattr(args, "backend", "embedded"), getattr(args, "ray_address", None)
    if address is not None and backend != "ray":
        raise UsageError(f"--ray-address {address!r} needs --backend ray")
    return backend, address


def open_lab(args: argparse.Namespace, **kwargs: Any) -> Lab:
    """The Lab of ``--backend`` (and ``--ray-address``); a backend that cannot start is a usage error."""
    backend, address = backend_options(args)
    try:
        return Lab(args.artifacts, history=args.history, backend=backend, address=address, **kwargs)
    except HistoryError as exc:  # a malformed history target, or no server there
        raise history_error(args.history, exc) from None
    except (ValueError, RayBackendError) as exc:  # a malformed address, no cluster there, no Ray installed
        raise UsageError(f"--backend {backend}: {exc}") from None


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--ray-address`` (docs/ray.md)."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="embedded",
        help="where the experiment trees run: embedded (threads of this process, the default) or ray "
        "(each in its own Ray actor; needs the ray extra)",
    )
    p.add_argument(
        "--ray-address",
        metavar="A",
        help="the Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start Ray on this machine)",
    )


def start(lab: Lab, spec: Any, overrides: Any = None) -> Experiment:
    """Start an experiment; a spec or parameters the workload refuses, and a disk too full for
    a run (see :data:`experiments.lab.MIN_FREE_BYTES`), are usage errors."""
    try:
        return lab.start_experiment(spec, overrides=overrides)
    except ValueError as exc:  # SpecError, or a workload refusing its parameters as it starts
        raise UsageError(str(exc)) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UsageError(f"cannot start a run: {exc}; free some space (--min-free-mib 0 skips the check)") from None


def add_min_free_option(p: argparse.ArgumentParser) -> None:
    """``--min-free-mib``: the free disk a run needs to start (see :data:`experiments.lab.MIN_FREE_BYTES`)."""
    p.add_argument(
        "--min-free-mib",
        type=Num(0, 1 << 30, integer=True).arg(),
        default=MIN_FREE_BYTES >> 20,
        help=f"start a run only with this much free disk, 0 = any (default {MIN_FREE_BYTES >> 20})",
    )


def end_on_signal(exp: Experiment, stop_now: threading.Event, console: Console | None = None) -> None:
    """Stop the experiment (flushing everything) if a signal asked for it while it was live."""
    if stop_now.is_set() and exp.status() in ("running", "paused"):
        if console is not None:
            console.print(
                "[yellow]signal received: stopping the experiment and flushing everything "
                "(a second Ctrl-C exits at once)[/]"
            )
        exp.stop()


def serve_dashboard(lab: Lab, port: int, console: Console) -> Any:
    """Start the web dashboard on the Lab (127.0.0.1) and print its URL; a port that is taken is a usage error."""
    from dashboard.server import Dashboard

    try:
        dash = Dashboard(lab, "127.0.0.1", port)
    except OSError as exc:  # the port is taken or not allowed
        raise UsageError(str(exc)) from None
    render.say(
        console,
        f"dashboard: {dash.new_sign_in_url()}  (a sign-in link that works once; the token, which "
        f"guards reading and control alike, is kept in {dash.token_file})",
    )
    return dash


def cmd_run(args: argparse.Namespace) -> int:
    console = render.console()
    summary_path = writable_file(args.json_summary, "--json-summary") if args.json_summary else None
    port = dash_port(args) if args.dashboard else None
    backend_options(args)  # the flags first, as argparse would
    # read once (a pipe or /dev/stdin cannot be read again) and checked before any folder or history exists
    full = load_spec(args.spec, args.set or None, workload_registry())
    lab = open_lab(args, min_free_bytes=args.min_free_mib << 20)
    dash = None
    try:
        with stop_on_signals() as stop_now:
            if port is not None:
                dash = serve_dashboard(lab, port, console)
            exp = start(lab, full)
            t0 = time.monotonic()
            last: dict[str, Any] = {}
            if args.no_live or not console.is_terminal:
                while not exp.wait(0.5) and not stop_now.is_set():
                    pass
            else:
                with Live(render.progress(exp, t0, last), console=console, refresh_per_second=4) as live:
                    while not exp.wait(0.5) and not stop_now.is_set():
                        live.update(render.progress(exp, t0, last))
                    live.update(render.progress(exp, t0, last))  # the last frame: the final count once ended
            end_on_signal(exp, stop_now, console)
            s = exp.summary()
            if summary_path is not None:  # before the table: a closed stdout must not cost the file
                try:
                    summary_path.write_bytes(orjson.dumps(s, option=orjson.OPT_INDENT_2))
                except OSError as exc:
                    raise UsageError(f"--json-summary {str(summary_path)!r}: {exc.strerror or exc}") from None
            console.print(render.summary_table(s))
            return EXIT_FAILED if run_failed(s) else EXIT_OK
    finally:
        try:
            lab.shutdown()
        finally:
            if dash is not None:
                dash.stop()


def color_spec(args: argparse.Namespace, graph_file: Path, graph_name: str) -> dict[str, Any]:
    """The experiment spec ``crucible color`` runs: the colouring workload over the graph file."""
    params: dict[str, Any] = {
        "graph": {"file": str(graph_file)},
        "target": args.target or 0,
        "gpu": args.gpu,
        "phases": args.phases.split(","),
        "init": {"strategy": args.init},
        "iterative": {
            "enabled": args.passes > 1,
            "max_passes": max(1, args.passes),
            # passes end on a stall, else the first would run the whole budget
            "stall_s": args.stall if args.stall is not None else (5.0 if args.passes > 1 else 0.0),
        },
    }
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_" for ch in graph_name)
    obj = color_objective()
    return {
        "name": check_id("experiment id", "color-" + safe[:100]),
        "time_budget_s": args.time_limit,
        "seed": args.seed,
        "workload": {"name": COLOR_WORKLOAD, "params": params},
        "metrics": {"publish_interval_s": 1.0},
        "anomaly": {"metrics": [obj.progress or obj.field]},  # watch what moves between two improvements
        "telemetry": {"flush_interval_s": 0.5},
    }  # a colouring step emits little: fewer, fuller batches


def cmd_color(args: argparse.Namespace) -> int:
    """Colour a DIMACS graph (a file or a shipped instance's name) with the full pipeline under
    a Lab, check the result independently."""
    from experiments.coloring.graph import GraphError, read_dimacs, resolve_graph_file
    from experiments.coloring.verify import check_coloring
    from experiments.coloring.workload import RESULT_FILE, save_result

    # A Ctrl-C before the Lab (imports, reading the graph) is a KeyboardInterrupt, which
    # cli.main ends with one line; from the Lab on it stops the run, which still reports.
    path = resolve_graph_file(args.graph)
    g = read_dimacs(path)
    if args.target is not None and not 1 <= args.target <= g.n:
        raise UsageError(f"--target must be between 1 and the number of vertices ({g.n}), got {args.target}")
    spec = load_spec(color_spec(args, path, g.name), None, workload_registry())  # before any folder or history
    t0 = time.monotonic()
    # The handlers cover the Lab's whole life, so that a signal never cuts its start or its
    # shutdown short (an embedded Lab: a Ray one would put its own SIGTERM handler in as it starts).
    with stop_on_signals() as stop_now:
        lab = Lab(args.artifacts, min_free_bytes=args.min_free_mib << 20)
        try:
            if stop_now.is_set():  # before the run started: nothing to report
                return interrupted("color", signum=stop_now.signum or signal.SIGINT)
            exp = start(lab, spec)
            while not exp.wait(0.5) and not stop_now.is_set():
                pass
            end_on_signal(exp, stop_now)  # Ctrl-C or SIGTERM: the pass under way is saved, the result still reported
            seconds = time.monotonic() - t0
            state = exp.checkpoints.get().get("workload") or {}
            reason = exp.reason
        finally:
            lab.shutdown()
    best = state.get("best")
    solved = (state.get("graph") or {}).get("fingerprint")
    if solved is not None and solved != g.fingerprint():  # the file changed between our read and the run's
        raise GraphError(
            f"{path}: the file changed while the run read it; the colouring in {exp.run_dir} is of the "
            "graph the run read, which this command cannot check: run it again on a file left as it is"
        )
    verdict = check_coloring(g, best) if best is not None else {"proper": False, "k": 0, "problems": ["no colouring"]}
    out_path = exp.run_dir / RESULT_FILE
    result = {
        "instance": g.name,
        "k": verdict["k"],
        "proper": verdict["proper"],
        "seconds": round(seconds, 3),
        "seconds_to_best": round(float(state.get("seconds_to_best", 0.0)), 3),
        "colors_per_pass": state.get("colors_per_pass", []),
        "reason": reason,
        "run_dir": str(exp.run_dir),
    }
    if best is not None and verdict["proper"]:
        if not out_path.exists():  # the run wrote it at its end, unless it failed before
            save_result(exp.run_dir, g, best, reason, result["seconds_to_best"], result["colors_per_pass"])
        result["coloring_path"] = str(out_path)
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        render.console().print(render.figures_table(f"colouring of {g.name} ({g.n} vertices, {g.m} edges)", result))
    return EXIT_OK if verdict["proper"] and not reason_failed(reason) else EXIT_FAILED


def add_commands(sub: Any) -> None:
    r = sub.add_parser("run", help=help_of("run"))
    r.add_argument("spec", help="experiment spec (TOML)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec value (dotted key)")
    r.add_argument("--artifacts", default="artifacts", type=folder_arg, help="artifacts folder (default ./artifacts)")
    r.add_argument(
        "--history",
        metavar="URL",
        help="where the run's history goes: a postgresql:// URL or a SQLite file "
        "(default $CRUCIBLE_HISTORY, else <artifacts>/history.sqlite3)",
    )
    add_backend_options(r)
    add_min_free_option(r)
    r.add_argument("--no-live", action="store_true", help="no live progress display")
    r.add_argument("--json-summary", metavar="PATH", help="also write the final summary as JSON")
    r.add_argument("--dashboard", action="store_true", help="serve the live web dashboard (127.0.0.1)")
    r.add_argument(
        "--dash-port", type=PORT.arg(), help="dashboard port, 0 to 65535 (default CRUCIBLE_DASH_PORT or 7878; 0 = any)"
    )
    r.set_defaults(func=cmd_run)
    co = sub.add_parser("color", help=help_of("color"))
    co.add_argument("graph", help="a .col or .col.gz file, or a shipped instance's name (crucible instances)")
    co.add_argument("--time-limit", type=SECONDS.arg(), default=60.0, help="seconds, up to 365 days (default 60)")
    co.add_argument(
        "--target",
        type=Num(1, MAX_VERTICES, integer=True).arg(),
        help=f"stop as soon as the best {color_objective().label} is this or fewer",
    )
    co.add_argument("--seed", type=SEED.arg(), default=0, help="0 to 2^32-1")
    co.add_argument(
        "--phases",
        default="population",
        help="comma-separated: population (GPU or all CPU cores), tabu, memetic, thermo",
    )
    co.add_argument("--init", default="dsatur", help="greedy, dsatur, spectral, community or multistart")
    co.add_argument(
        "--passes", type=Num(1, 1000, integer=True).arg(), default=1, help="iterative passes, 1 to 1000 (default 1)"
    )
    co.add_argument(
        "--stall",
        type=Num(0, YEAR_S).arg(),
        default=None,
        help="seconds without a better colouring that end a phase (and, after the last, a pass); "
        "default 5 with --passes > 1, else 0 (phases run to their own limits)",
    )
    co.add_argument("--gpu", choices=("auto", "cpu"), default="auto")
    co.add_argument("--json", action="store_true", help="one JSON object on stdout")
    co.add_argument("--artifacts", default="artifacts", type=folder_arg)
    add_min_free_option(co)
    co.set_defaults(func=cmd_color)
