"""``crucible list`` reads the history's ``runs`` table and falls back to the run folders; run
lookups fail with :class:`telemetry.rundir.RunNotFound`, which the CLI prints as a usage error."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from supervisor import main
from telemetry import rundir
from telemetry.jsonl import iter_run, run_segments
from telemetry.rundir import RunNotFound
from telemetry.store import DB_NAME

SPEC = (
    'name = "lst"\ntime_budget_s = 30\nseed = {seed}\n'
    '[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\ncalls = 200\n'
)
FIGURES = ("experiment", "run_id", "status", "reason", "events", "duration_s", "best", "path")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two finished runs (each ends once its calls are made): (artifacts, {run id: run dir})."""
    root = tmp_path_factory.mktemp("list")
    art = root / "art"
    for seed in (1, 2):
        spec = root / f"s{seed}.toml"
        spec.write_text(SPEC.format(seed=seed))
        assert main(["run", str(spec), "--artifacts", str(art), "--no-live"]) == 0
    return art, {p.name: p for p in (art / "lst").iterdir()}


def listed(capsys, art: Path) -> dict[str, dict]:
    capsys.readouterr()
    assert main(["list", "--json", "--artifacts", str(art)]) == 0
    return {i["run_id"]: i for i in (json.loads(line) for line in capsys.readouterr().out.splitlines())}


def copy_of(finished, tmp_path) -> tuple[Path, dict[str, Path]]:
    art, runs = finished
    mine = tmp_path / "art"
    shutil.copytree(art, mine, ignore=shutil.ignore_patterns("dashboard.token"))
    return mine, {k: mine / "lst" / k for k in runs}


def test_list_reads_the_runs_table_for_runs_that_ended(finished, tmp_path, capsys):
    art, runs = copy_of(finished, tmp_path)
    before = listed(capsys, art)
    assert set(before) == set(runs) and all(i["source"] == "history" for i in before.values())
    assert all(i["status"] == "stopped" and i["events"] > 0 for i in before.values())
    victim = next(iter(runs))
    for run_id, run in runs.items():  # each run's best on its objective: the lowest latency of a call that worked
        calls = [e for e in iter_run(run) if e["name"] == "call" and e.get("success") is not False]
        lowest = min(e["values"]["latency_ms"] for e in calls)
        assert before[run_id]["best"] == {"latency_ms": pytest.approx(lowest)}
    for seg in run_segments(runs[victim]):  # the table has the figures: the events files are not needed
        seg.unlink()
    (runs[victim] / "summary.json").unlink()
    after = listed(capsys, art)
    assert after[victim]["source"] == "history" and after[victim]["events"] == before[victim]["events"]


def test_list_falls_back_to_the_folders_without_the_database_with_the_same_figures(finished, tmp_path, capsys):
    art, runs = copy_of(finished, tmp_path)
    from_history = listed(capsys, art)
    for suffix in ("", "-wal", "-shm"):
        (art / (DB_NAME + suffix)).unlink(missing_ok=True)
    from_files = listed(capsys, art)
    assert set(from_files) == set(runs) and all(i["source"] == "files" for i in from_files.values())
    for run_id in runs:
        assert {k: from_files[run_id][k] for k in FIGURES} == {k: from_history[run_id][k] for k in FIGURES}
    capsys.readouterr()
    assert main(["list", "--artifacts", str(art)]) == 0  # the table form, too
    out = capsys.readouterr().out
    assert "runs in" in out and out.count("lst") >= len(runs)
    assert out.count("latency_ms ") == len(runs)  # each run's best, labelled (as a table, or a line per run)


