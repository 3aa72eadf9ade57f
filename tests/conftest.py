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
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("crucible", deadline=None)
settings.load_profile("crucible")

TESTS = Path(__file__).resolve().parent


def whole_suite(config: pytest.Config) -> bool:
    """Whether this session runs every test of the suite (the README's test command)."""
    if any(getattr(config.option, name, None) for name in ("keyword", "markexpr", "lf", "deselect")):
        return False
    args = [Path(str(config.rootpath / a)).resolve() for a in config.args]
    return bool(args) and all(a in (TESTS, config.rootpath.resolve()) for a in args)


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
