"""Test-wide settings.

* hypothesis without per-example deadlines (numba loads its cache on first call, and CI
  machines are slow and shared).
* Ctrl-C works in the tests whoever started them: a run started in the background by a
  non-interactive shell (``pytest &``) inherits SIGINT *ignored*, and so would every process
  it starts. The tests that interrupt a run (``crucible ab --parallel``, Ray tasks) send
  SIGINT, so the session restores Python's own handler first.
* Coverage (pytest-cov, configured in pyproject.toml) gates the whole suite at 90 %. A run
  of part of the suite (named modules or tests, ``-k``, ``-m``, ``--lf``) covers only part
  of the code by design: it keeps measuring but neither prints the table nor fails on the
  total, unless ``--cov-report`` is given on the command line.
* The suite runs on two pytest-xdist workers, a file per worker at a time (pyproject.toml);
  the modules that start Ray take turns (``ray_turn``), so two clusters never share the cores.
  The longest modules go first (``LONGEST_FIRST``), so that the run does not end with one
  worker busy on a long module and the other idle.
"""

from __future__ import annotations

import fcntl
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from actors.log import configure_logging

settings.register_profile("crucible", deadline=None)
# CI draws the same examples every run (a gate must not fail on a draw no change made); a
# developer's runs draw new ones, and keep the failures they find in .hypothesis/
settings.register_profile("crucible-ci", deadline=None, derandomize=True, database=None)
settings.load_profile("crucible-ci" if os.environ.get("CRUCIBLE_CI") else "crucible")

TESTS = Path(__file__).resolve().parent

LONGEST_FIRST = (  # about 40-110 s each on two cores; the Ray modules apart, as they take turns
    "test_ray_backend.py",
    "test_population.py",
    "test_daemon_crash.py",
    "test_lab_lifecycle.py",
    "test_daemon.py",
    "test_tuning_parallel.py",
    "test_dashboard_security.py",
    "test_dashboard.py",
    "test_queries.py",
    "test_recorder.py",
)


def whole_suite(config: pytest.Config) -> bool:
    """Whether this session runs every test of the suite (the README's test command)."""
    if any(getattr(config.option, name, None) for name in ("keyword", "markexpr", "lf", "deselect")):
        return False
    args = [Path(str(config.rootpath / a)).resolve() for a in config.args]
    return bool(args) and all(a in (TESTS, config.rootpath.resolve()) for a in args)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest modules first, each module's tests in their own order (see the docstring)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # see the module docstring
    cov = config.pluginmanager.getplugin("_cov")
    if cov is None or whole_suite(config):
        return
    opts = cov.options  # the plugin keeps its own namespace of the options
    if not any(str(a).startswith("--cov-report") for a in config.invocation_params.args):
        opts.cov_report = {}
    opts.cov_fail_under = 0


@pytest.fixture(autouse=True)
def logging_as_the_session_had() -> Iterator[None]:
    """Each test starts with the session's logging: structlog at every level to stderr, as a script
    that calls ``configure_logging()`` has it. Unconfigured, structlog prints on stdout, where
    a Lab's log lines would land amid the JSON a test reads from the CLI. A test that runs the
    CLI in-process leaves it configured for the whole process (WARNING and up, the CLI's
    default): a later test's ``capture_logs`` would then miss every info line, and pass or fail
    by which tests its worker ran before it."""
    configure_logging("DEBUG", json=False)
    yield


@pytest.fixture(scope="module")
def ray_turn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hold the machine's Ray turn for a module: the workers of one session (and other sessions
    of this user) start one Ray at a time. The tests tune a node's health checks to declare it
    dead in 1.5 s; a second cluster's processes competing for the cores could trip that."""
    with (tmp_path_factory.getbasetemp().parent / "ray.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield
