"""The event record (schema version 1), its columnar batch form, and its JSONL form.

One record type serves both workloads. On the wire, events travel in columnar
batches (``kind: "events"``); on disk, one JSON object per line. See docs/schema.md.
"""

import math
from collections.abc import Callable
from typing import Any, NotRequired, TypedDict

import numpy as np
import orjson

from actors.log import get_logger
from actors.messages import encode

log = get_logger("telemetry.schema")

SCHEMA_VERSION = 1
GPU_MODES = ("gpu", "cpu_fallback", "cpu_disabled", "cpu")  # cpu: the phase runs on the CPU by design
FIELDS = (
    "v",
    "seq",
    "ts",
    "experiment_id",
    "run_id",
    "pass",
    "phase",
    "step",
    "name",
    "values",
    "success",
    "gpu_mode",
    "gpu_reason",
    "parameters",
    "notes",
    "anomaly",
    "nonfinite",
)
SPARSE_FIELDS = ("notes", "anomaly", "nonfinite")
"""Fields carried as ``[[row, value], ...]`` lists in a batch: rare per event."""


# the message kinds of the telemetry wire (one dispatch each: ``handle_<kind>``)
EVENTS = "events"  # an EventBatch, from the phase's emitter down the pipeline
COUNTERS = "counters"  # the emitter's cumulative counters, when no batch carries them (close)
SAMPLING = "sampling"  # the Sampler's cumulative figures, to the Recorder

RECORD_EVENTS = (
    "phase_start",
    "phase_end",
    "phase_restart",
    "resumed",
    "paused",
    "unpaused",
    "control",
    "control_refused",
    "hypertune_action",
    "hypertune_outcome",
    "telemetry_dropped",
    "anomaly_unseen_metrics",  # actors.anomaly.UNSEEN_EVENT
    "checkpoint_failed",  # actors.phase: the checkpoint file could not be written
)
"""The events of the run's record, not samples of a measurement: the Sampler never drops them
(a workload adds its own milestones with ``record_events``), and the phase durations read the
pause and resume marks among them."""


_PassColumn = TypedDict("_PassColumn", {"pass": np.ndarray})  # int32; "pass" is a Python keyword


class EventBatch(_PassColumn):
    """An ``events`` message: ``n`` events as columns (one numpy array per field).

    String fields travel as int32 codes into per-batch tables (``name`` -> ``names``,
    ``phase`` -> ``phases``, ``reason`` -> ``reasons``, ``params`` -> ``param_texts``;
    -1 = none); ``values`` is one float64 column per value name (NaN = absent); ``sparse``
    holds the rare fields as ``[[row, value], ...]``. :func:`check_batch` checks all of it
    on arrival; docs/schema.md describes it.
    """

    kind: str
    experiment_id: str
    run_id: str
    n: int
    seq: NotRequired[np.ndarray]  # int64, set by the emitter when the batch is published
    ts: np.ndarray  # int64 microseconds
    step: np.ndarray  # int64, -1 = none
    name: np.ndarray
    phase: np.ndarray
    success: np.ndarray  # int8: -1 none, 0, 1
    gpu: np.ndarray  # int8 index into GPU_MODES, -1 = none
    reason: NotRequired[np.ndarray]
    params: NotRequired[np.ndarray]
    names: list[str]
    phases: list[str]
    reasons: NotRequired[list[str]]
    param_texts: NotRequired[list[str]]
    values: dict[str, np.ndarray]
    sparse: NotRequired[dict[str, list[list[Any]]]]
    counters: NotRequired[dict[str, int]]  # the emitter's cumulative counters at this batch
    sampling: NotRequired[dict[str, Any]]  # the Sampler's figures, on batches it forwards


class SchemaError(ValueError):
    """An event or batch does not follow the schema; the message names the field."""


