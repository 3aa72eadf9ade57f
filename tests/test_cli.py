import os
import subprocess
import sys

import pytest

from supervisor import main


def test_demo_shows_restarts(capsys):
    assert main(["--log-level", "CRITICAL", "demo", "--seconds", "0.6"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the flaky worker was restarted" in out


def test_python_supervisor_py_is_the_same_program():
    r = subprocess.run([sys.executable, "supervisor.py", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in r.stdout


def test_run_list_export_compare(tmp_path, capsys):
    art = str(tmp_path / "art")
    spec = tmp_path / "s.toml"
    spec.write_text('name = "cli"\ntime_budget_s = 0.3\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n')
    assert main(["run", str(spec), "--artifacts", art, "--no-live", "--set", "seed=3"]) == 0
    assert main(["run", str(spec), "--artifacts", art, "--no-live"]) == 0
    out = capsys.readouterr().out
    assert "run summary" in out and "budget" in out
    runs = sorted(p.name for p in (tmp_path / "art" / "cli").iterdir())
    assert len(runs) == 2
    assert main(["list", "--artifacts", art]) == 0
    assert "runs in" in capsys.readouterr().out
    assert main(["list", "--artifacts", art, "--json"]) == 0
    import json

    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(i["run_id"] for i in listed) == runs
    assert all(i["status"] == "stopped" and i["events"] > 0 for i in listed)
    out_csv = tmp_path / "x.csv"
    assert main(["export", runs[0], "--format", "csv", "--out", str(out_csv), "--artifacts", art]) == 0
    assert out_csv.read_text().startswith("seq,ts,")
    capsys.readouterr()
    assert main(["compare", runs[0], runs[1], "--metric", "latency_ms", "--json", "--artifacts", art]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0.0 <= r["p_value"] <= 1.0 and r["metric"] == "latency_ms"
    run_dir = str(tmp_path / "art" / "cli" / runs[0])
    for twice in ([runs[0], runs[0]], [runs[0], run_dir]):  # a run against itself: no finding to report
        with pytest.raises(SystemExit) as e:
            main(["compare", *twice, "--metric", "latency_ms", "--artifacts", art])
        assert e.value.code == 2 and "are the same run" in capsys.readouterr().err


def test_usage_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    import pytest

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ncolour = 1\n')
    with pytest.raises(SystemExit) as e:
        main(["run", str(bad), "--artifacts", str(tmp_path / "art"), "--no-live"])
    assert e.value.code == 2
    assert "colour: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", "../../etc", "--artifacts", str(tmp_path / "art")])
    assert e.value.code == 2
    assert "neither a run directory nor a valid run id" in capsys.readouterr().err


def test_color_command_reports_a_checked_colouring(tmp_path, capsys):
    import json
    from pathlib import Path

    import pytest

    col = "DSJC125.5"  # a shipped instance, by name
    art = str(tmp_path / "art")
    assert main(["color", col, "--time-limit", "30", "--target", "18", "--json", "--artifacts", art]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"instance", "k", "proper", "seconds", "seconds_to_best", "colors_per_pass", "coloring_path"} <= set(r)
    assert r["proper"] and r["k"] <= 18 and r["instance"] == "DSJC125.5"
    saved = json.loads(Path(r["coloring_path"]).read_text())
    assert len(saved["coloring"]) == 125 and min(saved["coloring"]) == 1  # 1-based, like DIMACS ids
    with pytest.raises(SystemExit) as e:
        main(["color", col, "--target", "126", "--artifacts", art])
    assert e.value.code == 2
    assert "--target must be between 1 and the number of vertices (125)" in capsys.readouterr().err


# --- user errors: one line on stderr, exit 2 -----------------------------------------------------------


def _usage_error(argv, capsys):
    """Run the CLI; assert it refused with exit 2 and exactly one line on stderr; return the line."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


LATENCY = "experiments/latency.toml"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["color", "DSJC125.1", "--time-limit", "nan"], "argument --time-limit: must be a finite number in [0.001, "),
        (["color", "DSJC125.1", "--time-limit", "inf"], "argument --time-limit: must be a finite number"),
        (["color", "DSJC125.1", "--time-limit", "-1"], "argument --time-limit: must be a finite number"),
        (["color", "DSJC125.1", "--passes", "-1"], "argument --passes: must be an integer in [1, 1000], got '-1'"),
        (["color", "DSJC125.1", "--seed", "99999999999999999999"], "argument --seed: must be an integer in [0, "),
        (["color", "DSJC125.1", "--target", "0"], "argument --target: must be an integer in [1, "),
        (["tune", LATENCY, "--trials", "-3"], "argument --trials: must be an integer in [1, 10000]"),
        (["tune", LATENCY, "--budget", "nan"], "argument --budget: must be a finite number"),
        (["ab", LATENCY, "--runs", "-2"], "argument --runs: must be an integer in [2, 1000]"),
        (["demo", "--seconds", "-1"], "argument --seconds: must be a finite number in [0.1, 3600]"),
        (
            ["run", LATENCY, "--dashboard", "--dash-port", "99999"],
            "argument --dash-port: must be an integer in [0, 65535]",
        ),
        (["--log-level", "noisy", "demo"], "argument --log-level: invalid choice"),
        (
            ["run", LATENCY, "--set", "time_budget_s=nan"],
            "time_budget_s: must be a finite number in [0.001, 31_536_000]",
        ),
        (["run", LATENCY, "--set", "seed=99999999999999999999"], "seed: must be <= 4_294_967_295"),
        (["run", LATENCY, "--set", "metrics.compression=nan"], "metrics.compression: must be a finite number in [10, "),
        (["run", LATENCY, "--set", "anomaly.window=9223372036854775807"], "anomaly.window: must be <= 1_000_000"),
        (["run", LATENCY, "--set", "telemetry.flush_interval_s=nan"], "telemetry.flush_interval_s: must be a finite"),
        (["run", LATENCY, "--set", "metadata.when=-inf"], "metadata.when: must be a finite number, got -inf"),
        (["run", LATENCY, "--set", "workload.params.timeout_s=inf"], "must be a finite number"),
        (["set", LATENCY, "seed=nan"], "seed: must be an integer in [0, 4_294_967_295], got nan"),
    ],
)
def test_numbers_must_be_finite_and_in_range(tmp_path, capsys, argv, says):
    err = _usage_error(
        [*argv, *(["--artifacts", str(tmp_path / "art")] if argv[0] in ("run", "color") else [])], capsys
    )
    assert says in err


def test_bad_files_and_graphs_are_usage_errors(tmp_path, capsys):
    art = str(tmp_path / "art")
    spec = tmp_path / "latin1.toml"
    spec.write_bytes(b'name = "caf\xe9"\n')
    assert "the spec is not UTF-8 text (byte 0xe9 at offset 11)" in _usage_error(
        ["run", str(spec), "--artifacts", art], capsys
    )
    assert "not UTF-8" in _usage_error(["set", str(spec), "seed=1"], capsys)
    col = tmp_path / "g.col"
    col.write_bytes(b"p edge 3 1\ne 1 \xff\n")
    assert "g.col:2: vertex ids must be integers" in _usage_error(["color", str(col), "--artifacts", art], capsys)
    col.write_bytes(b"p edge 2147483648 1\ne 1 2\n")
    assert "g.col:1: N (vertices) must be <= 100_000" in _usage_error(["color", str(col), "--artifacts", art], capsys)
    assert "is not a shipped instance; shipped: DSJC1000.5" in _usage_error(
        ["color", "DSJC9", "--artifacts", art], capsys
    )
    gen = tmp_path / "gen.toml"
    gen.write_text(
        'name = "g"\ntime_budget_s = 1\n[workload]\nname = "coloring"\n'
        '[workload.params]\ngraph = { generator = "gnp", n = -5 }\n'
    )
    assert "gnp: n must be >= 1, got -5" in _usage_error(["run", str(gen), "--artifacts", art, "--no-live"], capsys)


def test_unwritable_places_and_busy_ports_are_usage_errors(tmp_path, capsys, monkeypatch):
    import socket

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "artifacts folder" in _usage_error(["run", LATENCY, "--artifacts", str(blocker / "art")], capsys)
    art = str(tmp_path / "art")
    assert "--json-summary" in _usage_error(
        ["run", LATENCY, "--artifacts", art, "--json-summary", str(tmp_path / "missing" / "s.json")], capsys
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = _usage_error(["run", LATENCY, "--artifacts", art, "--dashboard", "--dash-port", str(port)], capsys)
    assert f"dashboard cannot listen on 127.0.0.1:{port}" in err
    monkeypatch.setenv("CRUCIBLE_DASH_PORT", "99999")
    assert "CRUCIBLE_DASH_PORT must be an integer in [0, 65535]" in _usage_error(
        ["run", LATENCY, "--artifacts", art, "--dashboard"], capsys
    )


def test_set_on_a_spec_that_cannot_be_written(tmp_path, capsys, monkeypatch):

    import actors.files
    import experiments.specedit

    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n')
    monkeypatch.setattr(experiments.specedit.os, "access", lambda p, mode: mode != os.W_OK)
    assert "the spec is read-only; nothing changed" in _usage_error(["set", str(spec), "seed=3"], capsys)
    monkeypatch.undo()

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(actors.files.tempfile, "mkstemp", refuse)
    assert "cannot write the spec (Permission denied)" in _usage_error(["set", str(spec), "seed=3"], capsys)
    assert spec.read_text() == 'name = "s"\n' and sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_set_never_leaves_a_scratch_file_and_keeps_the_mode(tmp_path):
    from experiments.specedit import set_values

    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"  # keep me\n')
    spec.chmod(0o640)
    set_values(spec, ["seed=3"])
    assert spec.read_text() == 'name = "s"  # keep me\nseed = 3\n'
    assert spec.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]


def test_set_on_a_read_only_file(tmp_path, capsys):
    """0444 says "do not edit", to root too (who could write it anyway)."""
    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n')
    spec.chmod(0o444)
    assert "read-only" in _usage_error(["set", str(spec), "seed=3"], capsys)
    assert spec.read_text() == 'name = "s"\n'


def test_set_through_a_link_edits_the_file_and_keeps_the_link(tmp_path):
    from experiments.specedit import set_values

    real = tmp_path / "specs" / "s.toml"
    real.parent.mkdir()
    real.write_text('name = "s"\n')
    link = tmp_path / "current.toml"
    link.symlink_to(real)
    set_values(link, ["seed=3"])
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert real.read_text() == 'name = "s"\nseed = 3\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.toml", "specs"]


def test_a_malformed_alert_is_a_usage_error(tmp_path, capsys):
    run = tmp_path / "art" / "exp" / "run-1"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text('{"v":1,"seq":0,"ts":1,"name":"step","values":{"conflicts":3}}\n')
    for bad in ("conflicts>1.2.3", "conflicts>.", "conflicts >> 3"):
        assert "bad alert" in _usage_error(
            ["monitor", "--latest", "--no-wait", "--artifacts", str(tmp_path / "art"), "--alert", bad], capsys
        )


def test_instances_lists_the_shipped_graphs(capsys, monkeypatch):
    import json

    import experiments.coloring.catalog as catalog

    assert main(["instances", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["DSJC250.5"] == {
        "name": "DSJC250.5",
        "vertices": 250,
        "edges": 15668,
        "best_known": 28,
        "density": round(2 * 15668 / (250 * 249), 4),
        "proved_optimal": False,
    }
    assert rows["queen8_8"]["edges"] == 728 and rows["queen8_8"]["proved_optimal"] is True
    assert len(rows) >= 15
    monkeypatch.setattr(catalog, "instance_names", lambda: ["le450_15c", "myciel5"])  # the table, quickly
    assert main(["instances"]) == 0
    out = capsys.readouterr().out
    assert "le450_15c" in out and "15 *" in out and "DSJC250.5" not in out


def test_a_run_stopped_by_a_storage_failure_exits_1(tmp_path, capsys, monkeypatch):
    """A full disk stops the run with reason ``storage: ...``: a failure, so the exit code is 1."""
    from tests.test_pipeline_faults import ENOSPC, failing_insert

    failing_insert(monkeypatch, 3, ENOSPC)
    spec = tmp_path / "s.toml"
    spec.write_text(
        'name = "full"\ntime_budget_s = 60\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'
        "calls_per_step = 50\n[telemetry]\nbatch_size = 32\n"
    )
    summary = tmp_path / "summary.json"
    rc = main(["run", str(spec), "--artifacts", str(tmp_path / "art"), "--no-live", "--json-summary", str(summary)])
    import json

    s = json.loads(summary.read_text())
    assert s["reason"] == "storage: [Errno 28] No space left on device"
    assert rc == 1


@pytest.mark.parametrize("command", ["run", "color"])
def test_a_disk_with_less_free_space_than_a_run_needs_is_a_usage_error(tmp_path, capsys, command):
    """No run begins (it would end ``storage: ...`` at once): one line, exit 2, naming the
    figures and the way past the check."""
    art = tmp_path / "art"
    target = ["experiments/latency.toml", "--no-live"] if command == "run" else ["myciel5", "--time-limit", "1"]
    with pytest.raises(SystemExit) as e:
        main([command, *target, "--artifacts", str(art), "--min-free-mib", str(1 << 30)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err and "needs 1073741824.0 MiB" in err and "--min-free-mib 0" in err
    assert [p.name for p in art.iterdir() if p.is_dir()] == []  # no run folder


@pytest.mark.parametrize(
    ("summary", "failed"),
    [
        ({"reason": "completed"}, False),
        ({"reason": "budget", "storage_error": None}, False),
        ({"reason": None}, False),
        ({}, False),
        ({"reason": "failed: over the restart intensity"}, True),
        ({"reason": "storage: [Errno 28] No space left on device", "storage_error": "storage: [Errno 28] ..."}, True),
        ({"reason": "budget", "storage_error": "storage: disk I/O error"}, True),  # failed while the tree drained
    ],
)
def test_which_run_endings_are_failures(summary, failed):
    from cli.errors import run_failed

    assert run_failed(summary) is failed


def test_the_printed_dashboard_line_says_the_token_guards_reading(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "dash"\ntime_budget_s = 0.2\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n')
    art = tmp_path / "art"
    assert main(["run", str(spec), "--artifacts", str(art), "--no-live", "--dashboard", "--dash-port", "0"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("dashboard: "))
    token = (art / "dashboard.token").read_text().strip()
    says = (
        "(a sign-in link that works once; the token, which guards reading and control alike, "
        f"is kept in {art / 'dashboard.token'})"
    )
    assert says in line and "/#code=" in line
    assert token not in line  # the token is never put in a URL: it would stay in the browser's history


@pytest.mark.timeout(400)
def test_color_stops_cleanly_on_sigterm_and_sigint_and_reports(tmp_path):
    """A signal stops the run like a budget would: the pass is saved, the result printed."""
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    for sig in (signal.SIGTERM, signal.SIGINT):
        art = tmp_path / f"art{int(sig)}"
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor",
                "color",
                "DSJC250.5",
                "--time-limit",
                "120",
                "--json",
                "--artifacts",
                str(art),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180  # a cold start on a busy machine compiles the kernels
        while not list(art.glob("*/*/checkpoint.json")):  # the run is stepping once it checkpoints
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        r = json.loads(out.strip().splitlines()[-1])
        assert r["proper"] and r["reason"] == "stopped" and r["seconds"] < 100
        run = Path(r["run_dir"])
        assert (run / "best_solution.pass0.json").exists() and Path(r["coloring_path"]).exists()


def test_color_passes_end_on_stalls(tmp_path, capsys):
    import json

    art = str(tmp_path / "art")
    argv = ["color", "DSJC125.5", "--passes", "3", "--stall", "0.3", "--time-limit", "20", "--json", "--artifacts", art]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["colors_per_pass"]) == 3 and r["proper"] and r["reason"] == "completed"


def test_a_bad_spec_touches_no_artifacts_folder_or_history(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "x"\nseed = -1\n')
    art = tmp_path / "art"
    assert "seed: must be >= 0, got -1" in _usage_error(
        ["run", str(spec), "--artifacts", str(art), "--no-live"], capsys
    )
    assert not art.exists()


@pytest.mark.parametrize(
    "argv",
    [["list"], ["color", "myciel5"], ["lab", "serve"], ["tune", "x.toml"], ["monitor", "r"], ["export", "r"]],
)
def test_an_empty_artifacts_folder_name_is_refused(tmp_path, capsys, monkeypatch, argv):
    """``--artifacts ""`` (an unset variable) would put runs and the history in the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*argv, "--artifacts", ""])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--artifacts: must name a folder" in err
    assert list(tmp_path.iterdir()) == []


def test_color_with_a_bad_phase_leaves_no_artifacts_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["color", "myciel5", "--phases", "bogus", "--artifacts", str(tmp_path / "art")])
    assert e.value.code == 2 and "bogus" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()
