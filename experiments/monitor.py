"""``crucible monitor``: follow a run from its files, as they are written.

* :class:`Tailer` reads a run's active ``events.jsonl`` as it grows: it keeps a torn last
  line until its newline arrives, and when the file is rotated it finishes the old file
  (the same open handle, now renamed) before it opens the new one.
* :func:`format_event` prints one line per event in the seed's style,
  ``[thermo][cpu] t=12.3s colors=118 conflicts=5600 params={"t_max":10}``.
* :class:`Alert` parses ``FIELD OP NUMBER`` (``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=``).
* :func:`run_summary` gathers the figures ``--summary`` prints: the best value per phase of the
  run's workload objective and its progress value (``experiments.workloads.objective_of``,
  read from the run's ``spec.json``; every workload's when the run has none).
* :func:`run_stopped` tells a follower when to stop waiting: the run's derived status
  (:func:`telemetry.rundir.run_status`) is no longer live, whether it stopped, failed or
  its process died. :func:`check_still_there` then tells a run that ended from one whose
  folder was deleted under the follower (:class:`RunFolderGone`).

Every file is read through :mod:`telemetry.jsonl`'s non-blocking opener: a FIFO or device in
the run folder is an error naming it (the events) or a warning naming it (the spec, the
summary: the events stand in for them).
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from experiments.workloads import Objective, generation, objective_of, objectives
from telemetry import jsonl
from telemetry.jsonl import ACTIVE, iter_run, open_run_file
from telemetry.rundir import (
    LIFECYCLE,
    SPEC,
    SUMMARY,
    RunNotFound,
    read_record,
    recorded_objective,
    run_status,
    summary_losses,
)
from telemetry.schema import SchemaError, parse_line

OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_ALERT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")


class _Labels(Mapping[str, str]):
    """A table read from every workload's objective on each use, so that a workload registered
    after this module was imported has its label too."""

    def __init__(self, reverse: bool) -> None:
        self._reverse = reverse
        self._cached: tuple[int, dict[str, str]] = (-1, {})

    def _table(self) -> dict[str, str]:
        gen, table = self._cached
        if gen != generation():  # built again only when the workloads changed (a tail line reads it per value)
            gen = generation()
            pairs = [(o.field, o.label) for o in objectives().values() if o.label != o.field]
            table = {b: a for a, b in pairs} if self._reverse else dict(pairs)
            self._cached = (gen, table)
        return table

    def __getitem__(self, key: str) -> str:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


SHORT: Mapping[str, str] = _Labels(reverse=False)
"""Field -> the short name a workload's objective declares for it (``colors`` for a colouring run)."""
LABELED: Mapping[str, str] = _Labels(reverse=True)
"""Short name -> the field it stands for: what the tail lines and tables show, read back."""


class AlertError(ValueError):
    """A malformed alert expression, or a field the run does not have."""


class RunFolderGone(RunNotFound):
    """The run folder (or its lifecycle record) was deleted while it was followed: the run did
    not end, it vanished, and a follower must not report that as a clean end."""


def has_record(run_dir: Path) -> bool:
    """Whether the run has its lifecycle record now (a follower notes it when it starts)."""
    return os.path.lexists(run_dir / LIFECYCLE)


def check_still_there(run_dir: Path, had_record: bool) -> None:
    """Raise :class:`RunFolderGone` when the run folder is gone, or its lifecycle record is
    although it was there when following began (it is replaced atomically, never removed).

    Raises:
        RunFolderGone: the message names the folder.
    """
    if not os.path.isdir(run_dir):
        raise RunFolderGone(f"the run folder {str(run_dir)!r} is gone: it was deleted while it was followed")
    if had_record and not has_record(run_dir):
        raise RunFolderGone(f"the run folder {str(run_dir)!r} lost its {LIFECYCLE}: it was deleted while followed")


class Alert:
    def __init__(self, expr: str) -> None:
        m = _ALERT.match(expr)
        if not m:
            raise AlertError(
                f"bad alert {expr!r}: expected FIELD OP NUMBER, e.g. 'conflicts>1000' (operators: {', '.join(OPS)})"
            )
        self.expr = expr.strip()
        self.field, self.op_text, self.number = m.group(1), m.group(2), m.group(3)
        self.op = OPS[self.op_text]
        self.value = float(m.group(3))
        if not math.isfinite(self.value):  # 1e400 reads as inf: a threshold nothing can cross
            raise AlertError(f"bad alert {expr!r}: {m.group(3)} is not a finite number")

    def resolve(self, fields: set[str]) -> None:
        """Check the field against the run's ``fields`` (none known yet: nothing to check),
        taking a short name the tail lines show (:data:`SHORT`) as the field it stands for,
        unless the run has a field of that very name.

        Raises:
            AlertError: the run has fields and not this one; the message lists them.
        """
        field = LABELED.get(self.field)
        if self.field not in fields and field is not None and (not fields or field in fields):
            self.field = field
        if fields and self.field not in fields:
            shown = ", ".join(f"{f} ({SHORT[f]})" if f in SHORT else f for f in sorted(fields))
            raise AlertError(f"alert {self.expr!r}: this run has no field {self.field!r}; its fields: {shown}")

    @property
    def shown(self) -> str:
        """The alert as the tail lines name its field: a field with a short name by that name,
        the field after it in brackets (``LABEL<30 (FIELD)``), whichever of the two was given."""
        label = SHORT.get(self.field)
        return f"{label}{self.op_text}{self.number} ({self.field})" if label else self.expr

    def fires(self, ev: dict[str, Any]) -> bool:
        v = (ev.get("values") or {}).get(self.field)
        return isinstance(v, (int, float)) and self.op(v, self.value)


