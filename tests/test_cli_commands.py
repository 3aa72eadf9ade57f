"""Every ``crucible`` command through ``supervisor.main`` in-process, with small budgets: the
output each prints (tables and JSON), the files it writes, and its one-line usage errors.

test_cli.py covers the usage errors of the numeric flags and the run/list/export/compare
round trip; this module covers the rest of each command's paths: the live progress panel, a
JSON summary file, the dashboard flag, the table forms, the monitor's tail, follow and
alert modes, set/get/show, tune and the A/B."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from experiments.workloads import objective_of
from supervisor import main
from telemetry.jsonl import iter_run

LATENCY = (
    'name = "lat"\ntime_budget_s = {budget}\nseed = {seed}\n[workload.params]\ntarget = "math:sqrt"\n'
    "args = [2.0]\ncalls_per_step = 20\ncalls = {calls}\n[metrics]\npublish_interval_s = 0.1\n"
)
COLORING = (
    'name = "col"\ntime_budget_s = 0.4\nseed = 1\n[workload]\nname = "coloring"\n[workload.params]\n'
    'graph = {{ generator = "gnp", n = 40, p = 0.5, seed = 2 }}\nphases = ["tabu", "memetic"]\ngpu = "cpu"\n'
    "[workload.params.tabu]\niters_per_step = 2000\n[workload.params.memetic]\npopulation = 4\n"
    "local_iters = 500\n{extra}"
)


def run_cli(capsys, *argv: str, code: int = 0) -> str:
    """Run ``crucible argv`` in-process; check its exit code; return what it printed."""
    capsys.readouterr()
    assert main(list(argv)) == code
    return capsys.readouterr().out


def usage_error(capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished latency runs in one artifacts folder: (artifacts, [run dirs])."""
    root = tmp_path_factory.mktemp("cli")
    art = root / "art"
    for seed in (1, 2):
        spec = root / f"lat{seed}.toml"
        spec.write_text(LATENCY.format(budget=30, seed=seed, calls=300))  # ends once its calls are made
        assert main(["run", str(spec), "--artifacts", str(art), "--no-live"]) == 0
    return art, sorted((art / "lat").iterdir())


# --- run ----------------------------------------------------------------------------------------------


def test_run_shows_live_progress_on_a_terminal_and_writes_a_json_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich takes stdout for a terminal: the live panel is drawn
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.8, seed=3, calls=0))
    out_json = tmp_path / "summary.json"
    out = run_cli(capsys, "run", str(spec), "--artifacts", str(tmp_path / "art"), "--json-summary", str(out_json))
    assert "elapsed / budget" in out and "events" in out and "latency_ms" in out  # the progress panel
    assert "run summary" in out
    s = json.loads(out_json.read_text())
    assert s["reason"] == "budget" and s["status"] == "stopped"
    assert s["events_persisted"] == sum(1 for _ in iter_run(Path(s["run_dir"]))) > 0


def _progress_text(exp) -> str:
    from rich.console import Console

    from cli.render import progress

    console = Console(record=True, width=200)
    console.print(progress(exp, time.monotonic(), {}))
    return console.export_text()


def _poll(pred, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := pred():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def _rows(text: str) -> dict[str, str]:
    """The panel's rows by their first column."""
    return {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 2}


@pytest.mark.parametrize("workload", ["latency", "coloring"])
def test_the_live_panel_shows_the_workloads_declared_objective(tmp_path, workload):
    """The panel's figure rows are the spec's workload's objective and, when declared, its
    progress value: a latency run shows latency_ms only, a colouring run its own two fields."""
    from experiments.lab import Lab

    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=60, seed=1, calls=0) if workload == "latency" else COLORING.format(extra=""))
    obj = objective_of(workload)
    main = obj.field if obj.label == obj.field else f"{obj.label} ({obj.field})"
    wanted = [main] + ([obj.progress] if obj.progress else [])
    lab = Lab(tmp_path / "art")
    try:
        exp = lab.start_experiment(str(spec), overrides=["time_budget_s=60"])

        def shown():
            text = _progress_text(exp)
            rows = _rows(text)
            return (text, rows) if all("best " in rows.get(w, "") for w in wanted) else None

        text, rows = _poll(shown)
    finally:
        lab.shutdown()
    figures = [name for name, line in rows.items() if "best " in line]
    assert figures == wanted
    others = {o.field for o in (objective_of("latency"), objective_of("coloring")) if o is not obj}
    assert not any(f in text for f in others)