def test_a_run_missing_from_the_table_is_read_from_its_folder(finished, tmp_path, capsys):
    art, runs = copy_of(finished, tmp_path)
    gone, kept = sorted(runs)
    with sqlite3.connect(art / DB_NAME) as db:
        db.execute("DELETE FROM runs WHERE run_id = ?", (gone,))
    db.close()
    copied = art / "lst" / "20990101T000000Z-abcdef"  # a run folder copied in from elsewhere
    shutil.copytree(runs[kept], copied)
    got = listed(capsys, art)
    assert got[gone]["source"] == "files" and got[kept]["source"] == "history"
    assert got[copied.name]["source"] == "files" and got[copied.name]["events"] == got[kept]["events"] > 0
    assert got[gone]["events"] > 0 and got[gone]["status"] == "stopped"


def test_an_unreadable_database_is_no_obstacle(finished, tmp_path, capsys):
    art, runs = copy_of(finished, tmp_path)
    for suffix in ("-wal", "-shm"):
        (art / (DB_NAME + suffix)).unlink(missing_ok=True)
    (art / DB_NAME).write_bytes(b"not a database at all" * 100)
    assert rundir.recorded_runs(art) is None
    got = listed(capsys, art)
    assert set(got) == set(runs) and all(i["source"] == "files" for i in got.values())


def test_a_folder_of_runs_given_as_a_run_names_its_newest_runs(finished, tmp_path, capsys, monkeypatch):
    """An experiment folder (or an artifacts folder) given where a run is asked for is said to
    be one, naming its newest run first (it read as a malformed run id); monitor, which can
    take the newest run of an artifacts folder, says --latest."""
    art, runs = copy_of(finished, tmp_path)
    first, second = runs.values()
    early = first.rename(art / "lst" / "20200101T000000Z-aaaaaa")
    late = second.rename(art / "lst" / "20200101T000001Z-000000")
    os.utime(early, (late.stat().st_mtime + 60,) * 2)  # touched later (resumed, archived): still started earlier
    for folder, kind in ((art / "lst", "experiment"), (art, "artifacts")):
        with pytest.raises(rundir.NotARunFolder) as e:
            rundir.resolve_run(str(folder), art)
        assert e.value.kind == kind and e.value.runs == [late, early]  # the latest started first
        assert f"{str(folder)!r} is an {kind} folder, not a run: its newest runs are {str(late)!r}, " in str(e.value)
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["export", str(folder), "--artifacts", str(art)])
        err = capsys.readouterr().err
        assert f"is an {kind} folder, not a run" in err and str(late) in err and "run id" not in err
    monkeypatch.chdir(art)  # the experiment's folder by its name, a valid run id that no run has
    with pytest.raises(rundir.NotARunFolder, match="'lst' is an experiment folder, not a run"):
        rundir.resolve_run("lst", art)
    with pytest.raises(SystemExit):
        main(["monitor", str(art), "--artifacts", str(art)])
    assert f"or --latest --artifacts {str(art)!r} for its newest" in capsys.readouterr().err


def test_run_lookups_raise_run_not_found(finished, tmp_path):
    art, runs = finished
    with pytest.raises(RunNotFound, match="neither a run directory nor a valid run id") as e:
        rundir.resolve_run("../../etc", art)
    assert isinstance(e.value, LookupError)
    with pytest.raises(RunNotFound, match=r"no run '20990101T000000Z-000000' under .*; recent runs: "):
        rundir.resolve_run("20990101T000000Z-000000", art)
    some = next(iter(runs))
    assert rundir.resolve_run(some, art) == runs[some]
    assert rundir.latest_run(art) in runs.values()


def test_runs_are_newest_started_first_whatever_touched_their_folders_since(tmp_path):
    """By the start time in the run id; within one second, and for ids of another form, by
    the folder's time. A folder's mtime alone put an old run that had just checkpointed first."""
    exp = tmp_path / "art" / "e"
    names = ["20250101T000000Z-ffffff", "20250101T000002Z-000000", "20250101T000002Z-aaaaaa", "copied-run"]
    for name in names:
        (exp / name).mkdir(parents=True)
        (exp / name / "lifecycle.json").write_text("{}")
    t = 1_800_000_000  # 2027: later than every start above
    for name, at in zip(names, (t + 50, t + 1, t + 2, t + 10), strict=True):
        os.utime(exp / name, (at, at))
    order = [p.name for p in rundir.find_runs(tmp_path / "art")]
    assert order == ["copied-run", "20250101T000002Z-aaaaaa", "20250101T000002Z-000000", "20250101T000000Z-ffffff"]
    assert rundir.latest_run(tmp_path / "art").name == "copied-run"
    os.utime(exp / "copied-run", (0, 0))  # an id of another form: its folder's time alone places it
    assert rundir.latest_run(tmp_path / "art").name == "20250101T000002Z-aaaaaa"
    with pytest.raises(RunNotFound, match="no runs under"):
        rundir.latest_run(tmp_path / "empty")


