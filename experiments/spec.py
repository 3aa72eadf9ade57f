"""Experiment specs: TOML files validated up front, with ``--set key=value`` overrides.

A spec names the experiment, its hypothesis and condition, tags and metadata, a seed, a
time budget, the workload and its parameters, and the telemetry / sampling / anomaly /
metrics / hypertune sections. Every key is checked against :data:`SCHEMA`: an unknown key,
a wrong type or an out-of-range value is a :class:`SpecError` naming the key and the file.
Workload parameters are checked by the workload itself (see ``experiments.workloads``).
Tables and arrays nest at most :data:`MAX_DEPTH` levels, checked where a spec is read
(:func:`parse_toml`, :func:`parse_override`) and where one is taken as a dict (:func:`load_spec`).
"""

from __future__ import annotations

import copy
import datetime
import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from actors import anomaly, recorder, streaming_metrics
from actors.anomaly import check_anomaly_config, threshold_problem
from actors.sampler import check_sampling
from experiments.validate import SECONDS, SEED, YEAR_S, Num, SpecError, brief, merge_tables, read_text, tree_problem
from telemetry import emitter
from telemetry.emitter import OVERFLOW_POLICIES
from telemetry.rundir import check_experiment_id
from telemetry.schema import check_id

MAX_DEPTH = 100
"""How deep tables and arrays may nest in a spec, the document being level 0 (tomlkit, which
``crucible set`` edits with, keeps the same limit). Deeper data overflows what reads and copies
it by recursion (the TOML reader, ``copy.deepcopy``) and the run folder's JSON writer (orjson
stops at 254 levels); no real spec comes near it."""
TOO_DEEP = f"tables and arrays nested more than {MAX_DEPTH} levels deep"


def nesting_problem(data: Any, limit: int = MAX_DEPTH) -> str | None:
    """Where ``data`` first holds a table or array more than ``limit`` levels deep (a dotted
    path, cut short), or None. Iterative, so that data too deep to recurse over is still checked."""
    if not isinstance(data, (dict, list, tuple)):
        return None
    stack: list[tuple[Any, int, tuple[Any, Any] | None]] = [(data, 0, None)]
    while stack:
        v, depth, trail = stack.pop()
        if depth > limit:
            return _trail_path(trail)
        items = v.items() if isinstance(v, dict) else enumerate(v)
        stack.extend((x, depth + 1, (trail, k)) for k, x in items if isinstance(x, (dict, list, tuple)))
    return None


def _trail_path(trail: tuple[Any, Any] | None, shown: int = 4) -> str:
    keys: list[Any] = []
    while trail is not None:
        trail, k = trail
        keys.append(k)
    keys.reverse()
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys[:shown]).removeprefix(".")
    return path[:80] + "..." if len(keys) > shown or len(path) > 80 else path


# A TOML text's tokens, as far as the dotted-key bound needs: strings and comments (whose dots
# are not keys'), the characters that end a key, and runs of anything else.
_TOML_TOKENS = re.compile(
    r'''"""(?:[^\\]|\\.)*?"""|\'\'\'.*?\'\'\'|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|#[^\n]*|([=,{}\[\]\n])|[^"'#=,{}\[\]\n]+''',
    re.S,
)


def dotted_key_problem(text: str, limit: int = MAX_DEPTH) -> int | None:
    """The line of the first key in ``text`` with more than ``limit`` dotted parts, or None.

    The TOML reader's time and memory grow with the square of a dotted key's length
    (``a.a.a...`` 30,000 parts deep in 60 KB takes it 5 GB), so such a key is refused from a
    scan in C before the reader sees it. Dots are counted between the characters that end a
    key (``= , { } [ ]``, a newline), outside strings and comments: a value's dots (a float,
    a time) are one or two."""
    dots = 0
    for m in _TOML_TOKENS.finditer(text):
        if m.group(1) is not None:
            dots = 0
        elif m[0][0] not in "\"'#":
            dots += m[0].count(".")
            if dots >= limit:
                return text.count("\n", 0, m.start()) + 1
    return None


def _check_nesting(data: Any, source: str | None) -> None:
    where = nesting_problem(data)
    if where is not None:
        raise SpecError(f"{_where(source, where)}: {TOO_DEEP}")


def _num(
    lo: float | None = None, hi: float | None = None, integer: bool = False, lo_open: bool = False
) -> Callable[[Any], str | None]:
    return Num(lo, hi, integer, lo_open).problem