class _Snapshots:
    """An experiment whose metrics snapshots come from a list, one per frame, as a panel that
    repaints faster than StreamingMetrics publishes sees them; the phase answers {} once the
    list's last (the final figures) is read, as a run that ended does."""

    def __init__(self, snaps):
        self.snaps = list(snaps)
        self.id, self.run_id = "lat", "r1"
        self.spec = {"time_budget_s": 5.0, "workload": {"name": "latency", "params": {}}}

    def metrics(self):
        return self.snaps.pop(0)

    def phase_status(self):
        return {"steps": 7, "active_s": 1.5} if self.snaps else {}

    def status(self):
        return "running" if self.snaps else "stopped"


def test_the_live_panel_rates_events_between_snapshots_and_ends_on_the_final_count():
    """The rate is taken between two distinct snapshots by their own times and held while
    the panel repaints over the same one (it read 0/s there); the last frame shows the final
    count, with the steps the phase reached."""
    from rich.console import Console

    from cli.render import progress

    snap = {"stale": False, "age_s": 0.1, "fields": {}}
    frames = [
        {**snap, "at": 100.0, "events": 155},
        {**snap, "at": 100.0, "events": 155},  # the same snapshot, repainted
        {"stale": True, "age_s": None},  # none to be had this time
        {**snap, "at": 101.0, "events": 386},
        {**snap, "at": 101.0, "events": 386},
        {**snap, "at": 101.5, "events": 841},  # the final figures
    ]
    exp, last, shown = _Snapshots(frames), {}, []
    for _ in frames:
        console = Console(record=True, width=200)
        console.print(progress(exp, time.monotonic(), last))
        shown.append(_rows(console.export_text()))
    events = [rows["events"].split("│")[2].strip() for rows in shown]
    assert events == ["155", "155", "155", "386  (231/s)", "386  (231/s)", "841  (910/s)"]
    assert "7" in shown[-1]["steps"] and "1.5 s active" in shown[-1]["elapsed / budget"]


def test_run_draws_its_last_frame_after_the_run_ended(tmp_path, capsys, monkeypatch):
    """The panel's last frame is drawn from the ended run, so it shows the final event count
    (it stopped at the last count read while running)."""
    from cli import render

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    seen = []
    real = render.progress

    def recording(exp, t0, last):
        table = real(exp, t0, last)
        seen.append((exp.wait(0), last.get("events"), exp.metrics().get("events")))
        return table

    monkeypatch.setattr(render, "progress", recording)
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.5, seed=3, calls=0))
    run_cli(capsys, "run", str(spec), "--artifacts", str(tmp_path / "art"))
    ended, shown_events, final_events = seen[-1]
    assert ended and shown_events == final_events > 0


def test_run_refuses_an_unwritable_json_summary_before_it_starts(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.2, seed=1, calls=0))
    err = usage_error(
        capsys,
        "run",
        str(spec),
        "--artifacts",
        str(tmp_path / "art"),
        "--no-live",
        "--json-summary",
        str(tmp_path / "missing" / "s.json"),
    )
    assert "--json-summary" in err and "cannot write there" in err
    assert not (tmp_path / "art").exists()  # refused before anything ran


def test_run_with_the_dashboard_prints_its_address(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.2, seed=1, calls=0))
    monkeypatch.setenv("CRUCIBLE_DASH_PORT", "0")  # any free port
    out = run_cli(capsys, "run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live", "--dashboard")
    assert "dashboard: http://127.0.0.1:" in out and "/#code=" in out and "?token=" not in out
    monkeypatch.setenv("CRUCIBLE_DASH_PORT", "seventy")
    err = usage_error(capsys, "run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live", "--dashboard")
    assert "CRUCIBLE_DASH_PORT" in err


def test_run_of_a_spec_the_workload_refuses_is_a_usage_error(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.2, seed=1, calls=0).replace("math:sqrt", "math:no_such_function"))
    err = usage_error(capsys, "run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live")
    assert "no_such_function" in err


# --- list, export, compare ----------------------------------------------------------------------------


