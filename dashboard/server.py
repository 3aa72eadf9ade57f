"""The live web dashboard: Starlette + uvicorn beside a Lab, in its process.

The dashboard is a client of the Lab's public API (experiments, their reads and their
lifecycle calls); the Lab knows nothing of it. Whoever wants one starts it on a Lab:
``Dashboard(lab, host, port)`` (``crucible run --dashboard`` does), and stops it.

Routes: ``GET /`` (the page: it holds no data and needs no token), ``POST /api/login``
(``{"code": ...}``, a one-time sign-in code, traded once for ``{"token": ...}``: the page's
way in, see :meth:`Dashboard.new_sign_in_url`), ``POST /api/ws-ticket`` (a single-use
ticket for ``/ws?ticket=``, as a browser cannot send a header with a WebSocket handshake),
``GET /static/...`` (the page's script and icon, and plotly.min.js served from the
installed plotly package: no CDN, works offline), ``GET /api/experiments``,
``GET /api/experiments/{id}`` (with the best so far, hypertune actions and outcomes, pass
ends: kept per run as it goes, see :class:`RunDetails`), ``GET /api/metrics/live?experiment=``
(last 200 events), ``GET /api/metrics/history?run_id=&limit=`` (ids validated: 400 on a bad
id or limit, 404 on an unknown id; the run is found with :func:`telemetry.rundir.find_runs`;
at most :data:`HISTORY_READS` at once, then 503 with Retry-After),
``POST /api/control/{pause,resume,restart,stop}`` (409 with the reason when the
experiment cannot do it), ``POST /api/control/set`` (a control's new value: 400 when the
workload refuses it), ``POST /api/experiments`` (a submission, when the dashboard serves
a :class:`~experiments.service.LabService`: 201 with the id; 400 naming the bad key; 501
on a plain Lab), ``WS /ws`` (batched pushes of what changed, at most 10 per second; a
client that stops reading is dropped; what a client sends is read and ignored, within
:data:`WS_MAX_MESSAGE_BYTES` a message and :data:`WS_MESSAGES_PER_S`), and ``GET /metrics``
(Prometheus text via prometheus_client).

Everything but the page's static files needs the token; Host, Origin and body size are
checked first (see :mod:`dashboard.security`). Errors are JSON ``{"error": "..."}`` with a
4xx status: routes raise :class:`HTTPException` for a bad request, and one handler turns the
Lab's lifecycle errors into 409 (404 for :class:`~experiments.lab.NotFound`); a read over the
query limits (:class:`~telemetry.query.QueryLimitError`) is a 503 that names the limit.

The dashboard names no workload's field: every experiment's JSON carries its workload's
declared objective (``{"field", "direction", "label", "progress"}``, from
:func:`experiments.workloads.objective_of`), and the page, the best so far and the
Prometheus gauges ``crucible_objective_best`` / ``crucible_objective_progress`` read it. The server binds
127.0.0.1 by default. The token is generated per dashboard and written to
``<artifacts>/dashboard.token`` with mode 0600 once the port is bound; the CLI prints a
one-time sign-in link, never the token in a URL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from actors.log import get_logger
from actors.runtime import collector
from dashboard.security import TICKET_TTL_S, Guard, OneTimeCodes, TokenClaim
from dashboard.transport import GuardedH11Protocol, GuardedWebSocketProtocol
from experiments.lab import Experiment, Lab, LifecycleError, NotFound
from experiments.service import KeyReused, LabService, QueueFull, ServiceClosed
from experiments.spec import SpecError
from experiments.validate import IDEMPOTENCY_HEADER, brief, tree_problem
from experiments.workloads import Objective, objective_of
from telemetry.jsonl import RunFileError, iter_run
from telemetry.query import QueryLimitError
from telemetry.rundir import LIVE, TOKEN_FILE, find_runs, summary_best
from telemetry.schema import check_id

log = get_logger("dashboard")

STATIC = Path(__file__).parent / "static"
CONTROLS = ("pause", "resume", "restart", "stop", "set")
SET_KEYS = ("experiment", "key", "value", "why")  # the body of POST /api/control/set
MAX_WHY_CHARS = 500
PUSH_INTERVAL_S = 0.1  # at most 10 pushes a second
ENDED_PUSH_S = 10.0  # an experiment's last events still go out this long after it ended
SEND_TIMEOUT_S = 2.0  # a client that does not take a push in this time is dropped
# /ws only pushes: what a client sends is read and dropped, within these bounds, else it is closed
WS_MAX_MESSAGE_BYTES = 4096  # a larger message is closed with 1009 by the protocol (uvicorn's ws_max_size)
WS_MESSAGES_PER_S = 10  # on average, with bursts of WS_MESSAGE_BURST; more is closed with 1008
WS_MESSAGE_BURST = 20
STATIC_TYPES = {"app.js": "application/javascript", "favicon.svg": "image/svg+xml"}
# the page runs its own script only, is never framed, and talks to its own origin only
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class _LabCollector:
    """Prometheus metrics read from the Lab at scrape time."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def collect(self) -> Any:
        fams = {
            "events": GaugeMetricFamily("crucible_events_persisted", "Events persisted", labels=["experiment"]),
            "emitted": GaugeMetricFamily("crucible_events_emitted", "Events emitted", labels=["experiment"]),
            "drops": GaugeMetricFamily(
                "crucible_events_dropped", "Events dropped (overflow, transit, sampling)", labels=["experiment"]
            ),
            "lost": GaugeMetricFamily(
                "crucible_events_lost",
                "Events lost (overflow, transit, storage): dropped, less what the Sampler left out on purpose",
                labels=["experiment"],
            ),
            "sampled": GaugeMetricFamily(
                "crucible_events_sampled_out", "Events the Sampler left out on purpose", labels=["experiment"]
            ),
            "restarts": GaugeMetricFamily(
                "crucible_restarts", "Child restarts in the experiment tree", labels=["experiment"]
            ),
            "best": GaugeMetricFamily(
                "crucible_objective_best",
                "Best so far of the workload's declared objective, in its direction",
                labels=["experiment", "field", "direction"],
            ),
            "progress": GaugeMetricFamily(
                "crucible_objective_progress",
                "Latest value of the objective's declared progress field",
                labels=["experiment", "field"],
            ),
            "running": GaugeMetricFamily(
                "crucible_running", "1 while running, 0.5 paused, 0 stopped", labels=["experiment"]
            ),
        }
        for exp in list(self.lab.experiments.values()):
            s = exp.summary()
            lbl = [exp.id]
            fams["events"].add_metric(lbl, float(s.get("events_persisted") or 0))
            fams["emitted"].add_metric(lbl, float(s.get("events_emitted") or 0))
            fams["drops"].add_metric(lbl, float(s.get("events_dropped") or 0))
            fams["sampled"].add_metric(lbl, float(s.get("events_sampled_out") or 0))
            fams["lost"].add_metric(lbl, float((s.get("events_dropped") or 0) - (s.get("events_sampled_out") or 0)))
            fams["restarts"].add_metric(lbl, float(sum((s.get("restarts") or {}).values())))
            obj = objective(exp)
            if obj is not None:
                best = summary_best(s, obj.field, obj.direction)
                if best is not None:
                    fams["best"].add_metric([exp.id, obj.field, obj.direction], float(best))
                if obj.progress:
                    lasts = [p.get("last", {}).get(obj.progress) for p in (s.get("phases") or {}).values()]
                    lasts = [x for x in lasts if isinstance(x, (int, float)) and not isinstance(x, bool)]
                    if lasts:
                        fams["progress"].add_metric([exp.id, obj.progress], float(lasts[-1]))
            fams["running"].add_metric(lbl, {"running": 1.0, "paused": 0.5}.get(exp.status(), 0.0))
        yield from fams.values()


