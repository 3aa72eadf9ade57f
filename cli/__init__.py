"""The ``crucible`` command line: one module per group of commands, above experiments and dashboard.

=====================  ==========================================================================
module                 commands
=====================  ==========================================================================
:mod:`cli.demo`        ``demo``
:mod:`cli.run`         ``run`` (``--dashboard`` serves the web dashboard), ``color``
:mod:`cli.runs`        ``list``, ``export``, ``compare``, ``sync``
:mod:`cli.monitor`     ``monitor``
:mod:`cli.spec`        ``set``, ``get``, ``show``
:mod:`cli.tuning`      ``tune``, ``ab``
:mod:`cli.instances`   ``instances``
:mod:`cli.lab`         ``lab serve`` (the lab daemon)
:mod:`cli.client`      ``submit``, ``ls``, ``pause``, ``resume``, ``stop`` (a daemon's clients)
=====================  ==========================================================================

:mod:`cli.render` draws the tables and live views; :mod:`cli.errors` (with :mod:`cli.exits`) holds the usage
errors and the exit codes. ``crucible ...`` and ``python supervisor.py ...`` both end in
:func:`main`, which also ends every command the same way on a Ctrl-C that the command does
not handle itself, and on output cut short by a closed pipe (``crucible list | head``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence
from typing import NoReturn

from cli.commands import COMMANDS, GROUPS
from cli.exits import EXIT_OUTPUT_CLOSED, interrupted, program

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``crucible color: error: argument --seed: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The parser: global options, then each command group's subcommands.

    ``lazy``: only the group of ``command`` (the command line's first word, if it names one)
    is imported and built in full; every other command is listed by name and help alone
    (:mod:`cli.commands`), so ``crucible --help`` and ``crucible list`` never import the Lab
    or numba. A listed-only command that gets parsed after all (a command line whose first
    free word was not the command) comes back with ``func`` None, and :func:`main` builds
    the whole parser then."""
    p = _Parser(prog="crucible", description="Supervised actor trees for long experiments.")
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        help="structlog level (default WARNING; lab serve: INFO)",
    )
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    sub = p.add_subparsers(dest="command", required=True)
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for group in GROUPS:
        if not lazy or group == wanted:
            importlib.import_module(group).add_commands(sub)
            continue
        for name, (module, help_line) in COMMANDS.items():
            if module == group:
                sub.add_parser(name, help=help_line, add_help=False).set_defaults(func=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``crucible`` command; its exit code (see :mod:`cli.errors`).

    A Ctrl-C that the command does not handle (in the seconds of imports before it starts, say)
    ends it with one line, not a traceback. Output cut short by a closed pipe ends it quietly,
    and for good: stdout then points at ``os.devnull``, so that the interpreter's last flush of
    what is still buffered does not fail again at exit."""
    args: argparse.Namespace | None = None
    _sane_terminal_size()
    closed = _hold_standard_fds()
    if "stdout" in closed:
        _say(f"{program(_command_in(argv))}: warning: stdout is closed; what this command prints is lost")
    try:
        try:
            parser = build_parser(_command_in(argv), lazy=True)
            args, rest = parser.parse_known_args(argv)
            if getattr(args, "func", None) is None:  # a command only listed: the line put it elsewhere
                parser = build_parser()
            if getattr(args, "func", None) is None or rest:  # the whole parse, and its errors
                args = parser.parse_args(argv)
            code = _run(parser, args)
            # a command whose product is its output says so (set_defaults(prints_result=True)); the
            # others (run, color, submit, set, export, lab serve) did their work, recorded elsewhere,
            # and end as they would have: a wrapper that retries a failure must not repeat them
            if "stdout" in closed and code == 0 and getattr(args, "prints_result", False):
                return _output_closed()
            return code
        finally:  # what is still buffered (a short listing, --help) goes now: a reader gone shows
            if sys.stdout is not None:  # here, where it is handled, not in the interpreter's flush at exit
                sys.stdout.flush()
    except KeyboardInterrupt:
        return interrupted(getattr(args, "command", None) or _command_in(argv))
    except BrokenPipeError:
        if not _stdout_closed():  # a pipe or socket of the command's own (a client's connection): not ours
            raise
        return _output_closed()
    except SystemExit as exc:
        if isinstance(exc.__context__, BrokenPipeError):  # rich's Console on a closed pipe (on_broken_pipe)
            return _output_closed()
        if "stdout" in closed and exc.code in (0, None):  # argparse's --help, printed to nothing: as warned
            return _output_closed()
        raise


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The command a command line names, before it is parsed (a Ctrl-C in the seconds of
    imports that building the parser takes): its first word that is not an option."""
    words = list(sys.argv[1:] if argv is None else argv)
    for i, word in enumerate(words):
        if word.startswith("-"):
            continue
        if i > 0 and _is_log_level(words[i - 1]):  # the global option's value
            continue
        return word if word.isascii() and word.isalpha() else None
    return None


def _is_log_level(word: str) -> bool:
    """``--log-level`` or an abbreviation argparse takes for it (``--log-l``: ``--log`` alone
    is ambiguous with ``--log-json``)."""
    return len(word) > len("--log-") and "--log-level".startswith(word)


def _hold_standard_fds() -> list[str]:
    """Point each of stdin, stdout and stderr that the command was started without (``>&-``)
    at ``os.devnull``; the names of those. Left closed, its number goes to the first file the
    command opens (a run's events file, the history), and whatever writes to stdout or stderr
    (a warning, a child process) would write into that file. A command with no stdout has its
    work done, and what it would have printed is lost: it says so, and a command whose product
    is that output (its parser's ``prints_result``) ends with 141, as on a closed pipe, so that
    ``crucible list --json >&-`` is no success."""
    closed = []
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        try:
            null = os.open(os.devnull, os.O_RDWR)
        except OSError:  # no /dev/null: nothing better to hold the number with
            continue
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        closed.append(name)
        if getattr(sys, name) is None:  # Python found it closed at start
            mode = "r" if fd == 0 else "w"
            setattr(sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False))
    return closed


def _say(line: str) -> None:
    """One line on stderr, when there is one to write to."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _sane_terminal_size() -> None:
    """Drop a ``COLUMNS`` or ``LINES`` that no terminal has (``0``, ``-5``, ``wide``): rich takes
    ``COLUMNS=0`` as a width of nothing and prints every table empty. The real size (or 80) is
    used instead."""
    for name in ("COLUMNS", "LINES"):
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and 0 < int(value) <= 100_000):
            del os.environ[name]


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from actors.log import configure_logging
    from actors.runtime import freeze_startup_heap
    from cli.errors import EXIT_USAGE, USER_ERRORS, one_line

    configure_logging(args.log_level or "WARNING", json=True if args.log_json else None)
    freeze_startup_heap()
    try:
        code = int(args.func(args) or 0)
    except USER_ERRORS as exc:
        parser.exit(EXIT_USAGE, f"crucible {args.command}: error: {one_line(exc)}\n")
    return code


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) that nobody reads any more."""
    if not hasattr(select, "poll"):  # pragma: no cover - not on POSIX
        return True
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or one with no file descriptor
        return False


def _output_closed() -> int:
    """Point stdout at ``os.devnull`` (what is left in its buffer goes nowhere); the exit code."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no stdout with a file descriptor: nothing to flush there
        pass
    return EXIT_OUTPUT_CLOSED


__all__ = ["build_parser", "main"]
