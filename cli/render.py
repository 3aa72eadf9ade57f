"""What ``crucible`` draws: the rich tables, the live progress panel and the monitor's view.

The commands compute; this module turns their figures into tables. The fields the live
views single out come from the workload's declared objective
(:func:`experiments.workloads.objective_of`): its field and, when it declares one, its
progress value. No view here names a workload's field.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from experiments.monitor import SHORT
from experiments.monitor import sparkline as spark
from experiments.workloads import Objective, objective_of

LISTING_WIDTH = 240  # a table written to a file or a pipe: wide enough for run ids and paths

if TYPE_CHECKING:
    from experiments.lab import Experiment


def say(console: Console, text: str) -> None:
    """One line of plain text as it is: no markup or highlighting read into the user's paths and
    values, and no line breaks inserted, so a path wider than the terminal stays whole to copy."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def objective_series(objs: Iterable[Objective]) -> list[tuple[str, str, str]]:
    """(label, field, direction) of what a live view follows for these objectives: each
    objective's field under its label, then its progress value (lower is better) when declared."""
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for o in objs:
        for label, field, direction in ((o.label, o.field, o.direction), (o.progress, o.progress, "min")):
            if field and field not in seen:
                seen.add(field)
                out.append((label or field, field, direction))
    return out


SUMMARY_FIGURES = (
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
)
COMPARE_FIGURES = (
    "n_control",
    "n_treatment",
    "mean_control",
    "mean_treatment",
    "test",
    "p_value",
    "mann_whitney_p",
    "effect_size",
    "cohens_d",
)


def progress(exp: Experiment, t0: float, last: dict[str, Any]) -> Table:
    """The live panel of ``crucible run``: status, time against the budget, steps, event rate,
    and the workload's objective and progress value (best in its direction, windowed p50 and
    p99) once the run has them. ``last`` carries the previous call's count for the rate."""
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
    obj = objective_of(exp.spec["workload"]["name"])
    for label, field, direction in objective_series([obj] if obj is not None else []):
        f = (m.get("fields") or {}).get(field)
        if f and f.get("count"):
            name = field if label == field else f"{label} ({field})"
            table.add_row(
                name,
                f"best {f[direction]:.4g}   last-window p50 {f.get('p50') or 0:.4g}   p99 {f.get('p99') or 0:.4g}",
            )
    if m.get("success_rate") is not None:
        table.add_row("success rate", f"{m['success_rate']:.4%}")
    return table