def test_export_in_every_format_counts_what_it_wrote(runs, tmp_path, capsys):
    art, dirs = runs
    events = sum(1 for _ in iter_run(dirs[0]))
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"x.{fmt}"
        said = run_cli(capsys, "export", str(dirs[0]), "--format", fmt, "--out", str(out), "--artifacts", str(art))
        assert f"exported {events:,} events" in said
        n = sum(1 for _ in out.open()) if fmt == "jsonl" else pq.read_table(out).num_rows
        assert n == events


def test_messages_naming_a_long_path_keep_it_on_one_line(runs, tmp_path, capsys):
    """A path wider than the terminal is printed whole (a user copies it), not folded."""
    art, dirs = runs
    out = tmp_path / ("a-folder-with-a-rather-long-name-" * 4) / "x.jsonl"
    out.parent.mkdir()
    said = run_cli(capsys, "export", str(dirs[0]), "--format", "jsonl", "--out", str(out), "--artifacts", str(art))
    assert len(str(out)) > 120 and f" to {out}\n" in said
    spec = out.parent / "s.toml"
    spec.write_text(LATENCY.format(budget=5, seed=1, calls=0))
    assert run_cli(capsys, "set", str(spec), "seed=3") == f"{spec}: set seed=3\n"


def test_export_of_an_unknown_run_names_the_recent_ones(runs, capsys):
    art, dirs = runs
    err = usage_error(capsys, "export", "20990101T000000Z-abcdef", "--artifacts", str(art))
    assert "no run" in err and dirs[0].name in err


def test_compare_prints_a_table_and_refuses_a_metric_without_values(runs, capsys):
    art, dirs = runs
    out = run_cli(capsys, "compare", dirs[0].name, dirs[1].name, "--metric", "latency_ms", "--artifacts", str(art))
    assert "latency_ms" in out and "p_value" in out and "CI of the difference" in out
    err = usage_error(capsys, "compare", dirs[0].name, dirs[1].name, "--metric", "nope", "--artifacts", str(art))
    assert "metric 'nope' has 0 finite values" in err


# --- monitor ------------------------------------------------------------------------------------------


def test_monitor_tails_a_finished_run_with_filters_and_alerts(runs, capsys):
    art, dirs = runs
    calls = sum(1 for e in iter_run(dirs[0]) if e["name"] == "call")
    out = run_cli(
        capsys, "monitor", dirs[0].name, "--artifacts", str(art), "--name", "call", "--alert", "latency_ms>=0"
    )
    assert out.count("ALERT latency_ms>=0") == calls  # every call fires the alert, nothing else is shown
    out = run_cli(capsys, "monitor", "--latest", "--artifacts", str(art), "--no-wait", "--phase", "no-such-phase")
    assert out.strip() == ""


def test_monitor_follow_view_ends_with_the_run(runs, capsys):
    art, dirs = runs
    out = run_cli(capsys, "monitor", str(dirs[1]), "--follow", "--artifacts", str(art))
    # the sparkline follows the latency workload's declared objective, and nothing of another workload's
    assert "crucible monitor" in out and re.search(r"latency_ms +[▁▂▃▄▅▆▇█]+ ", out), out
    assert "conflicts" not in out and "colors" not in out


def test_monitor_summary_of_a_colouring_run_shows_best_per_phase(tmp_path, capsys):
    spec = tmp_path / "c.toml"
    spec.write_text(COLORING.format(extra=""))
    art = str(tmp_path / "art")
    run_cli(capsys, "run", str(spec), "--artifacts", art, "--no-live")
    out = " ".join(run_cli(capsys, "monitor", "--latest", "--summary", "--artifacts", art).split())
    assert "(stopped)" in out and "colors=" in out and "conflicts=" in out and "GPU vs CPU (events)" in out
    assert "status stopped (budget)" in out


def test_events_the_sampler_left_out_are_not_shown_as_dropped(tmp_path, capsys):
    """A sampled run lost nothing: run's table and monitor --summary show its sampled-out
    events apart from the dropped ones (0), while summary.json keeps its fields."""
    spec = tmp_path / "s.toml"
    sampling = '[sampling]\nstrategy = "stratified"\n[sampling.config]\nby = "success"\nrates = { true = 0.1 }\n'
    spec.write_text(LATENCY.format(budget=0.5, seed=1, calls=0) + sampling)
    art, out_json = str(tmp_path / "art"), tmp_path / "s.json"
    out = run_cli(capsys, "run", str(spec), "--artifacts", art, "--no-live", "--json-summary", str(out_json))
    s = json.loads(out_json.read_text())
    sampled = s["accounting"]["sampled_out"]
    assert sampled > 0 and s["accounting"]["dropped"] == 0 and s["events_dropped"] == sampled
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in out.splitlines() if line.count("│") >= 3}
    assert rows["accounting.dropped"] == "0" and rows["events_sampled_out"] == str(sampled)
    assert "events_dropped" not in rows
    out = " ".join(run_cli(capsys, "monitor", "--latest", "--summary", "--artifacts", art).split())
    assert f"dropped 0, sampled out {sampled};" in out


