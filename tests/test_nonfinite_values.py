"""A value emitted as NaN or an infinity (a diverged loss) is no number a file can hold: the
event keeps a ``nonfinite`` mark naming the field, so it is counted by the Recorder's
summary, StreamingMetrics and ``crucible monitor --summary``, flagged by the anomaly
detector and exported, never lost silently."""

from __future__ import annotations

import csv
import math

import pyarrow.parquet as pq

from actors import Topics
from actors.anomaly import AnomalyDetection, anomaly_metrics, get_anomalies
from actors.recorder import Recorder
from actors.streaming_metrics import StreamingMetrics, get_streaming_metrics
from experiments.monitor import run_summary
from telemetry.emitter import Emitter
from telemetry.export import export_run
from telemetry.jsonl import iter_run


def test_a_diverged_value_is_marked_counted_flagged_and_exported(tmp_path):
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run")
    sm = StreamingMetrics.start("exp", publish_interval=0)
    ad = AnomalyDetection.start("exp", metrics=["loss"])
    for ref in (rec, sm, ad):
        topics.subscribe("events", ref)
    em = Emitter(topics, "exp", "run", batch_size=4)
    losses = [1.0, 0.9, math.nan, 0.8, math.inf, -math.inf, 0.7]
    for i, loss in enumerate(losses):
        em.emit("step", {"loss": loss, "lr": 0.1}, step=i)
    em.emit("step", {"lr": 0.2}, step=len(losses))  # a loss absent: no mark
    em.close()
    rec.ask({"kind": "flush"})
    run = tmp_path / "exp" / "run"
    events = list(iter_run(run))
    assert [e.get("nonfinite") for e in events] == [
        None,
        None,
        {"loss": "nan"},
        None,
        {"loss": "inf"},
        {"loss": "-inf"},
        None,
        None,
    ]
    assert all("loss" not in e["values"] and e["values"]["lr"] == 0.1 for e in events[2:6:2])  # the rest kept

    expected = {"loss": 3}
    assert rec.ask({"kind": "summary"})["values_nonfinite"] == expected
    snap = get_streaming_metrics(sm)
    assert snap["nonfinite_values"] == expected and snap["rejected_values"] == 3
    assert snap["fields"]["loss"]["count"] == 4  # the finite ones
    flagged = {a["seq"]: a for a in get_anomalies(ad)}
    assert set(flagged) == {2, 4, 5} and all(a["methods"] == ["nonfinite"] for a in flagged.values())
    assert anomaly_metrics(ad)["by_type"] == {"nonfinite": 3}
    assert run_summary(run)["nonfinite_values"] == expected

    export_run(run, "csv", tmp_path / "out.csv")
    with (tmp_path / "out.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["nonfinite"] for r in rows[2:6]] == ['{"loss":"nan"}', "", '{"loss":"inf"}', '{"loss":"-inf"}']
    export_run(run, "parquet", tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").column("nonfinite").to_pylist()[2] == '{"loss":"nan"}'

    rec.stop()
    again = Recorder.start(tmp_path, "exp", "run")  # rebuilt from the files after a restart
    try:
        assert again.ask({"kind": "summary"})["values_nonfinite"] == expected
    finally:
        again.stop()
        sm.stop()
        ad.stop()


def test_an_integer_past_float64_is_an_infinity_and_its_batch_is_kept(tmp_path):
    """One value of 10**400 used to raise in the batch's columns and lose the whole batch (up to
    1,023 good events with it): it is now an infinity, marked, and the rest is kept."""
    topics = Topics()
    rec = Recorder.start(tmp_path, "exp", "run")
    topics.subscribe("events", rec)
    em = Emitter(topics, "exp", "run", batch_size=4)
    for v in ({"loss": 1.0, "lr": 0.1}, {"loss": 10**400}, {"loss": -(10**400), "lr": 0.2}, {"lr": 0.3}):
        em.emit("step", v)
    assert em.close() == {"emitted": 4, "published": 4, "dropped": 0, "rejected": 0}
    rec.ask({"kind": "flush"})
    events = list(iter_run(tmp_path / "exp" / "run"))
    rec.stop()
    assert [e["values"] for e in events] == [{"loss": 1.0, "lr": 0.1}, {}, {"lr": 0.2}, {"lr": 0.3}]
    assert [e.get("nonfinite") for e in events] == [None, {"loss": "inf"}, {"loss": "-inf"}, None]


def huge_tokens() -> dict:
    """A latency target whose result holds an integer no float can hold."""
    return {"tokens_prompt": 10**400}


def test_a_latency_target_returning_a_huge_integer_is_measured_not_a_crash(tmp_path):
    from experiments.lab import Lab

    lab = Lab(tmp_path / "art")
    try:
        params = {"target": "tests.test_nonfinite_values:huge_tokens", "calls": 5, "calls_per_step": 5}
        exp = lab.start_experiment(
            {"name": "huge", "time_budget_s": 60, "workload": {"name": "latency", "params": params}}
        )
        assert exp.wait(60) and exp.reason == "completed"
        calls = [e for e in iter_run(exp.run_dir) if e["name"] == "call"]
        assert len(calls) == 5 and all(e["nonfinite"] == {"tokens_prompt": "inf"} for e in calls)
        assert exp.summary()["restarts"] == {}
    finally:
        lab.shutdown()
