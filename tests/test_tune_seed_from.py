"""``crucible tune --seed-from``: a path that is no readable run is a one-line error (exit 2)
before any trial runs; prior runs that are no use are named with their reason, a warning
when others are usable and an error when none is; the study learns from the usable ones."""

from __future__ import annotations

import json
import re

import orjson
import pytest

from experiments.tuning import SEARCH_SPACES, SeedFromError, prior_trials
from experiments.workloads import Objective
from supervisor import main

LATENCY = (
    'name = "lat"\ntime_budget_s = {budget}\nseed = 1\n[workload.params]\ntarget = "math:sqrt"\n'
    "args = [2.0]\ncalls_per_step = 20\ncalls = {calls}\n"
)
SPACE = SEARCH_SPACES["latency"]
OBJ = Objective("latency_ms", "min")


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """One finished latency run: (its artifacts folder, its run directory)."""
    root = tmp_path_factory.mktemp("prior")
    spec = root / "lat.toml"
    spec.write_text(LATENCY.format(budget=0.15, calls=200))  # the trials' budget: its best is comparable
    assert main(["run", str(spec), "--artifacts", str(root / "art"), "--no-live"]) == 0
    (run,) = (root / "art" / "lat").iterdir()
    return root / "art", run


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(LATENCY.format(budget=0.15, calls=0))
    return p


ENDED = {"status": "stopped", "reason": "budget", "active_duration": 0.15}


def _fake_run(path, spec=None, summary=None, lifecycle=ENDED):
    """A run directory with the records given (dicts written as JSON, text as it is); by
    default one that ran to the end of its budget."""
    path.mkdir(parents=True)
    for name, record in (("spec.json", spec), ("summary.json", summary), ("lifecycle.json", lifecycle)):
        if record is not None:
            (path / name).write_bytes(record if isinstance(record, bytes) else orjson.dumps(record))
    return path


LATENCY_SPEC = {"time_budget_s": 0.15, "workload": {"name": "latency", "params": {"calls_per_step": 20}}}
SUMMARY = {"phases": {"latency": {"best": {"latency_ms": 0.25}}}}


def _tune(capsys, tmp_path, spec, *seed_from, code=0, extra=()):
    """Run ``crucible tune`` with one trial; (exit code, stdout, stderr)."""
    argv = ["tune", str(spec), "--trials", "1", "--budget", "0.15", "--artifacts", str(tmp_path / "art"), *extra]
    for p in seed_from:
        argv += ["--seed-from", str(p)]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    return out, err


def test_a_path_that_is_no_readable_run_is_a_one_line_error_before_any_trial(tmp_path, capsys, spec, prior):
    art, run = prior
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    _fake_run(tmp_path / "locked")
    (tmp_path / "locked" / "spec.json").mkdir()  # a record that cannot be read (permissions aside)
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "a.txt", "is a file, not a run directory"),
        (tmp_path / "empty", r"is not a run directory \(it has no spec.json or summary.json\)$"),
        (art, rf"is an artifacts folder, not a run: its newest run is '{run}'; give a run's folder or id$"),
        (art / "lat", rf"is an experiment folder, not a run: its newest run is '{run}'"),
        (tmp_path / "locked", r"locked/spec\.json' cannot be read: Is a directory$"),
    ]
    for path, why in cases:
        for seed_from in ([path], [run, path]):  # a bad path among good ones is refused too
            _, err = _tune(capsys, tmp_path, spec, *seed_from, code=2)
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("crucible tune: error: --seed-from: ") and f"'{path}" in err
            assert re.search(why, err.strip()), err
    assert not (tmp_path / "art").exists()  # no trial ran


def test_prior_runs_none_of_which_is_usable_are_an_error_naming_each_reason(tmp_path, capsys, spec):
    other = _fake_run(tmp_path / "other", {"workload": {"name": "coloring", "params": {}}}, SUMMARY)
    broken = _fake_run(tmp_path / "broken", LATENCY_SPEC, b"{not json")
    _, err = _tune(capsys, tmp_path, spec, other, code=2)
    assert err.strip() == (
        f"crucible tune: error: --seed-from: nothing to learn from: '{other}': a run of workload 'coloring', "
        "not 'latency'"
    )
    _, err = _tune(capsys, tmp_path, spec, other, broken, code=2)
    assert len(err.strip().splitlines()) == 1
    assert "none of the 2 prior runs is usable" in err and f"'{other}': a run of workload" in err
    assert f"'{broken}': its summary.json is damaged (not valid JSON" in err
    assert not (tmp_path / "art").exists()