def test_monitor_alert_takes_the_short_name_the_event_lines_show(tmp_path, capsys):
    """The tail lines print chromatic_number as colors=...: --alert 'colors>0' watches it (it
    was refused as a field the run lacks) and its alert lines name it both ways."""
    spec = tmp_path / "c.toml"
    spec.write_text(COLORING.format(extra=""))
    art = str(tmp_path / "art")
    run_cli(capsys, "run", str(spec), "--artifacts", art, "--no-live")
    out = run_cli(capsys, "monitor", "--latest", "--artifacts", art, "--alert", "colors>0")
    lines = out.replace("\a", "").splitlines()  # each alert rings the bell first
    alerts = [line for line in lines if line.startswith("!! ALERT")]
    assert alerts and len(alerts) == sum(" colors=" in line for line in lines)
    assert all(line.startswith("!! ALERT colors>0 (chromatic_number): ") for line in alerts)
    err = usage_error(capsys, "monitor", "--latest", "--artifacts", art, "--alert", "colours>3")
    assert "has no field 'colours'" in err and "chromatic_number (colors)" in err


def test_monitor_usage_errors(runs, tmp_path, capsys):
    art, dirs = runs
    assert "give a run" in usage_error(capsys, "monitor", "--artifacts", str(art))
    assert "no runs under" in usage_error(capsys, "monitor", "--latest", "--artifacts", str(tmp_path / "empty"))
    err = usage_error(capsys, "monitor", dirs[0].name, "--artifacts", str(art), "--alert", "colours>3")
    assert "has no field 'colours'" in err and "latency_ms" in err


# --- set, get, show -------------------------------------------------------------------------------------


