"""The experiment commands of ``crucible``: run, list, export, compare, color, instances, ...

User errors (a bad spec, flag, file or port) are one line on stderr and exit code 2: a
command raises :class:`UsageError` or one of :data:`USER_ERRORS`, and ``supervisor.main``
prints it. Numeric flags are parsed by the validation kit (``experiments.validate``), so
they are finite and in the range their help states.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from actors.files import atomic_write
from actors.recorder import ArtifactsError
from experiments import rundir
from experiments.coloring.graph import MAX_VERTICES, GraphError
from experiments.lab import Experiment, Lab
from experiments.spec import SpecError
from experiments.validate import PORT, SECONDS, SEED, YEAR_S, Num
from telemetry.export import FORMATS, export_run
from telemetry.jsonl import ReadCounts, iter_run
from telemetry.schema import check_id


class UsageError(Exception):
    """A command-line problem; printed without a traceback, exit code 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, SpecError, GraphError, ArtifactsError)
"""Errors that are the user's to fix: ``crucible`` prints them as one line and exits 2."""


def _progress(exp: Experiment, t0: float, last: dict[str, Any]) -> Table:
    m = exp.metrics()
    ph = exp.phase_status()
    events = m.get("events", 0)
    now = time.monotonic()
    rate = (events - last.get("events", 0)) / max(now - last.get("t", t0), 1e-9)
    last.update(events=events, t=now)
    budget = exp.spec["time_budget_s"]
    table = Table(title=f"{exp.id}  run {exp.run_id}", show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("status", f"{exp.status()}  (workload {exp.spec['workload']['name']})")
    table.add_row("elapsed / budget", f"{ph.get('active_s', 0.0):.1f} s active / {budget:g} s   wall {now - t0:.1f} s")
    table.add_row("steps", str(ph.get("steps", 0)))
    table.add_row("events", f"{events:,}  ({rate:,.0f}/s)")
    for field in ("chromatic_number", "conflicts", "latency_ms"):
        f = (m.get("fields") or {}).get(field)
        if f and f.get("count"):
            table.add_row(
                field, f"best {f['min']:.4g}   last-window p50 {f.get('p50') or 0:.4g}   p99 {f.get('p99') or 0:.4g}"
            )
    if m.get("success_rate") is not None:
        table.add_row("success rate", f"{m['success_rate']:.4%}")
    return table


def summary_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"run summary: {s.get('experiment_id')} / {s.get('run_id')}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in (
        "status",
        "reason",
        "wall_clock_duration",
        "active_duration",
        "paused_duration",
        "pause_count",
        "resume_count",
        "events_emitted",
        "events_persisted",
        "events_dropped",
        "events_rejected",
    ):
        v = s.get(k)
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    for phase, p in (s.get("phases") or {}).items():
        best = ", ".join(f"{k}={v:.4g}" for k, v in sorted(p.get("best", {}).items())[:4])
        t.add_row(f"phase {phase}", f"{p.get('events')} events, {p.get('duration_s', 0):.2f} s; best {best}")
    if s.get("restarts"):
        t.add_row("restarts", ", ".join(f"{k}: {v}" for k, v in s["restarts"].items()))
    t.add_row("run dir", str(s.get("run_dir", "")))
    return t


def _dash_port(args: argparse.Namespace) -> int | None:
    """``--dash-port``, else ``CRUCIBLE_DASH_PORT`` (checked here, so a bad value is a usage error)."""
    if args.dash_port is not None or not args.dashboard:
        return args.dash_port
    env = os.environ.get("CRUCIBLE_DASH_PORT")
    if env is None:
        return None
    try:
        return int(PORT.parse(env))
    except ValueError as exc:
        raise UsageError(f"CRUCIBLE_DASH_PORT {exc}") from None


def _writable_file(path: str, what: str) -> Path:
    """Refuse, before the work starts, an output file whose folder cannot take it."""
    p = Path(path)
    if p.is_dir() or not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
        raise UsageError(f"{what} {path!r}: cannot write there (a folder, or a folder that is missing or read-only)")
    return p


FAILED_REASONS = ("failed", "storage:")  # a tree that gave up; a storage failure that stopped the run


