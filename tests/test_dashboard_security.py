"""Who may talk to the dashboard: a real uvicorn server on a free port, real HTTP and WebSocket
clients sending what a hostile page or a DNS-rebinding attack would send."""

import os
import socket
import stat
import time
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from dashboard.security import MAX_BODY, cookie_name
from dashboard.server import Dashboard
from dashboard.transport import GuardedH11Protocol
from supervisor import Lab

# tabu only, with no end but its time budget: it outlasts the module
SPEC = {
    "name": "sec",
    "time_budget_s": 600,
    "workload": {
        "name": "coloring",
        "params": {
            "graph": {"generator": "gnp", "n": 80, "p": 0.5, "seed": 3},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 1000, "max_iters_per_k": 10**12},  # ends by its budget only
        },
    },
}
DATA_ROUTES = [
    "/api/experiments",
    "/api/experiments/sec",
    "/api/metrics/live?experiment=sec",
    "/api/metrics/history?run_id={run_id}",
    "/metrics",
]
DOCUMENTED = {200, 303, 400, 401, 403, 404, 405, 409, 413, 501}  # 501: a submission to a plain Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("dash-sec") / "art")
    lab.start_experiment(SPEC)
    yield lab
    lab.shutdown()


@pytest.fixture(scope="module")
def dash(lab):
    dash = Dashboard(lab, port=0)
    yield dash
    dash.stop()


@pytest.fixture(scope="module")
def origin(dash):
    return f"http://127.0.0.1:{dash.port}"


def bare(dash, **kw):
    """A client with no credentials and no redirects followed."""
    return httpx.Client(base_url=dash.url, timeout=30, follow_redirects=False, **kw)


def bearer(dash):
    return {"Authorization": f"Bearer {dash.token}"}


def routes(lab):
    run_id = lab.get("sec").run_id
    return [r.format(run_id=run_id) for r in DATA_ROUTES]


def assert_still_running(lab, dash):
    exp = lab.get("sec")
    assert exp.status() == "running"
    before = exp.phase_status()["steps"]
    with bare(dash, headers=bearer(dash)) as c:
        assert c.get("/api/experiments").status_code == 200
        for _ in range(100):  # the phase keeps stepping: read until the count moves (bounded)
            if c.get("/api/experiments/sec").json()["steps"] > before:
                return
    raise AssertionError("the experiment stopped making progress")


# --- Host (DNS rebinding) ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:{port}",
        "evil.example",
        "127.0.0.1:1",
        "localhost",
        "127.0.0.1.nip.io:{port}",
        "127.0.0.1.evil.example:{port}",
        "0.0.0.0:{port}",
    ],
)
def test_a_host_that_is_not_this_server_is_refused_everywhere(lab, dash, host):
    host = host.format(port=dash.port)
    with bare(dash, headers={**bearer(dash), "Host": host}) as c:
        for path in ["/", "/static/app.js", "/static/plotly.min.js", *routes(lab)]:
            r = c.get(path)
            assert r.status_code == 400, (path, r.status_code)
            assert "Host" in r.json()["error"]
        r = c.post("/api/control/pause", json={"experiment": "sec"})
        assert r.status_code == 400
    sock = socket.create_connection((dash.host, dash.port), timeout=10)
    with pytest.raises(InvalidStatus) as exc:  # the rebinding page's WebSocket: its own name in Host
        connect(f"ws://{host}/ws", sock=sock, additional_headers=bearer(dash))
    assert exc.value.response.status_code == 403
    assert lab.get("sec").status() == "running"


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "LocalHost", "[::1]"])
def test_the_loopback_names_with_the_port_are_served(lab, dash, name):
    with bare(dash, headers={**bearer(dash), "Host": f"{name}:{dash.port}"}) as c:
        assert c.get("/api/experiments").status_code == 200


def test_a_refusal_quotes_a_huge_header_cut_short(lab, dash):
    """A 60 KiB Host or Origin is not echoed back (nor logged) whole."""
    huge = "h" * 60_000
    with bare(dash, headers={**bearer(dash), "Host": huge}) as c:
        r = c.get("/api/experiments")
    assert r.status_code == 400 and len(r.text) < 1000 and "60,000 characters" in r.json()["error"]
    with bare(dash, headers={**bearer(dash), "Origin": "http://" + huge}) as c:
        r = c.post("/api/control/pause", json={"experiment": "sec"})
    assert r.status_code == 403 and len(r.text) < 1000 and "60,007 characters" in r.json()["error"]
    assert_still_running(lab, dash)