def test_set_get_show_round_trip(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text("# my experiment\n" + LATENCY.format(budget=5, seed=1, calls=0))
    out = " ".join(run_cli(capsys, "set", str(spec), "time_budget_s=2.5", "workload.params.calls_per_step=7").split())
    assert "set time_budget_s=2.5, workload.params.calls_per_step=7" in out
    assert spec.read_text().startswith("# my experiment\n")  # comments and layout kept
    assert run_cli(capsys, "get", str(spec), "time_budget_s").strip() == "2.5"
    assert json.loads(run_cli(capsys, "get", str(spec), "workload.params"))["calls_per_step"] == 7
    assert run_cli(capsys, "get", str(spec), "workload.params.target").strip() == "math:sqrt"  # a string, bare
    shown = run_cli(capsys, "show", str(spec))
    assert "time_budget_s = 2.5" in shown and "[telemetry]" in shown  # defaults filled in
    assert "no_such" in usage_error(capsys, "get", str(spec), "no_such.key")
    assert "batch_sise" in usage_error(capsys, "set", str(spec), "telemetry.batch_sise=3")
    (tmp_path / "bad.toml").write_text("name = [\n")
    assert "bad.toml" in usage_error(capsys, "show", str(tmp_path / "bad.toml"))


def test_get_and_show_give_the_effective_spec_defaults_included(tmp_path, capsys):
    from actors import anomaly
    from experiments.remote import check_resources
    from experiments.spec import load_spec

    spec = tmp_path / "s.toml"
    spec.write_text('name = "bare"\n')
    assert run_cli(capsys, "get", str(spec), "resources.cpus").strip() == "1"
    assert check_resources(load_spec(spec)) == {"cpus": 1.0, "gpus": 0.0}  # what the ray backend reserves
    capsys.readouterr()
    assert main(["get", str(spec), "anomaly.threshold"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out) == anomaly.DEFAULT_THRESHOLDS
    assert "anomaly.threshold: not set in the spec: each method's default" in got.err
    assert run_cli(capsys, "get", str(spec), "anomaly.threshold.iqr").strip() == "1.5"
    err = usage_error(capsys, "get", str(spec), "anomaly.metrics")
    assert "not set in the spec: every numeric field" in err and "no such key" not in err
    err = usage_error(capsys, "get", str(spec), "telemetry.batch_sise")  # as run and set list them
    assert "telemetry.batch_sise: unknown key (known here: " in err and "telemetry.batch_size" in err
    shown = run_cli(capsys, "show", str(spec))
    assert "[resources]\ncpus = 1\ngpus = 0\n" in shown and "[anomaly.threshold]\nz_score = 3.0\n" in shown
    assert "# metrics: not set in the spec: every numeric field" in shown
    again = tmp_path / "again.toml"
    again.write_text(shown)  # the effective spec is a spec meaning the same
    unset = "# threshold: not set in the spec: each method's default\n"
    assert unset in shown and run_cli(capsys, "show", str(again)) == shown.replace(unset, "")


@pytest.mark.parametrize(
    "deep",
    [
        "[metadata]\nx = " + "[" * 300 + "]" * 300,
        "[workload.params]\nx = " + "{a = " * 300 + "1" + "}" * 300,
        "[metadata]\nx = " + "[" * 3000 + "]" * 3000,
    ],
)
def test_a_spec_nested_too_deep_is_one_line_from_every_command_and_runs_nothing(tmp_path, capsys, deep):
    spec = tmp_path / "deep.toml"
    spec.write_text(f'name = "deep"\ntime_budget_s = 0.5\n{deep}\n')
    art = tmp_path / "art"
    for argv in (
        ["run", str(spec), "--no-live"],
        ["tune", str(spec), "--trials", "1"],
        ["ab", str(spec), "--runs", "2"],
        ["get", str(spec), "name"],
        ["show", str(spec)],
        ["set", str(spec), "seed=2"],
    ):
        if argv[0] in ("run", "tune", "ab"):
            argv += ["--artifacts", str(art)]
        err = usage_error(capsys, *argv)
        assert f"{spec}: " in err and "nested more than 100 levels deep" in err, err
    assert not (art / "deep").exists()  # no run folder: the spec is refused before anything starts
    assert spec.read_text().endswith(f"{deep}\n")  # set left the file as it was


def test_a_malformed_assignment_is_named_as_typed_by_set_and_as_a_flag_by_run(tmp_path, capsys):
    """set takes KEY=VALUE arguments, not --set: its errors name what was typed alone; run's
    keep the flag, which it has."""
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=5, seed=1, calls=0))
    before = spec.read_bytes()
    for typed, said in (("seed", "'seed': expected key=value"), ("a..b=1", "'a..b=1': bad key 'a..b'")):
        err = usage_error(capsys, "set", str(spec), typed)
        assert f"{spec}: {said}" in err and "--set" not in err
    assert spec.read_bytes() == before
    assert "--set 'seed': expected key=value" in usage_error(capsys, "run", str(spec), "--set", "seed")


def test_set_refuses_an_edit_larger_than_a_spec_may_be_and_leaves_the_file(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text("# mine\n" + LATENCY.format(budget=5, seed=1, calls=0))
    before = spec.read_bytes()
    for assignments in (
        ["metadata.blob=" + "a" * 3_000_000],  # a string of 3 MB
        ["metadata.nums=[" + ",".join(["1"] * 400_000) + "]"],  # 400_000 numbers: 1.2 MB as TOML
        ["metadata.a=" + "a" * 600_000, "metadata.b=" + "b" * 600_000],  # each fits, not both
    ):
        err = usage_error(capsys, "set", str(spec), *assignments)
        assert f"{spec}: " in err and "more than the 1,048,576 a spec may hold; nothing changed" in err
        assert len(err) < 300  # the value is not quoted back
        assert spec.read_bytes() == before


def test_set_writes_a_long_value_whole_and_echoes_it_cut_short(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=5, seed=1, calls=0))
    text = 'say "hi"\\\x01' * 2_000  # escapes on every few characters
    nums = list(range(20_000))  # tomlkit's own conversion took 40 s over this list, and show as long again
    out = run_cli(capsys, "set", str(spec), f"metadata.text={json.dumps(text)}", f"metadata.nums={nums}", "seed=3")
    assert len(out) < 400 and "characters)" in out and "seed=3" in out
    assert len(spec.read_bytes()) < 1 << 20
    got = json.loads(run_cli(capsys, "get", str(spec), "metadata"))
    assert got == {"text": text, "nums": nums}
    shown = run_cli(capsys, "show", str(spec))
    assert "[metadata]" in shown and "nums = [0, 1, 2, 3, " in shown and shown.count("\n") < 100