def _type(*types: type) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, types) and not (isinstance(v, bool) and bool not in types):
            return None
        shown = v.isoformat() if isinstance(v, (datetime.date, datetime.time)) else repr(v)  # as the TOML had it
        problem = f"must be {' or '.join(t.__name__ for t in types)}, got {shown}"
        if str in types and not isinstance(v, dict):  # true, nan, 2024-01-01, [a] read as TOML values, not text
            problem += f' (text that reads as another TOML value needs quotes: "{shown}"; in --set, KEY=\'"{shown}"\')'
        return problem

    return check


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}, got {v!r}"

    return check


def _str_list(v: Any) -> str | None:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"must be a list of strings, got {v!r}"
    if any(not x.strip() for x in v):  # a field, method or tag of no name names nothing
        return f"must be a list of non-empty strings, got {v!r}"
    return None


def _id(v: Any) -> str | None:
    try:
        check_id("name", v)
        check_experiment_id(v)  # nor one of the artifacts folder's own names: refused before anything exists
    except ValueError as exc:
        return str(exc)
    return None


def _windows(v: Any) -> str | None:
    each = Num(0.001, YEAR_S)
    if not isinstance(v, list) or not 1 <= len(v) <= 32 or any(each.problem(x) for x in v):
        return f"must be a list of 1 to 32 window lengths, each {each.describe()} seconds, got {v!r}"
    return None


ANY_TABLE = "table"  # free-form table: metadata, workload params, sampling config

SCHEMA: dict[str, Any] = {
    "name": _id,
    "hypothesis": _type(str),
    "condition": _type(str),
    "tags": _str_list,
    "metadata": ANY_TABLE,
    "seed": SEED.problem,
    "time_budget_s": SECONDS.problem,
    "workload": {
        "name": _type(str),
        "params": ANY_TABLE,
    },
    "telemetry": {
        "batch_size": _num(1, 1_000_000, integer=True),
        "flush_interval_s": _num(0.001, 60),
        "overflow": _choice(*OVERFLOW_POLICIES),
        "max_backlog": _num(1, 1_000_000, integer=True),
        "block_timeout_s": _num(0, 3600),
        "rotate_mb": _num(1, 1_000_000),
        "fsync_interval_s": _num(0.01, 60),
        "ring_size": _num(0, 10_000_000, integer=True),
        "index_limit": _num(16, 1_000_000_000, integer=True),
        "debug": _type(bool),
        "maximize": _str_list,
    },
    "metrics": {
        "windows_s": _windows,
        "publish_interval_s": _num(0, 3600),
        "compression": _num(10, 100_000),
    },
    "sampling": {
        "strategy": _type(str),
        "config": ANY_TABLE,
    },
    "anomaly": {
        "enabled": _type(bool),
        "methods": _str_list,
        "metrics": _str_list,
        "threshold": threshold_problem,
        "action": _type(str),
        "window": _num(10, 1_000_000, integer=True),
        "warmup": _num(0, 1_000_000, integer=True),
        "ewma_lambda": _num(0.0001, 0.9999),
        "period_gap_s": _num(0, 86_400),
    },
    "hypertune": {
        "enabled": _type(bool),
        "window_s": _num(0.05, 3600),
        "policy": _choice("ucb", "epsilon_greedy"),
        "state_file": _type(str),
    },
    "supervision": {
        "max_restarts": _num(0, 1_000_000, integer=True),
        "max_seconds": _num(0.001, 86_400),
    },
    # what the ray backend reserves for the tree's process (docs/ray.md); the embedded backend ignores it
    "resources": {
        "cpus": _num(0, 1024),
        "gpus": _num(0, 64),
    },
}

