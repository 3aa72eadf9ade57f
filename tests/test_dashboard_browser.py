"""The dashboard as a person sees it: Debian's chromium (driven by Playwright) on the live page.

The screenshot is kept as a test artifact: under ``$CRUCIBLE_TEST_ARTIFACTS`` when set, else
under pytest's tmp dir; the test prints where.
"""

import os
import shutil
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
        page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url} {r.failure}"))


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
            page.goto(f"{dash.url}?token={dash.token}")
            # the token left the URL for an HttpOnly, SameSite=Strict cookie
            assert page.url == dash.url
            (cookie,) = ctx.cookies()
            assert cookie["value"] == dash.token and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            page.wait_for_function("() => window.__points > 20", timeout=30_000)
            assert page.text_content("#current") == "dash"
            # hypertune acts and judges its actions within a few seconds of stalling
            wait_for(lambda: c.get("/api/experiments/dash").json()["hypertune_outcomes"], 30, "a hypertune outcome")
            page.wait_for_selector("#feed .tag-outcome", timeout=10_000)
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

            best = wait_for(best_matches, 10, "the page's best to match the API")
            assert c.get("/api/experiments/dash").json()["objective"] == obj.to_dict()
            assert page.text_content("#best-unit") == label
            seen = page.evaluate(RANGES)
            shot = artifacts / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")

            # the list is updated in place: a row stays the same element across pushes, so a click lands
            pushes = page.evaluate(
                "() => { window.__row = document.querySelector('.exp[data-id=dash2]'); return window.__pushes; }"
            )
            page.wait_for_function(f"() => window.__pushes > {pushes + 3}", timeout=10_000)
            assert page.evaluate("() => window.__row.isConnected")
            page.click(".exp[data-id='dash2']")
            page.wait_for_function(f"() => {text('current')} === 'dash2'", timeout=10_000)
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
    from playwright.sync_api import sync_playwright

    hostile = "http://127.0.0.1:9/<img src=x onerror='window.__xss=1'>"
    lab.start_experiment(
        {
            "name": "calls",
            "time_budget_s": 600,
            "workload": {"name": "latency", "params": {"target": hostile, "calls_per_step": 5}},
        }
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            watch = Watch(page)
            page.goto(f"{dash.url}?token={dash.token}")
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
        finally:
            browser.close()
    assert watch.errors == []