def test_a_run_that_is_no_use_is_named_and_the_others_are_learned_from(tmp_path, capsys, spec, prior):
    _, run = prior
    stale = _fake_run(tmp_path / "stale", LATENCY_SPEC)  # no summary
    out, err = _tune(capsys, tmp_path, spec, run, stale)
    assert err.strip() == f"crucible tune: warning: --seed-from '{stale}' left out: it has no summary.json"
    assert "learned from 1 prior run(s) (1 left out) and 1 trial(s)" in out
    out, err = _tune(capsys, tmp_path, spec, run, stale, extra=["--json"])
    res = json.loads(out)
    assert res["seeded_from_prior_runs"] == 1
    assert res["skipped_prior_runs"] == [{"run_dir": str(stale), "reason": "it has no summary.json"}]
    assert f"'{stale}' left out" in err
    out, err = _tune(capsys, tmp_path, spec, run)
    assert "learned from 1 prior run(s) and 1 trial(s)" in out and "warning" not in err


def test_the_reason_a_prior_run_is_left_out(tmp_path):
    ok = _fake_run(tmp_path / "ok", LATENCY_SPEC, SUMMARY)
    cases = {
        _fake_run(tmp_path / "nospec", None, SUMMARY): "it has no spec.json",
        _fake_run(tmp_path / "badspec", b"[1]", SUMMARY): "its spec.json is damaged (expected a JSON object, got list)",
        _fake_run(tmp_path / "noworkload", {}, SUMMARY): "its spec names no workload",
        _fake_run(tmp_path / "noparams", {"workload": {"name": "latency"}}, SUMMARY): (
            "its spec has no workload.params table"
        ),
        _fake_run(
            tmp_path / "outside", {"workload": {"name": "latency", "params": {"calls_per_step": 10**6}}}, SUMMARY
        ): "workload.params.calls_per_step is outside the search space: must be <= 200, got 1000000",
        _fake_run(tmp_path / "nofield", LATENCY_SPEC, {"phases": {"p": {"best": {"x": 1.0}}}}): (
            "its summary.json has no latency_ms"
        ),
    }
    found, skipped = prior_trials([ok, *cases], "latency", SPACE, OBJ)
    assert found == [({"calls_per_step": 20}, 0.25)]
    assert skipped == list(cases.items())
    with pytest.raises(SeedFromError, match=r"none of the 6 prior runs is usable: .*; and 3 more$"):
        prior_trials(list(cases), "latency", SPACE, OBJ)
    assert prior_trials([], "latency", SPACE, OBJ) == ([], [])  # no prior runs asked for: nothing to refuse


def test_a_run_stopped_early_or_of_another_budget_is_left_out_with_the_reason(tmp_path):
    """A run stopped at 2.4 s of its 8 s budget has the best of a shorter search: it must not
    stand in the study for what its parameters reach; nor a run given another budget."""
    eight = {**LATENCY_SPEC, "time_budget_s": 8.0}
    ok = _fake_run(tmp_path / "ok", eight, SUMMARY)
    done = _fake_run(tmp_path / "done", eight, SUMMARY, {"status": "stopped", "reason": "completed"})
    cases = {
        _fake_run(
            tmp_path / "early", eight, SUMMARY, {"status": "stopped", "reason": "stopped", "active_duration": 2.4}
        ): (
            "it did not run to its end (status 'stopped', reason 'stopped' after 2.4 s): "
            "its best is of a shorter search"
        ),
        _fake_run(tmp_path / "failed", eight, SUMMARY, {"status": "failed", "reason": "failed: phase: boom"}): (
            "it did not run to its end (status 'failed', reason 'failed: phase: boom'): its best is of a shorter search"
        ),
        _fake_run(tmp_path / "nolife", eight, SUMMARY, None): (
            "it has no lifecycle.json: whether it ran to its end is unknown"
        ),
        _fake_run(
            tmp_path / "short", LATENCY_SPEC, SUMMARY
        ): "it ran with a time budget of 0.15 s, the trials with 8 s",
    }
    found, skipped = prior_trials([ok, done, *cases], "latency", SPACE, OBJ, budget=8.0)
    assert found == [({"calls_per_step": 20}, 0.25)] * 2
    assert skipped == list(cases.items())
    found, _ = prior_trials([tmp_path / "short"], "latency", SPACE, OBJ)  # no budget given: any
    assert len(found) == 1


def test_a_stopped_run_is_named_on_stderr_and_the_study_goes_on(tmp_path, capsys, spec, prior):
    _, run = prior
    early = _fake_run(
        tmp_path / "early",
        LATENCY_SPEC,
        SUMMARY,
        {"status": "stopped", "reason": "stopped", "active_duration": 0.05},
    )
    out, err = _tune(capsys, tmp_path, spec, run, early)
    assert err.strip() == (
        f"crucible tune: warning: --seed-from '{early}' left out: it did not run to its end "
        "(status 'stopped', reason 'stopped' after 0.05 s): its best is of a shorter search"
    )
    assert "learned from 1 prior run(s) (1 left out) and 1 trial(s)" in out
    _, err = _tune(capsys, tmp_path, spec, run, code=2, extra=["--budget", "0.3"])  # the last --budget wins
    assert "it ran with a time budget of 0.15 s, the trials with 0.3 s" in err