def test_the_cli_prints_a_missing_run_as_one_line_and_exits_2(finished, tmp_path, capsys):
    art, _ = finished
    for argv in (
        ["export", "20990101T000000Z-000000", "--artifacts", str(art)],
        ["compare", "20990101T000000Z-000000", "x", "--metric", "m", "--artifacts", str(art)],
        ["monitor", "--latest", "--artifacts", str(tmp_path / "empty")],
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"crucible {argv[0]}: error: no run"), err


def test_a_run_killed_between_two_summaries_lists_the_best_of_its_later_events(finished, tmp_path, capsys):
    """A run killed after a better value reached its events but before its next summary:
    ``list`` took the best from the lagging summary (colours 29 where its events held 28)."""
    art, runs = copy_of(finished, tmp_path)
    for suffix in ("", "-wal", "-shm"):  # the figures then come from the folders
        (art / (DB_NAME + suffix)).unlink(missing_ok=True)
    run = runs[sorted(runs)[0]]
    before = listed(capsys, art)[run.name]
    lines = (run / "events.jsonl").read_bytes().splitlines()
    last = json.loads(lines[-1])
    better = before["best"]["latency_ms"] / 2
    later = {**last, "seq": last["seq"] + 1, "name": "call", "success": True, "values": {"latency_ms": better}}
    with (run / "events.jsonl").open("ab") as f:
        f.write(json.dumps(later).encode() + b"\n")
    old = (run / "events.jsonl").stat().st_mtime - 10
    os.utime(run / "summary.json", (old, old))  # written before that event
    life = json.loads((run / "lifecycle.json").read_bytes())  # and then the process died
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    life.update(status="running", reason=None, ended_at=None, owner={**life["owner"], "pid": int(gone.stdout)})
    (run / "lifecycle.json").write_text(json.dumps(life))
    after = listed(capsys, art)[run.name]
    assert after["status"] == "crashed" and after["summary_stale"] and after["events"] == before["events"] + 1
    assert after["best"] == {"latency_ms": better}


