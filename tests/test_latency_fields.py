"""The latency workload records every numeric field a callable target returns (a training step's
``loss`` and ``acc`` as well as ``cost_usd``), and says once, naming it, each field it leaves
out: text, a bool, its own ``latency_ms``, a name no reader can use, one past the bound."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from structlog.testing import capture_logs

from experiments.workloads.latency import MAX_FIELDS, LatencyWorkload
from supervisor import Lab
from telemetry.jsonl import iter_run
from tests.fault_helpers import latency_spec

_calls = itertools.count()


def train_step() -> dict[str, Any]:
    """A target as an embedder writes one: its figures, and some that are not figures."""
    n = next(_calls)
    return {
        "loss": 1.0 / (n + 1),
        "acc": 0.5,
        "cost_usd": 0.001,
        "tokens_prompt": 7,
        "model": "tiny",
        "cached": True,
        "latency_ms": -1.0,
        "bad key": 1.0,
    }


def new_key_each_call() -> dict[str, Any]:
    return {f"k{next(_calls)}": 1.0}


class Events:
    """What the workload emits, as (name, values, notes)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any], str | None]] = []

    def set_context(self, **_: Any) -> None:
        pass

    def emit(self, name: str, values: dict[str, Any] | None = None, *, notes: str | None = None, **_: Any) -> None:
        self.got.append((name, dict(values or {}), notes))


def calls_of(target: str, n: int) -> list[tuple[dict[str, Any], str | None]]:
    w = LatencyWorkload(LatencyWorkload.check_params({"target": target, "calls": n, "calls_per_step": n}))
    ev = Events()
    w.start(ev)  # type: ignore[arg-type]
    w.step(ev)  # type: ignore[arg-type]
    return [(v, notes) for name, v, notes in ev.got if name == "call"]


def test_every_numeric_field_of_a_callables_result_is_a_value_and_the_others_are_named_once():
    with capture_logs() as logs:
        calls = calls_of("tests.test_latency_fields:train_step", 3)
    for values, _ in calls:
        assert set(values) == {"latency_ms", "loss", "acc", "cost_usd", "tokens_prompt"}  # loss and acc were dropped
        assert values["latency_ms"] >= 0  # the target's own latency_ms never replaces the measurement
    notes = [n for _, n in calls]
    assert notes[1:] == [None, None]  # said on the first call that returned them, not on each
    assert notes[0] == (
        "target field(s) not recorded: 'model' (it is not a number (str)), 'cached' (it is not a number (bool)), "
        "'latency_ms' (it is the workload's own measurement), "
        "'bad key' (its name is not a field name (a letter or _, then letters, digits, _ . -; 64 at most))"
    )
    warned = [e for e in logs if e["event"] == "target field not recorded"]
    assert [e["field"] for e in warned] == ["'model'", "'cached'", "'latency_ms'", "'bad key'"]
    assert all(e["log_level"] == "warning" and e["target"].endswith(":train_step") for e in warned)


def test_a_target_inventing_fields_is_bounded_and_says_so_once():
    with capture_logs() as logs:
        calls = calls_of("tests.test_latency_fields:new_key_each_call", MAX_FIELDS + 5)
    kept = {k for values, _ in calls for k in values} - {"latency_ms"}
    assert len(kept) == MAX_FIELDS
    past = [n for _, n in calls[MAX_FIELDS:]]
    assert all(n is not None and f"already gave {MAX_FIELDS} fields" in n for n in past)
    assert len([e for e in logs if e["event"] == "target field not recorded"]) == 5


def test_the_fields_left_out_are_said_at_most_max_fields_times():
    """A target inventing a key per call, past the bound: the log and the notes stop after
    MAX_FIELDS of them (and say so), memory with them."""
    with capture_logs() as logs:
        calls = calls_of("tests.test_latency_fields:new_key_each_call", 3 * MAX_FIELDS)
    warned = [e for e in logs if e["event"] == "target field not recorded"]
    assert len(warned) == MAX_FIELDS and [e["last"] for e in warned].count(True) == 1 and warned[-1]["last"]
    said = [n for _, n in calls[MAX_FIELDS:] if n is not None]
    assert len(said) == MAX_FIELDS and said[-1].endswith("fields left out after this one are not said")


