"""How ``crucible`` ends at the edges: output cut short by a closed pipe, a Ctrl-C in the
seconds before a run starts (or while its Lab shuts down), an artifacts path that is no
folder, and the modes of what a run writes.

The pipe and signal tests run the real program in a child process: what they check (the
last flush at exit, the interpreter's handling of SIGINT) only happens there."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import cli.run
from cli.exits import EXIT_INTERRUPTED, EXIT_OUTPUT_CLOSED
from supervisor import main

ROOT = Path(__file__).resolve().parents[1]
SPEC = 'name = "edge"\ntime_budget_s = 0.2\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'
PIPE_BYTES = 4096  # the smallest pipe Linux makes: a few runs' lines overflow it


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run's folder, made by ``crucible run``."""
    base = tmp_path_factory.mktemp("edges")
    spec = base / "s.toml"
    spec.write_text(SPEC)
    art = base / "art"
    assert main(["--log-level", "CRITICAL", "run", str(spec), "--artifacts", str(art), "--no-live"]) == 0
    (run,) = (art / "edge").iterdir()
    return run


def artifacts_with(tmp_path: Path, run: Path, n: int) -> Path:
    """An artifacts folder of ``n`` runs, copies of ``run`` (``crucible list`` reads them from their files)."""
    art = tmp_path / f"art{n}"
    for i in range(n):
        shutil.copytree(run, art / "edge" / f"{run.name[:-6]}{i:06x}")
    return art


