"""The live web dashboard: Starlette + uvicorn beside a Lab, in its process.

The dashboard is a client of the Lab's public API (experiments, their reads and their
lifecycle calls); the Lab knows nothing of it. Whoever wants one starts it on a Lab:
``Dashboard(lab, host, port)`` (``crucible run --dashboard`` does), and stops it.

Routes: ``GET /`` (the page; ``/?token=`` trades the token for a cookie and redirects to
``/``), ``GET /static/...`` (the page's script and icon, and plotly.min.js served from the
installed plotly package: no CDN, works offline), ``GET /api/experiments``,
``GET /api/experiments/{id}`` (with the best so far, hypertune actions and outcomes, pass
ends), ``GET /api/metrics/live?experiment=`` (last 200 events),
``GET /api/metrics/history?run_id=`` (ids validated: 400 on a bad id, 404 on an unknown
one; the run is found with :func:`telemetry.rundir.find_runs`),
``POST /api/control/{pause,resume,restart,stop}`` (409 with the reason when the
experiment cannot do it), ``POST /api/control/set`` (a control's new value: 400 when the
workload refuses it), ``POST /api/experiments`` (a submission, when the dashboard serves
a :class:`~experiments.service.LabService`: 201 with the id; 400 naming the bad key; 501
on a plain Lab), ``WS /ws`` (batched pushes, at most 10 per second; a client that
stops reading is dropped), and ``GET /metrics`` (Prometheus text via prometheus_client).

Everything but the page's static files needs the token; Host, Origin and body size are
checked first (see :mod:`dashboard.security`). Errors are JSON ``{"error": "..."}`` with a
4xx status: routes raise :class:`HTTPException` for a bad request, and one handler turns the
Lab's lifecycle errors into 409 (404 for :class:`~experiments.lab.NotFound`).

The dashboard names no workload's field: every experiment's JSON carries its workload's
declared objective (``{"field", "direction", "label", "progress"}``, from
:func:`experiments.workloads.objective_of`), and the page, the best so far and the
Prometheus gauges ``crucible_objective_best`` / ``crucible_objective_progress`` read it. The server binds
127.0.0.1 by default. The token is generated per dashboard, written to
``<artifacts>/dashboard.token`` with mode 0600, and logged with the URL.
"""

from __future__ import annotations