def known_fields(run_dir: Path, sample: int = 5000) -> set[str]:
    """Numeric fields the run has carried so far (its summary, else its first events)."""
    out: set[str] = set()
    phases = (read_record(run_dir, SUMMARY) or {}).get("phases")  # unreadable: a warning; the events say
    for ph in phases.values() if isinstance(phases, dict) else ():
        if isinstance(ph, dict) and isinstance(ph.get("min"), dict):
            out.update(ph["min"])
    for i, ev in enumerate(iter_run(run_dir)):
        out.update(ev.get("values") or {})
        if i >= sample:
            break
    return out


def format_event(ev: dict[str, Any], t0_us: int) -> str:
    mode = ev.get("gpu_mode")  # one of telemetry.schema.GPU_MODES: gpu, or cpu for any of the CPU ones
    gpu = "-" if not isinstance(mode, str) or not mode else "gpu" if mode == "gpu" else "cpu"
    head = f"[{ev.get('phase') or '-'}][{gpu}] t={(ev['ts'] - t0_us) / 1e6:.1f}s {ev['name']}"
    vals = " ".join(f"{SHORT.get(k, k)}={v:.6g}" for k, v in (ev.get("values") or {}).items())
    out = f"{head} {vals}".rstrip()
    if ev.get("success") is not None:
        out += f" success={str(ev['success']).lower()}"
    if ev.get("parameters"):
        out += " params=" + orjson.dumps(ev["parameters"]).decode()
    if ev.get("notes"):
        out += f"  # {ev['notes']}"
    if (ev.get("anomaly") or {}).get("flag"):
        out += f"  [anomaly {ev['anomaly'].get('score')}]"
    return out


class Tailer:
    """Yields the events appended to a run's files, surviving rotation and torn lines."""

    def __init__(self, run_dir: Path, from_start: bool = True) -> None:
        self.run_dir = run_dir
        self.path = run_dir / ACTIVE
        self._fh: Any = None
        self._ino: int | None = None
        self._buf = b""
        self._past_long = False
        self.from_start = from_start
        self.skipped = 0

    def _open(self) -> bool:
        try:
            fh = open_run_file(self.path)
        except FileNotFoundError:
            return False
        self._fh, self._ino, self._buf = fh, os.fstat(fh.fileno()).st_ino, b""
        self._past_long = False  # reading past a line longer than MAX_LINE_BYTES
        if not self.from_start:
            fh.seek(0, os.SEEK_END)
            self.from_start = True  # only the first file starts at its end
        return True

    def poll(self) -> Iterator[dict[str, Any]]:
        """Everything complete that has been written since the last poll."""
        if self._fh is None and not self._open():
            return
        while True:
            chunk = self._fh.read(1 << 20)
            if chunk:
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                if self._past_long and lines:  # the end of a line too long to be an event: dropped
                    lines, self._past_long = lines[1:], False
                if len(self._buf) > jsonl.MAX_LINE_BYTES:  # damage (NUL bytes, no newline): never held whole
                    self._buf, self._past_long = b"", True
                    self.skipped += 1
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        yield parse_line(line)
                    except SchemaError:
                        self.skipped += 1
                continue
            try:
                rotated = os.stat(self.path).st_ino != self._ino
            except FileNotFoundError:
                rotated = True
            if not rotated:
                return  # caught up; a torn last line stays in the buffer until its newline
            self._fh.close()  # the old file is finished (we read it to its end): move on
            if not self._open():
                self._fh = None
                return

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def run_objectives(run_dir: Path) -> list[Objective]:
    """The objective of the run's workload (from its ``spec.json``), else the one its lifecycle
    record carries (a workload this process does not know); every workload's when neither says."""
    spec = read_record(run_dir, SPEC)  # unreadable: a warning, and every workload's fields
    wl = spec.get("workload") if isinstance(spec, dict) else None
    own = objective_of(wl.get("name")) if isinstance(wl, dict) else None
    if own is None:
        recorded = recorded_objective(read_record(run_dir, LIFECYCLE) or {})
        own = Objective.from_dict(recorded) if recorded is not None else None
    return [own] if own is not None else list(objectives().values())