def summary_table(s: dict[str, Any]) -> Table:
    """A run's final summary (``crucible run``)."""
    t = Table(title=f"run summary: {s.get('experiment_id')} / {s.get('run_id')}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in SUMMARY_FIGURES:
        v = s.get(k)
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    for phase, p in (s.get("phases") or {}).items():
        best = ", ".join(f"{k}={v:.4g}" for k, v in sorted(p.get("best", {}).items())[:4])
        t.add_row(f"phase {phase}", f"{p.get('events')} events, {p.get('duration_s', 0):.2f} s; best {best}")
    if s.get("restarts"):
        t.add_row("restarts", ", ".join(f"{k}: {v}" for k, v in s["restarts"].items()))
    t.add_row("run dir", str(s.get("run_dir", "")))
    return t


def figures_table(title: str, figures: Mapping[str, Any]) -> Table:
    """Two columns, figure and value (``crucible color``)."""
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in figures.items():
        t.add_row(k, str(v))
    return t


def runs_table(title: str, infos: Iterable[dict[str, Any]]) -> Table:
    """``crucible list``: one row per run (see :func:`telemetry.rundir.list_runs`)."""
    t = Table(title=title)
    for col in ("experiment", "run", "status", "events", "duration s", "path"):
        t.add_column(col)
    unreadable = []
    for i in infos:
        d = i["duration_s"]
        status = i["status"] + (f" ({i['reason']})" if i["reason"] else "")
        if i["events"] is None:  # its files cannot be read: say why under the table
            unreadable.append(f"{i['run_id']}: {i['evidence'][-1]}")
        t.add_row(
            i["experiment"],
            i["run_id"],
            status,
            "unreadable" if i["events"] is None else str(i["events"]),
            f"{d:.1f}" if isinstance(d, (int, float)) else "?",
            i["path"],
        )
    if unreadable:
        t.caption = "\n".join(unreadable)
    return t


def compare_table(title: str, r: dict[str, Any]) -> Table:
    """``crucible compare``: the test's figures and the confidence interval of the difference."""
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in COMPARE_FIGURES:
        v = r[k]
        t.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    t.add_row(f"{r['confidence']:.0%} CI of the difference", f"[{r['ci'][0]:.6g}, {r['ci'][1]:.6g}]")
    return t


def ab_table(rep: dict[str, Any], runs: int) -> Table:
    """``crucible ab``: the two arms side by side; the final values are named by the objective's label."""
    t = Table(title=f"hypertune A/B: {runs} runs per arm, {rep['budget_s']:g} s each, target {rep['target']:g}")
    for col in ("", "hypertune on", "hypertune off"):
        t.add_column(col)
    on, off = rep["arms"]["on"], rep["arms"]["off"]
    label = rep.get("label") or rep.get("objective")
    t.add_row(f"final {label}" if label else "final", str(on["final"]), str(off["final"]))
    t.add_row(
        "mean / median",
        f"{on['final_mean']:.2f} / {on['final_median']:g}",
        f"{off['final_mean']:.2f} / {off['final_median']:g}",
    )
    t.add_row("reached target", f"{on['reached_target']}/{on['runs']}", f"{off['reached_target']}/{off['runs']}")
    t.add_row("time to target s (median)", f"{on['ttt_median']:.2f}", f"{off['ttt_median']:.2f}")
    return t


def instances_table(rows: Iterable[dict[str, Any]]) -> Table:
    """``crucible instances``: the shipped DIMACS graphs; ``*`` marks a proved optimum."""
    t = Table(title="DIMACS instances shipped with crucible (crucible color NAME)")
    for col in ("name", "vertices", "edges", "density", "best known"):
        t.add_column(col, justify="left" if col == "name" else "right")
    for r in rows:
        k = "?" if r["best_known"] is None else f"{r['best_known']}{' *' if r['proved_optimal'] else ''}"
        t.add_row(r["name"], str(r["vertices"]), f"{r['edges']:,}", f"{r['density']:.3f}", k)
    return t


def monitor_summary_table(title: str, phases: dict[str, dict[str, Any]]) -> Table:
    """``crucible monitor --summary``: per phase, events, duration and best values."""
    t = Table(title=title)
    t.add_column("phase")
    t.add_column("events", justify="right")
    t.add_column("duration s", justify="right")
    t.add_column("best")
    for ph, p in phases.items():
        t.add_row(
            ph,
            str(p["events"]),
            f"{p['duration_s']:.2f}",
            ", ".join(f"{SHORT.get(k, k)}={v:.6g}" for k, v in p["best"].items()),
        )
    return t


class MonitorView:
    """The full-screen view of ``crucible monitor --follow``: a sparkline per followed field
    (the run's objective and its progress value, see :func:`objective_series`) and the last
    lines of the tail."""

    KEEP_LINES = 15

    def __init__(self, title: str, objs: Iterable[Objective]) -> None:
        self.title = title
        self.labels = {field: label for label, field, _ in objective_series(objs)}
        self.series: dict[str, list[float]] = {field: [] for field in self.labels}
        self.lines: list[str] = []

    def add(self, values: Mapping[str, Any], line: str | None = None) -> None:
        """Take one event's values (and, in the follow view, its formatted line)."""
        for field, points in self.series.items():
            v = values.get(field)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                points.append(v)
        if line is not None:
            self.lines.append(line)
            del self.lines[: -self.KEEP_LINES]

    def table(self) -> Table:
        t = Table(title=self.title, show_header=False, expand=True)
        t.add_column("", no_wrap=True)
        width = max((len(label) for label in self.labels.values()), default=0)
        for field, label in self.labels.items():
            points = self.series[field]
            t.add_row(escape(f"{label:<{width}} {spark(points)}  {points[-1] if points else '-'}"))
        for line in self.lines:
            t.add_row(escape(line))
        return t


def listing_console() -> Console:
    """The console for a listing: on a terminal, its width; written to a file or a pipe (``>
    runs.txt``, ``| grep``) without ``COLUMNS``, :data:`LISTING_WIDTH` columns, so that run
    ids and paths come out whole rather than cut to 80 columns."""
    if sys.stdout is not None and not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return Console(width=LISTING_WIDTH)
    return Console()
