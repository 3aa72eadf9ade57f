import os
import threading

import orjson
import pytest

from experiments.monitor import Alert, AlertError, Tailer, format_event, sparkline
from experiments.spec import SpecError
from experiments.specedit import get_value, set_values, show
from supervisor import Lab, main
from telemetry.schema import GPU_MODES, dumps_line


def line(seq, **kw):
    ev = {
        "v": 1,
        "seq": seq,
        "ts": 1_000_000 + seq * 1000,
        "experiment_id": "e",
        "run_id": "r",
        "pass": 0,
        "name": "step",
        "values": {"conflicts": float(100 - seq)},
        **kw,
    }
    return dumps_line(ev)


def test_tailer_follows_a_growing_file_with_torn_lines_and_rotation(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    active = run / "events.jsonl"
    fh = active.open("ab")
    tail = Tailer(run)
    assert list(tail.poll()) == []
    fh.write(line(0) + line(1))
    fh.write(line(2)[:15])  # a torn line: the writer is mid-way
    fh.flush()
    assert [e["seq"] for e in tail.poll()] == [0, 1]
    fh.write(line(2)[15:] + line(3))
    fh.flush()
    assert [e["seq"] for e in tail.poll()] == [2, 3]
    fh.write(line(4))  # written just before the rotation...
    fh.flush()
    fh.close()
    os.replace(active, run / "events.000001.jsonl")  # ...then the file is rotated
    with active.open("ab") as new:
        new.write(line(5) + line(6))
    assert [e["seq"] for e in tail.poll()] == [4, 5, 6]  # the old file's tail first, nothing lost
    with active.open("ab") as new:
        new.write(b'{"broken json\n' + line(7))
    assert [e["seq"] for e in tail.poll()] == [7] and tail.skipped == 1
    tail.close()


def test_format_and_alerts():
    ev = orjson.loads(line(3, phase="thermo", gpu_mode="cpu_fallback", parameters={"t_max": 10}))
    ev["values"]["chromatic_number"] = 118.0
    text = format_event(ev, 1_000_000)
    assert text.startswith("[thermo][cpu] t=0.0s step conflicts=97 colors=118")
    assert text.endswith('params={"t_max":10}')
    for mode, shown in (*((m, "gpu" if m == "gpu" else "cpu") for m in GPU_MODES), (None, "-")):
        assert format_event({**ev, "gpu_mode": mode}, 1_000_000).startswith(f"[thermo][{shown}] "), mode
    assert Alert("conflicts>90").fires(ev) and not Alert("conflicts <= 50").fires(ev)
    assert Alert("chromatic_number==118").fires(ev)
    by_label = Alert("colors == 118")
    by_label.resolve({"chromatic_number", "conflicts"})  # the short name format_event shows
    assert by_label.fires(ev) and by_label.shown == "colors==118 (chromatic_number)"
    by_field = Alert("chromatic_number==118")
    by_field.resolve(set())  # no fields known yet: nothing to check
    assert by_field.shown == "colors==118 (chromatic_number)" and Alert("conflicts >90").shown == "conflicts >90"
    own = Alert("colors>1")
    own.resolve({"colors", "chromatic_number"})  # a run with a field of that very name: that field
    assert own.field == "colors"
    with pytest.raises(AlertError, match=r"no field 'k'; its fields: chromatic_number \(colors\), conflicts"):
        Alert("k>1").resolve({"chromatic_number", "conflicts"})
    for bad in ("conflicts>>1", "conflicts", "1>conflicts", "conflicts>x"):
        with pytest.raises(AlertError, match="expected FIELD OP NUMBER"):
            Alert(bad)
    assert sparkline([1, 2, 3, 8]) == "▁▂▃█"


def test_monitor_tails_a_live_run_until_it_stops(tmp_path, capsys):
    lab = Lab(tmp_path / "art")
    exp = lab.start_experiment(
        {
            "name": "mon",
            "time_budget_s": 60.0,  # ends after its calls: a bounded output
            "workload": {
                "name": "latency",
                "params": {"target": "math:sqrt", "args": [2.0], "calls_per_step": 5, "calls": 3000},
            },
        }
    )
    code = {}
    t = threading.Thread(
        target=lambda: code.setdefault(
            "rc",
            main(
                [
                    "monitor",
                    exp.run_id,
                    "--artifacts",
                    str(tmp_path / "art"),
                    "--name",
                    "call",
                    "--alert",
                    "latency_ms>=0",
                ]
            ),
        )
    )
    assert exp.registry.await_name("recorder", timeout=10) is not None
    exp.wait(30)
    t.start()  # started on a run still being written or just finished: it must read it all and exit
    t.join(60)
    lab.shutdown()
    out = capsys.readouterr().out
    calls = sum(
        1 for e in __import__("telemetry.jsonl", fromlist=["iter_run"]).iter_run(exp.run_dir) if e["name"] == "call"
    )
    assert code["rc"] == 0
    assert out.count("!! ALERT latency_ms>=0") == calls > 0  # every call matched the alert
    assert main(["monitor", exp.run_id, "--summary", "--artifacts", str(tmp_path / "art")]) == 0
    assert "hypertune actions 0" in " ".join(capsys.readouterr().out.split())


def test_monitor_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["monitor", "ghost", "--artifacts", str(tmp_path)])
    assert e.value.code == 2 and "no run 'ghost'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["monitor", "--latest", "--artifacts", str(tmp_path)])
    assert e.value.code == 2