DEFAULTS: dict[str, Any] = {
    "name": "experiment",
    "hypothesis": "",
    "condition": "",
    "tags": [],
    "metadata": {},
    "seed": 0,
    "time_budget_s": 60.0,
    "workload": {"name": "latency", "params": {}},
    "telemetry": {
        "batch_size": emitter.BATCH_SIZE,
        "flush_interval_s": emitter.FLUSH_INTERVAL_S,
        "overflow": emitter.OVERFLOW,
        "max_backlog": emitter.MAX_BACKLOG,
        "block_timeout_s": emitter.BLOCK_TIMEOUT_S,
        "rotate_mb": recorder.ROTATE_BYTES >> 20,
        "fsync_interval_s": recorder.FSYNC_INTERVAL_S,
        "ring_size": recorder.RING_SIZE,
        "index_limit": recorder.INDEX_LIMIT,
        "debug": False,
        "maximize": [],
    },
    "metrics": {
        "windows_s": list(streaming_metrics.WINDOWS_S),
        "publish_interval_s": streaming_metrics.PUBLISH_INTERVAL_S,
        "compression": streaming_metrics.COMPRESSION,
    },
    "sampling": {"strategy": "all", "config": {}},
    "anomaly": {
        "enabled": True,
        "methods": list(anomaly.DEFAULT_METHODS),
        "action": anomaly.ACTION,
        "window": anomaly.WINDOW,
        "warmup": anomaly.WARMUP,
        "ewma_lambda": anomaly.EWMA_LAMBDA,
        "period_gap_s": anomaly.PERIOD_GAP_S,
    },
    "hypertune": {"enabled": False, "window_s": 5.0, "policy": "ucb", "state_file": ""},
    "supervision": {"max_restarts": 3, "max_seconds": 5.0},
    "resources": {"cpus": 1, "gpus": 0},  # the ray backend reads them (experiments/remote.py)
}

UNSET: dict[str, tuple[Any, str]] = {
    "anomaly.threshold": (dict(anomaly.DEFAULT_THRESHOLDS), "not set in the spec: each method's default"),
    "anomaly.metrics": (None, "not set in the spec: every numeric field the events carry is watched"),
}
"""Keys the schema knows that have no value until a spec gives one, their absence meaning
something no single value in :data:`DEFAULTS` would: (the value it amounts to, or None; what
``crucible get`` and ``show`` say of it)."""


def known_here(prefix: str, names: Iterable[str]) -> str:
    """The error for a key not among ``names`` (the keys of the table at ``prefix``), listing them."""
    return f"unknown key (known here: {', '.join(sorted(prefix + n for n in names))})"


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _check(data: dict[str, Any], schema: dict[str, Any], source: str | None, prefix: str = "") -> None:
    for k, v in data.items():
        key = f"{prefix}{k}"
        rule = schema.get(k)
        if rule is None:
            raise SpecError(f"{_where(source, key)}: {known_here(prefix, schema)}")
        if rule == ANY_TABLE:
            if not isinstance(v, dict):
                raise SpecError(f"{_where(source, key)}: must be a table, got {v!r}")
        elif isinstance(rule, dict):
            if not isinstance(v, dict):
                raise SpecError(f"{_where(source, key)}: must be a table, got {v!r}")
            _check(v, rule, source, key + ".")
        else:
            problem = rule(v)
            if problem:
                raise SpecError(f"{_where(source, key)}: {problem}")


BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML's bare keys: what --set and crucible set take


def parse_override(item: str, flag: str = "--set ") -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is read as TOML, else as a string.
    Errors begin with ``flag``, how the user gave ``item`` (``crucible set`` takes it bare: "")."""
    if "=" not in item:
        raise SpecError(f"{flag}{item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") >= MAX_DEPTH:
        raise SpecError(f"{flag}{brief(key)}: {TOO_DEEP}")
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"{flag}{brief(item)!r}: bad key {brief(key)!r}")
    parts = key.split(".")
    for part in parts:  # a quoted key ("a.b", 'x y') would be split on its dots, its quotes kept in the name
        if not BARE_KEY.fullmatch(part):
            raise SpecError(
                f"{flag}{brief(key)}: {brief(part)!r} is not a bare key (letters, digits, _ and -); "
                "keys here are bare: a key that needs quotes is set by editing the file"
            )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except ValueError as exc:  # an integer of more than 4300 digits (Python's limit on reading one)
        raise SpecError(f"{flag}{key}: {_too_long(exc)}") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables by recursion
        raise SpecError(f"{flag}{key}: {TOO_DEEP}") from None
    nested: Any = value
    for part in reversed(parts):  # the value where it will sit in the spec: its depth counts from the top
        nested = {part: nested}
    if nesting_problem(nested) is not None:
        raise SpecError(f"{flag}{key}: {TOO_DEEP}")
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(data)
    if not overrides:
        return out
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for path, value in items:
        parts = path.split(".") if isinstance(path, str) else path
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {'.'.join(parts)}: {p!r} is not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def _check_numbers(raw: dict[str, Any], source: str | None) -> None:
    bad = tree_problem(raw)
    if bad:
        raise SpecError(f"{_where(source, bad[0])}: {bad[1]}")


def _too_long(exc: ValueError) -> str:
    return f"a number too long to read ({str(exc).split(';')[0]})"


def parse_toml(text: str, source: str | Path = "submitted spec") -> dict[str, Any]:
    """A spec's TOML text as a dict; :class:`SpecError` naming ``source`` and where it is malformed.
    A leading byte-order mark (as some editors write) is skipped."""
    text = text.removeprefix("\ufeff")
    line = dotted_key_problem(text)
    if line is not None:
        raise SpecError(f"{source}:{line}: a dotted key of more than {MAX_DEPTH} parts ({TOO_DEEP})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{source}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's limit on reading one)
        raise SpecError(f"{source}: {_too_long(exc)}") from None
    except RecursionError:  # tomllib reads nested arrays and inline tables by recursion
        raise SpecError(f"{source}: {TOO_DEEP}") from None
    _check_nesting(data, str(source))
    return data


def read_spec_text(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The text of a spec file and its parsed TOML; :class:`SpecError` naming the file."""
    try:
        text = read_text(path, "spec")
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write: not the spec's
    return text, parse_toml(text, path)