def run_failed(summary: dict[str, Any]) -> bool:
    """Whether a run ended in failure: its reason says the tree gave up (``failed: ...``) or
    the storage failed (``storage: ...``), or its events were not all stored (a storage error
    after the phase had already ended)."""
    return str(summary.get("reason") or "").startswith(FAILED_REASONS) or bool(summary.get("storage_error"))


def cmd_run(args: argparse.Namespace) -> int:
    console = Console()
    stop_now = threading.Event()
    summary_path = _writable_file(args.json_summary, "--json-summary") if args.json_summary else None

    def on_signal(signum: int, frame: Any) -> None:
        stop_now.set()

    try:
        lab = Lab(args.artifacts, dashboard=args.dashboard, dash_port=_dash_port(args))
    except OSError as exc:  # the dashboard's port is taken or not allowed
        raise UsageError(str(exc)) from None
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    if lab.dashboard is not None:
        console.print(
            f"dashboard: {lab.dashboard.url}?token={lab.dashboard.token}  (the token guards reading "
            f"and control alike; it is kept in {lab.dashboard.token_file})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )  # one line: the URL stays whole to copy
    try:
        try:
            exp = lab.start_experiment(args.spec, overrides=args.set or None)
        except ValueError as exc:  # SpecError, or a workload refusing its parameters as it starts
            raise UsageError(str(exc)) from None
        t0 = time.monotonic()
        last: dict[str, Any] = {}
        if args.no_live or not console.is_terminal:
            while not exp.wait(0.5) and not stop_now.is_set():
                pass
        else:
            with Live(_progress(exp, t0, last), console=console, refresh_per_second=4) as live:
                while not exp.wait(0.5) and not stop_now.is_set():
                    live.update(_progress(exp, t0, last))
        if stop_now.is_set() and exp.status() in ("running", "paused"):
            console.print("[yellow]signal received: stopping the experiment and flushing everything[/]")
            exp.stop()
        s = exp.summary()
        console.print(summary_table(s))
        if summary_path is not None:
            try:
                summary_path.write_bytes(orjson.dumps(s, option=orjson.OPT_INDENT_2))
            except OSError as exc:
                raise UsageError(f"--json-summary {str(summary_path)!r}: {exc.strerror or exc}") from None
        return 1 if run_failed(s) else 0
    finally:
        lab.shutdown()
        for sig, h in old.items():
            signal.signal(sig, h)


def find_runs(artifacts: Path) -> list[Path]:
    """Run directories under an artifacts folder, newest first."""
    return rundir.find_runs(artifacts)


def resolve_run(arg: str, artifacts: Path) -> Path:
    """A run directory from a path or a run id (validated: ids never escape the artifacts folder)."""
    p = Path(arg)
    if p.is_dir() and ((p / "events.jsonl").exists() or list(p.glob("events.*.jsonl"))):
        return p
    try:
        check_id("run id", arg)
    except ValueError as exc:
        raise UsageError(f"{arg!r} is neither a run directory nor a valid run id: {exc}") from None
    hits = [r for r in find_runs(artifacts) if r.name == arg]
    if not hits:
        recent = ", ".join(r.name for r in find_runs(artifacts)[:5]) or "none"
        raise UsageError(f"no run {arg!r} under {artifacts}; recent runs: {recent}")
    return hits[0]


def run_info(run: Path) -> dict[str, Any]:
    """Status derived from the run's records, events reconciled with the files (experiments.rundir)."""
    return rundir.run_info(run)


def cmd_list(args: argparse.Namespace) -> int:
    art = Path(args.artifacts)
    infos = [run_info(r) for r in find_runs(art)]
    if args.json:
        for i in infos:
            print(orjson.dumps(i).decode())
        return 0
    t = Table(title=f"runs in {art}")
    for col in ("experiment", "run", "status", "events", "duration s", "path"):
        t.add_column(col)
    for i in infos:
        d = i["duration_s"]
        status = i["status"] + (f" ({i['reason']})" if i["reason"] else "")
        t.add_row(
            i["experiment"],
            i["run_id"],
            status,
            str(i["events"]),
            f"{d:.1f}" if isinstance(d, (int, float)) else "?",
            i["path"],
        )
    Console().print(t)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    run = resolve_run(args.run, Path(args.artifacts))
    out = Path(args.out) if args.out else Path(f"{run.name}.{args.format}")
    counts = ReadCounts()
    try:
        n = export_run(run, args.format, out, counts=counts)
    except OSError as exc:
        raise UsageError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None
    skipped = f"; skipped {counts.skipped:,} unreadable line(s)" if counts.skipped else ""
    Console().print(f"exported {n:,} events of {run} to {out}{skipped}", markup=False, highlight=False)
    return 0


def _values(run: Path, metric: str) -> list[float]:
    out = []
    for ev in iter_run(run):
        v = (ev.get("values") or {}).get(metric)
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def cmd_compare(args: argparse.Namespace) -> int:
    from telemetry.stats import compare

    art = Path(args.artifacts)
    a, b = resolve_run(args.run_a, art), resolve_run(args.run_b, art)
    va, vb = _values(a, args.metric), _values(b, args.metric)
    if len(va) < 2 or len(vb) < 2:
        raise UsageError(
            f"metric {args.metric!r} has {len(va)} values in {a.name} and {len(vb)} in {b.name}; "
            "need at least 2 in each"
        )
    r = compare(va, vb, metric=args.metric)
    if args.json:
        print(orjson.dumps(r).decode())
        return 0
    t = Table(title=f"{args.metric}: {a.name} (control) vs {b.name} (treatment)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in (
        "n_control",
        "n_treatment",
        "mean_control",
        "mean_treatment",
        "test",
        "p_value",
        "mann_whitney_p",
        "effect_size",
        "cohens_d",
    ):
        v = r[k]
        t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    t.add_row(f"{r['confidence']:.0%} CI of the difference", f"[{r['ci'][0]:.6g}, {r['ci'][1]:.6g}]")
    Console().print(t)
    return 0


def cmd_color(args: argparse.Namespace) -> int:
    """Colour a DIMACS graph (a file or a shipped instance's name) with the full pipeline under
    a Lab, check the result independently."""
    from experiments.coloring.graph import read_dimacs, resolve_graph_file
    from experiments.coloring.verify import check_coloring

    path = resolve_graph_file(args.graph)
    g = read_dimacs(path)
    if args.target is not None and not 1 <= args.target <= g.n:
        raise UsageError(f"--target must be between 1 and the number of vertices ({g.n}), got {args.target}")
    params: dict[str, Any] = {
        "graph": {"file": str(path)},
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
    spec = {
        "name": check_id(
            "experiment id",
            "color-" + "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_" for ch in g.name)[:100],
        ),
        "time_budget_s": args.time_limit,
        "seed": args.seed,
        "workload": {"name": "coloring", "params": params},
        "metrics": {"publish_interval_s": 1.0},
        "anomaly": {"metrics": ["conflicts"]},
        "telemetry": {"flush_interval_s": 0.5},
    }  # a colouring step emits little: fewer, fuller batches
    stop_now = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop_now.set()

    lab = Lab(args.artifacts)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        try:
            exp = lab.start_experiment(spec)
        except ValueError as exc:  # SpecError, or the workload refusing its parameters as it starts
            raise UsageError(str(exc)) from None
        while not exp.wait(0.5) and not stop_now.is_set():
            pass
        if stop_now.is_set() and exp.status() in ("running", "paused"):
            exp.stop()  # Ctrl-C or SIGTERM: the pass under way is saved, the result still reported
        seconds = time.monotonic() - t0
        state = exp.checkpoints.get().get("workload") or {}
        reason = exp.reason
    finally:
        lab.shutdown()
        for sig, h in old.items():
            signal.signal(sig, h)
    best = state.get("best")
    verdict = check_coloring(g, best) if best is not None else {"proper": False, "k": 0, "problems": ["no colouring"]}
    out_path = exp.run_dir / "coloring.json"
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
        result["coloring_path"] = str(out_path)
        atomic_write(out_path, orjson.dumps({**result, "coloring": [c + 1 for c in best]}))
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        t = Table(title=f"colouring of {g.name} ({g.n} vertices, {g.m} edges)")
        t.add_column("figure")
        t.add_column("value", justify="right")
        for k, v in result.items():
            t.add_row(k, str(v))
        Console().print(t)
    failed = str(reason or "").startswith(FAILED_REASONS)
    return 0 if verdict["proper"] and not failed else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from experiments.tuning import tune

    console = Console()
    try:
        res = tune(
            args.spec,
            args.trials,
            args.artifacts,
            seed_from=args.seed_from or [],
            budget=args.budget,
            objective=args.objective,
            seed=args.seed,
            overrides=args.set or None,
            on_trial=None
            if args.json
            else lambda r: console.print(
                f"trial {r['trial']}: {args.objective}={r[args.objective]:g} "
                f"(best after {r['seconds_to_best']:.2f} s) with {r['params']}"
            ),
        )
    except (SpecError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(orjson.dumps(res).decode())
    else:
        console.print(
            f"learned from {res['seeded_from_prior_runs']} prior run(s) and {len(res['trials'])} trial(s); "
            f"best {args.objective} = {res['best_value']}"
        )
        console.print("proposed next configuration (--set):")
        for k, v in (res["proposal"] or {}).items():
            console.print(f"  workload.params.{k}={v}")
    return 0


def cmd_ab(args: argparse.Namespace) -> int:
    from experiments.tuning import ab

    console = Console()
    try:
        rep = ab(
            args.spec,
            args.runs,
            args.artifacts,
            budget=args.budget,
            target=args.target,
            overrides=args.set or None,
            on_run=None
            if args.json
            else lambda r: console.print(f"  hypertune {r['arm']:>3}  seed {r['seed']}: final {r['final']:g}"),
        )
    except (SpecError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(orjson.dumps({k: v for k, v in rep.items() if k != "runs"}).decode())
        return 0
    t = Table(title=f"hypertune A/B: {args.runs} runs per arm, {rep['budget_s']:g} s each, target {rep['target']:g}")
    for col in ("", "hypertune on", "hypertune off"):
        t.add_column(col)
    on, off = rep["arms"]["on"], rep["arms"]["off"]
    t.add_row("final colours", str(on["final"]), str(off["final"]))
    t.add_row(
        "mean / median",
        f"{on['final_mean']:.2f} / {on['final_median']:g}",
        f"{off['final_mean']:.2f} / {off['final_median']:g}",
    )
    t.add_row("reached target", f"{on['reached_target']}/{on['runs']}", f"{off['reached_target']}/{off['runs']}")
    t.add_row("time to target s (median)", f"{on['ttt_median']:.2f}", f"{off['ttt_median']:.2f}")
    console.print(t)
    for key in ("final_colors", "time_to_target"):
        c = rep[key]
        console.print(
            f"{key}: Mann-Whitney p = {c['p_value']:.4g}, effect size (Hedges g, on - off) = "
            f"{c['effect_size']:.3f}, CI of the difference = {c.get('ci')}"
        )
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from experiments.monitor import (
        SHORT,
        Alert,
        AlertError,
        Tailer,
        format_event,
        known_fields,
        run_stopped,
        run_summary,
    )
    from experiments.monitor import sparkline as spark

    art = Path(args.artifacts)
    if args.latest:
        runs = find_runs(art)
        if not runs:
            raise UsageError(f"no runs under {art}")
        run = runs[0]
    elif args.run:
        run = resolve_run(args.run, art)
    else:
        raise UsageError("give a run (directory or id) or --latest")
    try:
        alerts = [Alert(a) for a in args.alert or []]
    except ValueError as exc:  # AlertError, or a number the pattern let through that float() refuses
        raise UsageError(str(exc) if isinstance(exc, AlertError) else f"bad alert: {exc}") from None
    if alerts:
        fields = known_fields(run)
        for a in alerts:
            if fields and a.field not in fields:
                raise UsageError(
                    f"alert {a.expr!r}: this run has no field {a.field!r}; its fields: {', '.join(sorted(fields))}"
                )
    console = Console()
    if args.summary:
        s = run_summary(run)
        t = Table(title=f"{run.parent.name} / {run.name} ({s['status']})")
        t.add_column("phase")
        t.add_column("events", justify="right")
        t.add_column("duration s", justify="right")
        t.add_column("best")
        for ph, p in s["phases"].items():
            t.add_row(
                ph,
                str(p["events"]),
                f"{p['duration_s']:.2f}",
                ", ".join(f"{SHORT.get(k, k)}={v:.6g}" for k, v in p["best"].items()),
            )
        console.print(t)
        console.print(
            f"GPU vs CPU (events): {s['gpu_usage'] or 'not recorded'}; run {s['duration_s']:.1f} s; "
            f"persisted {s['events_persisted']}, dropped {s['events_dropped']}; "
            f"anomalies {s['anomalies']}; hypertune actions {len(s['hypertune_actions'])}"
        )
        for a in s["hypertune_actions"][-10:]:
            console.print(f"  action: {a}")
        if s["reason"]:
            console.print(f"status {s['status']} ({s['reason']})", markup=False, highlight=False)
        return 0
    tail = Tailer(run, from_start=not args.from_end)
    t0: int | None = None
    colors: list[float] = []
    conflicts: list[float] = []
    last_lines: list[str] = []

    def consume() -> int:
        nonlocal t0
        n = 0
        for ev in tail.poll():
            t0 = ev["ts"] if t0 is None else t0
            if (args.phase and ev.get("phase") != args.phase) or (args.name and ev["name"] != args.name):
                continue
            n += 1
            vals = ev.get("values") or {}
            if "chromatic_number" in vals:
                colors.append(vals["chromatic_number"])
            if "conflicts" in vals:
                conflicts.append(vals["conflicts"])
            line = format_event(ev, t0)
            fired = [a.expr for a in alerts if a.fires(ev)]
            if args.follow:
                last_lines.append(("!! " if fired else "   ") + line)
                del last_lines[:-15]
            else:
                if fired:
                    console.file.write("\a")
                    console.print(f"[bold red]!! ALERT {escape(', '.join(fired))}:[/] {escape(line)}", highlight=False)
                else:
                    console.print(line, markup=False, highlight=False)
        return n

    def view() -> Table:
        t = Table(title=f"crucible monitor: {run.parent.name} / {run.name}", show_header=False, expand=True)
        t.add_column("", no_wrap=True)
        t.add_row(f"colours   {spark(colors)}  {colors[-1] if colors else '-'}")
        t.add_row(f"conflicts {spark(conflicts)}  {conflicts[-1] if conflicts else '-'}")
        for line in last_lines:
            t.add_row(escape(line))
        return t

    waiter = threading.Event()
    try:
        if args.follow:
            with Live(view(), console=console, screen=console.is_terminal, refresh_per_second=4) as live:
                while True:
                    ended = args.no_wait or run_stopped(run)  # before reading: nothing written after is missed
                    got = consume()
                    live.update(view())
                    if ended and not got:
                        break
                    waiter.wait(0.25)
        else:
            while True:
                ended = args.no_wait or run_stopped(run)
                got = consume()
                if ended and not got:
                    break
                waiter.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        tail.close()
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from experiments.specedit import set_values

    try:
        set_values(args.spec, args.assignments)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    Console().print(f"{args.spec}: set {', '.join(args.assignments)}")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from experiments.specedit import get_value

    try:
        v = get_value(args.spec, args.key)
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    print(orjson.dumps(v).decode() if not isinstance(v, str) else v)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from experiments.specedit import show

    try:
        print(show(args.spec), end="")
    except SpecError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    """The DIMACS instances shipped with the package: name, size, best known colours."""
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
    if args.json:
        for r in rows:
            print(orjson.dumps(r).decode())
        return 0
    t = Table(title="DIMACS instances shipped with crucible (crucible color NAME)")
    for col in ("name", "vertices", "edges", "density", "best known"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        k = "?" if r["best_known"] is None else f"{r['best_known']}{' *' if r['proved_optimal'] else ''}"
        t.add_row(r["name"], str(r["vertices"]), f"{r['edges']:,}", f"{r['density']:.3f}", k)
    Console().print(t)
    Console().print("* proved optimal")
    return 0


def add_commands(sub: Any) -> None:
    mo = sub.add_parser("monitor", help="follow a run from its files: --tail, --summary, --follow")
    mo.add_argument("run", nargs="?", help="run directory or run id")
    mo.add_argument("--latest", action="store_true", help="the newest run in the artifacts folder")
    mode = mo.add_mutually_exclusive_group()
    mode.add_argument("--tail", action="store_true", help="stream events as they are written (the default)")
    mode.add_argument("--summary", action="store_true", help="best per phase, GPU/CPU, drops, anomalies, actions")
    mode.add_argument("--follow", action="store_true", help="full-screen live view with sparklines")
    mo.add_argument("--phase", help="only this phase")
    mo.add_argument("--name", help="only this event name")
    mo.add_argument("--alert", action="append", metavar="EXPR", help="e.g. 'conflicts>1000' (repeatable)")
    mo.add_argument("--from-end", action="store_true", help="start at the end of the file, not its beginning")
    mo.add_argument("--no-wait", action="store_true", help="print what is there and exit")
    mo.add_argument("--artifacts", default="artifacts")
    mo.set_defaults(func=cmd_monitor)
    se = sub.add_parser("set", help="set spec values (validated; comments and layout kept)")
    se.add_argument("spec")
    se.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    se.set_defaults(func=cmd_set)
    ge = sub.add_parser("get", help="print a spec value (defaults filled in)")
    ge.add_argument("spec")
    ge.add_argument("key")
    ge.set_defaults(func=cmd_get)
    sh = sub.add_parser("show", help="print the whole effective spec")
    sh.add_argument("spec")
    sh.set_defaults(func=cmd_show)
    tu = sub.add_parser("tune", help="propose starting parameters from prior runs and new trials (Optuna TPE)")
    tu.add_argument("spec")
    tu.add_argument("--trials", type=Num(1, 10_000, integer=True).arg(), default=8, help="1 to 10000 (default 8)")
    tu.add_argument("--seed-from", action="append", metavar="RUN_DIR", help="learn from a prior run (repeatable)")
    tu.add_argument("--budget", type=SECONDS.arg(), help="seconds per trial, up to 365 days (default: the spec's)")
    tu.add_argument("--objective", default="chromatic_number", help="field to minimise (default chromatic_number)")
    tu.add_argument("--seed", type=SEED.arg(), default=0, help="0 to 2^32-1")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE")
    tu.add_argument("--json", action="store_true")
    tu.add_argument("--artifacts", default="artifacts")
    tu.set_defaults(func=cmd_tune)
    abp = sub.add_parser("ab", help="A/B: hypertune on vs off over N seeds, with statistics")
    abp.add_argument("spec")
    abp.add_argument("--runs", type=Num(2, 1000, integer=True).arg(), default=5, help="runs per arm, 2 to 1000")
    abp.add_argument("--budget", type=SECONDS.arg(), help="seconds per run, up to 365 days (default: the spec's)")
    abp.add_argument("--target", type=Num(0, 1e12).arg(), help="time-to-target threshold (default: best reached)")
    abp.add_argument("--set", action="append", metavar="KEY=VALUE")
    abp.add_argument("--json", action="store_true")
    abp.add_argument("--artifacts", default="artifacts")
    abp.set_defaults(func=cmd_ab)
    co = sub.add_parser("color", help="colour a DIMACS graph (the full pipeline, checked)")
    co.add_argument("graph", help="a .col or .col.gz file, or a shipped instance's name (crucible instances)")
    co.add_argument("--time-limit", type=SECONDS.arg(), default=60.0, help="seconds, up to 365 days (default 60)")
    co.add_argument(
        "--target", type=Num(1, MAX_VERTICES, integer=True).arg(), help="stop as soon as this many colours is reached"
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
    co.add_argument("--artifacts", default="artifacts")
    co.set_defaults(func=cmd_color)
    ins = sub.add_parser("instances", help="list the DIMACS instances shipped with the package")
    ins.add_argument("--json", action="store_true", help="one JSON object per instance")
    ins.set_defaults(func=cmd_instances)
    r = sub.add_parser("run", help="run an experiment spec in the foreground")
    r.add_argument("spec", help="experiment spec (TOML)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec value (dotted key)")
    r.add_argument("--artifacts", default="artifacts", help="artifacts folder (default ./artifacts)")
    r.add_argument("--no-live", action="store_true", help="no live progress display")
    r.add_argument("--json-summary", metavar="PATH", help="also write the final summary as JSON")
    r.add_argument("--dashboard", action="store_true", help="serve the live web dashboard (127.0.0.1)")
    r.add_argument(
        "--dash-port", type=PORT.arg(), help="dashboard port, 0 to 65535 (default CRUCIBLE_DASH_PORT or 7878; 0 = any)"
    )
    r.set_defaults(func=cmd_run)
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
