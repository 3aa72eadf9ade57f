"""Tuning and the A/B judge a run by its workload's declared objective, in its direction."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from experiments.tuning import SEARCH_SPACES, _objective, ab_report, run_objective, run_trace, tune
from experiments.workloads import Objective, registry
from telemetry.schema import dumps_line


def _event(seq, name, values, success=None):
    ev = {
        "v": 1,
        "seq": seq,
        "ts": 1_000_000 + seq * 500_000,
        "experiment_id": "e",
        "run_id": "r",
        "pass": 0,
        "name": name,
        "values": values,
    }
    if success is not None:
        ev["success"] = success
    return dumps_line(ev)


def test_search_spaces_are_the_workloads_declarations():
    assert SEARCH_SPACES == {n: dict(c.search_space) for n, c in registry().items() if c.search_space}
    assert set(SEARCH_SPACES) == {"coloring", "latency"}


def test_the_objective_is_the_workloads_unless_another_field_is_named():
    assert _objective("coloring", None).field == "chromatic_number"
    assert _objective("latency", None) == registry()["latency"].objective
    assert _objective("latency", "latency_ms") is registry()["latency"].objective
    assert _objective("latency", "cost_usd") == Objective("cost_usd", "min")
    with pytest.raises(ValueError, match="declares no objective"):
        _objective("ghost", None)


def test_the_trace_follows_the_objective_and_ignores_failed_calls(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        _event(0, "call", {"latency_ms": 5.0}, True),
        _event(1, "call", {"latency_ms": 0.1}, False),  # a fast failure is not a better latency
        _event(2, "call", {"latency_ms": 4.0}, True),
        _event(3, "start", {"calls_done": 0.0}),
        _event(4, "call", {"latency_ms": 4.5}, True),
    ]
    (run / "events.jsonl").write_bytes(b"".join(lines))
    best, trace = run_trace(run, Objective("latency_ms", "min"))
    assert best == 4.0 and trace == [(0.0, 5.0), (1.0, 4.0)]
    best, trace = run_trace(run, Objective("latency_ms", "max"))
    assert best == 5.0 and trace == [(0.0, 5.0)]


def test_a_max_objective_reads_the_highest_value_and_targets_the_highest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"phases": {"a": {"best": {"x": 1.0}, "max": {"x": 7.0}}, "b": {"best": {"x": 2.0}, "max": {"x": 9.0}}}}
    (run / "summary.json").write_bytes(orjson.dumps(summary))
    assert run_objective(run, "x") == 1.0 and run_objective(run, "x", "max") == 9.0
    rows = [
        {"arm": "on", "final": 9.0, "trace": [(0.0, 1.0), (2.0, 9.0)]},
        {"arm": "on", "final": 8.0, "trace": [(0.0, 1.0), (1.0, 8.0)]},
        {"arm": "off", "final": 7.0, "trace": [(0.0, 7.0)]},
        {"arm": "off", "final": 9.0, "trace": [(0.0, 2.0), (3.0, 9.0)]},
    ]
    rep = ab_report(rows, budget=10.0, objective=Objective("x", "max"))
    assert rep["objective"] == "x" and rep["direction"] == "max" and rep["label"] == "x" and rep["target"] == 9.0
    assert set(rep["final_best"]) >= {"p_value", "effect_size", "ci"} and "final_colors" not in rep
    assert rep["arms"]["on"]["reached_target"] == 1 and rep["arms"]["on"]["time_to_target"] == [2.0, 10.0]
    assert rep["arms"]["off"]["time_to_target"] == [10.0, 3.0]
    low = ab_report(rows, budget=10.0)  # no objective given: lower is better, as before
    assert low["target"] == 7.0 and low["arms"]["off"]["reached_target"] == 1
    assert low["objective"] is None and low["direction"] == "min" and low["label"] is None


def test_the_ab_table_names_the_final_values_by_the_objectives_label():
    from rich.console import Console

    from cli.render import ab_table

    rows = [{"arm": arm, "final": f, "trace": [(0.0, f)]} for arm, f in (("on", 3.0), ("on", 4.0), ("off", 5.0))]
    rows.append({"arm": "off", "final": 6.0, "trace": [(0.0, 6.0)]})
    for objective, row in ((Objective("latency_ms", "min", "latency"), "final latency"), (None, "final")):
        console = Console(record=True, width=200)
        console.print(ab_table(ab_report(rows, budget=1.0, objective=objective), 2))
        lines = [line.split("│")[1].strip() for line in console.export_text().splitlines() if "│" in line]
        assert row in lines, lines


def test_tune_judges_by_the_workloads_objective_by_default(tmp_path):
    spec = {
        "name": "tune",
        "time_budget_s": 0.2,
        "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0]}},
    }
    res = tune(spec, 1, tmp_path / "art", seed=1)
    assert res["objective"] == "latency_ms" and res["direction"] == "min"
    assert res["trials"] and res["trials"][0]["latency_ms"] == res["best_value"] >= 0


FAILING = {"target": "math:sqrt", "args": [-1]}  # every call fails (ValueError: math domain error)


def test_tune_never_judges_a_trial_by_failed_calls(tmp_path):
    spec = {"name": "fails", "time_budget_s": 0.2, "workload": {"name": "latency", "params": FAILING}}
    res = tune(spec, 1, tmp_path / "art", seed=1)
    (trial,) = res["trials"]
    assert "failed" in trial and "latency_ms" not in trial and "did not fail" in trial["failed"]
    assert res["best_value"] is None and res["proposal"] is None


def test_a_mistyped_objective_stops_the_study_after_its_first_trial_naming_the_fields(tmp_path):
    """A field no run records fails every trial alike: the study stops after the first, and
    says which fields the run has, rather than spend every trial's budget first."""
    spec = {"name": "typo", "time_budget_s": 0.2, "workload": {"name": "latency", "params": {"target": "math:sqrt"}}}
    with pytest.raises(ValueError, match=r"objective 'latncy_ms': trial 0's run records no such field") as err:
        tune(spec, 5, tmp_path / "art", seed=1, objective="latncy_ms")
    assert "latency_ms" in str(err.value).split("its fields: ")[1]
    assert [p.name for p in (tmp_path / "art").iterdir() if p.is_dir() and p.name.startswith("typo")] == ["typo"]


