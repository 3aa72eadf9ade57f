"""A lab daemon refuses a spec nested too deep as it refuses any bad spec: HTTP 400 with the
reason, nothing queued, no run folder, and the daemon still serving."""

from __future__ import annotations

import httpx
import pytest

from dashboard.server import Dashboard
from experiments.service import LabService


def _deep_table(n: int) -> dict:
    deep: dict = {"a": 1}
    for _ in range(n):
        deep = {"a": deep}
    return deep


@pytest.fixture
def daemon(tmp_path):
    service = LabService(tmp_path / "art", max_running=1)
    dash = Dashboard(service, port=0)
    try:
        yield service, httpx.Client(base_url=dash.url, timeout=60, headers={"Authorization": f"Bearer {dash.token}"})
    finally:
        dash.stop()
        service.shutdown()


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"json": {"spec": {"name": "deep", "metadata": _deep_table(300)}}}, "submitted spec: metadata.a.a.a..."),
        ({"json": {"spec": {"name": "deep", "metadata": _deep_table(900)}}}, "submitted spec: metadata.a.a.a..."),
        (
            {
                "content": 'name = "deep"\n[metadata]\nx = ' + "[" * 300 + "]" * 300,
                "headers": {"content-type": "application/toml"},
            },
            "submitted spec: metadata.x[0][0]...",
        ),
        (
            {
                "content": 'name = "deep"\nx = ' + "{a = " * 2000 + "1" + "}" * 2000,
                "headers": {"content-type": "application/toml"},
            },
            "submitted spec",
        ),
        ({"json": {"spec": {"name": "deep"}, "set": ["metadata.x=" + "[" * 300 + "]" * 300]}}, "--set metadata.x"),
    ],
)
def test_a_submission_nested_too_deep_is_a_400_and_queues_nothing(daemon, body, where):
    service, http = daemon
    r = http.post("/api/experiments", **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"{where}: tables and arrays nested more than 100 levels deep"
    assert service.list(history=False) == []
    assert not (service.artifacts / "queue.json").exists() and not (service.artifacts / "deep").exists()
    assert http.get("/api/experiments").status_code == 200  # still serving
