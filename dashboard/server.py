"""The live web dashboard: Starlette + uvicorn inside the Lab's process.

Routes: ``GET /`` (the page), ``GET /static/plotly.min.js`` (served from the installed
plotly package: no CDN, works offline), ``GET /api/experiments``,
``GET /api/experiments/{id}``, ``GET /api/metrics/live?experiment=`` (last 200 events),
``GET /api/metrics/history?run_id=`` (ids validated: 400 on a bad id, 404 on an unknown
one), ``POST /api/control/{pause,resume,restart,stop}`` (``Authorization: Bearer <token>``;
401 without it, 409 with the reason when the experiment cannot do it), ``WS /ws`` (batched
pushes, at most 10 per second; a client that stops reading is dropped), and ``GET /metrics``
(Prometheus text via prometheus_client).

The server binds 127.0.0.1 by default. The control token is generated per Lab, written to
``<artifacts>/dashboard.token`` with mode 0600, and logged with the URL.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from actors.log import get_logger
from actors.recorder import summary_best
from telemetry.jsonl import iter_run
from telemetry.schema import check_id

log = get_logger("dashboard")

STATIC = Path(__file__).parent / "static"
CONTROLS = ("pause", "resume", "restart", "stop")
PUSH_INTERVAL_S = 0.1  # at most 10 pushes a second
SEND_TIMEOUT_S = 2.0  # a client that does not take a push in this time is dropped


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _error(status: int, message: str) -> _Json:
    return _Json({"error": message}, status_code=status)


class _LabCollector:
    """Prometheus metrics read from the Lab at scrape time."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab

    def collect(self) -> Any:
        fams = {
            "events": GaugeMetricFamily("crucible_events_persisted", "Events persisted", labels=["experiment"]),
            "emitted": GaugeMetricFamily("crucible_events_emitted", "Events emitted", labels=["experiment"]),
            "drops": GaugeMetricFamily("crucible_events_dropped", "Events dropped (overflow, transit, sampling)",
                                       labels=["experiment"]),
            "restarts": GaugeMetricFamily("crucible_restarts", "Child restarts in the experiment tree",
                                          labels=["experiment"]),
            "best": GaugeMetricFamily("crucible_best_chromatic_number", "Best colour count so far",
                                      labels=["experiment"]),
            "conflicts": GaugeMetricFamily("crucible_conflicts", "Conflicts in the latest step", labels=["experiment"]),
            "running": GaugeMetricFamily("crucible_running", "1 while running, 0.5 paused, 0 stopped",
                                         labels=["experiment"]),
        }
        for exp in list(self.lab.experiments.values()):
            s = exp.summary()
            lbl = [exp.id]
            fams["events"].add_metric(lbl, float(s.get("events_persisted") or 0))
            fams["emitted"].add_metric(lbl, float(s.get("events_emitted") or 0))
            fams["drops"].add_metric(lbl, float(s.get("events_dropped") or 0))
            fams["restarts"].add_metric(lbl, float(sum((s.get("restarts") or {}).values())))
            best = summary_best(s, "chromatic_number")
            if best is not None:
                fams["best"].add_metric(lbl, float(best))
            lasts = [p.get("last", {}).get("conflicts") for p in (s.get("phases") or {}).values()]
            lasts = [x for x in lasts if isinstance(x, (int, float))]
            if lasts:
                fams["conflicts"].add_metric(lbl, float(lasts[-1]))
            fams["running"].add_metric(lbl, {"running": 1.0, "paused": 0.5}.get(exp.status(), 0.0))
        yield from fams.values()


def experiment_view(exp: Any) -> dict[str, Any]:
    st = exp.phase_status() if exp.status() in ("running", "paused") else {}
    return {"id": exp.id, "run_id": exp.run_id, "status": exp.status(), "reason": exp.reason,
            "workload": exp.spec["workload"]["name"], "params": st.get("params", {}), "steps": st.get("steps"),
            "active_s": st.get("active_s"), "durations": exp.durations()}