def test_an_ab_run_without_a_value_is_a_failed_run(tmp_path):
    from experiments.tuning import ABFailed, ab

    spec = {"name": "fails", "time_budget_s": 0.2, "workload": {"name": "latency", "params": FAILING}}
    with pytest.raises(ABFailed, match=r"hypertune on has fewer .*no latency_ms from an event that did not fail"):
        ab(spec, 2, tmp_path / "art", budget=0.2)


def test_tune_and_ab_read_the_spec_once(tmp_path):
    """A spec given as a path is read once: every run is of the spec as it was read, even when
    the file changes under the study (a pipe could not be read again at all)."""
    from experiments.tuning import ab

    path = tmp_path / "lat.toml"
    path.write_text('name = "once"\ntime_budget_s = 0.2\n[workload]\nname = "latency"\n[metadata]\nmark = "first"\n')
    seen = []

    def edit_after_first(row):  # the file changes between runs
        seen.append(row["run_dir"])
        path.write_text('name = "other"\n[workload]\nname = "latency"\n[metadata]\nmark = "second"\n')

    tune(path, 2, tmp_path / "t", seed=1, on_trial=edit_after_first)
    path.write_text('name = "once"\ntime_budget_s = 0.2\n[workload]\nname = "latency"\n[metadata]\nmark = "first"\n')
    ab(path, 2, tmp_path / "a", budget=0.2, on_run=edit_after_first)
    assert len(seen) == 6
    for run_dir in seen:
        spec = orjson.loads((Path(run_dir) / "spec.json").read_bytes())
        assert spec["metadata"] == {"mark": "first"} and spec["workload"]["name"] == "latency"


def test_trial_ids_of_a_long_name_stay_ids(tmp_path):
    from experiments.tuning import trial_experiment_id
    from telemetry.rundir import check_experiment_id

    name = "a" * 128
    ids = [trial_experiment_id(name, i) for i in (0, 1, 9_999)]
    assert ids == [name, "a" * 126 + "-2", "a" * 122 + "-10000"]
    assert all(check_experiment_id(i) == i for i in ids)
    spec = {"name": name, "time_budget_s": 0.1, "workload": {"name": "latency"}}
    res = tune(spec, 2, tmp_path / "art", seed=1)
    assert [("failed" in t) for t in res["trials"]] == [False, False]