def test_a_run_whose_events_file_cannot_be_read_is_named_and_spares_the_others(finished, tmp_path, capsys):
    """A folder where a run's events file should be: ``list`` shows that run as unreadable,
    with the reason, and every other run as before; the readers of that run are one line,
    exit 2, naming the file; ``export`` leaves no output file behind."""
    art, runs = copy_of(finished, tmp_path)
    for suffix in ("", "-wal", "-shm"):  # the figures then come from the files
        (art / (DB_NAME + suffix)).unlink(missing_ok=True)
    broken, fine = sorted(runs)
    before = listed(capsys, art)
    (runs[broken] / "events.jsonl").unlink()
    (runs[broken] / "events.jsonl").mkdir()
    summary = runs[broken] / "summary.json"
    old = (runs[broken] / "events.jsonl").stat().st_mtime - 10
    os.utime(summary, (old, old))  # older than the events: they are counted (a touch made it newer, by chance)
    got = listed(capsys, art)
    assert got[fine] == before[fine]
    assert got[broken]["events"] is None and got[broken]["status"] == "stopped"
    assert "events.jsonl' cannot be read: Is a directory" in got[broken]["evidence"][-1]
    capsys.readouterr()
    assert main(["list", "--artifacts", str(art)]) == 0
    assert "unreadable" in capsys.readouterr().out
    out = tmp_path / "out.jsonl"
    for argv in (
        ["monitor", broken, "--summary"],
        ["compare", broken, fine, "--metric", "conflicts"],
        ["export", broken, "--out", str(out)],
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([*argv, "--artifacts", str(art)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"run file '{runs[broken] / 'events.jsonl'}' cannot be read: Is a directory" in err, err
    assert not list(tmp_path.glob("*out.jsonl*"))  # neither the output nor its partial file


def test_mistakes_in_what_to_read_are_one_line_and_exit_2(finished, tmp_path, capsys):
    art, runs = finished
    some = next(iter(runs))
    for argv, said in (
        (["list", "--artifacts", str(tmp_path / "nowhere")], "no artifacts folder"),
        (["monitor", some, "--latest", "--artifacts", str(art)], "or --latest, not both"),
        (["monitor", some, "--alert", "conflicts>1e400", "--artifacts", str(art)], "1e400 is not a finite number"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and said in err, err


def test_a_summary_that_cannot_be_read_falls_back_to_the_events(finished, tmp_path, capsys):
    art, runs = copy_of(finished, tmp_path)
    for suffix in ("", "-wal", "-shm"):
        (art / (DB_NAME + suffix)).unlink(missing_ok=True)
    before = listed(capsys, art)
    run = sorted(runs)[0]
    (runs[run] / "summary.json").unlink()
    (runs[run] / "summary.json").mkdir()
    after = listed(capsys, art)
    assert after[run]["events"] == before[run]["events"] > 0 and after[run]["status"] == "stopped"
    capsys.readouterr()
    assert main(["monitor", run, "--summary", "--artifacts", str(art)]) == 0
    assert f"persisted {before[run]['events']}," in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as refused:  # the stream's filters are not quietly dropped
        main(["monitor", run, "--summary", "--phase", "tabu", "--alert", "latency_ms>1", "--artifacts", str(art)])
    assert refused.value.code == 2
    assert "--phase, --alert: for --tail and --follow" in capsys.readouterr().err


def test_output_options_never_replace_recorded_files(finished, tmp_path, capsys):
    """``export --out`` and ``run --json-summary`` naming a run's events, its records, the
    history or the Lab's own files (the daemon's queue, hypertune's state): one line, exit 2,
    and the file is byte for byte what it was."""
    art, runs = copy_of(finished, tmp_path)
    run_id, run_dir = next(iter(runs.items()))
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(seed=3))
    (art / "hypertune").mkdir(exist_ok=True)
    (art / "hypertune" / "latency-x.json").write_text('{"arms": {}}')  # what hypertune learned
    (art / "queue.json").write_text('{"queue": []}')
    (art / "history.sqlite3.lock").write_text("")
    victims = [run_dir / "events.jsonl", run_dir / "summary.json", art / DB_NAME]
    victims += [art / "hypertune" / "latency-x.json", art / "queue.json", art / "history.sqlite3.lock"]
    before = {v: v.read_bytes() for v in victims}
    for victim in victims:
        for argv in (
            ["export", run_id, "--artifacts", str(art), "--format", "csv", "--out", str(victim)],
            ["run", str(spec), "--artifacts", str(tmp_path / "other"), "--no-live", "--json-summary", str(victim)],
        ):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and "refusing to replace" in err and len(err.strip().splitlines()) == 1, err
    assert {v: v.read_bytes() for v in victims} == before
    out = tmp_path / "fine.csv"
    out.write_text("an earlier export\n")  # an ordinary file is replaced as before
    assert main(["export", run_id, "--artifacts", str(art), "--format", "csv", "--out", str(out)]) == 0
    assert out.read_text() != "an earlier export\n"


def test_the_cli_sits_above_experiments_and_dashboard():
    """Neither the experiments nor the dashboard import the command line; an installed wheel has it."""
    code = (
        "import sys\n"
        "import experiments.lab, telemetry.rundir, experiments.monitor, experiments.tuning, dashboard.server\n"
        "print(sorted(m for m in sys.modules if m == 'cli' or m.startswith('cli.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "cli*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert project["project"]["scripts"]["crucible"] == "cli:main"  # the same main as supervisor.main


# --- the same readers over a named history: SQLite or PostgreSQL -------------------------------------------------

pytest_plugins = ["tests.pg_server"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def finished_in(request, tmp_path_factory):
    """Two finished runs whose history went where ``--history`` said: a SQLite file outside the
    artifacts folder, or a PostgreSQL database. (artifacts, history, {run id: run dir})."""
    from tests.pg_server import pg_server

    root = tmp_path_factory.mktemp(f"history-{request.param}")
    art = root / "art"
    history = str(root / "elsewhere.sqlite3") if request.param == "sqlite" else pg_server().new_database()
    for seed in (1, 2):
        spec = root / f"s{seed}.toml"
        spec.write_text(SPEC.format(seed=seed))
        assert main(["run", str(spec), "--artifacts", str(art), "--no-live", "--history", history]) == 0
    assert not (art / DB_NAME).exists()  # nothing went to the default
    return art, history, {p.name: p for p in (art / "lst").iterdir()}


def test_the_readers_read_a_named_history_as_they_read_the_files(finished_in, tmp_path, capsys):
    """list, export, compare and monitor --summary give the same answers from the history
    (``--history``, or CRUCIBLE_HISTORY) as from the runs' files; export and compare need no
    run folder when the history is named."""
    art, history, runs = finished_in
    a, b = sorted(runs)

    def run_cli(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    got = {
        i["run_id"]: i
        for i in map(json.loads, run_cli("list", "--json", "--artifacts", str(art), "--history", history).splitlines())
    }
    assert set(got) == set(runs) and all(i["source"] == "history" and i["events"] > 0 for i in got.values())
    plain = {i["run_id"]: i for i in map(json.loads, run_cli("list", "--json", "--artifacts", str(art)).splitlines())}
    assert all(plain[r]["source"] == "files" and plain[r]["events"] == got[r]["events"] for r in runs)

    files_out, hist_out = tmp_path / "files.jsonl", tmp_path / "history.jsonl"
    run_cli("export", a, "--artifacts", str(art), "--out", str(files_out))
    run_cli("export", a, "--artifacts", str(art), "--history", history, "--out", str(hist_out))
    assert hist_out.read_bytes() == files_out.read_bytes() and len(files_out.read_bytes().splitlines()) > 0
    metric = "latency_ms"  # one per call

    cmp_files = run_cli("compare", a, b, "--metric", metric, "--json", "--artifacts", str(art))
    cmp_hist = run_cli("compare", a, b, "--metric", metric, "--json", "--artifacts", str(art), "--history", history)
    assert json.loads(cmp_hist) == json.loads(cmp_files)

    mon_files = run_cli("monitor", a, "--summary", "--artifacts", str(art))
    mon_hist = run_cli("monitor", a, "--summary", "--artifacts", str(art), "--history", history)
    assert mon_hist == mon_files and "persisted" in mon_files

    away = tmp_path / "moved"  # the run's folder gone (on another host, say): the history still has its events
    shutil.move(str(runs[a]), away)
    try:
        capsys.readouterr()
        run_cli("export", a, "--artifacts", str(art), "--history", history, "--out", str(tmp_path / "again.jsonl"))
        assert (tmp_path / "again.jsonl").read_bytes() == files_out.read_bytes()
        with pytest.raises(SystemExit) as e:
            main(["export", "20990101T000000Z-000000", "--artifacts", str(art), "--history", history])
        assert e.value.code == 2 and "no run '20990101T000000Z-000000' in the history" in capsys.readouterr().err
    finally:
        shutil.move(str(away), runs[a])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_schema"])
def test_a_run_on_a_damaged_history_is_one_line_and_exit_2(finished, tmp_path, capsys, damage):
    """A history that is not a database, a cut one, or one with other tables: ``run`` says so
    in one line naming the file, exit 2 (no traceback)."""
    import sqlite3

    art = tmp_path / "art"
    art.mkdir()
    db = art / DB_NAME
    if damage == "garbage":
        db.write_text("garbage\n")
    elif damage == "truncated":
        db.write_bytes((finished[0] / DB_NAME).read_bytes()[:20000])
    else:
        con = sqlite3.connect(db)
        con.executescript("CREATE TABLE runs (x); CREATE TABLE batches (y);")
        con.close()
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(seed=4))
    with pytest.raises(SystemExit) as e:
        main(["run", str(spec), "--artifacts", str(art), "--no-live"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "cannot be opened" in err, err


def test_the_users_text_prints_as_written_never_as_emoji(tmp_path, capsys, monkeypatch):
    """Rich renders ``:x:`` as an emoji by default: a folder named ``E:x:`` listed as ``E❌``
    cannot be pasted back, and a reason quoting ``root:x:0:0`` reads wrong. The CLI's
    consoles print the text as it is."""
    import io

    from cli import render

    out = io.StringIO()
    render.console(file=out, width=200).print("root:x:0:0 :thumbs_up: E:x:")
    assert out.getvalue().strip() == "root:x:0:0 :thumbs_up: E:x:"
    art = tmp_path / "E:x:"
    run = art / "exp" / "20261124T000000Z-abcdef"
    run.mkdir(parents=True)
    (run / "lifecycle.json").write_text(
        json.dumps({"status": "failed", "reason": "failed: bad line root:x:0:0", "updated_at": 1.0})
    )
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["list", "--artifacts", str(art)]) == 0
    shown = capsys.readouterr().out
    assert "E:x:" in shown and "root:x:0:0" in shown and "❌" not in shown


def test_monitor_summary_of_a_run_killed_before_its_first_summary_says_the_drops_are_not_known(tmp_path, capsys):
    from telemetry.schema import dumps_line

    run = tmp_path / "art" / "exp" / "20261124T000000Z-abcdef"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(
        b"".join(
            dumps_line({"v": 1, "seq": i, "ts": 1_000_000 + i, "experiment_id": "exp", "run_id": run.name, "name": "s"})
            for i in range(5)
        )
    )
    assert main(["monitor", str(run), "--summary"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "persisted 5, dropped not known (no summary.json says)" in out
    assert "None" not in out


def test_export_and_monitor_say_when_the_files_hold_fewer_events_than_the_summary_recorded(tmp_path, capsys):
    """Lines cut off an events file (a disk restored from an old copy, a careless ``head``):
    the export is of what is there, and says how many the summary says are gone and where
    to look (the history), as monitor --summary does; a whole run says nothing."""
    import orjson

    from telemetry.schema import dumps_line

    art = tmp_path / "art"
    run = art / "exp" / "20261124T000000Z-abcdef"
    run.mkdir(parents=True)
    lines = [
        dumps_line({"v": 1, "seq": i, "ts": 1_000_000 + i, "experiment_id": "exp", "run_id": run.name, "name": "s"})
        for i in range(10)
    ]
    (run / "events.jsonl").write_bytes(b"".join(lines))
    (run / "summary.json").write_bytes(orjson.dumps({"events_persisted": 10}))
    out = tmp_path / "whole.jsonl"
    assert main(["export", str(run), "--format", "jsonl", "--out", str(out)]) == 0
    assert "not in its files" not in "".join(capsys.readouterr())
    (run / "events.jsonl").write_bytes(b"".join(lines[:4]))
    os.utime(run / "summary.json")  # written after the events: the summary is current
    assert main(["export", str(run), "--format", "jsonl", "--out", str(tmp_path / "part.jsonl")]) == 0
    err = " ".join("".join(capsys.readouterr()).split())
    assert "exported 4 events" in err and "6 event(s) the run's summary says were recorded are not in its files" in err
    assert "--history" in err
    assert main(["monitor", str(run), "--summary"]) == 0
    assert "6 event(s) the run's summary says were recorded" in " ".join(capsys.readouterr().out.split())