def test_a_url_targets_own_status_and_bytes_are_not_values(monkeypatch):
    w = LatencyWorkload(LatencyWorkload.check_params({"target": "http://127.0.0.1:9/", "calls": 1}))
    ev = Events()
    w.start(ev)  # type: ignore[arg-type]
    w._fn = lambda: {"status": 200, "bytes": 12}  # what the GET returns, as the workload's own dict
    w.step(ev)  # type: ignore[arg-type]
    assert [set(v) for name, v, _ in ev.got if name == "call"] == [{"latency_ms"}]


def test_a_real_run_records_and_totals_the_targets_fields(tmp_path):
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(
            {
                "name": "fields",
                "time_budget_s": 60.0,
                "workload": {
                    "name": "latency",
                    "params": {"target": "tests.test_latency_fields:train_step", "calls": 20, "calls_per_step": 5},
                },
            }
        )
        assert exp.wait(60)
        m = exp.metrics()
    finally:
        lab.shutdown()
    calls = [e for e in iter_run(exp.run_dir) if e["name"] == "call"]
    assert len(calls) == 20 and all({"loss", "acc"} <= set(e["values"]) for e in calls)
    assert m["totals"]["cost_usd"] == pytest.approx(20 * 0.001)
    assert {"loss", "acc"} <= set(m["fields"])  # the metrics the readers show (monitor, analyze, compare)


def sometimes_cancelled() -> float:
    """An async client's call, as an embedder wraps one: every third call's task is cancelled."""
    import asyncio

    n = next(_calls)

    async def call() -> float:
        task = asyncio.ensure_future(asyncio.sleep(0.001, result=1.0))
        if n % 3 == 0:
            task.cancel()
        return await task

    return asyncio.run(call())


def interrupted() -> float:
    """A library that re-raises a signal it caught, in the phase's thread."""
    raise KeyboardInterrupt


def test_a_base_exception_from_a_target_touches_no_other_run(tmp_path):
    """An async target's CancelledError (a BaseException) ended every experiment of every Lab
    in the process, each recorded stopped. A cancelled call is a failed call; a
    KeyboardInterrupt out of a step is that run's crash alone."""
    lab, other = Lab(tmp_path / "art"), Lab(tmp_path / "other")
    try:
        bystander = other.start_experiment(latency_spec("bystander", budget=600.0))

        def spec(name: str, target: str) -> dict[str, Any]:
            params = {"target": f"tests.test_latency_fields:{target}", "calls": 30, "calls_per_step": 3}
            return {"name": name, "time_budget_s": 60.0, "workload": {"name": "latency", "params": params}}

        cancelled = lab.start_experiment(spec("cancelled", "sometimes_cancelled"))
        broken = lab.start_experiment(spec("broken", "interrupted"))
        assert cancelled.wait(60) and broken.wait(60)
        assert cancelled.reason == "completed"
        calls = [e for e in iter_run(cancelled.run_dir) if e["name"] == "call"]
        failed = [e for e in calls if e["success"] is False]
        assert len(calls) == 30 and len(failed) == 10 and all("CancelledError" in e["notes"] for e in failed)
        assert broken.status() == "failed" and "KeyboardInterrupt() raised in a handler" in broken.reason
        assert bystander.status() == "running"  # the other Lab's run goes on
        again = lab.start_experiment(spec("again", "sometimes_cancelled"))  # and this Lab still starts runs
        assert again.wait(60) and again.reason == "completed"
    finally:
        lab.shutdown()
        other.shutdown()
    assert bystander.reason == "stopped"