def test_set_get_show_keep_comments_and_validate(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('# my experiment\nname = "x"  # the id\n\n[workload]\nname = "latency"\n')
    set_values(p, ["time_budget_s=12.5", "workload.params.calls_per_step=7", "hypertune.enabled=true"])
    text = p.read_text()
    assert text.startswith('# my experiment\nname = "x"  # the id\n')
    assert get_value(p, "time_budget_s") == 12.5 and get_value(p, "workload.params.calls_per_step") == 7
    assert get_value(p, "telemetry.batch_size") == 1024  # defaults filled in
    with pytest.raises(SpecError, match="must be >= 1"):
        set_values(p, ["telemetry.batch_size=0"])
    assert p.read_text() == text  # a refused change leaves the file untouched
    with pytest.raises(SpecError, match="unknown key"):
        set_values(p, ["telemetry.colour=1"])
    with pytest.raises(SpecError, match="unknown key"):
        get_value(p, "telemetry.nope")
    assert 'name = "x"' in show(p) and "batch_size = 1024" in show(p)
    assert main(["get", str(p), "workload.params.calls_per_step"]) == 0


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('init = { strategy = "dsatur" }', 'init = { strategy = "dsatur", tries = 5 }'),
        ('init = {strategy = "dsatur"}', 'init = {strategy = "dsatur",tries = 5}'),  # the file's own style
        ("init = { tries = 2 }", "init = { tries = 5 }"),
    ],
)
def test_a_key_set_in_an_inline_table_keeps_its_spacing(tmp_path, before, after):
    p = tmp_path / "s.toml"
    p.write_text(f'name = "x"\n[workload]\nname = "coloring"\n[workload.params]\n{before}\n')
    set_values(p, ["workload.params.init.tries=5"])
    assert p.read_text().splitlines()[-1] == after
    assert get_value(p, "workload.params.init.tries") == 5


def test_a_follower_stops_for_every_ended_status_and_only_then(tmp_path):
    import subprocess
    import sys
    import time

    from experiments.monitor import run_stopped, run_summary
    from telemetry.rundir import owner_info, write_json

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = {"running": False, "paused": False, "stopped": True, "failed": True, "archived": True}
    for status, ended in cases.items():
        run = tmp_path / status
        run.mkdir()
        write_json(run / "lifecycle.json", {"status": status, "owner": owner_info(), "updated_at": time.time()})
        assert run_stopped(run) is ended, status
    dead = tmp_path / "dead"
    dead.mkdir()
    write_json(
        dead / "lifecycle.json",
        {"status": "running", "owner": {**owner_info(), "pid": gone.pid}, "updated_at": time.time()},
    )
    (dead / "events.jsonl").write_bytes(line(0) + line(1) + line(2))
    (dead / "summary.json").write_bytes(orjson.dumps({"events_persisted": 1}))
    os.utime(dead / "summary.json", (0, 0))  # older than the events: the run died between two summaries
    assert run_stopped(dead)
    s = run_summary(dead)
    assert s["status"] == "crashed" and f"pid {gone.pid}" in s["reason"]
    assert (s["events_persisted"], s["summary_lag_events"]) == (3, 2)
    assert run_stopped(tmp_path / "no-record")  # nothing says it is alive: nothing to wait for


def test_the_summary_tracks_the_run_workloads_objective_in_its_direction(tmp_path):
    from experiments.monitor import SHORT, run_objectives, run_summary
    from experiments.workloads import objectives

    run = tmp_path / "run"
    run.mkdir()
    events = [
        line(0, phase="calls", values={"latency_ms": 3.0, "conflicts": 9.0}),
        line(1, phase="calls", values={"latency_ms": 1.5, "conflicts": 4.0}),
        line(2, phase="calls", values={"latency_ms": 2.0}),
    ]
    (run / "events.jsonl").write_bytes(b"".join(events))
    # no spec: judged by every workload's fields
    assert run_objectives(run) == list(objectives().values())
    assert run_summary(run)["phases"]["calls"]["best"] == {"latency_ms": 1.5, "conflicts": 4.0}
    # a latency run: its own objective only (conflicts mean nothing there)
    (run / "spec.json").write_bytes(orjson.dumps({"workload": {"name": "latency", "params": {}}}))
    assert [o.field for o in run_objectives(run)] == ["latency_ms"]
    assert run_summary(run)["phases"]["calls"]["best"] == {"latency_ms": 1.5}
    for bad in (b"{", b"[1]", b'{"workload": "latency"}', b'{"workload": {"name": "ghost"}}'):
        (run / "spec.json").write_bytes(bad)  # an unreadable or foreign record: every workload's fields
        assert run_objectives(run) == list(objectives().values())
    assert SHORT == {"chromatic_number": "colors"}  # the short names are the objectives' labels