def test_a_client_that_leaves_mid_body_sends_no_request(lab, dash):
    """A complete-looking JSON prefix of a longer declared body is not half a request: the
    pause it spells is never taken."""
    pause = b'{"experiment": "sec"}'
    with socket.create_connection((dash.host, dash.port), timeout=10) as s:
        s.sendall(
            f"POST /api/control/pause HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n"
            f"Authorization: Bearer {dash.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(pause) + 50}\r\n\r\n".encode()
            + pause
        )
    assert_still_running(lab, dash)  # several requests later: the dropped one would have been served by now


def test_a_request_without_a_host_is_refused(lab, dash):
    with socket.create_connection((dash.host, dash.port), timeout=10) as s:
        s.sendall(f"GET /api/experiments HTTP/1.0\r\nAuthorization: Bearer {dash.token}\r\n\r\n".encode())
        head = s.recv(64)
    assert head.startswith(b"HTTP/1.1 400")


# --- the token ------------------------------------------------------------------------------------------------


def test_reads_need_the_token_as_much_as_controls(lab, dash):
    paths = routes(lab)
    with bare(dash) as c:
        for path in paths:
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert c.get(path, headers={"Cookie": f"{cookie_name(dash.port)}=wrong"}).status_code == 401, path
            assert c.get(path, params={"token": dash.token}).status_code == 401, path  # not in URLs
        page = c.get("/")
        assert page.status_code == 401 and "sec" not in page.text and "?token=" in page.text
        for path in ["/static/plotly.min.js", "/static/app.js", "/static/favicon.svg"]:
            assert c.get(path).status_code == 200, path  # the page's own files hold no data
    with bare(dash, headers=bearer(dash)) as c:
        for path in paths:
            assert c.get(path).status_code == 200, path
    with bare(dash, cookies={cookie_name(dash.port): dash.token}) as c:
        for path in paths:
            assert c.get(path).status_code == 200, path


def test_the_first_load_trades_the_url_token_for_a_strict_http_only_cookie(lab, dash):
    name = cookie_name(dash.port)
    with bare(dash) as c:
        wrong = c.get("/", params={"token": "wrong"})
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        r = c.get("/", params={"token": dash.token})
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{name}={dash.token};")
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attrs
        page = c.get("/")  # the client kept the cookie: the clean URL now serves the page
        assert page.status_code == 200 and dash.token not in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp


def test_controls_take_the_cookie_but_not_from_another_origin(lab, dash, origin):
    cookies = {cookie_name(dash.port): dash.token}
    body = {"experiment": "ghost"}  # a valid request that changes nothing: 404 once past the checks
    with bare(dash, cookies=cookies) as c:
        assert c.post("/api/control/stop", json=body, headers={"Origin": origin}).status_code == 404
        for other in [
            "http://localhost:1",
            "http://evil.example",
            "null",
            f"https://127.0.0.1:{dash.port}",
            f"http://localhost:{dash.port}",
        ]:
            r = c.post("/api/control/stop", json={"experiment": "sec"}, headers={"Origin": other})
            assert r.status_code == 403, other
            assert c.get("/api/experiments", headers={"Origin": other}).status_code == 403, other
    assert lab.get("sec").status() == "running"


# --- the WebSocket --------------------------------------------------------------------------------------------


def ws_url(dash):
    return dash.url.replace("http://", "ws://") + "ws"


@pytest.mark.parametrize(
    "origin_value",
    ["http://evil.example", "null", "http://localhost:1", "http://127.0.0.1:{port}.evil.example", "file://"],
)
def test_the_websocket_refuses_other_origins(lab, dash, origin_value):
    with pytest.raises(InvalidStatus) as exc:
        connect(
            ws_url(dash),
            origin=origin_value.format(port=dash.port),  # type: ignore[arg-type]
            additional_headers=bearer(dash),
        )
    assert exc.value.response.status_code == 403