class _HostCollector:
    """The hosting process as a long-running daemon is watched: its threads and the periodic
    full collection (:mod:`actors.runtime`), beside prometheus_client's process (memory,
    CPU, files) and GC metrics."""

    def collect(self) -> Any:
        threads = GaugeMetricFamily("crucible_threads", "Threads of this process")
        threads.add_metric([], float(threading.active_count()))
        runs = CounterMetricFamily("crucible_gc_periodic_runs", "Periodic full collections (actors.runtime)")
        runs.add_metric([], float(collector.runs))
        last = GaugeMetricFamily("crucible_gc_periodic_last_seconds", "How long the last periodic collection took")
        last.add_metric([], collector.last_s)
        yield from (threads, runs, last)


def objective(exp: Experiment) -> Objective | None:
    """The experiment's workload's declared objective; None for a workload this process does not know."""
    return objective_of((exp.spec.get("workload") or {}).get("name"))


def experiment_view(exp: Experiment) -> dict[str, Any]:
    """One experiment for the list and the pushes; ``objective`` tells the page what to draw."""
    st = exp.phase_status() if exp.status() in LIVE else {}
    obj = objective(exp)
    return {
        "id": exp.id,
        "run_id": exp.run_id,
        "status": exp.status(),
        "reason": exp.reason,
        "workload": exp.spec["workload"]["name"],
        "params": st.get("params", {}),
        "steps": st.get("steps"),
        "active_s": st.get("active_s"),
        "durations": exp.durations(),
        "objective": obj.to_dict() if obj is not None else None,
    }


def best_value(summary: dict[str, Any], obj: Objective | None) -> dict[str, Any] | None:
    """The run's best so far of its objective, in the objective's direction, for the page."""
    if obj is None:
        return None
    value = summary_best(summary, obj.field, obj.direction)
    if value is None:
        return None
    return {"field": obj.field, "label": obj.label, "direction": obj.direction, "value": value}


def passes(starts: list[dict[str, Any]], ends: list[dict[str, Any]], field: str | None) -> list[dict[str, Any]]:
    """Pass boundaries from ``phase_start`` and ``pass_end`` events: per pass, when it started
    (its first phase), when it ended and its ``field`` (the objective) at the end, oldest first."""
    out: dict[int, dict[str, Any]] = {}

    def entry(n: int) -> dict[str, Any]:
        return out.setdefault(n, {"pass": n, "start_ts": None, "why": None, "end_ts": None, "best": None})

    for e in starts:
        p = entry(e["pass"])
        if p["start_ts"] is None or e["ts"] < p["start_ts"]:
            p["start_ts"], p["why"] = e["ts"], e.get("notes")
    for e in ends:
        p = entry(e["pass"])
        p["end_ts"], p["best"] = e["ts"], (e.get("values") or {}).get(field) if field else None
    return [out[k] for k in sorted(out)]


RARE_EVENTS = {"hypertune_action": 50, "hypertune_outcome": 50, "phase_start": 200, "pass_end": 200}
"""The events the side panels show, and how many of the newest of each a run's details keep."""
DETAILS_SCAN = 200_000
"""Events the first details read of a run searches for :data:`RARE_EVENTS` (the newest ones;
an older part of a bigger run is not searched): every later read searches only what came since."""
DETAILS_OVERLAP_US = 2_000_000  # searched again on the next read: events that reach the Recorder late
DETAILS_MAX_AGE_S = 1.0  # several pages polling one run search it at most once a second
DETAILS_WAIT_S = 0.5  # a request waits this long for another's search of the run, then answers what is kept


