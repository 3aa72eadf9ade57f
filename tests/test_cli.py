import subprocess
import sys

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

    col = Path(__file__).resolve().parents[2] / "shared" / "dimacs" / "DSJC125.5.col"
    art = str(tmp_path / "art")
    assert main(["color", str(col), "--time-limit", "30", "--target", "18", "--json", "--artifacts", art]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"instance", "k", "proper", "seconds", "seconds_to_best", "colors_per_pass", "coloring_path"} <= set(r)
    assert r["proper"] and r["k"] <= 18 and r["instance"] == "DSJC125.5"
    saved = json.loads(Path(r["coloring_path"]).read_text())
    assert len(saved["coloring"]) == 125 and min(saved["coloring"]) == 1  # 1-based, like DIMACS ids
    with pytest.raises(SystemExit) as e:
        main(["color", str(col), "--target", "0", "--artifacts", art])
    assert e.value.code == 2 and "--target must be between 1 and" in capsys.readouterr().err
