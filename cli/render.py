"""What ``crucible`` draws: the rich tables, the live progress panel and the monitor's view.

The commands compute; this module turns their figures into tables. The fields the live
views single out come from the workload's declared objective
(:func:`experiments.workloads.objective_of`): its field and, when it declares one, its
progress value. No view here names a workload's field.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from experiments.monitor import SHORT
from experiments.monitor import sparkline as spark
from experiments.workloads import Objective, objective_of, objectives
from telemetry.rundir import summary_losses

LISTING_WIDTH = 240  # a table written to a file or a pipe: wide enough for run ids and paths

if TYPE_CHECKING:
    from experiments.lab import Experiment


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""C0 and C1 controls, DEL, line separators and bidirectional overrides: characters that
move the cursor, retitle or reprogram the terminal, or reorder what the line seems to say."""


def _escape_char(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def plain(value: object) -> str:
    """Recorded or user-given text made safe for a terminal: its control characters written
    as ``\\x1b``-style escapes, so a run named ``e<ESC>]0;PWNED<BEL>x`` cannot retitle the
    terminal, and a name holding a line break stays on one line."""
    return _CONTROL.sub(_escape_char, str(value))


def shown(value: object) -> str:
    """Recorded or user-given text in a place rich reads markup (a cell, a title, a caption):
    :func:`plain`, then markup-escaped, so ``[/b]`` in a folder's name neither raises
    MarkupError nor ``[bold red]evil`` styles itself and hides its brackets. Every such text
    this module shows goes through here."""
    return escape(plain(value))


def say(console: Console, text: str) -> None:
    """One line of plain text as it is: no markup or highlighting read into the user's paths and
    values, and no line breaks inserted, so a path wider than the terminal stays whole to copy.
    Control characters are escaped (:func:`plain`)."""
    console.print(plain(text), markup=False, highlight=False, soft_wrap=True)


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
    "accounting.dropped",  # the real losses; events_dropped would add what the Sampler left out on purpose
    "events_sampled_out",
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


def event_rate(m: Mapping[str, Any], last: dict[str, Any]) -> tuple[int, float | None]:
    """The event count of the metrics snapshot ``m`` and the rate between the last two distinct
    snapshots, by the snapshots' own times (``at``): StreamingMetrics publishes about once a
    second, so a rate over the time between two repaints would read 0/s whenever no new
    snapshot came between them. ``last`` holds the previous snapshot's count and time and the
    rate, kept until a newer snapshot comes; the rate is None until two have been seen."""
    at, events = m.get("at"), m.get("events")
    if at is None or events is None:
        return last.get("events", 0), last.get("rate")
    prev_at, prev_events = last.get("at"), last.get("events", 0)
    if prev_at is None or at > prev_at:
        rated = prev_at is not None and events >= prev_events  # a count that went back (restarted): no rate
        last["rate"] = (events - prev_events) / (at - prev_at) if rated else None
        last.update(events=events, at=at)
    return last["events"], last.get("rate")


def progress(exp: Experiment, t0: float, last: dict[str, Any]) -> Table:
    """The live panel of ``crucible run``: status, time against the budget, steps, event rate,
    and the workload's objective and progress value (best in its direction, windowed p50 and
    p99) once the run has them. ``last`` carries what earlier frames saw (see
    :func:`event_rate`): the panel repaints more often than the metrics snapshot changes, and
    a frame without a new snapshot shows the figures of the last one, never a rate of 0."""
    m = exp.metrics()
    if m.get("at") is not None:
        last["metrics"] = m
    m = last.get("metrics", m)  # no snapshot to be had this time: the last one, for what it says
    ph = exp.phase_status() or last.get("phase", {})  # {} once ended: the steps and time it reached
    last["phase"] = ph
    events, rate = event_rate(m, last)
    now = time.monotonic()
    budget = exp.spec["time_budget_s"]
    table = Table(title=shown(f"{exp.id}  run {exp.run_id}"), show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("status", shown(f"{exp.status()}  (workload {exp.spec['workload']['name']})"))
    table.add_row("elapsed / budget", f"{ph.get('active_s', 0.0):.1f} s active / {budget:g} s   wall {now - t0:.1f} s")
    table.add_row("steps", str(ph.get("steps", 0)))
    table.add_row("events", f"{events:,}" + (f"  ({rate:,.0f}/s)" if rate is not None else ""))
    obj = objective_of(exp.spec["workload"]["name"])
    for label, field, direction in objective_series([obj] if obj is not None else []):
        f = (m.get("fields") or {}).get(field)
        if f and f.get("count"):
            name = field if label == field else f"{label} ({field})"
            table.add_row(
                shown(name),
                f"best {f[direction]:.4g}   last-window p50 {f.get('p50') or 0:.4g}   p99 {f.get('p99') or 0:.4g}",
            )
    if m.get("success_rate") is not None:
        table.add_row("success rate", f"{m['success_rate']:.4%}")
    return table


def summary_table(s: dict[str, Any]) -> Table:
    """A run's final summary (``crucible run``)."""
    t = Table(title=shown(f"run summary: {s.get('experiment_id')} / {s.get('run_id')}"))
    t.add_column("figure")
    t.add_column("value", justify="right", overflow="fold")  # a run dir wraps whole, never cut to "…"
    dropped, sampled = summary_losses(s)
    figures = {**s, "accounting.dropped": dropped, "events_sampled_out": sampled}
    for k in SUMMARY_FIGURES:
        v = figures.get(k)
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else shown(v))
    for phase, p in (s.get("phases") or {}).items():
        best = ", ".join(f"{k}={v:.4g}" for k, v in _phase_bests(p.get("best") or {}))
        t.add_row(
            shown(f"phase {phase}"), shown(f"{p.get('events')} events, {p.get('duration_s', 0):.2f} s; best {best}")
        )
    if s.get("restarts"):
        t.add_row("restarts", shown(", ".join(f"{k}: {v}" for k, v in s["restarts"].items())))
    t.add_row("run dir", shown(s.get("run_dir", "")))
    return t


def _phase_bests(best: Mapping[str, Any]) -> list[tuple[str, float]]:
    """A phase's bests worth a line: the workloads' objective and progress fields it has (a
    best ``k`` or ``duration_ms`` means nothing), or its first four fields if it has none."""
    keys = [f for o in objectives().values() for f in (o.field, o.progress) if f and f in best]
    keys = list(dict.fromkeys(keys)) or sorted(best)[:4]
    return [(k, best[k]) for k in keys if isinstance(best[k], (int, float)) and not isinstance(best[k], bool)]


def figures_table(title: str, figures: Mapping[str, Any]) -> Table:
    """Two columns, figure and value (``crucible color``)."""
    t = Table(title=shown(title))
    t.add_column("figure")
    t.add_column("value", justify="right", overflow="fold")  # a path wraps whole, never cut to "…"
    for k, v in figures.items():
        t.add_row(shown(k), shown(v))
    return t


RUNS_COLUMNS = ("experiment", "run", "status", "events", "duration s", "best", "path")
WHOLE_COLUMNS = ("run", "path")  # never cut nor wrapped: what a user reads and copies


class RunsTable(Table):
    """The table of ``crucible list``. Where the console is too narrow to show every run id
    and path whole in it, one line per run instead, its id first (a soft-wrapping console,
    :func:`listing_console`, prints them uncut): a table that cut every id to ``20261123T2…``
    would list runs none of which could be named."""

    def __init__(self, title: str) -> None:
        super().__init__(title=shown(title))
        for col in RUNS_COLUMNS:
            whole = col in WHOLE_COLUMNS
            self.add_column(col, no_wrap=whole, overflow="fold" if whole else "ellipsis")
        self.title_text = plain(title)
        self.runs: list[tuple[str, ...]] = []  # each row's texts, plain (unescaped): to measure and to list
        self.notes: list[str] = []

    def add_run(self, *cells: str) -> None:
        """One run's row, its texts as recorded (escaped here)."""
        texts = tuple(plain(c) for c in cells)
        self.runs.append(texts)
        self.add_row(*(escape(c) for c in texts))

    def add_note(self, text: str) -> None:
        """A line under the table (a run whose files cannot be read, and why)."""
        self.notes.append(plain(text))
        self.caption = escape("\n".join(self.notes))

    def whole_width(self) -> int:
        """The narrowest this table can be with its run ids and paths whole and every other
        cell wrapped at most between words: the columns, their padding and the rules."""
        total = len(RUNS_COLUMNS) + 1
        for i, col in enumerate(RUNS_COLUMNS):
            texts = [col, *(row[i] for row in self.runs)]
            if col in WHOLE_COLUMNS:
                total += max(cell_len(t) for t in texts) + 2
            else:
                total += max((cell_len(w) for t in texts for w in t.split()), default=1) + 2
        return total

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.whole_width() <= options.max_width:  # wrapped as a table is, on a soft-wrapping console too
            yield from super().__rich_console__(console, options.update(no_wrap=False, overflow=None))
            return
        yield Text(self.title_text)
        for experiment, run, status, events, duration, best, path in self.runs:
            yield Text(f"{run}  {experiment}  {status}  {events} events  {duration} s  {best}  {path}")
        for note in self.notes:
            yield Text(note)


def runs_table(title: str, infos: Iterable[dict[str, Any]]) -> RunsTable:
    """``crucible list``: one row per run (see :func:`telemetry.rundir.list_runs`)."""
    t = RunsTable(title)
    for i in infos:
        d = i["duration_s"]
        status = i["status"] + (f" ({i['reason']})" if i["reason"] else "")
        if i["events"] is None:  # its files cannot be read: say why under the table
            t.add_note(f"{i['run_id']}: {i['evidence'][-1]}")
        t.add_run(
            str(i["experiment"]),
            str(i["run_id"]),
            status,
            "unreadable" if i["events"] is None else ("~" if i.get("events_approx") else "") + str(i["events"]),
            f"{d:.1f}" if isinstance(d, (int, float)) else "?",
            objective_best(i.get("best"), i.get("objective")),
            str(i["path"]),
        )
    return t


def objective_best(bests: Any, own: Any = None) -> str:
    """A run's best on its workload's objective, labelled (``latency_ms 0.0123``), from the bests a
    listing carries; ``-`` when it has none (a run killed before its first result). The
    objective is the run's own (``own``, from its lifecycle record) when it has one, else the
    one whose field the run recorded: the workloads' fields differ."""
    if not isinstance(bests, dict):
        return "-"
    known = [(o.field, o.label) for o in objectives().values()]
    if isinstance(own, dict):
        known.insert(0, (own.get("field"), own.get("label")))
    for name, label in known:
        v = bests.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{label} {v:.6g}"
    return "-"


def _figure(v: Any) -> str:
    """A figure of ``compare`` as shown: a float to 6 digits, an undefined one in words."""
    if isinstance(v, float):
        if math.isnan(v):
            return "undefined"
        return f"{v:+g}" if math.isinf(v) else f"{v:.6g}"
    return shown(v)


def compare_table(title: str, r: dict[str, Any]) -> RenderableType:
    """``crucible compare``: the test's figures and the confidence interval of the difference,
    the comparison's ``note`` under them. Where the means, the p-value or the interval are not
    numbers, one line that says why instead: a table of inf and nan would read as a result."""
    core = (r["mean_control"], r["mean_treatment"], r["p_value"], *r["ci"])
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in core):
        why = r.get("note") or "its figures are not finite numbers"
        return Text(plain(f"{title}: no comparison: {why}"))
    t = Table(title=shown(title))
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in COMPARE_FIGURES:
        t.add_row(k, _figure(r[k]))
    t.add_row(f"{r['confidence']:.0%} CI of the difference", f"[{r['ci'][0]:.6g}, {r['ci'][1]:.6g}]")
    said = [r[k] for k in ("note", "warning") if r.get(k)]
    if said:
        t.caption = shown("\n".join(said))
    return t