def _tracked(objs: list[Objective]) -> dict[str, bool]:
    """Field -> True when higher is better, for the objectives' fields and progress values."""
    out: dict[str, bool] = {}
    for o in objs:
        out.setdefault(o.field, o.direction == "max")
        if o.progress:
            out.setdefault(o.progress, False)
    return out


def run_stopped(run_dir: Path) -> bool:
    """True once the run will write no more events: stopped, failed, archived, crashed or unknown."""
    return not run_status(run_dir).live


def _better(best: dict[str, Any], values: dict[str, Any], tracked: dict[str, bool]) -> None:
    """Fold ``values`` into ``best``: each tracked field in its direction (True: higher is better)."""
    for k, v in values.items():
        if k not in tracked or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k not in best or (v > best[k] if tracked[k] else v < best[k]):
            best[k] = v


def run_summary(run_dir: Path, events: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Best value per phase (of the objective's field and progress value, each in its own
    direction), GPU vs CPU usage, durations, drops (``dropped``: the losses, not summary.json's
    ``events_dropped``) apart from what the Sampler left out (``sampled_out``), anomalies, hypertune actions.

    ``status`` is the derived status (see :mod:`telemetry.rundir`), ``reason`` its reason
    or evidence; ``events_persisted`` counts the events on disk when ``summary.json`` lags
    them (a run that died between two summaries), with ``summary_lag_events`` saying by how much.
    ``events``: the run's events from elsewhere than its files (the history), in order.

    Raises:
        RunFileError: the events cannot be read (a FIFO or a folder in their place).
    """
    report = run_status(run_dir)
    tracked = _tracked(run_objectives(run_dir))
    phases: dict[str, dict[str, Any]] = {}
    gpu: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    anomalies = 0
    actions: list[str] = []
    first = last = None
    prev = None  # the previous event's phase: a gap between two events of one phase is its time
    in_pause = False
    n = 0
    for ev in iter_run(run_dir) if events is None else events:
        n += 1
        ph = ev.get("phase") or "-"
        p = phases.setdefault(ph, {"events": 0, "duration_s": 0.0, "best": {}})
        if prev == ph and last is not None and not in_pause and ev["name"] != "resumed":  # as the Recorder counts
            p["duration_s"] += max(0, ev["ts"] - last) / 1e6
        prev = ph
        if ev["name"] in ("paused", "unpaused"):  # a pause's time, events held through it included, is no phase's
            in_pause = ev["name"] == "paused"
        first = ev["ts"] if first is None else first
        last = ev["ts"]
        p["events"] += 1
        if ev.get("success") is not False:  # a failed attempt's values are never a best (as the Recorder's)
            _better(p["best"], ev.get("values") or {}, tracked)
        if ev.get("gpu_mode"):
            gpu[ev["gpu_mode"]] = gpu.get(ev["gpu_mode"], 0) + 1
        if (ev.get("anomaly") or {}).get("flag"):
            anomalies += 1
        for field in ev.get("nonfinite") or ():
            nonfinite[field] = nonfinite.get(field, 0) + 1
        if ev["name"] == "hypertune_action":
            actions.append(ev.get("notes") or "")
    summ = read_record(run_dir, SUMMARY) or {}  # unreadable (a FIFO, a folder): a warning, the events alone
    said_phases = summ.get("phases")
    for ph, figures in said_phases.items() if isinstance(said_phases, dict) else ():
        # the summary's bests also cover what a sampling strategy left off the disk
        if ph in phases and isinstance(figures, dict):
            for key, higher in (("min_ok", False), ("max_ok", True)):
                by_field = figures.get(key)
                if isinstance(by_field, dict):  # _better checks each value
                    pick = {k: v for k, v in by_field.items() if tracked.get(k) is higher}
                    _better(phases[ph]["best"], pick, tracked)
    said = summ.get("events_persisted")
    lag = n - said if isinstance(said, int) and n > said else (n if said is None and n else 0)
    dropped, sampled = summary_losses(summ)
    return {
        "run_dir": str(run_dir),
        "phases": phases,
        "gpu_usage": gpu,
        "anomalies": anomalies,
        "nonfinite_values": nonfinite,
        "hypertune_actions": actions,
        "duration_s": (last - first) / 1e6 if first is not None else 0.0,
        "events_persisted": max(n, said) if isinstance(said, int) else n,
        "events_read": n,  # what the files (or ``events``) gave: fewer than the summary says when some are gone
        # the real losses and what the Sampler left out on purpose, apart (summary_losses)
        "dropped": dropped,
        "sampled_out": sampled,
        "summary_lag_events": lag,
        "status": str(report.status),
        "reason": report.reason,
    }


def sparkline(values: list[float], width: int = 60) -> str:
    bars = "▁▂▃▄▅▆▇█"
    vals = values[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(bars[min(7, int((v - lo) / span * 7.999))] for v in vals)