# --- color, tune, ab -------------------------------------------------------------------------------------


def test_color_prints_a_table_with_passes(tmp_path, capsys):
    out = run_cli(
        capsys,
        "color",
        "myciel5",
        "--time-limit",
        "0.6",
        "--passes",
        "2",
        "--phases",
        "tabu",
        "--gpu",
        "cpu",
        "--artifacts",
        str(tmp_path / "art"),
    )
    assert "colouring of myciel5 (47 vertices" in out and "proper" in out and "True" in out


def test_tune_proposes_parameters_after_learning_from_a_prior_run(runs, tmp_path, capsys):
    _, dirs = runs
    spec = tmp_path / "t.toml"
    spec.write_text(LATENCY.format(budget=30, seed=1, calls=300))  # the prior runs' budget; ends after its calls
    out = run_cli(
        capsys,
        "tune",
        str(spec),
        "--trials",
        "2",
        "--objective",
        "latency_ms",
        "--seed-from",
        str(dirs[0]),
        "--artifacts",
        str(tmp_path / "art"),
    )
    assert "learned from 1 prior run(s) and 2 trial(s)" in out and "workload.params.calls_per_step=" in out
    assert out.count("trial ") == 2 and "trial 0: latency_ms=" in out
    res = json.loads(  # no --objective: the workload's declared one (latency_ms, minimised)
        run_cli(capsys, "tune", str(spec), "--trials", "1", "--json", "--artifacts", str(tmp_path / "art"))
    )
    assert res["objective"] == "latency_ms" and res["direction"] == "min"
    assert len(res["trials"]) == 1 and res["proposal"] and res["trials"][0]["latency_ms"] > 0
    err = usage_error(
        capsys,
        "tune",
        str(spec),
        "--trials",
        "1",
        "--set",
        "workload.params.calls=-1",
        "--artifacts",
        str(tmp_path / "art"),
    )
    assert "calls" in err


def test_ab_runs_both_arms_and_reports_the_statistics(tmp_path, capsys):
    spec = tmp_path / "c.toml"
    spec.write_text(COLORING.format(extra=""))
    art = str(tmp_path / "art")
    out = " ".join(run_cli(capsys, "ab", str(spec), "--runs", "2", "--budget", "0.3", "--artifacts", art).split())
    assert "hypertune A/B: 2 runs per arm" in out and "final_best: Mann-Whitney p =" in out
    assert f"final {objective_of('coloring').label}" in out  # the table row, named by the declared label
    assert out.count("hypertune on seed") == 2 and out.count("hypertune off seed") == 2
    rep = json.loads(
        run_cli(
            capsys, "ab", str(spec), "--runs", "2", "--budget", "0.2", "--target", "50", "--json", "--artifacts", art
        )
    )
    assert rep["target"] == 50 and rep["arms"]["on"]["runs"] == rep["arms"]["off"]["runs"] == 2
    assert rep["objective"] == "chromatic_number" and rep["direction"] == "min" and "final_best" in rep
    assert rep["arms"]["on"]["reached_target"] == 2  # any proper colouring of 40 vertices has <= 40 colours
    assert "runs" not in rep


def test_summary_table_lists_restarts(tmp_path):
    from rich.console import Console

    from cli.render import summary_table

    s = orjson.loads(
        orjson.dumps(
            {
                "experiment_id": "e",
                "run_id": "r",
                "status": "stopped",
                "restarts": {"phase": 2},
                "phases": {
                    "tabu": {"events": 3, "duration_s": 1.0, "best": {"conflicts": 0.0, "k": 27.0, "active_s": 9.0}},
                    "custom": {"events": 1, "duration_s": 0.5, "best": {"loss": 0.25}},
                },
            }
        )
    )
    console = Console(record=True, width=200)
    console.print(summary_table(s))
    text = console.export_text()
    assert "phase: 2" in text and "conflicts=0" in text
    assert "k=27" not in text and "active_s" not in text  # an objective's fields, not every minimum
    assert "loss=0.25" in text  # a phase with none of them: its own fields