def create_app(lab: Any, token: str) -> Starlette:
    registry = CollectorRegistry()
    registry.register(_LabCollector(lab))  # type: ignore[arg-type]

    def find(request: Request, key: str = "experiment") -> Any:
        exp_id = request.query_params.get(key) or request.path_params.get("exp_id")
        try:
            check_id("experiment id", exp_id)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            return lab.get(exp_id)
        except KeyError:
            return _error(404, f"no experiment {exp_id!r}")

    async def index(request: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_text())

    async def plotly(request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="application/javascript")

    async def experiments(request: Request) -> Response:
        exps = list(lab.experiments.values())
        return _Json({"experiments": await asyncio.to_thread(lambda: [experiment_view(e) for e in exps])})

    async def experiment(request: Request) -> Response:
        exp = find(request)
        if isinstance(exp, Response):
            return exp
        view = await asyncio.to_thread(experiment_view, exp)
        actions = await asyncio.to_thread(exp.query_window, ("last_n", 50), {"name": "hypertune_action"})
        return _Json({**view, "hypertune_actions": [{"ts": a["ts"], "notes": a["notes"]} for a in actions]})

    async def live(request: Request) -> Response:
        exp = find(request)
        if isinstance(exp, Response):
            return exp
        events = await asyncio.to_thread(exp.query_window, ("last_n", 200))
        return _Json({"experiment": exp.id, "events": events})

    async def history(request: Request) -> Response:
        run_id = request.query_params.get("run_id")
        try:
            check_id("run id", run_id)
        except ValueError as exc:
            return _error(400, str(exc))
        runs = [p.parent for p in lab.artifacts.glob(f"*/{run_id}/events.jsonl")]
        if not runs:
            return _error(404, f"no run {run_id!r}")
        try:
            limit = max(1, min(100_000, int(request.query_params.get("limit", "10000"))))
        except ValueError:
            return _error(400, "limit must be an integer")

        def read() -> list[dict[str, Any]]:
            out = []
            for ev in iter_run(runs[0]):
                out.append(ev)
                if len(out) >= limit:
                    break
            return out
        return _Json({"run_id": run_id, "events": await asyncio.to_thread(read)})

    async def control(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not hmac.compare_digest(auth[7:].encode(), token.encode()):
            return _error(401, "control needs 'Authorization: Bearer <token>' (see dashboard.token)")
        action = request.path_params["action"]
        if action not in CONTROLS:
            return _error(404, f"unknown control {action!r}; expected one of {', '.join(CONTROLS)}")
        try:
            body = orjson.loads(await request.body() or b"{}")
        except orjson.JSONDecodeError:
            return _error(400, "the body must be JSON: {\"experiment\": \"<id>\"}")
        exp_id = body.get("experiment") if isinstance(body, dict) else None
        try:
            check_id("experiment id", exp_id)
            exp = lab.get(exp_id)
        except ValueError as exc:
            return _error(400, str(exc))
        except KeyError:
            return _error(404, f"no experiment {exp_id!r}")
        from experiments.lab import LifecycleError

        try:
            if action == "restart":
                result = await asyncio.to_thread(exp.restart_pass)
            else:
                await asyncio.to_thread(getattr(exp, action))
                result = None
        except LifecycleError as exc:
            return _error(409, str(exc))
        return _Json({"experiment": exp.id, "action": action, "status": exp.status(), "result": result})

    async def metrics(request: Request) -> Response:
        return Response(await asyncio.to_thread(generate_latest, registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        last_seq: dict[str, int] = {}
        try:
            while True:
                payload = await asyncio.to_thread(_push, lab, last_seq)
                await asyncio.wait_for(websocket.send_bytes(orjson.dumps(payload)), SEND_TIMEOUT_S)
                await asyncio.sleep(PUSH_INTERVAL_S)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            pass  # a client that left or stopped reading: dropped, the Lab carries on
        finally:
            try:
                await websocket.close()
            except (RuntimeError, OSError):
                pass

    return Starlette(routes=[
        Route("/", index), Route("/static/plotly.min.js", plotly), Route("/api/experiments", experiments),
        Route("/api/experiments/{exp_id}", experiment), Route("/api/metrics/live", live),
        Route("/api/metrics/history", history), Route("/api/control/{action}", control, methods=["POST"]),
        Route("/metrics", metrics), WebSocketRoute("/ws", ws),
    ])


def _push(lab: Any, last_seq: dict[str, int]) -> dict[str, Any]:
    """One batched push: every experiment's state and its events since the last push."""
    exps = []
    events: dict[str, list[dict[str, Any]]] = {}
    for exp in list(lab.experiments.values()):
        exps.append(experiment_view(exp))
        if exp.status() in ("running", "paused"):
            try:
                recent = exp.query_window(("last_n", 200))
            except Exception:  # noqa: BLE001 - a stopping experiment: try again next push
                recent = []
            new = [e for e in recent if e["seq"] > last_seq.get(exp.id, -1)]
            if new:
                last_seq[exp.id] = new[-1]["seq"]
                events[exp.id] = new
    return {"experiments": exps, "events": events}


class Dashboard:
    """Runs the app with uvicorn on a daemon thread; ``url`` and ``token`` once started."""

    def __init__(self, lab: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        import uvicorn

        if port is None:
            port = int(os.environ.get("CRUCIBLE_DASH_PORT", "7878"))
        self.token = secrets.token_urlsafe(24)
        token_file = lab.artifacts / "dashboard.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token + "\n")
        os.chmod(token_file, 0o600)
        self.token_file = token_file
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # port 0: any free port; the URL says which
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}/"
        config = uvicorn.Config(create_app(lab, self.token), log_level="warning", lifespan="off", ws_ping_interval=None)
        self.server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="dashboard",
                                        daemon=True)
        self._thread.start()
        log.info("dashboard listening", url=self.url, token_file=str(token_file))

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
