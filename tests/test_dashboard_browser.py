"""The dashboard as a person sees it: Debian's chromium (driven by Playwright) on the live page.

The screenshot is kept as a test artifact: under ``$CRUCIBLE_TEST_ARTIFACTS`` when set, else
under pytest's tmp dir; the test prints where.
"""

import contextlib
import http.server
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from dashboard.server import Dashboard
from experiments.workloads import objective_of
from supervisor import Lab

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

# tabu only, with no end but its time budget; hypertune acts after 0.5 s without progress
SPEC = {
    "name": "dash",
    "time_budget_s": 600,
    "hypertune": {"enabled": True, "window_s": 0.5},
    "workload": {
        "name": "coloring",
        "params": {
            "graph": {"generator": "gnp", "n": 120, "p": 0.5, "seed": 3},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 2000, "max_iters_per_k": 10**12},  # ends by its budget only
        },
    },
}
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RANGES = """() => {
  const gd = document.getElementById('chart'), L = gd._fullLayout, out = {axes: {}, data: []};
  for (const a of ['xaxis', 'yaxis', 'yaxis2']) if (L[a]) out.axes[a] = {range: L[a].range, title: L[a].title.text};
  for (const t of gd.data) out.data.push({name: t.name, yaxis: t.yaxis, x: Array.from(t.x), y: Array.from(t.y)});
  out.shapes = (L.shapes || []).length;
  out.titles = Array.from(document.querySelectorAll('#chart .g-xtitle, #chart .g-ytitle, #chart .g-y2title'))
    .map(e => e.textContent);
  return out;
}"""
TOKEN_KEY = "crucible-dashboard-token"  # where app.js keeps the token (localStorage)
HAS_PASS_LINE = "() => document.getElementById('chart')._fullLayout.shapes.length >= 1"
ANNOTATIONS = "() => document.getElementById('chart')._fullLayout.annotations.map(a => a.text).join(' ')"


def text(element_id):
    """A JS expression: the text of the element with that id (wait_for_function needs functions: the page's
    Content-Security-Policy forbids evaluating strings)."""
    return f"document.getElementById('{element_id}').textContent"


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path / "art")
    yield lab
    lab.shutdown()


@pytest.fixture
def dash(lab):
    dash = Dashboard(lab, port=0)
    yield dash
    dash.stop()