def check_gpu_share(gpus: float) -> None:
    """``ValueError`` for a GPU count above 1 that is not whole: Ray shares one GPU in fractions,
    never several (checked with the spec, not only when the ray backend places the tree)."""
    if gpus > 1 and gpus != int(gpus):
        raise ValueError(f"a share of a GPU must be below 1, or whole GPUs; got {gpus!r}")


def load_spec(
    spec: str | Path | dict[str, Any],
    overrides: list[str] | dict[str, Any] | None = None,
    workloads: dict[str, Any] | None = None,
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """Read (a path) or take (a dict) a spec, apply overrides, validate, fill defaults.

    ``source`` names a dict spec in error messages (a path names itself). A spec this
    function returned may be given again (its ``source`` key is taken for ``source``): it is
    the one reading of a file that cannot be read twice (a pipe, ``/dev/stdin``).

    Raises:
        SpecError: naming the file and the key, for anything the spec reference does not allow.
    """
    if isinstance(spec, dict):
        _check_nesting(spec, source)  # before anything recurses over it
        raw = copy.deepcopy(spec)
        given = raw.pop("source", None)
        if source is None and isinstance(given, str):
            source = given
    else:
        source = str(spec)
        raw = read_spec_text(spec)[1]
    _check(raw, SCHEMA, source)  # the schema's ranges first: they name the allowed values
    _check_numbers(raw, source)  # then every number, free-form tables included
    raw = apply_overrides(raw, overrides)
    where = source and f"{source} (with --set)" if overrides else source
    if overrides:
        _check_nesting(raw, where)  # each --set value was checked on its own; a dict of overrides was not
    _check(raw, SCHEMA, where)
    _check_numbers(raw, where)
    full = merge_tables(DEFAULTS, raw, opaque=("metadata",))
    try:  # their messages name the key (sampling.config.seed)
        check_sampling(full["sampling"]["strategy"], full["sampling"]["config"])
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}" if where else str(exc)) from None
    a = full["anomaly"]
    try:
        check_anomaly_config(
            a["methods"], a.get("metrics"), a.get("threshold"), a["action"], a["window"], a["warmup"], a["ewma_lambda"]
        )
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}" if where else str(exc)) from None
    try:
        check_gpu_share(full["resources"]["gpus"])
    except ValueError as exc:
        raise SpecError(f"{_where(where, 'resources.gpus')}: {exc}") from None
    if workloads is not None:
        name = full["workload"]["name"]
        broken = getattr(workloads, "broken", {})  # a plug-in that failed to load: say why, not "unknown"
        if name not in workloads and name in broken:
            raise SpecError(f"{_where(where, 'workload.name')}: {broken[name]}")
        if name not in workloads:
            raise SpecError(
                f"{_where(where, 'workload.name')}: unknown workload {name!r}; "
                f"available: {', '.join(sorted(workloads))}"
            )
        try:
            full["workload"]["params"] = workloads[name].check_params(full["workload"]["params"])
        except (ValueError, TypeError) as exc:
            raise SpecError(f"{_where(where, 'workload.params')}: {exc}") from None
    full["source"] = source
    return full