def test_the_websocket_needs_the_token(lab, dash, origin):
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Cookie": f"{cookie_name(dash.port)}=wrong"}]:
        with pytest.raises(InvalidStatus) as exc:
            connect(ws_url(dash), origin=origin, additional_headers=headers)  # type: ignore[arg-type]
        assert exc.value.response.status_code == 403
    cookie = {"Cookie": f"{cookie_name(dash.port)}={dash.token}"}
    with connect(ws_url(dash), origin=origin, additional_headers=cookie) as ws:  # type: ignore[arg-type]
        assert orjson.loads(ws.recv(timeout=30))["experiments"][0]["id"] == "sec"
    with connect(ws_url(dash), additional_headers=bearer(dash)) as ws:  # a script: no Origin, the bearer token
        assert orjson.loads(ws.recv(timeout=30))["experiments"][0]["id"] == "sec"


# --- connections ----------------------------------------------------------------------------------------------


def _closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (EOF or reset); False if it kept the connection 30 s."""
    sock.settimeout(30)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_flood_of_idle_connections_is_shed_and_the_server_still_answers(lab, dash, monkeypatch):
    """No token needed to open sockets: surplus connections are closed as accepted and ones
    whose headers trickle in are closed after the header timeout (no file descriptors pile up),
    a kept-alive connection gets the same time for its next request, and a websocket is not
    timed."""
    monkeypatch.setattr(GuardedH11Protocol, "max_connections", 8)
    monkeypatch.setattr(GuardedH11Protocol, "header_timeout_s", 1.0)
    head = f"GET /api/experiments HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n"
    with connect(ws_url(dash), additional_headers=bearer(dash)) as ws:
        assert ws.recv(timeout=30)
        refused_before = GuardedH11Protocol.refused
        socks = [socket.create_connection(("127.0.0.1", dash.port)) for _ in range(20)]
        t0 = time.monotonic()
        for sock in socks:
            sock.sendall(head.encode())  # and never the blank line that ends the headers
        assert all(_closed_by_server(sock) for sock in socks)
        assert time.monotonic() - t0 >= 0.9  # the ones within the limit had their full second
        assert GuardedH11Protocol.refused - refused_before >= 20 - 8
        for sock in socks:
            sock.close()
        # a body that trickles past the timeout is closed too; its request never runs
        with socket.create_connection(("127.0.0.1", dash.port)) as sock:
            sock.sendall(
                f"POST /api/control/pause HTTP/1.1\r\nHost: 127.0.0.1:{dash.port}\r\n"
                f"Authorization: Bearer {dash.token}\r\nContent-Length: 200\r\n\r\n{{".encode()
            )
            assert _closed_by_server(sock)
        # kept alive: one full request answered, then a second whose headers never end
        with socket.create_connection(("127.0.0.1", dash.port)) as sock:
            sock.sendall(f"{head}Authorization: Bearer {dash.token}\r\n\r\n".encode())
            sock.settimeout(30)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(head.encode())
            assert _closed_by_server(sock)
        assert ws.recv(timeout=30)  # the websocket outlived the header timeout
    r = httpx.get(dash.url + "api/experiments", headers=bearer(dash), timeout=30)
    assert r.status_code == 200 and r.json()["experiments"][0]["id"] == "sec"
    assert_still_running(lab, dash)


# --- bodies ---------------------------------------------------------------------------------------------------


def test_request_bodies_are_capped(lab, dash):
    big = b'{"experiment": "sec", "pad": "' + b"x" * (MAX_BODY + 1) + b'"}'
    with bare(dash, headers=bearer(dash)) as c:
        r = c.post("/api/control/pause", content=big)
        assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]

        def chunks():  # no Content-Length: the cap holds as the body streams in
            for _ in range(64):
                yield b"x" * 4096

        assert c.post("/api/control/pause", content=chunks()).status_code == 413
        just_under = b'{"experiment": "ghost", "pad": "' + b"x" * (MAX_BODY - 40) + b'"}'
        assert len(just_under) <= MAX_BODY
        assert c.post("/api/control/pause", content=just_under).status_code == 404
    assert_still_running(lab, dash)


# --- the token file -------------------------------------------------------------------------------------------


def test_the_token_file_is_never_written_through_a_symlink(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    os.chmod(victim, 0o644)
    (art / "dashboard.token").symlink_to(victim)
    lab = Lab(art)
    dash = Dashboard(lab, port=0)
    try:
        token_file = dash.token_file
        assert victim.read_text() == "keep me\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
        assert not token_file.is_symlink() and token_file.is_file()
        assert stat.S_IMODE(token_file.lstat().st_mode) == 0o600
        assert token_file.read_text() == dash.token + "\n"
        assert [p.name for p in art.iterdir() if p.name.startswith(".dashboard.token")] == []
    finally:
        dash.stop()
        lab.shutdown()


def test_an_old_readable_token_file_is_replaced_by_a_private_one(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    old = art / "dashboard.token"
    old.write_text("old\n")
    os.chmod(old, 0o644)
    lab = Lab(art)
    dash = Dashboard(lab, port=0)
    try:
        assert stat.S_IMODE(old.stat().st_mode) == 0o600 and old.read_text() == dash.token + "\n"
    finally:
        dash.stop()
        lab.shutdown()


# --- fuzzing --------------------------------------------------------------------------------------------------

segment = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
ids = st.one_of(segment, st.sampled_from(["ghost", "..", "../../etc/passwd", "a" * 200, "sec-9", "%00", ""]))
paths = st.one_of(
    st.builds(lambda i: f"/api/experiments/{quote(i, safe='')}", ids),
    st.builds(lambda i: f"/api/metrics/live?experiment={quote(i, safe='')}", ids),
    st.builds(
        lambda i, n: f"/api/metrics/history?run_id={quote(i, safe='')}&limit={quote(n, safe='')}",
        ids,
        st.one_of(st.integers(-(10**20), 10**20).map(str), segment),
    ),
    st.builds(
        lambda a: f"/api/control/{quote(a, safe='')}",
        st.one_of(st.sampled_from(["pause", "resume", "restart", "stop"]), segment),
    ),
    st.lists(segment.filter(bool), max_size=4).map(lambda segs: "/" + "/".join(quote(s, safe="") for s in segs)),
    st.sampled_from(
        [
            "/",
            "/ws",
            "/metrics",
            "/static/app.js",
            "/static/../server.py",
            "/static/%2e%2e/server.py",
            "/?token=",
            "/api/experiments?experiment=sec",
            "/api/experiments/",
            "/%ff%fe",
            "/api/experiments/%ff",
            "/api/metrics/live?experiment=%ff",
            "/static/index.html",
        ]
    ),
)
bodies = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda i: orjson.dumps({"experiment": i}), ids),
    st.builds(
        orjson.dumps,
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | segment,
            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(segment, kids, max_size=3),
            max_leaves=8,
        ),
    ),
    st.integers(MAX_BODY - 8, MAX_BODY + 8).map(lambda n: b"x" * n),
)


METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])


def test_fuzzed_requests_get_documented_answers_and_nothing_stops(lab, dash):
    port, token = dash.port, dash.token
    client = bare(dash)

    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(
        method=METHODS,
        path=paths,
        body=bodies,
        auth=st.sampled_from(["none", "bearer", "wrong", "cookie"]),
        host=st.sampled_from(["own", "own", "own", "localhost", "evil"]),
        origin=st.sampled_from([None, None, "own", "null", "http://evil.example"]),
    )
    def one(method, path, body, auth, host, origin):
        headers = {"Host": {"own": f"127.0.0.1:{port}", "localhost": f"localhost:{port}", "evil": "evil.example"}[host]}
        if auth == "bearer":
            headers["Authorization"] = f"Bearer {token}"
        elif auth == "wrong":
            headers["Authorization"] = "Bearer " + token[::-1]
        elif auth == "cookie":
            headers["Cookie"] = f"{cookie_name(port)}={token}"
        if origin is not None:
            headers["Origin"] = f"http://127.0.0.1:{port}" if origin == "own" else origin
        # never the real experiment with a valid token: the fuzz must not stop it by asking nicely
        body = body.replace(b'"sec"', b'"ghost"')
        client.cookies.clear()  # each request stands alone
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code in DOCUMENTED, (method, path, r.status_code, r.text[:200])
        json_error = r.headers.get("content-type", "").startswith("application/json") and method != "HEAD"
        if r.status_code >= 400 and json_error:
            assert isinstance(r.json()["error"], str)
        if r.status_code == 200 and path.startswith(("/api/", "/metrics")):
            assert host != "evil" and auth in ("bearer", "cookie") and origin in (None, "own")

    with client:
        one()
    assert_still_running(lab, dash)
