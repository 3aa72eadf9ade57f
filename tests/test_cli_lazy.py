"""A command line imports only the group of the command it names (cli.commands lists the rest)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cli
from cli.commands import COMMANDS, GROUPS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("numba", "scipy", "experiments.lab", "experiments.spec", "experiments.coloring.workload", "cli.run")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _func(parser: argparse.ArgumentParser) -> object:
    """The function a command runs (``lab``'s: its ``serve``'s)."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return nested[0].choices["serve"].get_default("func") if nested else parser.get_default("func")


def test_the_table_is_what_the_groups_define_in_their_order():
    sub = _subcommands(cli.build_parser())
    assert list(sub.choices) == list(COMMANDS)
    assert {a.dest: a.help for a in sub._choices_actions} == {name: h for name, (_, h) in COMMANDS.items()}
    for name, (module, _) in COMMANDS.items():  # each command's function lives in the module the table names
        assert _func(sub.choices[name]).__module__ == module
    assert set(GROUPS) == {m for m, _ in COMMANDS.values()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_lazy_parser_builds_the_named_command_in_full_and_lists_the_others(command):
    sub = _subcommands(cli.build_parser(command, lazy=True))
    assert list(sub.choices) == list(COMMANDS)
    module = COMMANDS[command][0]
    for name, parser in sub.choices.items():
        built = _func(parser) is not None
        assert built == (COMMANDS[name][0] == module), name


def imported_after(code: str, cwd: Path = ROOT) -> list[str]:
    """Which of :data:`HEAVY` a fresh interpreter has imported after running ``code`` (which
    must end well): how a test holds a light path light."""
    code += f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stderr.strip().splitlines()[-1])


def _imported_by(argv: list[str]) -> list[str]:
    """What ``crucible ARGV`` imports, run as the console script does (it must exit 0)."""
    return imported_after(
        "from cli import main\n"
        "try:\n"
        f"    rc = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        "assert rc in (0, None), rc\n"
    )


def test_help_and_the_readers_import_neither_the_lab_nor_numba(tmp_path):
    (tmp_path / "art").mkdir()
    art = str(tmp_path / "art")
    assert _imported_by(["--help"]) == []
    assert _imported_by(["list", "--json", "--artifacts", art]) == []
    assert _imported_by(["ls", "--help"]) == []
    assert "experiments.lab" not in _imported_by(["instances", "--json"])  # the table is read from text


def test_python_supervisor_py_is_as_light_as_the_crucible_script(tmp_path):
    """``python supervisor.py ...`` imported the whole framework before the command line (0.7 s,
    and a Ctrl-C in that time was a traceback, not one line)."""
    (tmp_path / "art").mkdir()
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['supervisor.py', 'list', '--json', '--artifacts', {str(tmp_path / 'art')!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'supervisor.py')!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    assert imported_after(code, cwd=ROOT) == []
    import supervisor  # as a library it is the framework's front: everything is there

    assert {"Lab", "Supervisor", "RayBackendError", "main"} <= set(dir(supervisor))


def test_a_command_line_whose_first_word_is_not_the_command_still_runs_it(tmp_path, capsys):
    """``--log-l`` is argparse's abbreviation of ``--log-level``: the first free word is its
    value, so the command is only listed at first, and the whole parser is built for it."""
    (tmp_path / "art").mkdir()
    assert cli.main(["--log-l", "WARNING", "list", "--json", "--artifacts", str(tmp_path / "art")]) == 0
    assert capsys.readouterr().out == ""  # JSON lines, one per run: none here


def test_an_abbreviated_log_level_s_value_is_not_taken_for_the_command():
    from cli import _command_in

    assert _command_in(["--log-l", "DEBUG", "list"]) == "list"
    assert _command_in(["--log-level", "DEBUG", "list"]) == "list"
    assert _command_in(["--log", "DEBUG", "list"]) == "DEBUG"  # ambiguous for argparse too: its error
    assert _command_in(["--log-json", "ls"]) == "ls"


def test_a_submission_that_could_not_start_is_said_once(monkeypatch, tmp_path, capsys):
    import cli.client

    class Failed:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, *args):
            return {"id": "x", "status": "failed", "reason": "could not start: no such graph"}

    monkeypatch.setattr(cli.client, "client", lambda args: Failed())
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n')
    assert cli.main(["submit", str(spec), "--to", "http://127.0.0.1:1/"]) == 1
    assert capsys.readouterr().err == "crucible submit: x could not start: no such graph\n"