import asyncio
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
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from actors.log import get_logger
from actors.runtime import collector
from dashboard.security import (
    Guard,
    cookie_name,
    kept_token,
    new_token,
    presented_token,
    token_matches,
    write_token_file,
)
from dashboard.transport import GuardedH11Protocol
from experiments.lab import Experiment, Lab, LifecycleError, NotFound
from experiments.service import KeyReused, LabService, ServiceClosed
from experiments.spec import SpecError
from experiments.validate import IDEMPOTENCY_HEADER, brief, tree_problem
from experiments.workloads import Objective, objective_of
from telemetry.jsonl import RunFileError, iter_run
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
NEEDS_TOKEN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>crucible dashboard</title></head>
<body><h1>crucible dashboard</h1><p>{why}</p>
<p>Open the URL that <code>crucible run --dashboard</code> prints (it ends in <code>?token=...</code>),
or add <code>?token=</code> followed by the contents of <code>&lt;artifacts&gt;/dashboard.token</code>.</p>
</body></html>"""


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


def experiment_details(exp: Experiment) -> dict[str, Any]:
    """One experiment for the page's side panels: the view, the best so far, the recent hypertune
    actions and outcomes, and its passes."""

    def recent(name: str, n: int = 50) -> list[dict[str, Any]]:
        return exp.query_window(("last_n", n), {"name": name})

    def feed(name: str) -> list[dict[str, Any]]:
        return [
            {"ts": e["ts"], "phase": e.get("phase"), "notes": e.get("notes"), "values": e.get("values") or {}}
            for e in recent(name)
        ]

    obj = objective(exp)
    return {
        **experiment_view(exp),
        "best": best_value(exp.summary(), obj),
        "hypertune_actions": feed("hypertune_action"),
        "hypertune_outcomes": feed("hypertune_outcome"),
        "passes": passes(recent("phase_start", 200), recent("pass_end", 200), obj.field if obj else None),
    }


SUBMIT_KEYS = ("spec", "toml", "set", "id")
TOML_TYPES = ("application/toml", "text/")


def submission(content_type: str, body: bytes, query: Any) -> tuple[str | dict[str, Any], list[str], str | None]:
    """A POST /api/experiments body as (spec, overrides, id): TOML text (``application/toml`` or
    ``text/*``, overrides and id from the query: ``?set=k=v&id=x``), or JSON
    ``{"spec": {...} | "toml": "...", "set": ["k=v"], "id": "..."}``. HTTPException 400 if malformed."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype.startswith(TOML_TYPES):
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise HTTPException(400, "the TOML body must be UTF-8") from None
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
    return json.loads(body, parse_int=_int64, parse_constant=_no_constant)


def create_app(
    lab: Lab,
    token: str,
    hosts: tuple[str, ...] = ("127.0.0.1",),
    port: int = 7878,
    service: LabService | None = None,
) -> Starlette:
    """The Starlette app, every route behind :class:`dashboard.security.Guard`; ``hosts`` are the
    names it answers to besides the loopback ones, ``port`` the port it listens on. With a
    ``service`` (the lab daemon) it takes submissions and lists the queue; ``lab`` is its Lab."""
    registry = CollectorRegistry()
    registry.register(_LabCollector(lab))  # type: ignore[arg-type]
    registry.register(_HostCollector())  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    cookie = cookie_name(port)
    source = PushSource(lab, service)

    def valid_id(kind: str, value: Any) -> str:
        try:
            return check_id(kind, value)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    def find(exp_id: Any) -> Experiment:
        return lab.get(valid_id("experiment id", exp_id))  # NotFound: a 404 (lab_error)

    async def index(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:  # the first load: trade the URL's token for a cookie, drop it from the URL
            if not token_matches(given, token):
                return HTMLResponse(
                    NEEDS_TOKEN.format(why="The token in this URL is not this dashboard's."),
                    status_code=401,
                    headers=PAGE_HEADERS,
                )
            resp = RedirectResponse("/", status_code=303, headers=PAGE_HEADERS)
            resp.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
            return resp
        if not token_matches(presented_token(request.headers, cookie), token):
            return HTMLResponse(
                NEEDS_TOKEN.format(why="This page needs the dashboard token."), status_code=401, headers=PAGE_HEADERS
            )
        return HTMLResponse((STATIC / "index.html").read_text(), headers=PAGE_HEADERS)

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
                known = {e["id"] for e in views + out["queued"]}
                everything = await asyncio.to_thread(service.list)
                out["earlier"] = [e for e in everything if e["id"] not in known]
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
        except KeyReused as exc:  # as the IETF's Idempotency-Key draft answers a key reused with another body
            raise HTTPException(422, str(exc)) from None
        except (SpecError, ValueError) as exc:  # a spec, override, id or key the CLI would refuse too
            raise HTTPException(400, str(exc)) from None
        return _Json(entry, status_code=200 if entry.get("repeated") else 201)

    async def experiment(request: Request) -> Response:
        exp = find(request.path_params["exp_id"])
        return _Json(await asyncio.to_thread(experiment_details, exp))

    async def live(request: Request) -> Response:
        exp = find(request.query_params.get("experiment"))
        events = await asyncio.to_thread(exp.query_window, ("last_n", 200))
        return _Json({"experiment": exp.id, "events": events})

    async def history(request: Request) -> Response:
        run_id = valid_id("run id", request.query_params.get("run_id"))
        try:
            limit = max(1, min(100_000, int(request.query_params.get("limit", "10000"))))
        except ValueError:
            raise HTTPException(400, "limit must be an integer") from None
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

        try:
            events = await asyncio.to_thread(read)
        except RunFileError as exc:  # the run's own files are broken: the server's fault, said plainly
            raise HTTPException(500, str(exc)) from None
        return _Json({"run_id": run_id, "events": events})

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
        last_seq: dict[str, int] = {}
        try:
            while True:
                payload = await asyncio.to_thread(source.push, last_seq)
                await asyncio.wait_for(websocket.send_bytes(orjson.dumps(payload)), SEND_TIMEOUT_S)
                await asyncio.sleep(PUSH_INTERVAL_S)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            pass  # a client that left or stopped reading: dropped, the Lab carries on
        finally:
            try:
                await websocket.close()
            except (RuntimeError, OSError):
                pass

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

    async def lab_error(request: Request, exc: Exception) -> Response:
        """The Lab refused: no such experiment (404), or a transition it cannot make now (409)."""
        assert isinstance(exc, LifecycleError)
        return _Json({"error": str(exc)}, status_code=404 if isinstance(exc, NotFound) else 409)

    routes = [
        Route("/", index),
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
            OSError: storage_error,
            Exception: unexpected_error,  # kept by Starlette's outermost middleware, which re-raises to the server
        },
        middleware=[Middleware(Guard, hosts=hosts, port=port, token=token)],
    )
    app.router.redirect_slashes = False  # an unknown path is a 404, not a redirect to a guess
    return app


def queued_view(service: LabService, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The queue (start order, position 1 = next) and submissions that never ran."""
    known = {v["id"] for v in views}
    return [e for e in service.list(history=False) if e["id"] not in known]


class PushSource:
    """What every open page's socket pushes, read from the Lab once per :data:`PUSH_INTERVAL_S`
    for all of them: each socket then keeps only the events it has not sent. A hundred open
    tabs cost one read of each live experiment per interval, not a hundred. An experiment that
    ended is read for :data:`ENDED_PUSH_S` more, so its last events reach the pages too."""

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
        out: dict[str, Any] = {"experiments": exps, "recent": recent}
        if self.service is not None:
            out["queued"] = queued_view(self.service, exps)
        return out

    def push(self, last_seq: dict[str, int]) -> dict[str, Any]:
        """One socket's batched push: every experiment's state, its events since that socket's
        last push (``last_seq``, per experiment id) and the queue.

        ``last_seq`` keeps only the Lab's experiments: an id the Lab forgot (see
        :meth:`Lab.forget`) leaves it, so a page left open does not grow with every
        experiment the daemon ever ran."""
        snap = self.snapshot()
        events: dict[str, list[dict[str, Any]]] = {}
        for exp_id, recent in snap["recent"].items():
            new = [e for e in recent if e["seq"] > last_seq.get(exp_id, -1)]
            if new:
                last_seq[exp_id] = new[-1]["seq"]
                events[exp_id] = new
        for gone in last_seq.keys() - {e["id"] for e in snap["experiments"]}:  # a page open for months
            del last_seq[gone]
        out: dict[str, Any] = {"experiments": snap["experiments"], "events": events}
        if "queued" in snap:
            out["queued"] = snap["queued"]
        return out


class Dashboard:
    """Serves the app for ``lab`` with uvicorn on a daemon thread, from construction to :meth:`stop`;
    ``lab`` may be a :class:`~experiments.service.LabService` (the lab daemon): then it takes submissions.

    ``url``, ``token`` and ``token_file`` say where and how to reach it. ``port`` None means
    ``CRUCIBLE_DASH_PORT``, else 7878; 0 means any free port.

    Raises:
        OSError: the address cannot be listened on (taken, or not allowed); the message says which.
    """

    def __init__(self, lab: Lab | LabService, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        service = lab if isinstance(lab, LabService) else None
        lab = lab.lab if isinstance(lab, LabService) else lab

        if port is None:
            port = int(os.environ.get("CRUCIBLE_DASH_PORT", "7878"))
        self.token_file = lab.artifacts / TOKEN_FILE
        # a lab daemon keeps its token across restarts (its clients hold it); a plain Lab gets a new one
        kept = kept_token(self.token_file) if service is not None else None
        self.token = kept or new_token()
        write_token_file(self.token_file, self.token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))  # port 0: any free port; the URL says which
            sock.listen(2048)  # connections queue from now on: the URL works as soon as it is known
        except OSError as exc:
            sock.close()
            raise OSError(f"dashboard cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{f'[{self.host}]' if family == socket.AF_INET6 else self.host}:{self.port}/"
        app = create_app(lab, self.token, (host, self.host), self.port, service)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", ws_ping_interval=None, http=GuardedH11Protocol
        )
        self.server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True
        )
        self._thread.start()
        log.info("dashboard listening", url=self.url, token_file=str(self.token_file))

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