def _cli(capsys, *argv):
    """``crucible argv`` in-process: (exit code, stdout, stderr)."""
    from supervisor import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_trial_seeds_wrap_into_the_seed_range(tmp_path):
    """--seed 4294967295 (the largest): trial 1 runs with seed 0, not 4294967296 (which the spec refuses)."""
    from experiments.tuning import trial_seed

    assert [trial_seed(2**32 - 2, i) for i in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
    spec = {"name": "wrap", "time_budget_s": 0.15, "workload": {"name": "latency"}}
    res = tune(spec, 2, tmp_path / "art", seed=2**32 - 1)
    assert res["failed_trials"] == 0 and [("failed" in t) for t in res["trials"]] == [False, False]
    seeds = [orjson.loads((Path(t["run_dir"]) / "spec.json").read_bytes())["seed"] for t in res["trials"]]
    assert seeds == [2**32 - 1, 0]


def test_a_latency_trial_has_no_time_to_best_and_says_so(tmp_path):
    from cli.tuning import trial_line

    spec = {"name": "lat", "time_budget_s": 0.15, "workload": {"name": "latency"}}
    (row,) = tune(spec, 1, tmp_path / "art", seed=1)["trials"]
    assert row["seconds_to_best"] is None  # the workload records none: not 0.0
    assert "(time to best unknown)" in trial_line(row) and "best after" not in trial_line(row)
    assert "(best after 1.50 s)" in trial_line({**row, "seconds_to_best": 1.5})


STUDY = {
    "objective": "latency_ms",
    "direction": "min",
    "seeded_from_prior_runs": 0,
    "skipped_prior_runs": [],
    "parallel": 1,
    "best_value": 2.0,
    "proposal": {"calls_per_step": 7},
    "search_space": {},
}


def test_a_study_with_a_failed_trial_says_so(capsys, monkeypatch):
    trials = [
        {"trial": 0, "params": {"calls_per_step": 7}, "latency_ms": 2.0, "seconds_to_best": None, "run_dir": "a"},
        {"trial": 1, "params": {"calls_per_step": 9}, "failed": "SpecError: bad\nthing", "run_dir": "b"},
    ]

    def fake_tune(*args, on_trial=None, **kw):
        for t in trials:
            on_trial(t)
        return {**STUDY, "trials": trials, "failed_trials": 1}

    monkeypatch.setattr("experiments.tuning.tune", fake_tune)
    rc, out, err = _cli(capsys, "tune", "x.toml")
    assert rc == 0 and "and 2 trial(s) (1 failed); best latency_ms = 2.0" in out
    assert err.strip() == "crucible tune: warning: 1 of 2 trial(s) failed; trial 1: SpecError: bad thing"
    rc, out, err = _cli(capsys, "tune", "x.toml", "--json")
    assert rc == 0 and orjson.loads(out)["failed_trials"] == 1 and "1 of 2 trial(s) failed" in err


def test_an_interrupted_json_study_prints_the_trials_that_finished(capsys, monkeypatch):
    row = {"trial": 0, "params": {"calls_per_step": 7}, "latency_ms": 2.0, "seconds_to_best": None, "run_dir": "a"}

    def fake_tune(*args, on_trial=None, **kw):
        on_trial(row)
        raise KeyboardInterrupt

    monkeypatch.setattr("experiments.tuning.tune", fake_tune)
    rc, out, err = _cli(capsys, "tune", "x.toml", "--json")
    assert rc == 130 and orjson.loads(out) == {"interrupted": True, "trials": [row]}
    assert "interrupted" in err
    rc, out, _ = _cli(capsys, "tune", "x.toml")
    assert rc == 130 and "trial 0: latency_ms=2" in out


def test_ab_json_keeps_the_sign_of_an_infinite_effect_size(capsys, monkeypatch):
    """Neither arm varies and on is better: Hedges' g is -inf; JSON has no infinity, and null
    would say "undefined" and lose which arm was better."""
    rows = [{"arm": "on", "seed": i, "final": 27.0, "trace": [(0.5, 27.0)]} for i in range(3)]
    rows += [{"arm": "off", "seed": i, "final": 28.0, "trace": [(0.1, 28.0)]} for i in range(3)]
    rep = ab_report(rows, 10.0, None, Objective("chromatic_number", "min"))
    assert rep["final_best"]["effect_size"] == -math.inf
    monkeypatch.setattr("experiments.tuning.ab", lambda *a, **k: {**rep, "failed": [], "parallel": 1})
    rc, out, _ = _cli(capsys, "ab", "x.toml", "--json")
    got = orjson.loads(out)
    assert rc == 0 and got["final_best"]["effect_size"] == "-inf"
    assert got["final_best"]["ci"] == [-1.0, -1.0] and got["arms"]["on"]["final"] == [27.0] * 3


def _coloring_params(**over):
    from experiments.coloring.params import check_params

    return check_params({"graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 2}, "gpu": "cpu", **over})


def test_the_colouring_search_space_follows_the_spec_s_phases():
    """experiments/default.toml runs tabu then population: memetic's dimensions would change
    nothing, and the population phase's own tenure and crossover must be searched."""
    from experiments.coloring.params import LIMITS, PHASES
    from experiments.spec import load_spec
    from experiments.tuning import search_space

    default = load_spec("experiments/default.toml", None, registry())["workload"]["params"]
    assert list(search_space("coloring", default)) == [
        "tabu.tenure_alpha",
        "tabu.tenure_a",
        "tabu.iters_per_step",
        "population.tenure_alpha",
        "population.tenure_a",
        "population.crossover_rate",
    ]
    memetic = search_space("coloring", _coloring_params(phases=["memetic"]))
    assert set(memetic) == {  # its local search is TabuCol with the tabu section's tenure
        "tabu.tenure_alpha",
        "tabu.tenure_a",
        "memetic.population",
        "memetic.local_iters",
        "memetic.mutation_rate",
    }
    assert set(search_space("coloring", _coloring_params(phases=["thermo"]))) == {"thermo.replicas", "thermo.t_max"}
    assert search_space("latency", {"calls_per_step": 3}) == SEARCH_SPACES["latency"]
    union = search_space("coloring", None)
    assert union == SEARCH_SPACES["coloring"]
    assert {k.split(".")[0] for k in union} == set(PHASES)
    for name, (lo, hi, _) in union.items():  # every proposal is a spec the checks accept
        low, high, _ = LIMITS[tuple(name.split("."))]
        assert low <= lo < hi <= high, name


def test_thermo_s_hottest_temperature_is_searched_above_the_spec_s_coldest():
    from experiments.tuning import search_space

    hot = _coloring_params(phases=["thermo"], thermo={"t_min": 1.2})
    assert search_space("coloring", hot)["thermo.t_max"] == (1.2, 3.0, "float")
    assert "thermo.t_max" not in search_space(
        "coloring", _coloring_params(phases=["thermo"], thermo={"t_min": 5.0, "t_max": 6.0})
    )


def test_tune_searches_and_applies_the_population_phase_s_parameters(tmp_path):
    spec = {
        "name": "pop",
        "time_budget_s": 0.3,
        "workload": {
            "name": "coloring",
            "params": {
                "graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 2},
                "phases": ["tabu", "population"],
                "gpu": "cpu",
                "population": {"population": 4, "threads_per_chain": 1},
            },
        },
    }
    res = tune(spec, 1, tmp_path / "art", seed=3)
    (trial,) = res["trials"]
    assert "failed" not in trial, trial
    assert set(trial["params"]) == set(res["search_space"])
    assert {k.split(".")[0] for k in trial["params"]} == {"tabu", "population"}
    ran = orjson.loads((Path(trial["run_dir"]) / "spec.json").read_bytes())["workload"]["params"]
    assert ran["population"]["crossover_rate"] == trial["params"]["population.crossover_rate"]
    assert ran["population"]["tenure_a"] == trial["params"]["population.tenure_a"]


def test_a_prior_run_of_other_phases_is_left_out(tmp_path):
    from experiments.tuning import prior_trials, search_space

    def run(name, phases):
        d = tmp_path / name
        d.mkdir()
        spec = {"time_budget_s": 5.0, "workload": {"name": "coloring", "params": _coloring_params(phases=phases)}}
        (d / "spec.json").write_bytes(orjson.dumps(spec))
        (d / "summary.json").write_bytes(orjson.dumps({"phases": {"tabu": {"best": {"chromatic_number": 9.0}}}}))
        (d / "lifecycle.json").write_bytes(orjson.dumps({"status": "stopped", "reason": "budget"}))
        return d

    space = search_space("coloring", _coloring_params(phases=["tabu", "population"]))
    same, other = run("same", ["tabu", "population"]), run("other", ["tabu", "memetic"])
    found, skipped = prior_trials([same, other], "coloring", space, registry()["coloring"].objective, 5.0)
    assert len(found) == 1 and set(found[0][0]) == set(space) and found[0][1] == 9.0
    assert skipped == [
        (
            other,
            "its parameters are not the ones searched (it ran other phases): memetic.local_iters, "
            "memetic.mutation_rate, memetic.population, population.crossover_rate, population.tenure_a, "
            "population.tenure_alpha",
        )
    ]
