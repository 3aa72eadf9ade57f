"""``crucible lab serve``: the lab daemon (its clients, ``submit``, ``ls`` and the controls,
are in :mod:`cli.client`).

The daemon hosts a :class:`~experiments.service.LabService` and the dashboard on it, logs
JSON lines to ``<artifacts>/daemon.log`` and stderr, and on SIGTERM or SIGINT stops every
running experiment (flushed to disk), keeps the queue and exits 0.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import Any

import structlog

from actors.log import LOG_KEEP, LOG_ROTATE_BYTES, configure_logging
from cli.commands import help_of
from cli.errors import EXIT_OK, UsageError, folder_arg, history_error
from cli.run import add_backend_options, add_min_free_option, stop_on_signals
from experiments.validate import PORT, Num
from telemetry.rundir import DAEMON_LOG

M_ARENA_MAX = -8  # glibc's mallopt() parameter number (malloc.h)
DAEMON_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = DAEMON_MALLOC_ARENAS) -> int | None:
    """Cap glibc's malloc arenas for this process; the cap set, or None (not glibc, or
    ``MALLOC_ARENA_MAX`` set by whoever started the process: theirs is kept).

    Why: every experiment starts and ends a dozen threads (its actors, its heartbeat, the
    service's watcher, the HTTP handlers' workers). glibc gives threads arenas of their own,
    up to 8 per core, and what a thread frees stays in its arena, fragmented, instead of going
    back to the system: past its warm-up the daemon grew by 13 to 36 KB per experiment with
    no Python object kept (docs/benchmarks.md, *The lab daemon*). With two arenas the freed
    space is reused: 3 to 9 KB. Python's small objects have their own allocator and the GIL
    serialises most of the rest; the submit latency did not change beyond the noise. Call
    it before the threads start: arenas made already stay.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and others tune differently
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None


def cmd_serve(args: argparse.Namespace) -> int:
    from actors.recorder import check_artifacts_dir
    from dashboard.server import Dashboard
    from experiments.admission import check_data_dir, check_target_rule
    from experiments.remote import RayBackendError
    from experiments.service import LabLocked, LabService
    from telemetry.batchstore import HistoryError

    if args.ray_address is not None and args.backend != "ray":
        raise UsageError(f"--ray-address {args.ray_address!r} needs --backend ray")

    arenas = limit_malloc_arenas()  # first, before any thread: see its docstring
    artifacts = check_artifacts_dir(args.artifacts)
    try:
        data_dirs = [check_data_dir(d) for d in args.data_dir]
    except ValueError as exc:
        raise UsageError(f"--data-dir: {exc}") from None
    try:
        allow_targets = [check_target_rule(t) for t in args.allow_target]
    except ValueError as exc:
        raise UsageError(f"--allow-target: {exc}") from None

    # the daemon tells what it does at INFO unless --log-level says otherwise (WARNING included)
    level = args.log_level or "INFO"
    configure_logging(
        level, json=True, also_to=artifacts / DAEMON_LOG, rotate_bytes=args.log_max_mib << 20, keep=args.log_keep
    )
    log = structlog.get_logger("cli.lab")
    log.info("malloc arenas", limit=arenas or os.environ.get("MALLOC_ARENA_MAX") or "glibc default")
    try:
        service = LabService(
            artifacts,
            max_running=args.max_experiments,
            history=args.history,
            backend=args.backend,
            address=args.ray_address,
            data_dirs=data_dirs,
            allow_targets=allow_targets,
            min_free_bytes=args.min_free_mib << 20,
            start=False,  # resumes and starts nothing before the port is ours (see LabService)
        )
    except LabLocked as exc:
        raise UsageError(str(exc)) from None
    except HistoryError as exc:  # a malformed history target, or no server there
        raise history_error(args.history, exc) from None
    except (ValueError, RayBackendError) as exc:  # a malformed --ray-address, no cluster there, no Ray installed
        raise UsageError(f"--backend {args.backend}: {exc}") from None
    dash = None
    # the signal handlers stay for the whole stop: a repeat of the first signal is ignored, and a
    # second one later ends the process at once, as stop_on_signals says (not the default action)
    with stop_on_signals() as stop_now:
        try:
            try:
                dash = Dashboard(service, args.host, args.port)
            except OSError as exc:
                raise UsageError(str(exc)) from None
            service.start(should_stop=stop_now.is_set)  # a SIGTERM at boot starts no more of the queue
            sys.stdout.write(f"lab daemon: {dash.url} (artifacts {artifacts}, token in {dash.token_file})\n")
            sys.stdout.write(f"dashboard: {dash.new_sign_in_url()}  (a sign-in link that works once)\n")
            sys.stdout.flush()
            log.info("lab daemon serving", url=dash.url, artifacts=str(artifacts), max_running=args.max_experiments)
            while not stop_now.wait(1.0):
                pass
            log.info("lab daemon stopping on a signal")
        finally:
            try:
                if dash is not None:
                    dash.stop()
            finally:
                service.shutdown()
                log.info("lab daemon stopped")
    return EXIT_OK


def add_commands(sub: Any) -> None:
    lab = sub.add_parser("lab", help=help_of("lab"))
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    s = lab_sub.add_parser("serve", help="serve a Lab with a submission queue until SIGTERM/SIGINT")
    s.add_argument(
        "--artifacts",
        default="artifacts",
        type=folder_arg,
        help="artifacts folder (default ./artifacts); one daemon each",
    )
    s.add_argument(
        "--history",
        metavar="URL",
        help="where every run's history goes: a postgresql:// URL or a SQLite file "
        "(default $CRUCIBLE_HISTORY, else <artifacts>/history.sqlite3)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=PORT.arg(), default=7878, help="port, 0 to 65535 (default 7878; 0 = any free)")
    s.add_argument(
        "--max-experiments",
        type=Num(1, 1000, integer=True).arg(),
        default=1,
        help="experiments run at once, 1 to 1000 (default 1); the rest wait in the queue",
    )
    s.add_argument(
        "--log-max-mib",
        type=Num(0, 1 << 20, integer=True).arg(),
        default=LOG_ROTATE_BYTES >> 20,
        help=f"rotate <artifacts>/{DAEMON_LOG} past this many MiB, 0 = never (default {LOG_ROTATE_BYTES >> 20})",
    )
    s.add_argument(
        "--log-keep",
        type=Num(1, 1000, integer=True).arg(),
        default=LOG_KEEP,
        help=f"rotated log files kept, {DAEMON_LOG}.1 the newest (1 to 1000, default {LOG_KEEP})",
    )
    s.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder whose files submissions may read (graph files; repeatable); the shipped "
        "instances are always allowed, nothing else is by default",
    )
    s.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="T",
        help="code or endpoint submissions may call (the latency workload's target; repeatable): "
        "module:function, module:* or an http(s)://host[:port]/path prefix; by default only "
        "experiments.workloads.latency:checksum_work and the math functions whose time does not grow "
        "with their arguments (sqrt, exp, log, sin, ...; see docs/daemon.md)",
    )
    add_backend_options(s)
    add_min_free_option(s)
    s.set_defaults(func=cmd_serve)