class RunDetails:
    """What the side panels need of one run, kept as it goes: the newest :data:`RARE_EVENTS`.

    Rare events (hypertune actions, pass ends) cannot be found by asking for the last 50 of
    a name: where there are fewer than 50, that reads the whole run (10 M events: seconds,
    then a :class:`~telemetry.query.QueryLimitError`). Instead the first read searches a
    time range that holds about :data:`DETAILS_SCAN` events (estimated from the run's
    summary; halved while it is over the history's scan limit) and each later read the range
    since the previous one, so a read costs what arrived since, whatever the run's size.
    ``since_us`` is where the search began (None: the run's first event)."""

    def __init__(self, asks: concurrent.futures.Executor) -> None:
        self.asks = asks  # where the searches' asks wait (see DetailsCache)
        self.lock = threading.Lock()  # one search at a time
        self.kept: dict[str, dict[tuple[int, int], dict[str, Any]]] = {name: {} for name in RARE_EVENTS}
        self.found: dict[str, list[dict[str, Any]]] = {name: [] for name in RARE_EVENTS}  # the kept, newest last
        self.upto_us: int | None = None  # every event before this was searched (None: nothing searched yet)
        self.since_us: int | None = None
        self.final = False  # the run had ended when it was last searched: nothing will change
        self.read_at = float("-inf")

    def newest(self, name: str) -> list[dict[str, Any]]:
        return [self.kept[name][k] for k in sorted(self.kept[name])]

    def update(self, exp: Experiment, summary: dict[str, Any], clock: Any = time.monotonic) -> None:
        """Search what the run recorded since the last update (at most once per
        :data:`DETAILS_MAX_AGE_S`; never again once it ended and was searched after).
        Raises :class:`~telemetry.query.QueryLimitError` when even a small range is over the limits."""
        if self.final or clock() - self.read_at < DETAILS_MAX_AGE_S:
            return
        ended = exp.wait(0)  # before the search: when ended now, the search sees every event
        last = exp.query_window(("last_n", 1))
        if last:
            last_ts = int(last[-1]["ts"])
            if self.upto_us is None:
                self._first(exp, summary, last_ts)
            else:
                self._search(exp, max(self.upto_us - DETAILS_OVERLAP_US, self.since_us or 0), last_ts)
            self.upto_us = last_ts + 1
        self.final, self.read_at = ended, clock()

    def _first(self, exp: Experiment, summary: dict[str, Any], last_ts: int) -> None:
        total, start = summary.get("events_persisted") or 0, summary.get("started_ts")
        known = isinstance(start, int) and not isinstance(start, bool) and start < last_ts
        span = None  # small (or not summarised yet): all of it
        if known and total > DETAILS_SCAN:
            span = max(1, (last_ts - start) * DETAILS_SCAN // total)
        while True:
            lo = 0 if span is None else last_ts - span
            try:
                self._search(exp, lo, last_ts)
            except QueryLimitError:  # more events there than the estimate said: a quarter of the range
                span = (span if span is not None else last_ts - start if known else 1_000_000) // 4
                if span < 1_000:  # not even a millisecond fits: the limit is the answer
                    raise
                continue
            self.since_us = None if span is None else lo
            return

    def _search(self, exp: Experiment, lo_us: int, last_ts: int) -> None:
        window = ("range", lo_us / 1e6, last_ts / 1e6 + 1.0)  # past the last event: it is in, whatever rounding
        # asked all at once: a Recorder busy taking a fast run's events answers each ask late, the
        # wait is paid once rather than once per name
        futures = {name: self.asks.submit(exp.query_window, window, {"name": name}) for name in RARE_EVENTS}
        found = {name: f.result() for name, f in futures.items()}  # a QueryLimitError is raised here
        for name, keep in RARE_EVENTS.items():
            kept = self.kept[name]
            for e in found[name]:
                kept[(int(e["ts"]), int(e["seq"]))] = {
                    k: e.get(k) for k in ("ts", "seq", "pass", "phase", "notes", "values")
                }
            for k in sorted(kept)[:-keep] if len(kept) > keep else ():
                del kept[k]
        self.found = {name: self.newest(name) for name in RARE_EVENTS}  # replaced whole: read without the lock


class DetailsCache:
    """One :class:`RunDetails` per run the Lab holds, shared by every page and request."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], RunDetails] = {}
        # a search asks the Recorder for the four names at once: a Recorder busy with a fast
        # run answers each ask late, and the wait is paid once rather than once per name
        self.asks = concurrent.futures.ThreadPoolExecutor(len(RARE_EVENTS), thread_name_prefix="dashboard-details")

    def get(self, exp: Experiment) -> RunDetails:
        with self._lock:
            live = {(e.id, e.run_id) for e in list(self.lab.experiments.values())} | {(exp.id, exp.run_id)}
            self._runs = {k: v for k, v in self._runs.items() if k in live}  # forgotten runs go
            return self._runs.setdefault((exp.id, exp.run_id), RunDetails(self.asks))

    def close(self) -> None:
        self.asks.shutdown(wait=False, cancel_futures=True)


def experiment_details(exp: Experiment, cache: DetailsCache) -> dict[str, Any]:
    """One experiment for the page's side panels: the view, the best so far, the recent hypertune
    actions and outcomes, and its passes. ``started_ts`` is the run's first event (what the page's
    times count from), ``events`` how many it persisted, ``details_since`` where the search for the
    actions and passes began (None: the run's start; see :class:`RunDetails`).

    Raises :class:`~telemetry.query.QueryLimitError` when the run cannot be searched within
    the query limits (the route answers 503 naming the limit)."""
    summary = exp.summary()
    run = cache.get(exp)
    if run.lock.acquire(timeout=DETAILS_WAIT_S):  # else another request is searching: what is kept answers
        try:
            run.update(exp, summary)
        finally:
            run.lock.release()
    found = run.found

    def feed(name: str) -> list[dict[str, Any]]:
        return [
            {"ts": e["ts"], "phase": e.get("phase"), "notes": e.get("notes"), "values": e.get("values") or {}}
            for e in found[name]
        ]

    obj = objective(exp)
    return {
        **experiment_view(exp),
        "best": best_value(summary, obj),
        "started_ts": summary.get("started_ts"),
        "events": summary.get("events_persisted"),
        "details_since": run.since_us,
        "hypertune_actions": feed("hypertune_action"),
        "hypertune_outcomes": feed("hypertune_outcome"),
        "passes": passes(found["phase_start"], found["pass_end"], obj.field if obj else None),
    }


SUBMIT_KEYS = ("spec", "toml", "set", "id")
TOML_TYPES = ("application/toml", "text/")


def submission(content_type: str, body: bytes, query: Any) -> tuple[str | dict[str, Any], list[str], str | None]:
    """A POST /api/experiments body as (spec, overrides, id): TOML text (``application/toml`` or
    ``text/*``, overrides and id from the query: ``?set=k=v&id=x``), or JSON
    ``{"spec": {...} | "toml": "...", "set": ["k=v"], "id": "..."}``. HTTPException 400 if malformed."""
    ctype = content_type.split(";")[0].strip().lower()
    allowed = ("set", "id") if ctype.startswith(TOML_TYPES) else ()
    unknown_q = sorted({k for k in query if k not in allowed})
    if unknown_q:  # a typo (?sets=) silently ignored would run the spec without its overrides
        where = "with a TOML body the query takes set and id" if allowed else 'with a JSON body "set" and "id" go in it'
        raise HTTPException(400, f"unknown query parameter(s) {', '.join(brief(k, 40) for k in unknown_q)}: {where}")
    if ctype.startswith(TOML_TYPES):
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise HTTPException(400, "the TOML body must be UTF-8") from None
        ids = query.getlist("id")
        if len(ids) > 1:  # which one was meant is anyone's guess: refused, not the last taken
            raise HTTPException(400, f"give one id in the query, not {len(ids)}")
        return text, query.getlist("set"), query.get("id")
    if ctype != "application/json":
        raise HTTPException(415, "send the spec as application/toml (or text/plain) or as application/json")
    try:
        data = strict_json(body or b"null")
    except ValueError as exc:  # json's decode error is a ValueError
        raise HTTPException(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # nested past the reader's stack (64 KiB of '{"a":'): the spec's limit, not a 500
        raise HTTPException(400, "the JSON body is nested too deep (tables nest at most 100 levels)") from None
    if not isinstance(data, dict):
        raise HTTPException(400, 'the JSON body must be an object: {"spec": {...} or "toml": "...", "set": [...]}')
    unknown = sorted(set(data) - set(SUBMIT_KEYS))
    if unknown:
        raise HTTPException(400, f"unknown key(s) {', '.join(unknown)} in the body; known: {', '.join(SUBMIT_KEYS)}")
    if ("spec" in data) == ("toml" in data):
        raise HTTPException(400, 'the body needs exactly one of "spec" (a table) or "toml" (a string)')
    spec = data.get("spec", data.get("toml"))
    if "spec" in data and not isinstance(spec, dict):
        raise HTTPException(400, f'"spec" must be a table, got {spec!r}')
    if "toml" in data and not isinstance(spec, str):
        raise HTTPException(400, f'"toml" must be a string, got {type(spec).__name__}')
    sets = data.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
        raise HTTPException(400, f'"set" must be a list of "key=value" strings, got {sets!r}')
    exp_id = data.get("id")
    if exp_id is not None and not isinstance(exp_id, str):
        raise HTTPException(400, f'"id" must be a string, got {exp_id!r}')
    return spec, sets, exp_id


def control_body(body: bytes, action: str) -> dict[str, Any]:
    """A POST /api/control/{action} body: ``{"experiment": id}``, and for ``set`` also
    ``"key"``, ``"value"`` (any JSON value the workload's control takes: integers exact,
    NaN and Infinity refused) and an optional ``"why"``. HTTPException 400 if malformed."""
    shape = '{"experiment": "<id>", "key": "<control>", "value": <JSON>, "why": "<note>"}'
    if action != "set":
        shape = '{"experiment": "<id>"}'
    try:
        data = strict_json(body or b"{}")
    except ValueError as exc:
        raise HTTPException(400, f"the body is not valid JSON ({brief(str(exc), 120)}): {shape}") from None
    except RecursionError:
        raise HTTPException(400, "the JSON body is nested too deep") from None
    if not isinstance(data, dict):
        raise HTTPException(400, f"the body must be a JSON object: {shape}")
    if action != "set":
        return data
    bad = tree_problem(data)  # first: no message below may echo what no response can carry
    if bad is not None:
        raise HTTPException(400, f"{bad[0]}: {bad[1]}")
    unknown = sorted(set(data) - set(SET_KEYS))
    if unknown:
        given = brief(", ".join(unknown), 120)
        raise HTTPException(400, f"unknown key(s) {given} in the body; known: {', '.join(SET_KEYS)}")
    key, why = data.get("key"), data.get("why", "requested over HTTP")
    if not isinstance(key, str) or not key:
        raise HTTPException(400, f'"key" must name a control (a non-empty string): {shape}')
    if "value" not in data:
        raise HTTPException(400, f'"value" is missing: {shape}')
    if not isinstance(why, str) or len(why) > MAX_WHY_CHARS:
        raise HTTPException(400, f'"why" must be a string of at most {MAX_WHY_CHARS} characters')
    return data


def _int64(text: str) -> int:
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"the integer {brief(text, 40)} does not fit in signed 64 bits")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes) -> Any:
    """A submitted JSON body, its integers kept exact: one past 64 bits is refused (a fast
    JSON reader would make it a float silently), as are NaN and Infinity (not JSON)."""
    return json.loads(body, parse_int=_int64, parse_constant=_no_constant, object_pairs_hook=_no_repeats)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: a key given twice is refused, not the last one
    taken (``{"spec": A, "spec": B}`` would run B, the sender perhaps meaning A)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"key {brief(k, 80)!r} is given twice in one object")
            seen.add(k)
    return out


HISTORY_DEFAULT = 10_000
HISTORY_MAX = 100_000  # events one history read may return
HISTORY_READS = 2  # history reads served at once; one more is a 503 with Retry-After
HISTORY_RETRY_S = 2


def history_limit(text: str) -> int:
    """The ``limit`` of a history read: an integer from 1 to :data:`HISTORY_MAX`, else a 400 naming it."""
    try:
        limit = int(text)
    except ValueError:
        limit = None
    if limit is None or not 1 <= limit <= HISTORY_MAX:
        raise HTTPException(400, f"limit must be an integer from 1 to {HISTORY_MAX:,}, got {brief(text, 40)!r}")
    return limit


def create_app(
    lab: Lab,
    token: str,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    port: int = 7878,
    service: LabService | None = None,
    sign_in: OneTimeCodes | None = None,
) -> Starlette:
    """The Starlette app, every route behind :class:`dashboard.security.Guard`; ``hosts`` are the
    names it answers to besides the loopback ones, ``port`` the port it listens on. With a
    ``service`` (the lab daemon) it takes submissions and lists the queue; ``lab`` is its Lab.
    ``sign_in`` holds the one-time codes ``POST /api/login`` trades for the token (none: the
    page can be signed in only by pasting the token)."""
    registry = CollectorRegistry()
    registry.register(_LabCollector(lab))  # type: ignore[arg-type]
    registry.register(_HostCollector())  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    sign_in = sign_in if sign_in is not None else OneTimeCodes()
    tickets = OneTimeCodes(ttl_s=TICKET_TTL_S)
    source = PushSource(lab, service)
    details = DetailsCache(lab)
    history_reads = threading.BoundedSemaphore(HISTORY_READS)

    def valid_id(kind: str, value: Any) -> str:
        try:
            return check_id(kind, value)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def find(exp_id: Any) -> Experiment:
        return lab.get(valid_id("experiment id", exp_id))  # NotFound: a 404 (lab_error)

    async def index(request: Request) -> Response:
        # the same page for everyone: it holds no data, and signs itself in (app.js) with the
        # one-time code in its URL's fragment, which the browser never sends here
        return HTMLResponse((STATIC / "index.html").read_text(), headers=PAGE_HEADERS)

    async def login(request: Request) -> Response:
        """A one-time sign-in code (``{"code": ...}``) for the token: once per code. No token
        needed (the Guard lets it through); another origin's page is refused by the Guard."""
        try:
            data = strict_json(await request.body() or b"{}")
        except (ValueError, RecursionError):
            data = None
        code = data.get("code") if isinstance(data, dict) else None
        if not isinstance(code, str):
            raise HTTPException(400, 'send {"code": "<the sign-in code>"}')
        if not sign_in.take(code):
            raise HTTPException(
                401,
                "this sign-in link was used already, or is not this dashboard's: open the link that "
                "crucible run --dashboard or crucible lab serve printed, or paste the token from "
                "<artifacts>/dashboard.token",
            )
        return _Json({"token": token}, headers={"Cache-Control": "no-store"})

    async def sign_in_link(request: Request) -> Response:
        """A fresh sign-in link (``crucible open``), for the holder of the token: the printed
        one works once, and a second browser (or one whose storage was cleared) needs another."""
        url = f"{str(request.base_url).rstrip('/')}/#code={sign_in.issue()}"  # the Host was checked
        return _Json({"url": url}, headers={"Cache-Control": "no-store"})

    async def ws_ticket(request: Request) -> Response:
        """A single-use ticket for ``/ws?ticket=``: valid TICKET_TTL_S, for the holder of the token."""
        return _Json({"ticket": tickets.issue(), "expires_s": TICKET_TTL_S}, headers={"Cache-Control": "no-store"})

    async def plotly(request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="application/javascript")

    async def static_file(request: Request) -> Response:
        name = request.url.path.rsplit("/", 1)[-1]
        return FileResponse(STATIC / name, media_type=STATIC_TYPES[name], headers={"Cache-Control": "no-cache"})

    async def experiments(request: Request) -> Response:
        if request.method == "POST":
            return await submit(request)
        exps = list(lab.experiments.values())
        views = await asyncio.to_thread(lambda: [experiment_view(e) for e in exps])
        out: dict[str, Any] = {"experiments": views}
        if service is not None:
            out["queued"] = queued_view(service, views)
            if request.query_params.get("history") == "1":  # runs of the daemon's earlier lifetimes, from disk
                # by run: an earlier (or crashed, waiting) run of an id the Lab holds is listed too
                known = {e["run_id"] for e in views}
                unrun = {e["id"] for e in out["queued"]}  # queued, or never ran: listed there already
                everything = await asyncio.to_thread(service.list)
                out["earlier"] = [
                    e for e in everything if e.get("run_id") and e["run_id"] not in known and e["id"] not in unrun
                ]
        return _Json(out)

    async def submit(request: Request) -> Response:
        if service is None:
            raise HTTPException(
                501,
                "this dashboard serves a Lab without a submission queue; submit to a lab daemon (crucible lab serve)",
            )
        spec, sets, exp_id = submission(
            request.headers.get("content-type", ""), await request.body(), request.query_params
        )
        keys = request.headers.getlist(IDEMPOTENCY_HEADER)  # a client's retry repeats it: no second experiment
        if len(keys) > 1:  # which one a retry would repeat is anyone's guess: refused, not the first taken
            raise HTTPException(400, f"send one {IDEMPOTENCY_HEADER} header, not {len(keys)}")
        key = keys[0] if keys else None
        try:
            entry = await asyncio.to_thread(service.submit, spec, sets, exp_id, key)
        except ServiceClosed as exc:
            raise HTTPException(503, str(exc)) from None
        except QueueFull as exc:  # a client's retry will not help at once: 429 Too Many Requests, with the why
            raise HTTPException(429, str(exc)) from None
        except KeyReused as exc:  # as the IETF's Idempotency-Key draft answers a key reused with another body
            raise HTTPException(422, str(exc)) from None
        except (SpecError, ValueError) as exc:  # a spec, override, id or key the CLI would refuse too
            raise HTTPException(400, str(exc)) from None
        return _Json(entry, status_code=200 if entry.get("repeated") else 201)

    async def experiment(request: Request) -> Response:
        exp = find(request.path_params["exp_id"])
        return _Json(await asyncio.to_thread(experiment_details, exp, details))

    async def live(request: Request) -> Response:
        exp = find(request.query_params.get("experiment"))

        def read() -> dict[str, Any]:  # the run's start too: the page's times count from it
            events = exp.query_window(("last_n", 200))
            return {"experiment": exp.id, "events": events, "started_ts": exp.summary().get("started_ts")}

        return _Json(await asyncio.to_thread(read))

    async def history(request: Request) -> Response:
        run_id = valid_id("run id", request.query_params.get("run_id"))
        limit = history_limit(request.query_params.get("limit", str(HISTORY_DEFAULT)))
        # the id is valid (no separator, no traversal); the run is one of the artifacts folder's own
        runs = [r for r in await asyncio.to_thread(find_runs, lab.artifacts) if r.name == run_id]
        if not runs:
            raise HTTPException(404, f"no run {run_id!r}")

        def read() -> list[dict[str, Any]]:
            out = []
            for ev in iter_run(runs[0]):
                out.append(ev)
                if len(out) >= limit:
                    break
            return out

        if not history_reads.acquire(blocking=False):  # each read holds up to 100,000 events twice
            raise HTTPException(
                503,
                f"{HISTORY_READS} history reads are under way, the most this lab serves at once; try again shortly",
                headers={"Retry-After": str(HISTORY_RETRY_S)},
            )
        try:
            try:
                events = await asyncio.to_thread(read)
            except RunFileError as exc:  # the run's own files are broken: the server's fault, said plainly
                raise HTTPException(500, str(exc)) from None
            return _Json({"run_id": run_id, "events": events})  # encoded here, while the slot is held
        finally:
            history_reads.release()

    async def control(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in CONTROLS:
            raise HTTPException(404, f"unknown control {action!r}; expected one of {', '.join(CONTROLS)}")
        body = control_body(await request.body(), action)
        exp_id = valid_id("experiment id", body.get("experiment"))
        if service is not None and action not in ("restart", "set"):  # the service knows the queue: stop cancels one
            entry = await asyncio.to_thread(getattr(service, action), exp_id)
            return _Json({"experiment": exp_id, "action": action, "status": entry["status"], "result": None})
        # a queued id on a daemon: a 409 that says it is queued, not a 404
        doing = "set a parameter" if action == "set" else "restart a pass"
        exp = find(exp_id) if service is None else service.live(exp_id, doing)
        if action == "set":  # a value the workload refuses (an unknown control, out of its range) is a 400
            why = body.get("why", "requested over HTTP")
            try:
                result = await asyncio.to_thread(exp.set_param, body["key"], body["value"], why)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
        elif action == "restart":
            result = await asyncio.to_thread(exp.restart_pass)
        else:  # a transition the experiment cannot make raises a LifecycleError: a 409 (lab_error)
            await asyncio.to_thread(getattr(exp, action))
            result = None
        return _Json({"experiment": exp.id, "action": action, "status": exp.status(), "result": result})

    async def metrics(request: Request) -> Response:
        return Response(
            await asyncio.to_thread(generate_latest, registry), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        reading = asyncio.create_task(take_client_messages(websocket))
        pushing = asyncio.create_task(push_to(websocket))
        try:
            # whichever ends first (the client left or broke the limits, or stopped reading) ends the other
            await asyncio.wait((reading, pushing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pushing.cancel()
            reading.cancel()
            await asyncio.gather(reading, pushing, return_exceptions=True)
            ended = reading.done() and not reading.cancelled() and reading.exception() is None
            refused = reading.result() if ended else None
            # one that stopped reading is aborted at once by the protocol (GuardedWebSocketProtocol), never
            # waited on; one that left makes close() raise WebSocketDisconnect: nothing left to close
            try:
                if refused is not None:
                    log.info("websocket closed: too many messages from the client", client=websocket.client)
                    await asyncio.wait_for(websocket.close(1008, refused), SEND_TIMEOUT_S)
                else:
                    await asyncio.wait_for(websocket.close(), SEND_TIMEOUT_S)
            except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
                pass

    async def push_to(websocket: WebSocket) -> None:
        """Send what changed every PUSH_INTERVAL_S until the client leaves or stops reading."""
        last_seq: dict[str, int] = {}
        try:
            while True:
                payload = await asyncio.to_thread(source.push, last_seq)
                await asyncio.wait_for(websocket.send_bytes(orjson.dumps(payload)), SEND_TIMEOUT_S)
                await asyncio.sleep(PUSH_INTERVAL_S)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            pass  # a client that left or stopped reading: dropped, the Lab carries on

    async def take_client_messages(websocket: WebSocket) -> str | None:
        """Read and drop what the client sends: the socket only pushes, but a message left unread
        pauses the protocol's reading, and then its pongs and close frame go unseen and the
        keepalive drops a client that reads every push. Returns when the client leaves (None),
        or the reason to close it when it sends more than WS_MESSAGES_PER_S (a burst of
        WS_MESSAGE_BURST); the protocol closes one that sends over WS_MAX_MESSAGE_BYTES (1009)."""
        allowance, last = float(WS_MESSAGE_BURST), time.monotonic()
        while True:
            try:
                message = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError, OSError):
                return None
            if message["type"] == "websocket.disconnect":
                return None
            now = time.monotonic()
            allowance = min(float(WS_MESSAGE_BURST), allowance + (now - last) * WS_MESSAGES_PER_S) - 1.0
            last = now
            if allowance < 0:
                return f"the dashboard takes no messages on /ws (over {WS_MESSAGES_PER_S} a second)"

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _Json({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    async def storage_error(request: Request, exc: Exception) -> Response:
        """The Lab could not write its own files (a full disk, a queue file that is a folder):
        a 503 that says so, never a bare 500; what was recorded before is untouched."""
        assert isinstance(exc, OSError)
        log.error("dashboard request failed on storage", path=request.url.path, error=str(exc))
        what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        return _Json({"error": f"the lab cannot write its files now ({what}); try again later"}, status_code=503)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        """A defect, not the client's fault: a 500 whose message names it, with the connection
        closed (the server drops it after such an error, and a client that reused it would
        report a reset rather than this answer). The traceback goes to the log."""
        log.error("dashboard request failed", path=request.url.path, error=repr(exc), exc_info=exc)
        what = brief(f"{type(exc).__name__}: {exc}", 200)
        return _Json(
            {"error": f"internal error ({what}); the lab's log has the traceback"},
            status_code=500,
            headers={"connection": "close"},
        )

    async def limit_error(request: Request, exc: Exception) -> Response:
        """A read the query limits refuse (a run too big to search that way): a 503 that names
        the limit, a one-line warning in the log, never a 500 with a traceback."""
        log.warning("dashboard read over the query limits", path=request.url.path, error=str(exc))
        return _Json({"error": f"this read is over the lab's query limits: {exc}"}, status_code=503)

    async def lab_error(request: Request, exc: Exception) -> Response:
        """The Lab refused: no such experiment (404), or a transition it cannot make now (409)."""
        assert isinstance(exc, LifecycleError)
        return _Json({"error": str(exc)}, status_code=404 if isinstance(exc, NotFound) else 409)

    routes = [
        Route("/", index),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/ws-ticket", ws_ticket, methods=["POST"]),
        Route("/api/sign-in-link", sign_in_link, methods=["POST"]),
        Route("/static/plotly.min.js", plotly),
        *(Route(f"/static/{name}", static_file) for name in STATIC_TYPES),
        Route("/api/experiments", experiments, methods=["GET", "POST"]),
        Route("/api/experiments/{exp_id}", experiment),
        Route("/api/metrics/live", live),
        Route("/api/metrics/history", history),
        Route("/api/control/{action}", control, methods=["POST"]),
        Route("/metrics", metrics),
        WebSocketRoute("/ws", ws),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            HTTPException: http_error,
            LifecycleError: lab_error,
            QueryLimitError: limit_error,
            OSError: storage_error,
            Exception: unexpected_error,  # kept by Starlette's outermost middleware, which re-raises to the server
        },
        middleware=[Middleware(Guard, hosts=hosts, port=port, token=token, tickets=tickets)],
    )
    app.router.redirect_slashes = False  # an unknown path is a 404, not a redirect to a guess
    app.state.details = details  # closed with the Dashboard
    return app


def queued_view(service: LabService, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The queue (start order, position 1 = next) and submissions that never ran."""
    known = {v["id"] for v in views}
    return [e for e in service.list(history=False) if e["id"] not in known]


SENT_KEY = "#sent"
"""The key of a socket's state (the ``last_seq`` it passes to :meth:`PushSource.push`) that holds
the read it was last pushed from; never an experiment id (ids have no ``#``)."""


class PushSource:
    """What every open page's socket pushes, read from the Lab once per :data:`PUSH_INTERVAL_S`
    for all of them: each socket then keeps only what it has not sent. A hundred open
    tabs cost one read of each live experiment per interval, not a hundred. An experiment that
    ended is read for :data:`ENDED_PUSH_S` more, so its last events reach the pages too.

    Each read is numbered; it notes in which read the list of experiments (ids and order), each
    experiment's view and the queue last changed, so a socket sends only what changed since
    the read it last pushed from: with nothing changed, a push carries neither the list nor the
    queue (a daemon's queue of a thousand submissions is 100 KB a push)."""

    def __init__(
        self, lab: Lab, service: LabService | None = None, max_age_s: float = PUSH_INTERVAL_S, clock: Any = None
    ) -> None:
        self.lab, self.service, self.max_age_s = lab, service, max_age_s
        self.clock = clock or time.monotonic
        self.reads = 0  # how many times the Lab was read (one per interval, however many sockets)
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._snapshot: dict[str, Any] = {}
        self._final: dict[str, list[dict[str, Any]]] = {}  # an ended experiment's last events, read once
        self._views: dict[str, dict[str, Any]] = {}  # the last read's views, by id
        self._changed: dict[str, int] = {}  # per id: the read in which its view last changed
        self._order: list[str] | None = None  # ids in list order (None: never read)
        self._list_at = 0  # the read in which the list's ids or order last changed
        self._queued: list[dict[str, Any]] | None = None
        self._queue_at = 0

    def snapshot(self) -> dict[str, Any]:
        """The experiments, the last 200 events of each live one and the queue, at most
        ``max_age_s`` old (read now if older: the first socket to ask pays, the others wait)."""
        with self._lock:
            if self.clock() - self._at >= self.max_age_s:
                self._snapshot = self._read()
                self._at = self.clock()
            return self._snapshot

    def _read(self) -> dict[str, Any]:
        self.reads += 1
        exps, recent = [], {}
        for exp in list(self.lab.experiments.values()):
            exps.append(experiment_view(exp))
            ended = exp.ended_at
            if exp.status() in LIVE:
                try:
                    recent[exp.id] = exp.query_window(("last_n", 200))
                except Exception:  # noqa: BLE001 - a stopping experiment: try again next push
                    recent[exp.id] = []
            elif ended is not None and exp.clock() - ended < ENDED_PUSH_S:  # read once: they change no more
                if exp.id not in self._final:
                    try:
                        self._final[exp.id] = exp.query_window(("last_n", 200))
                    except Exception:  # noqa: BLE001 - its history not readable now: nothing more to send
                        self._final[exp.id] = []
                recent[exp.id] = self._final[exp.id]
        self._final = {k: v for k, v in self._final.items() if k in recent}
        gen = self.reads
        order = [v["id"] for v in exps]
        if order != self._order:
            self._order, self._list_at = order, gen
        self._changed = {v["id"]: (gen if self._views.get(v["id"]) != v else self._changed[v["id"]]) for v in exps}
        self._views = {v["id"]: v for v in exps}
        out: dict[str, Any] = {
            "gen": gen,
            "experiments": exps,
            "recent": recent,
            "changed": self._changed,
            "list_at": self._list_at,
        }
        if self.service is not None:
            queued = queued_view(self.service, exps)
            if queued != self._queued:
                self._queued, self._queue_at = queued, gen
            out["queued"], out["queue_at"] = self._queued, self._queue_at
        return out

    def push(self, last_seq: dict[str, int]) -> dict[str, Any]:
        """One socket's batched push: what changed since that socket's last push. ``last_seq``
        is the socket's state, empty at first: per experiment id the last event seq sent, and
        under :data:`SENT_KEY` the read it last pushed from.

        The push holds ``events`` (per experiment, those not sent yet), ``experiments`` (the whole
        list: in the first push and whenever one is added, removed or moved) or else ``updated``
        (the experiments whose view changed; left out when none did), and on a daemon
        ``queued`` (the whole queue, when it changed).

        ``last_seq`` keeps only the Lab's experiments: an id the Lab forgot (see
        :meth:`Lab.forget`) leaves it, so a page left open does not grow with every
        experiment the daemon ever ran."""
        snap = self.snapshot()
        sent = last_seq.get(SENT_KEY, 0)  # reads are numbered from 1: 0 has seen nothing
        events: dict[str, list[dict[str, Any]]] = {}
        for exp_id, recent in snap["recent"].items():
            new = [e for e in recent if e["seq"] > last_seq.get(exp_id, -1)]
            if new:
                last_seq[exp_id] = new[-1]["seq"]
                events[exp_id] = new
        for gone in last_seq.keys() - {e["id"] for e in snap["experiments"]} - {SENT_KEY}:  # a page open for months
            del last_seq[gone]
        out: dict[str, Any] = {"events": events}
        if snap["list_at"] > sent:
            out["experiments"] = snap["experiments"]
        else:
            updated = [v for v in snap["experiments"] if snap["changed"][v["id"]] > sent]
            if updated:
                out["updated"] = updated
        if "queued" in snap and snap["queue_at"] > sent:
            out["queued"] = snap["queued"]
        last_seq[SENT_KEY] = snap["gen"]
        return out


class Dashboard:
    """Serves the app for ``lab`` with uvicorn on a daemon thread, from construction to :meth:`stop`;
    ``lab`` may be a :class:`~experiments.service.LabService` (the lab daemon): then it takes submissions.

    ``url``, ``token`` and ``token_file`` say where and how to reach it, and
    :meth:`new_sign_in_url` gives a link that opens the page signed in. ``port`` None means
    ``CRUCIBLE_DASH_PORT``, else 7878; 0 means any free port.

    Raises:
        OSError: the address cannot be listened on (taken, or not allowed); the message says which.
    """

    def __init__(self, lab: Lab | LabService, host: str = "127.0.0.1", port: int | None = None) -> None:
        service = lab if isinstance(lab, LabService) else None
        lab = lab.lab if isinstance(lab, LabService) else lab

        if port is None:
            port = int(os.environ.get("CRUCIBLE_DASH_PORT", "7878"))
        self.token_file = lab.artifacts / TOKEN_FILE
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))  # port 0: any free port; the URL says which
            sock.listen(2048)  # connections queue from now on: the URL works as soon as it is known
        except OSError as exc:
            sock.close()
            raise OSError(f"dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        # only once the port is ours: a dashboard that cannot listen leaves the running one's token file alone.
        # A lab daemon keeps its token across restarts (its clients hold it); a plain Lab gets a new one,
        # unless another dashboard serves the same folder now: then both take the file's (TokenClaim)
        try:
            self._claim = TokenClaim(self.token_file, keep=service is not None)
        except OSError:
            sock.close()
            raise
        try:
            self._start(lab, service, host, sock, family)
        except BaseException:
            self._claim.release()  # held, it would make the next dashboard on the folder share a dead one's token
            sock.close()
            raise
        log.info("dashboard listening", url=self.url, token_file=str(self.token_file))

    def _start(self, lab: Lab, service: LabService | None, host: str, sock: socket.socket, family: int) -> None:
        """Serve the app on the bound ``sock`` from a daemon thread."""
        import uvicorn

        self.token = self._claim.token
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{f'[{self.host}]' if family == socket.AF_INET6 else self.host}:{self.port}/"
        self._sign_in = OneTimeCodes()
        app = create_app(lab, self.token, (host, self.host), self.port, service, self._sign_in)
        self._details: DetailsCache = app.state.details
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            http=GuardedH11Protocol,
            ws=GuardedWebSocketProtocol,
            ws_max_size=WS_MAX_MESSAGE_BYTES,
        )
        self.server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True
        )
        self._thread.start()

    def new_sign_in_url(self) -> str:
        """A link that opens the page signed in, once: ``URL#code=<one-time code>``.

        The code is in the fragment, which the browser never sends to a server; the page trades
        it for the token (kept in its origin's localStorage) and takes it out of the address
        bar. The browser's history keeps the link, by then spent, never the token. Each call
        gives a new code; the oldest unused ones are forgotten past 64."""
        return f"{self.url}#code={self._sign_in.issue()}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._details.close()
        self._claim.release()