@pytest.fixture
def artifacts(tmp_path):
    root = Path(os.environ.get("CRUCIBLE_TEST_ARTIFACTS") or tmp_path / "artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


class Watch:
    """What the page did wrong: console errors, uncaught exceptions, 4xx/5xx answers."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e}"))
        page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{r.status} {r.url}"))
        page.on("requestfailed", self._failed)

    def _failed(self, request) -> None:
        # A fetch still in flight when the page reloads or navigates, or that the page cancels
        # itself, ends ERR_ABORTED: nothing went wrong. A server that fails it answers, resets
        # or closes instead (ERR_EMPTY_RESPONSE, ERR_CONNECTION_RESET, ...), and is counted.
        if request.failure != "net::ERR_ABORTED":
            self.errors.append(f"failed: {request.url} {request.failure}")


@contextlib.contextmanager
def signed_in_page(dash):
    """A fresh browser's page signed in with a new link, and its :class:`Watch`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            watch = Watch(page)
            page.goto(dash.new_sign_in_url())
            yield page, watch
        finally:
            browser.close()


def covers(rng, values):
    lo, hi = min(rng), max(rng)
    return lo <= min(values) and max(values) <= hi


def api(dash):
    return httpx.Client(base_url=dash.url, timeout=30, headers={"Authorization": f"Bearer {dash.token}"})


def wait_for(pred, timeout, what):
    """Poll a condition on the Lab's own API (no page involved), failing with ``what``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_what_a_person_sees_with_two_experiments(lab, dash, artifacts):
    from playwright.sync_api import sync_playwright

    obj = objective_of("coloring")  # the page draws what the workload declares: its label and progress value
    label, prog = obj.label, obj.progress

    lab.start_experiment(SPEC)
    lab.start_experiment(SPEC, experiment_id="dash2")
    c = api(dash)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            watch = Watch(page)
            page.goto(dash.new_sign_in_url())
            # the one-time code was traded for the token, kept in this origin's storage, never a cookie
            page.wait_for_function(f"() => localStorage.getItem('{TOKEN_KEY}') === '{dash.token}'", timeout=30_000)
            assert page.url == dash.url and ctx.cookies() == []

            page.wait_for_function("() => window.__points > 20", timeout=30_000)
            assert page.text_content("#current") == "dash"
            # hypertune acts and judges its actions within a few seconds of stalling
            wait_for(lambda: c.get("/api/experiments/dash").json()["hypertune_outcomes"], 90, "a hypertune outcome")
            page.wait_for_selector("#feed .tag-outcome", timeout=30_000)
            assert page.locator("#feed .tag-action").count() >= 1

            page.click("#btn-restart")  # a new pass from the best solution: a pass boundary on the chart
            page.wait_for_function(f"() => {text('feedback')}.startsWith('restart: running')", timeout=30_000)
            page.wait_for_function(f"() => {text('passes')}.includes('restart requested')", timeout=30_000)
            page.wait_for_function(HAS_PASS_LINE, timeout=30_000)
            assert "pass 1" in page.evaluate(ANNOTATIONS)

            # the best so far is on the page, the same as the Lab's own figure
            def best_matches():
                want = c.get("/api/experiments/dash").json()["best"]["value"]
                return page.text_content("#best") == f"{want:g}" and want

            best = wait_for(best_matches, 30, "the page's best to match the API")
            assert c.get("/api/experiments/dash").json()["objective"] == obj.to_dict()
            assert page.text_content("#best-unit") == label
            seen = page.evaluate(RANGES)
            shot = artifacts / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")

            # the list is updated in place: a row stays the same element across pushes, so a click lands;
            # the queue table is drawn when the queue changed, not on every push
            pushes, draws, t0 = page.evaluate(
                "() => { window.__row = document.querySelector('.exp[data-id=dash2]');"
                " window.__queueRow = document.querySelector('#queue tr:last-child');"
                " return [window.__pushes, window.__draws, performance.now()]; }"
            )
            page.wait_for_function(f"() => window.__pushes > {pushes + 10} && window.__draws > {draws}", timeout=30_000)
            assert page.evaluate("() => window.__row.isConnected && window.__queueRow.isConnected")
            # the chart is redrawn at a pace, not on every push: a page busy drawing would keep a click waiting
            drew, took_ms = page.evaluate(f"() => [window.__draws - {draws}, performance.now() - {t0}]")
            assert 1 <= drew <= took_ms / 150 + 1, (drew, took_ms)
            page.click(".exp[data-id='dash2']")
            page.wait_for_function(f"() => {text('current')} === 'dash2'", timeout=30_000)
            page.wait_for_function(
                "() => document.getElementById('chart').data.some(t => t.x.length > 0)", timeout=30_000
            )
            assert page.evaluate("() => document.getElementById('chart')._fullLayout.yaxis.title.text") == label
        finally:
            browser.close()

    axes = seen["axes"]
    assert axes["xaxis"]["title"] and axes["yaxis"]["title"] == label and axes["yaxis2"]["title"] == prog
    assert {label, prog} <= {t.strip() for t in seen["titles"]}
    assert any(t.startswith("seconds") for t in seen["titles"])
    colours = [v for t in seen["data"] if t["name"].startswith(label + " ") for v in t["y"]]
    conflicts = [v for t in seen["data"] if t["name"].startswith(prog + " ") for v in t["y"]]
    xs = [v for t in seen["data"] for v in t["x"]]
    assert colours and conflicts
    assert covers(axes["xaxis"]["range"], xs), (axes["xaxis"], min(xs), max(xs))
    assert covers(axes["yaxis"]["range"], colours), (axes["yaxis"], min(colours), max(colours))
    assert covers(axes["yaxis2"]["range"], conflicts), (axes["yaxis2"], min(conflicts), max(conflicts))
    assert min(colours) <= best + 1  # the colour line sits where the colour count is, not near 0
    assert seen["shapes"] >= 1
    assert watch.errors == []
    assert shot.stat().st_size > 20_000


def test_page_text_is_never_markup(lab, dash):
    """A parameter that looks like HTML shows as text: nothing parsed, nothing run."""
    hostile = "http://127.0.0.1:9/<img src=x onerror='window.__xss=1'>"
    lab.start_experiment(
        {
            "name": "calls",
            "time_budget_s": 600,
            "workload": {"name": "latency", "params": {"target": hostile, "calls_per_step": 5}},
        }
    )
    with signed_in_page(dash) as (page, watch):
        page.wait_for_function(f"() => {text('params')}.includes('<img')", timeout=30_000)
        assert page.locator("#params img").count() == 0
        assert page.evaluate("window.__xss") is None
        assert hostile in page.text_content("#params")
        page.wait_for_function("() => window.__points > 5", timeout=30_000)
        assert page.text_content("#best-unit") in ("", objective_of("latency").label)
        # points are counted as they arrive; the chart is drawn on the next frame
        page.wait_for_function(
            "() => document.getElementById('chart')._fullLayout?.yaxis?.title?.text === 'latency_ms'",
            timeout=30_000,
        )
    assert watch.errors == []


# calls of the default checksum task: about a thousand events a second, no passes, no hypertune
LATENCY = {"name": "calls", "time_budget_s": 600, "workload": {"name": "latency", "params": {"calls_per_step": 20}}}
DETAILS = re.compile(r".*/api/experiments/[^/?]+$")
CHART_X = "() => document.getElementById('chart').data.flatMap(t => Array.from(t.x))"


def test_details_one_at_a_time_never_stale_and_times_from_the_runs_start(lab, dash):
    """A details request that has not answered is not joined by another (a big run's answer
    can take longer than the 2 s between polls); selecting another experiment clears the best
    and the feed at once; a failed details call says so on the page instead of showing the
    previous experiment's numbers. Times count from the run's start (a pass that began before
    the events shown is not at a negative time), and the chart says it shows the newest events."""
    from playwright.sync_api import sync_playwright

    exp = lab.start_experiment(SPEC)
    calls = lab.start_experiment(LATENCY)
    c = api(dash)
    wait_for(lambda: (exp.metrics().get("events") or 0) > 1_000, 60, "a colouring run with history before the page")
    wait_for(lambda: (calls.metrics().get("events") or 0) > 1_000, 60, "a latency run with history before the page")
    mode, held, asked = ["pass"], [], []

    def on_details(route):
        asked.append(route.request.url)
        if mode[0] == "hold":
            held.append(route)
        elif mode[0] == "fail" and route.request.url.endswith("/calls"):
            route.fulfill(status=503, content_type="application/json", body='{"error": "over the limit of 5"}')
        else:
            route.continue_()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route(DETAILS, on_details)
            page.goto(dash.new_sign_in_url())
            page.wait_for_function(f"() => {text('current')} === 'dash' && {text('best')} !== '-'", timeout=30_000)
            # pass 0 began before the 200 events the page was given: at 0 s or later, never before
            page.wait_for_function(f"() => {text('passes')}.includes('after init')", timeout=30_000)
            started = page.evaluate(
                "() => Array.from(document.querySelectorAll('#passes tr')).slice(1).map(r => r.cells[1].textContent)"
            )
            assert started and all(not s.startswith("-") for s in started), started
            assert page.evaluate("() => document.getElementById('chart')._fullLayout.xaxis.title.text") == (
                "seconds since the run started"
            )
            assert min(page.evaluate(CHART_X)) > 0  # the run had been going: its events are not at 0 s

            mode[0] = "hold"  # the next details request gets no answer until the test lets it go
            page.wait_for_function("() => window.__detailsInFlight === 1", timeout=30_000)
            skipped = page.evaluate("() => window.__detailsSkipped")
            page.wait_for_function(f"() => window.__detailsSkipped >= {skipped + 2}", timeout=30_000)
            assert len(held) == 1 and page.evaluate("() => window.__detailsInFlight") == 1

            page.click(".exp[data-id='calls']")  # the colouring run's figures leave at once
            assert page.text_content("#current") == "calls"
            assert (page.text_content("#best"), page.text_content("#best-unit")) == ("-", "")
            assert page.locator("#feed .tag").count() == 0

            mode[0] = "fail"
            for route in held:
                route.continue_()  # the colouring run's late answer is dropped; the latency run's fails
            page.wait_for_function(f"() => {text('details-error')}.includes('503')", timeout=30_000)
            assert "over the limit of 5" in page.text_content("#details-error")
            assert page.text_content("#best") == "-"

            mode[0] = "pass"
            page.wait_for_function(f"() => {text('details-error')} === '' && {text('best')} !== '-'", timeout=30_000)
            assert page.text_content("#best-unit") == objective_of("latency").label
            page.wait_for_function(f"() => {text('chart-note')}.includes('showing the newest')", timeout=30_000)
            assert " of " in page.text_content("#chart-note")
            assert min(page.evaluate(CHART_X)) > 0
        finally:
            browser.close()
    assert all(DETAILS.match(u) for u in asked) and c.get("/api/experiments/calls").status_code == 200


def test_a_long_runs_details_say_from_when_they_were_searched(lab, dash, monkeypatch):
    """A run past the details search's size (lowered here to 500 events) has its passes and
    hypertune actions searched in its newest events only: the page says from when."""
    from dashboard import server

    monkeypatch.setattr(server, "DETAILS_SCAN", 500)
    calls = lab.start_experiment(LATENCY)
    wait_for(lambda: (calls.metrics().get("events") or 0) > 3_000, 60, "a latency run past the search's size")
    with signed_in_page(dash) as (page, watch):
        page.wait_for_function(f"() => {text('details-note')}.includes('searched from')", timeout=30_000)
        since = float(re.search(r"searched from ([0-9.]+) s on", page.text_content("#details-note")).group(1))
        assert since > 0  # not the run's start: its newest events only
        assert "crucible export" in page.text_content("#details-note")
    assert watch.errors == []


class Recorder(http.server.BaseHTTPRequestHandler):
    """Another local web server (a notebook, a dev server): records every request it gets."""

    seen: list[str] = []

    def do_GET(self):
        Recorder.seen.append(f"{self.requestline}\n{self.headers}")
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>another local service</body></html>")

    def log_message(self, *args):
        pass


def test_the_token_stays_in_its_origin_out_of_history_and_off_other_ports(lab, dash, tmp_path):
    """A real profile: after signing in with the printed link, the token is in this origin's
    storage only. No cookie, so another web server on the same host receives nothing; the
    history holds the spent sign-in link, never the token; a reload stays signed in."""
    from playwright.sync_api import sync_playwright

    lab.start_experiment(SPEC)
    Recorder.seen = []
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    profile = tmp_path / "profile"
    link = dash.new_sign_in_url()
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                page = ctx.new_page()
                watch = Watch(page)
                page.goto(link)
                page.wait_for_function("() => window.__pushes > 2", timeout=30_000)
                assert page.url == dash.url  # the code left the address bar
                assert page.evaluate(f"() => localStorage.getItem('{TOKEN_KEY}')") == dash.token
                assert ctx.cookies() == []
                page.reload()  # the clean URL: still signed in, from storage
                page.wait_for_function("() => window.__pushes > 2", timeout=30_000)
                assert watch.errors == []
                assert page.text_content("#conn") == "live" and page.is_hidden("#signin")
                page.goto(f"http://127.0.0.1:{other.server_address[1]}/")  # any other local web page
                page.goto(f"http://localhost:{other.server_address[1]}/x")
            finally:
                ctx.close()
    finally:
        other.shutdown()
    assert len(Recorder.seen) >= 2 and not any(dash.token in r for r in Recorder.seen), Recorder.seen  # its favicon too
    db = sqlite3.connect(f"file:{profile}/Default/History?mode=ro", uri=True)
    try:
        urls = [u for (u,) in db.execute("select url from urls")]
    finally:
        db.close()
    assert link in urls  # what the browser recorded: the spent link...
    assert not any(dash.token in u for u in urls), urls  # ...never the token


def test_a_page_without_a_token_says_how_to_sign_in(lab, dash):
    """No token, a spent link, an old ?token= link: the page says how to get in, and the token
    pasted from the token file signs it in."""
    from playwright.sync_api import sync_playwright

    lab.start_experiment(SPEC)
    link = dash.new_sign_in_url()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            first = browser.new_context()
            page = first.new_page()
            page.goto(link)
            page.wait_for_function("() => window.__pushes > 0", timeout=30_000)
            page = browser.new_context().new_page()  # another browser profile: the link is spent
            page.goto(link)
            page.wait_for_selector("#signin", state="visible", timeout=30_000)
            assert "used already" in page.text_content("#signin-why")
            assert "dashboard.token" in page.text_content("#signin") and page.url == dash.url
            assert page.text_content("#conn") == "not signed in"
            page.goto(f"{dash.url}?token={dash.token}")  # an old link: not taken, and taken out of the address bar
            page.wait_for_selector("#signin", state="visible", timeout=30_000)
            assert "no longer taken" in page.text_content("#signin-why") and page.url == dash.url
            page.goto(dash.url)
            page.wait_for_selector("#signin", state="visible", timeout=30_000)
            assert "needs the dashboard's token" in page.text_content("#signin-why")
            page.fill("#signin-token", dash.token)
            page.click("#signin-save")
            page.wait_for_function("() => window.__pushes > 0", timeout=30_000)
            assert page.is_hidden("#signin") and page.text_content("#conn") == "live"
            # a token this dashboard does not take (another Lab's) is dropped, and the page says so
            page.evaluate(f"() => localStorage.setItem('{TOKEN_KEY}', 'not-this-one')")
            page.reload()
            page.wait_for_selector("#signin", state="visible", timeout=30_000)
            assert "not this dashboard's" in page.text_content("#signin-why")
            assert page.evaluate(f"() => localStorage.getItem('{TOKEN_KEY}')") is None
        finally:
            browser.close()


def test_a_tab_with_an_old_token_does_not_sign_out_a_newer_tab(tmp_path):
    """One origin keeps one token. A tab still holding the previous Lab's token (a plain Lab
    makes a new one each run) gets a 401: it takes the token another tab signed in with since,
    instead of erasing it (which signed the newer tab out, its one-time link spent)."""
    import socket

    from playwright.sync_api import sync_playwright

    key = "crucible-dashboard-token"
    live = "() => document.getElementById('conn')?.textContent === 'live'"  # (a reload in between)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab1 = Lab(tmp_path / "a1")
    d1 = Dashboard(lab1, port=port)
    lab2 = d2 = None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            ctx = browser.new_context()
            old = ctx.new_page()
            old.goto(d1.new_sign_in_url())
            old.wait_for_function(live, timeout=30_000)
            d1.stop()
            lab1.shutdown()
            old.route("**/api/**", lambda r: r.abort())  # the old tab asks nothing while...
            lab2 = Lab(tmp_path / "a2")
            d2 = Dashboard(lab2, port=port)  # ...the next Lab starts on the same port
            new = ctx.new_page()
            new.goto(d2.new_sign_in_url())
            new.wait_for_function(live, timeout=30_000)
            old.unroute("**/api/**")  # its old token meets a 401: it takes the newer one
            old.wait_for_function(live, timeout=30_000)
            assert new.evaluate(f"localStorage.getItem('{key}')") == d2.token
            new.reload()
            new.wait_for_function(live, timeout=30_000)
        finally:
            browser.close()
            for d, lab in ((d2, lab2), (None, None)):
                if d is not None:
                    d.stop()
                if lab is not None:
                    lab.shutdown()