def check_event_fields(
    name: Any,
    values: Any,
    phase: Any,
    step: Any,
    success: Any,
    gpu_mode: Any,
    parameters: Any,
    notes: Any,
    extra: dict[str, Any],
) -> None:
    """Validate one ``emit()`` call; raise :class:`SchemaError` naming the bad field."""
    if extra:
        raise SchemaError(f"unknown event field(s) {', '.join(sorted(extra))}; known: {', '.join(FIELDS)}")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"event field 'name' must be a non-empty string, got {name!r}")
    if values is not None:
        if not isinstance(values, dict):
            raise SchemaError(f"event field 'values' must be a dict of numbers, got {type(values).__name__}")
        for k, v in values.items():
            if not isinstance(k, str):
                raise SchemaError(f"event field 'values' has a non-string key {k!r}")
            if not isinstance(v, (int, float, np.integer, np.floating, np.bool_)):  # a bool is 1 or 0
                raise SchemaError(f"event field 'values.{k}' must be a number, got {v!r}")
    if phase is not None and not isinstance(phase, str):
        raise SchemaError(f"event field 'phase' must be a string, got {phase!r}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
        raise SchemaError(f"event field 'step' must be an integer, got {step!r}")
    if success is not None and not isinstance(success, (bool, np.bool_)):
        raise SchemaError(f"event field 'success' must be a bool or None, got {success!r}")
    if gpu_mode is not None and gpu_mode not in GPU_MODES:
        raise SchemaError(f"event field 'gpu_mode' must be one of {', '.join(GPU_MODES)}, got {gpu_mode!r}")
    if parameters is not None and not isinstance(parameters, dict):
        raise SchemaError(f"event field 'parameters' must be a dict, got {type(parameters).__name__}")
    if notes is not None and not isinstance(notes, str):
        raise SchemaError(f"event field 'notes' must be a string, got {type(notes).__name__}")


OPTIONAL_FIELDS = ("phase", "success", "gpu_mode", "gpu_reason", "step", "parameters", "notes", "anomaly", "nonfinite")
CODED_COLUMNS = {"name": "names", "phase": "phases", "reason": "reasons", "params": "param_texts"}
"""Batch columns of int32 codes into a per-batch string table (-1 = absent)."""


def batch_rows(batch: EventBatch) -> list[dict[str, Any]]:
    """Expand a columnar ``events`` batch into compact event dicts (keys in JSONL order).

    Compact: optional fields that are null are left out, as in the JSONL files;
    :func:`full_event` restores them. Rows that share name/phase/pass/success/gpu
    are copied from one template dict. ``parameters`` dicts are parsed once per
    distinct snapshot in the batch and shared between rows: treat them as read-only.
    """
    n = int(batch["n"])
    if n == 0:
        return []
    names, phases, reasons = batch["names"], batch["phases"], batch.get("reasons", [])
    params = [orjson.loads(t) for t in batch.get("param_texts", [])]
    exp, run = batch["experiment_id"], batch["run_id"]
    vcols = [(k, a.tolist()) for k, a in batch["values"].items()]
    minus = [-1] * n
    reason_c = batch["reason"].tolist() if "reason" in batch else minus
    param_c = batch["params"].tolist() if "params" in batch else minus
    templates: dict[tuple[int, ...], dict[str, Any]] = {}
    rows = []
    append = rows.append
    for i, (sq, t, st, ps, nc, pc, su, gc, rc, prc) in enumerate(
        zip(
            batch["seq"].tolist(),
            batch["ts"].tolist(),
            batch["step"].tolist(),
            batch["pass"].tolist(),
            batch["name"].tolist(),
            batch["phase"].tolist(),
            batch["success"].tolist(),
            batch["gpu"].tolist(),
            reason_c,
            param_c,
            strict=True,
        )
    ):
        key = (nc, pc, ps, su, gc, rc)
        tmpl = templates.get(key)
        if tmpl is None:
            tmpl = {
                "v": SCHEMA_VERSION,
                "seq": 0,
                "ts": 0,
                "experiment_id": exp,
                "run_id": run,
                "pass": ps,
                "name": names[nc],
            }
            if pc >= 0:
                tmpl["phase"] = phases[pc]
            if su >= 0:
                tmpl["success"] = su == 1
            if gc >= 0:
                tmpl["gpu_mode"] = GPU_MODES[gc]
            if rc >= 0:
                tmpl["gpu_reason"] = reasons[rc]
            templates[key] = tmpl
        r = tmpl.copy()
        r["seq"] = sq
        r["ts"] = t
        if st >= 0:
            r["step"] = st
        if prc >= 0:
            r["parameters"] = params[prc]
        vals = {}
        for k, col in vcols:
            x = col[i]
            if x == x:  # not NaN
                vals[k] = x
        r["values"] = vals
        append(r)
    for f, entries in batch.get("sparse", {}).items():
        if f in SPARSE_FIELDS:
            for i, x in entries:
                rows[i][f] = x
    return rows


def compact_event(row: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`full_event`: null optional fields left out, as written to JSONL."""
    return {k: v for k, v in row.items() if v is not None or k not in OPTIONAL_FIELDS}


def full_event(row: dict[str, Any]) -> dict[str, Any]:
    """The event with every optional field present (None where absent)."""
    out = dict(row)
    for f in OPTIONAL_FIELDS:
        out.setdefault(f, None)
    out.setdefault("values", {})
    return out


def rows_to_batch(rows: list[dict[str, Any]], experiment_id: str, run_id: str) -> EventBatch:
    """The inverse of :func:`batch_rows` (tests, recovery back-fills)."""
    tables: dict[str, dict[Any, int]] = {"names": {}, "phases": {}, "reasons": {}, "param_texts": {}}

    def code(table: str, x: Any) -> int:
        if x is None:
            return -1
        t = tables[table]
        return t.setdefault(x, len(t))

    keys = sorted({k for r in rows for k in r.get("values", {})})
    n = len(rows)
    vals = {k: np.full(n, np.nan) for k in keys}
    sparse: dict[str, list[list[Any]]] = {f: [] for f in SPARSE_FIELDS}
    for i, r in enumerate(rows):
        for k, x in r.get("values", {}).items():
            vals[k][i] = x
        for f in SPARSE_FIELDS:
            if r.get(f) is not None:
                sparse[f].append([i, r[f]])

    def ints(f: str, dtype: Any, default: int = -1) -> np.ndarray:
        return np.array([default if r.get(f) is None else r[f] for r in rows], dtype=dtype)

    ptexts = [None if r.get("parameters") is None else orjson.dumps(r["parameters"]).decode() for r in rows]
    return {
        "kind": EVENTS,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "n": n,
        "seq": ints("seq", np.int64),
        "ts": ints("ts", np.int64),
        "step": ints("step", np.int64),
        "pass": ints("pass", np.int32, 0),
        "name": np.array([code("names", r["name"]) for r in rows], dtype=np.int32),
        "phase": np.array([code("phases", r.get("phase")) for r in rows], dtype=np.int32),
        "success": np.array([-1 if r.get("success") is None else int(r["success"]) for r in rows], dtype=np.int8),
        "gpu": np.array(
            [-1 if r.get("gpu_mode") is None else GPU_MODES.index(r["gpu_mode"]) for r in rows], dtype=np.int8
        ),
        "reason": np.array([code("reasons", r.get("gpu_reason")) for r in rows], dtype=np.int32),
        "params": np.array([code("param_texts", t) for t in ptexts], dtype=np.int32),
        **{t: list(tables[t]) for t in tables},
        "values": vals,
        "sparse": sparse,
        "counters": {},
    }


def select_rows(b: EventBatch, keep: np.ndarray) -> EventBatch:
    """The rows of a batch where ``keep`` is True (sparse entries renumbered)."""
    out = b.copy()
    for k in ("seq", "ts", "step", "pass", "name", "phase", "success", "gpu", "reason", "params"):
        if k in b:
            out[k] = b[k][keep]
    out["values"] = {k: v[keep] for k, v in b["values"].items()}
    new_index = np.cumsum(keep) - 1
    out["sparse"] = {
        f: [[int(new_index[i]), x] for i, x in entries if keep[i]] for f, entries in b.get("sparse", {}).items()
    }
    out["n"] = int(keep.sum())
    return out


_INT_KINDS = "iu"
_REQUIRED_COLUMNS = ("seq", "ts", "step", "pass", "name", "phase", "success", "gpu")
_TABLES = {"name": "names", "phase": "phases", "reason": "reasons", "params": "param_texts"}
_CODE_FLOOR = {"name": 0, "phase": -1, "reason": -1, "params": -1}
MAX_BATCH_ROWS = 1 << 24
"""The most rows one batch may claim (a bound on what a malformed ``n`` can make a consumer allocate)."""


MAX_EXTREMES = 4096
"""Rows of ``sampling.extremes`` a message may carry (phases x fields of one batch); a batch
with more keeps the first ones only."""


def batch_extremes(b: EventBatch, rows: np.ndarray) -> list[list[Any]]:
    """Per phase and numeric field, over the ``rows`` (a mask) of a batch: ``[phase, field,
    min, max, min_ok, max_ok]`` (``_ok``: over the rows not marked failed; None where there
    are none). What a Sampler drops still counts in the run's figures this way (see
    :func:`check_sampling_figures`), a few numbers a batch where the rows would be thousands."""
    out: list[list[Any]] = []
    if not rows.any():
        return out
    phase_c = b["phase"]
    ok_rows = rows & (b["success"] != 0)
    first = int(phase_c[0])
    one_phase = bool((phase_c == first).all())  # the usual batch: no mask per phase to build
    for code in [first] if one_phase else np.unique(phase_c[rows]).tolist():
        name = b["phases"][code] if code >= 0 else None
        m, ok = (rows, ok_rows) if one_phase else (rows & (phase_c == code), ok_rows & (phase_c == code))
        for field, col in b["values"].items():
            x = col[m]
            lo = float(np.fmin.reduce(x)) if x.size else math.nan  # NaN (no value) left out, no warning
            if math.isnan(lo):
                continue
            y = col[ok]
            lo_ok = float(np.fmin.reduce(y)) if y.size else math.nan
            ok_pair = (None, None) if math.isnan(lo_ok) else (lo_ok, float(np.fmax.reduce(y)))
            out.append([name, field, lo, float(np.fmax.reduce(x)), *ok_pair])
            if len(out) == MAX_EXTREMES:  # a message past it is refused whole: the batch's events with it
                return out
    return out


def _check_extremes(rows: Any) -> None:
    where = "batch field 'sampling.extremes'"
    if not isinstance(rows, list) or len(rows) > MAX_EXTREMES:
        raise SchemaError(f"{where} must be a list of at most {MAX_EXTREMES} rows")
    for r in rows:
        if (
            not isinstance(r, list)
            or len(r) != 6
            or not (r[0] is None or isinstance(r[0], str))
            or not isinstance(r[1], str)
            or any(not (v is None or (isinstance(v, float) and np.isfinite(v))) for v in r[4:])
            or any(not (isinstance(v, float) and np.isfinite(v)) for v in r[2:4])
        ):
            raise SchemaError(
                f"{where}: a row must be [phase, field, min, max, min_ok, max_ok] of finite numbers, got {r!r}"
            )


def _int_count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise SchemaError(f"{name} must be an int >= 0, got {v!r}")
    return int(v)


def check_counters(counters: Any, where: str = "counters") -> None:
    """Emitter counters: a table of name = int >= 0 (:class:`SchemaError` otherwise)."""
    if not isinstance(counters, dict):
        raise SchemaError(f"batch field {where!r} must be a table of counts, got {type(counters).__name__}")
    for k, v in counters.items():
        if not isinstance(k, str):
            raise SchemaError(f"batch field {where!r} has a non-string key {k!r}")
        _int_count(f"batch field '{where}.{k}'", v)


def check_sampling_figures(sampling: Any) -> None:
    """The Sampler's cumulative figures: ``sampled_out`` and ``held``, ints >= 0; and the
    ``extremes`` of what it dropped (see :func:`batch_extremes`)."""
    if not isinstance(sampling, dict):
        raise SchemaError(f"batch field 'sampling' must be a table, got {type(sampling).__name__}")
    for k in ("sampled_out", "held"):
        if k in sampling:
            _int_count(f"batch field 'sampling.{k}'", sampling[k])
    if "extremes" in sampling:
        _check_extremes(sampling["extremes"])


def check_batch(b: Any) -> None:
    """Check that a decoded ``events`` batch has the shape every consumer relies on.

    Raises :class:`SchemaError` naming the first bad field. Checked: ``n``; the ids; every
    column a 1-D integer array of length ``n``; ``seq`` strictly increasing (``ts`` may
    step back where an emitter restarted); every code inside its string table (the JSONL kernel indexes tables without
    bounds checks); the tables lists of strings, parameter snapshots JSON objects; value
    columns numeric arrays of length ``n``; sparse entries ``[row, value]`` with a valid
    row; the optional ``counters`` and ``sampling`` figures. Cost: a few numpy reductions
    per column, no per-row Python.
    """
    if not isinstance(b, dict):
        raise SchemaError(f"an events batch must be a table, got {type(b).__name__}")
    if "n" not in b:
        raise SchemaError("batch has no 'n'")
    n = _int_count("batch field 'n'", b["n"])
    if n > MAX_BATCH_ROWS:
        raise SchemaError(f"batch field 'n' is {n}, above the limit of {MAX_BATCH_ROWS} rows per batch")
    for f in ("experiment_id", "run_id"):
        if not isinstance(b.get(f), str):
            raise SchemaError(f"batch field {f!r} must be a string, got {b.get(f)!r}")
    for col in (*_REQUIRED_COLUMNS, *(c for c in ("reason", "params") if c in b)):
        if col not in b:
            raise SchemaError(f"batch has no column {col!r}")
        a = b[col]
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in _INT_KINDS:
            raise SchemaError(
                f"batch column {col!r} must be a 1-D integer array, got "
                f"{type(a).__name__}{'' if not isinstance(a, np.ndarray) else f' {a.dtype}{a.shape}'}"
            )
        if a.size != n:
            raise SchemaError(f"batch column {col!r} has {a.size} rows, n is {n}")
    for col, table in _TABLES.items():
        if col not in b and table not in b:
            continue
        t = b.get(table)
        kinds = (str, bytes) if table == "param_texts" else str  # JSON text: the emitter's are bytes
        if not isinstance(t, list) or not all(isinstance(x, kinds) for x in t):
            raise SchemaError(f"batch table {table!r} must be a list of strings")  # present even unused
        if col not in b:
            continue
        if n and (int(b[col].min()) < _CODE_FLOOR[col] or int(b[col].max()) >= len(t)):
            raise SchemaError(
                f"batch column {col!r} has codes outside [{_CODE_FLOOR[col]}, {len(t)}) "
                f"(its table {table!r} has {len(t)} entries)"
            )
    if n:
        if int(b["success"].min()) < -1 or int(b["success"].max()) > 1:
            raise SchemaError("batch column 'success' must hold -1 (none), 0 or 1")
        if int(b["gpu"].min()) < -1 or int(b["gpu"].max()) >= len(GPU_MODES):
            raise SchemaError(f"batch column 'gpu' must hold -1 (none) or a code below {len(GPU_MODES)}")
        if n > 1 and not np.all(b["seq"][1:] > b["seq"][:-1]):
            raise SchemaError("batch column 'seq' must increase strictly within a batch")
    for t in b.get("param_texts", ()):
        try:
            ok = isinstance(orjson.loads(t), dict)
        except orjson.JSONDecodeError:
            ok = False
        if not ok:
            raise SchemaError(f"batch table 'param_texts' holds {t[:40]!r}, not a JSON object")
    vals = b.get("values")
    if not isinstance(vals, dict):
        raise SchemaError(f"batch field 'values' must be a table of columns, got {type(vals).__name__}")
    for k, a in vals.items():
        if not isinstance(k, str):
            raise SchemaError(f"batch field 'values' has a non-string key {k!r}")
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in "fiu" or a.size != n:
            raise SchemaError(f"batch value column {k!r} must be a 1-D numeric array of {n} rows")
    sparse = b.get("sparse", {})
    if not isinstance(sparse, dict):
        raise SchemaError(f"batch field 'sparse' must be a table, got {type(sparse).__name__}")
    for f, entries in sparse.items():
        if not isinstance(entries, list):
            raise SchemaError(f"batch field 'sparse.{f}' must be a list of [row, value] pairs")
        for e in entries:
            if (
                not isinstance(e, list)
                or len(e) != 2
                or isinstance(e[0], bool)
                or not isinstance(e[0], int)
                or not 0 <= e[0] < n
            ):
                raise SchemaError(
                    f"batch field 'sparse.{f}' holds {e!r}, not a [row, value] pair with a row in [0, {n})"
                )
    if "counters" in b:
        check_counters(b["counters"])
    if "sampling" in b:
        check_sampling_figures(b["sampling"])


def dumps_line(row: dict[str, Any]) -> bytes:
    """One JSONL line (with the trailing newline)."""
    return orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


_LINE_TYPES: dict[str, tuple[type, ...]] = {
    "v": (int,),
    "seq": (int,),
    "ts": (int,),
    "pass": (int,),
    "step": (int,),
    "name": (str,),
    "experiment_id": (str,),
    "run_id": (str,),
    "phase": (str,),
    "success": (bool,),
    "gpu_mode": (str,),
    "gpu_reason": (str,),
    "notes": (str,),
    "parameters": (dict,),
    "anomaly": (dict,),
    "nonfinite": (dict,),
    "values": (dict,),
}


def parse_line(line: bytes | str) -> dict[str, Any]:
    """Parse and check one JSONL line; :class:`SchemaError` if it is not an event.

    Valid JSON is not enough: every field must have its schema type (``"ts": "x"`` is
    refused), so readers never meet a record they cannot use. A ``null`` in ``values`` (how
    JSON writes a non-finite number) is left out, as NaN is in a batch.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError("line is not a JSON object")
    for f in ("seq", "ts", "name"):
        if f not in obj:
            raise SchemaError(f"event has no {f!r}")
    for f, v in obj.items():
        types = _LINE_TYPES.get(f)
        if types is None or (v is None and f in OPTIONAL_FIELDS):
            continue
        if v is None or not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise SchemaError(f"event field {f!r} must be {' or '.join(t.__name__ for t in types)}, got {v!r:.60}")
        bound = 2**31 if f == "pass" else 2**63
        if types == (int,) and not -bound <= v < bound:
            raise SchemaError(f"event field {f!r} is out of range, got {v!r}")
    if obj.get("v", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise SchemaError(f"schema version {obj['v']} is newer than this reader ({SCHEMA_VERSION})")
    if not obj["name"]:
        raise SchemaError("event 'name' must not be empty")
    vals = obj.get("values")
    if vals:
        for k, x in list(vals.items()):
            if x is None:
                del vals[k]
            elif isinstance(x, bool) or not isinstance(x, (int, float)):
                raise SchemaError(f"event field 'values.{k}' must be a number, got {x!r:.60}")
    return full_event(obj)


_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_id(kind: str, value: Any) -> str:
    """Validate an id that becomes a path component: no separators, no traversal, bounded."""
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(f"{kind} must be a string of 1..128 characters, got {value!r:.150}")
    if value[0] in "._-" or not set(value) <= _ID_CHARS:
        raise ValueError(
            f"{kind} {value!r:.150} may only use letters, digits, '.', '_', '-' and must start with a letter or digit"
        )
    return value


STORED_FIELDS = (
    "kind",
    "experiment_id",
    "run_id",
    "n",
    "seq",
    "ts",
    "step",
    "pass",
    "name",
    "phase",
    "success",
    "gpu",
    "reason",
    "params",
    "names",
    "phases",
    "reasons",
    "param_texts",
    "values",
    "sparse",
)
"""The fields of a batch a history stores: the events, not the figures that rode along."""


def stored_batch(b: EventBatch) -> bytes:
    """The bytes a history stores for one batch (its :data:`STORED_FIELDS`, msgpack)."""
    return encode({k: b[k] for k in STORED_FIELDS if k in b})


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """``value`` (JSON-like) with ``fn`` applied to every string, keys too."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {map_strings(k, fn): map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [map_strings(v, fn) for v in value]
    return value