def crucible(argv: list[str], stdout: int) -> subprocess.Popen[bytes]:
    """The ``crucible`` program in a child process (``python -m supervisor`` is the same program),
    its stdout buffered as a user's is: with ``PYTHONUNBUFFERED`` every print is a write of its
    own, and nothing is left for the last flush."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [sys.executable, "-m", "supervisor", *argv]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.PIPE)


def small_pipe() -> tuple[int, int]:
    """A pipe that holds only ``PIPE_BYTES``, so that a writer blocks until its reader reads or goes."""
    if not hasattr(fcntl, "F_SETPIPE_SZ"):  # pragma: no cover - Linux only
        pytest.skip("needs Linux's F_SETPIPE_SZ")
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    return r, w


def assert_quiet(err: bytes) -> None:
    text = err.decode(errors="replace")
    assert "Traceback" not in text and "BrokenPipeError" not in text and "Exception ignored" not in text, text


# --- a closed pipe -------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [False, True], ids=["json", "table"])
def test_output_cut_short_after_the_first_line_ends_quietly(tmp_path, one_run, table):
    """``crucible list | head -1``: the reader goes after one line while the list is still being
    written (far more than the pipe holds); the command ends quietly, exit 141 as on SIGPIPE."""
    art = artifacts_with(tmp_path, one_run, 60)
    r, w = small_pipe()
    p = crucible(["list", "--artifacts", str(art), *([] if table else ["--json"])], stdout=w)
    os.close(w)
    with os.fdopen(r, "rb", buffering=0) as reader:  # unbuffered: reads the first line and no more
        first = reader.readline()
    _, err = p.communicate(timeout=120)
    assert first.strip()  # it did print, and was cut off after that
    if not table:
        assert json.loads(first)["experiment"] == "edge"
    assert_quiet(err)
    assert p.returncode == EXIT_OUTPUT_CLOSED


def test_output_closed_before_the_last_flush_ends_quietly(tmp_path, one_run):
    """A short listing sits in stdout's buffer until the end; nobody reads it: the flush that fails
    is the command's own, not the interpreter's at exit (which would say "Exception ignored")."""
    art = artifacts_with(tmp_path, one_run, 3)
    r, w = os.pipe()
    p = crucible(["list", "--artifacts", str(art), "--json"], stdout=w)
    os.close(w)
    os.close(r)  # before the child writes anything: every write to its stdout fails
    _, err = p.communicate(timeout=120)
    assert_quiet(err)
    assert p.returncode == EXIT_OUTPUT_CLOSED


def test_a_listing_started_with_stdout_closed_is_no_success(tmp_path, one_run):
    """``crucible list --json >&-``: the listing has nowhere to go; the command says so on stderr
    and ends with 141, as on a closed pipe, not 0 with its output lost."""
    art = artifacts_with(tmp_path, one_run, 2)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    argv = [sys.executable, "-m", "supervisor", "list", "--artifacts", str(art), "--json"]
    p = subprocess.run(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=120)
    assert_quiet(p.stderr)
    assert p.returncode == EXIT_OUTPUT_CLOSED
    assert b"crucible list: warning: stdout is closed" in p.stderr
    bad = subprocess.run(  # a usage error keeps its own code
        [*argv[:-3], "--artifacts", str(tmp_path / "none")],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        timeout=120,
    )
    assert bad.returncode == 2 and b"no artifacts folder" in bad.stderr


def test_the_commands_that_print_their_product_are_those_the_docs_name():
    """With stdout closed these end with 141; the others did their work and end as they would have."""
    parser = cli.build_parser()
    argv = {
        "list": [],
        "ls": ["--to", "http://127.0.0.1:1/"],
        "compare": ["a", "b", "--metric", "m"],
        "monitor": [],
        "get": ["s", "k"],
        "show": ["s"],
        "instances": [],
        "tune": ["s"],
        "ab": ["s"],
        "run": ["s"],
        "color": ["g"],
        "submit": ["s", "--to", "http://127.0.0.1:1/"],
        "set": ["s", "k=v"],
        "export": ["r"],
        "sync": [],
        "demo": [],
        "stop": ["x", "--to", "http://127.0.0.1:1/"],
        "lab": ["serve"],
        "open": ["--to", "http://127.0.0.1:1/"],
    }
    prints = {c for c, rest in argv.items() if getattr(parser.parse_args([c, *rest]), "prints_result", False)}
    assert prints == {"list", "ls", "compare", "monitor", "get", "show", "instances", "tune", "ab", "open"}


def test_a_run_started_without_stdout_or_stderr_writes_into_no_file_of_its_own(tmp_path):
    """Started with stdout and stderr closed, a run's first files would take their numbers, and
    anything printed would land in them. Both are held on os.devnull from the start: the run's
    files hold only what they should, and the run is recorded in full."""
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    art = tmp_path / "art"
    code = (
        "import os, sys, cli\n"
        f"code = cli.main(['run', {str(spec)!r}, '--artifacts', {str(art)!r}, '--no-live'])\n"
        "print('stray line')\n"
        "sys.stderr.write('stray warning\\n')\n"
        "sys.stdout.flush(); sys.stderr.flush()\n"
        "held = [code, os.readlink('/proc/self/fd/1'), os.readlink('/proc/self/fd/2')]\n"
        f"open({str(tmp_path / 'fds')!r}, 'w').write(repr(held))\n"
    )

    def close_out_and_err() -> None:
        os.close(1)
        os.close(2)

    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, preexec_fn=close_out_and_err, timeout=120)
    assert p.returncode == 0
    assert ast.literal_eval((tmp_path / "fds").read_text()) == [0, os.devnull, os.devnull]  # the run is its product
    (run,) = (art / "edge").iterdir()
    for f in run.rglob("*"):
        if f.is_file():
            assert b"stray" not in f.read_bytes(), f
    rows = [json.loads(line) for line in (run / "events.jsonl").read_bytes().splitlines()]
    assert [r["seq"] for r in rows] == list(range(len(rows))) and rows
    assert json.loads((run / "lifecycle.json").read_bytes())["status"] == "stopped"


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch, capsys):
    """Only stdout's reader going is a quiet end: a connection of the command's own that breaks
    (a daemon's, a history server's) is an error still."""
    import cli.runs

    def broken(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli.runs, "cmd_list", broken)
    with pytest.raises(BrokenPipeError):
        main(["list"])


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_as_color_starts_is_one_line_not_a_traceback(tmp_path):
    """SIGINT as soon as the command is under way (its imports, the graph, numba, the Lab), or,
    on a slow start, later in the run: either way no traceback. The child says it is ready from
    inside the color command, so that the signal never lands in the interpreter's own start-up
    or in the imports, before ``cli.main`` can catch anything."""
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # conftest: the child's is the default
    art = tmp_path / "art"
    code = (  # 'ready' from inside the command, so that cli.main's handler is in place when it lands
        "import sys, cli, cli.run\n"
        "color = cli.run.cmd_color\n"
        "def ready(args):\n    print('ready', flush=True)\n    return color(args)\n"
        "cli.run.cmd_color = ready\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = ["color", "myciel5", "--time-limit", "30", "--json", "--artifacts", str(art)]
    p = subprocess.Popen(
        [sys.executable, "-c", code, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    if p.returncode == EXIT_INTERRUPTED:  # before the run: one line
        assert err.strip().splitlines()[-1].endswith(": interrupted"), err
        assert not out.strip()
    else:  # in the run: stopped, and still reported (exit 1 if stopped before a first colouring)
        assert p.returncode in (0, 1), err
        assert json.loads(out.strip().splitlines()[-1])["reason"] in ("stopped", "completed", "budget")


def test_ctrl_c_while_the_graph_loads_is_one_line(tmp_path, monkeypatch, capsys):
    import experiments.coloring.graph

    def interrupted(path: object) -> None:
        raise KeyboardInterrupt  # what SIGINT raises in the main thread while it reads the graph

    monkeypatch.setattr(experiments.coloring.graph, "read_dimacs", interrupted)
    try:
        code = main(["color", "myciel5", "--artifacts", str(tmp_path / "art")])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C escaped crucible color (a traceback)")
    assert code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "crucible color: interrupted\n"


class _SignalledLab(cli.run.Lab):
    """A Lab that receives a real SIGINT (or ``sig``) as it starts, or as it shuts down."""

    when = "start"
    sig = signal.SIGINT

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.when == "start":
            os.kill(os.getpid(), self.sig)

    def shutdown(self, timeout: float = 60.0) -> None:
        if self.when == "shutdown":
            os.kill(os.getpid(), self.sig)
        super().shutdown(timeout)


@pytest.mark.parametrize("when", ["start", "shutdown"])
def test_ctrl_c_as_the_lab_starts_or_shuts_down_cuts_nothing_short(tmp_path, monkeypatch, capsys, when):
    """The Lab of ``crucible color`` lives under the signal handlers: a Ctrl-C as it starts ends
    the command before the run (one line), and one while it flushes at the end (an impatient
    second Ctrl-C) neither cuts the flush short nor loses the result."""
    monkeypatch.setattr(_SignalledLab, "when", when)
    monkeypatch.setattr(cli.run, "Lab", _SignalledLab)
    art = tmp_path / "art"
    try:
        code = main(["color", "myciel5", "--time-limit", "20", "--target", "6", "--json", "--artifacts", str(art)])
    except KeyboardInterrupt:
        pytest.fail(f"the Ctrl-C as the Lab {'starts' if when == 'start' else 'shuts down'} escaped (a traceback)")
    out, err = capsys.readouterr()
    if when == "start":
        assert code == EXIT_INTERRUPTED and err == "crucible color: interrupted\n" and not out
        assert not list(art.glob("*/*/spec.json"))  # no run was started
    else:
        assert code == 0, err
        r = json.loads(out)
        assert r["proper"] and r["k"] <= 6
        assert json.loads((Path(r["run_dir"]) / "lifecycle.json").read_text())["status"] == "stopped"


def test_a_sigterm_as_the_lab_starts_is_a_termination_not_a_ctrl_c(tmp_path, monkeypatch, capsys):
    """A service manager's SIGTERM before the run started: one line that names it, and 143
    (128 + SIGTERM), as a shell reports a command SIGTERM ended; not Ctrl-C's 130."""
    monkeypatch.setattr(_SignalledLab, "sig", signal.SIGTERM)
    monkeypatch.setattr(cli.run, "Lab", _SignalledLab)
    art = tmp_path / "art"
    code = main(["color", "myciel5", "--time-limit", "20", "--json", "--artifacts", str(art)])
    out, err = capsys.readouterr()
    assert code == 128 + signal.SIGTERM == 143
    assert err == "crucible color: terminated (SIGTERM)\n" and not out
    assert not list(art.glob("*/*/spec.json"))