def ab_table(rep: dict[str, Any], runs: int) -> Table:
    """``crucible ab``: the two arms side by side; the final values are named by the objective's label."""
    t = Table(title=f"hypertune A/B: {runs} runs per arm, {rep['budget_s']:g} s each, target {rep['target']:g}")
    for col in ("", "hypertune on", "hypertune off"):
        t.add_column(col)
    on, off = rep["arms"]["on"], rep["arms"]["off"]
    label = rep.get("label") or rep.get("objective")
    t.add_row(shown(f"final {label}" if label else "final"), shown(on["final"]), shown(off["final"]))
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
        t.add_row(shown(r["name"]), str(r["vertices"]), f"{r['edges']:,}", f"{r['density']:.3f}", k)
    return t


def monitor_summary_table(title: str, phases: dict[str, dict[str, Any]]) -> Table:
    """``crucible monitor --summary``: per phase, events, duration and best values."""
    t = Table(title=shown(title))
    t.add_column("phase")
    t.add_column("events", justify="right")
    t.add_column("duration s", justify="right")
    t.add_column("best")
    for ph, p in phases.items():
        t.add_row(
            shown(ph),
            shown(p["events"]),
            f"{p['duration_s']:.2f}",
            shown(", ".join(f"{SHORT.get(k, k)}={v:.6g}" for k, v in p["best"].items())),
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
        t = Table(title=shown(self.title), show_header=False, expand=True)
        t.add_column("", no_wrap=True)
        width = max((len(label) for label in self.labels.values()), default=0)
        for field, label in self.labels.items():
            points = self.series[field]
            t.add_row(shown(f"{label:<{width}} {spark(points)}  {points[-1] if points else '-'}"))
        for line in self.lines:
            t.add_row(shown(line))
        return t


def console(**options: Any) -> Console:
    """A rich console for the CLI's output. Emoji codes are not rendered: the text it shows is
    the user's (paths, ids, reasons, specs), and ``:x:`` in a folder name or ``root:x:0:0`` in
    a quoted line must print as written, not as a picture."""
    return Console(emoji=False, **options)


def listing_console() -> Console:
    """The console for a listing: on a terminal, its width; written to a file or a pipe (``>
    runs.txt``, ``| grep``) without ``COLUMNS``, :data:`LISTING_WIDTH` columns, so that run
    ids and paths come out whole rather than cut to 80 columns. It soft-wraps: a line wider
    than the console (:class:`RunsTable`'s one line per run) is printed whole, not cropped."""
    if sys.stdout is not None and not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return console(width=LISTING_WIDTH, soft_wrap=True)
    return console(soft_wrap=True)