@pytest.mark.parametrize("table", ["summary", "figures"])
def test_a_long_path_in_a_result_table_wraps_whole_on_a_narrow_terminal(table):
    """The paths a user copies from ``run`` and ``color`` are wrapped, not cut to an ellipsis."""
    from rich.console import Console

    from cli.render import figures_table, summary_table

    path = "artifacts/color-DSJC250.5/20261124T031859Z-d3cbc6/coloring-k28-a-rather-long-name.json"
    console = Console(record=True, width=60)
    if table == "summary":
        console.print(summary_table({"experiment_id": "e", "run_id": "r", "run_dir": path}))
    else:
        console.print(figures_table("colouring", {"k": 28, "coloring_path": path}))
    text = console.export_text()
    cells = "".join(line.split("│")[-2].strip() for line in text.splitlines() if line.count("│") >= 3)
    assert path in cells and "…" not in text


def test_run_reads_its_spec_once_so_a_pipe_runs_the_spec_it_held(tmp_path):
    """``crucible run /dev/stdin``: the spec that was checked is the one that runs (a second
    read of the pipe would find it empty: a default spec, another experiment)."""
    import subprocess
    import sys

    art = tmp_path / "art"
    summary = tmp_path / "s.json"
    argv = [sys.executable, "-m", "supervisor", "run", "/dev/stdin", "--artifacts", str(art), "--no-live"]
    argv.extend(["--json-summary", str(summary)])
    r = subprocess.run(
        argv,
        input=LATENCY.format(budget=0.3, seed=1, calls=0).replace('"lat"', '"piped"'),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 0, r.stderr
    assert [p.name for p in art.iterdir() if p.is_dir() and p.name != "hypertune"] == ["piped"]
    spec = orjson.loads(next((art / "piped").iterdir()).joinpath("spec.json").read_bytes())
    assert spec["source"] == "/dev/stdin" and spec["workload"]["params"]["target"] == "math:sqrt"
    assert orjson.loads(summary.read_bytes())["experiment_id"] == "piped"


def test_a_closed_stdout_does_not_cost_the_json_summary(tmp_path):
    """``crucible run spec --json-summary s.json | true``: the table cannot be printed, the file is written."""
    import os
    import subprocess
    import sys

    spec = tmp_path / "s.toml"
    spec.write_text(LATENCY.format(budget=0.3, seed=1, calls=0))
    summary = tmp_path / "s.json"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first print meets a broken pipe
    argv = [sys.executable, "-m", "supervisor", "run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live"]
    argv.extend(["--json-summary", str(summary)])
    try:
        r = subprocess.run(
            argv,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
    finally:
        os.close(write_end)
    assert r.returncode == 141, r.stderr
    assert orjson.loads(summary.read_bytes())["experiment_id"] == "lat"


def test_color_refuses_to_judge_a_graph_other_than_the_one_it_solved(tmp_path, capsys, monkeypatch):
    """The file replaced between the command's read and the run's: the colouring is not checked
    against the wrong graph (a false 'not proper'), the command says what happened."""
    import experiments.coloring.graph as graph_mod

    path = tmp_path / "g.col"
    path.write_text("p edge 4 3\ne 1 2\ne 2 3\ne 3 4\n")
    real = graph_mod.read_dimacs

    def read_then_replace(p):
        g = real(p)
        path.write_text("p edge 5 0\n")  # another graph for the run to read
        return g

    monkeypatch.setattr(graph_mod, "read_dimacs", read_then_replace)
    argv = ["color", str(path), "--time-limit", "0.3", "--phases", "tabu", "--gpu", "cpu"]
    err = usage_error(capsys, *argv, "--artifacts", str(tmp_path / "art"))
    assert "the file changed while the run read it" in err


@pytest.mark.parametrize("columns", ["0", "-3", "wide", ""])
def test_a_terminal_width_no_terminal_has_still_prints_the_table(runs, capsys, monkeypatch, columns):
    art, _ = runs
    monkeypatch.setenv("COLUMNS", columns)
    out = run_cli(capsys, "list", "--artifacts", str(art))
    assert "lat" in out and "stopped" in out


def test_a_listing_written_to_a_file_keeps_run_ids_and_paths_whole(runs, capsys, monkeypatch):
    """``crucible list > runs.txt`` or ``| grep``: nothing cut to 80 columns."""
    art, dirs = runs
    monkeypatch.delenv("COLUMNS", raising=False)
    out = run_cli(capsys, "list", "--artifacts", str(art))
    for d in dirs:
        assert d.name in out and str(d) in out