# --- the artifacts folder ------------------------------------------------------------------------


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_an_artifacts_path_that_is_no_folder_says_what_it_is(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("")
    err = _usage_error(["color", "myciel5", "--artifacts", str(f)], capsys)
    assert f"artifacts folder {str(f)!r} is not writable: it is a file, not a folder" in err
    assert "File exists" not in err
    err = _usage_error(["color", "myciel5", "--artifacts", str(f / "art" / "deeper")], capsys)
    assert f"cannot be created: {str(f)!r} is a file, not a folder" in err
    assert "Not a directory" not in err
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    err = _usage_error(["color", "myciel5", "--artifacts", str(link)], capsys)
    assert f"is not writable: it is a broken link (to {str(tmp_path / 'gone')!r})" in err
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is not writable: it is not a folder" in _usage_error(["color", "myciel5", "--artifacts", str(fifo)], capsys)


def test_an_artifacts_folder_without_permission_says_where(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores permissions")
        err = _usage_error(["color", "myciel5", "--artifacts", str(ro / "art")], capsys)
        assert f"artifacts folder {str(ro / 'art')!r} cannot be created in {str(ro)!r}: Permission denied" in err
        err = _usage_error(["color", "myciel5", "--artifacts", str(ro)], capsys)
        assert f"artifacts folder {str(ro)!r} is not writable: Permission denied" in err
    finally:
        ro.chmod(0o755)


# --- what a run writes ---------------------------------------------------------------------------


def test_a_runs_spec_folder_and_history_are_the_owners_only(one_run):
    """The spec can hold a workload's arguments, and so do the events, checkpoints and the
    history: like the daemon's queue, the owner's only."""
    assert stat.S_IMODE((one_run / "spec.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(one_run.stat().st_mode) == 0o700
    history = one_run.parent.parent / "history.sqlite3"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    for extra in history.parent.glob("history.sqlite3-*"):  # WAL and shared memory, while open
        assert stat.S_IMODE(extra.stat().st_mode) == 0o600, extra
    assert json.loads((one_run / "spec.json").read_text())["name"] == "edge"


def test_a_ctrl_c_before_the_parser_names_the_command_from_the_command_line(capsys):
    from cli import _command_in

    assert _command_in(["--log-level", "DEBUG", "tune", "spec.toml"]) == "tune"
    assert _command_in(["--log-json", "lab", "serve"]) == "lab"
    assert _command_in(["--help"]) is None and _command_in(["../x"]) is None


# --- help and defaults -----------------------------------------------------------------------------


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_says_each_default_as_the_command_has_it(capsys):
    """Each option's help gives the default the command uses: export's format, the A/B's runs,
    the history each reader falls back to (list a file, export and compare the runs' files),
    and the log level of lab serve."""
    export = _help(["export"], capsys)
    assert "the output's format (default jsonl)" in export
    assert "(default $CRUCIBLE_HISTORY, else the run's files)" in export and "list:" not in export
    compare = _help(["compare"], capsys)
    assert "(default $CRUCIBLE_HISTORY, else the runs' files)" in compare and "list:" not in compare
    listing = _help(["list"], capsys)
    assert "(default $CRUCIBLE_HISTORY, else <artifacts>/history.sqlite3)" in listing and "files" not in listing
    assert "runs per arm, 2 to 1000 (default 5)" in _help(["ab"], capsys)
    assert "(default WARNING; lab serve: INFO)" in _help([], capsys)


@pytest.mark.parametrize(("given", "level"), [([], "INFO"), (["--log-level", "WARNING"], "WARNING")])
def test_lab_serve_logs_at_info_unless_told_a_level(tmp_path, monkeypatch, given, level):
    """An explicit --log-level WARNING is a level asked for, not the default (it logged at INFO)."""
    import cli.lab

    class Configured(Exception):
        pass

    def configure(lvl, **_kw):
        raise Configured(lvl)

    monkeypatch.setattr(cli.lab, "limit_malloc_arenas", lambda: None)  # the test process keeps its own
    monkeypatch.setattr(cli.lab, "configure_logging", configure)
    with pytest.raises(Configured) as e:
        main([*given, "lab", "serve", "--artifacts", str(tmp_path / "art"), "--port", "0"])
    assert e.value.args == (level,)


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """A shell's background job ignores SIGINT (the terminal's Ctrl-C is for the foreground):
    a run started so must not stop on it; SIGTERM, not ignored, still stops it."""
    from cli.run import stop_on_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signals() as stop_now:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop_now.is_set()
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before kill returns to us
            assert stop_now.wait(5) and stop_now.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
