"""The colouring workload's side of hypertune's steering: the memetic phase's parameters carry
the tenure its TabuCol runs with (so the tenure arms compute from the tenure in force), the
action controls take ``true`` only, and an automatic controller may skip a phase but never
end the run by it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.coloring.workload import ColoringWorkload


def coloring(phases, **sections):
    params = ColoringWorkload.check_params(
        {"graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 3}, "phases": phases, "gpu": "cpu", **sections}
    )
    return ColoringWorkload(params, 1)


class Em:
    def __init__(self):
        self.events = []

    def emit(self, name, values=None, **kw):
        self.events.append({"name": name, **kw})

    def set_context(self, **kw):
        pass


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 10.0))
def test_the_memetic_tenure_arms_follow_the_tenure_in_force(alpha):
    w = coloring(["memetic"], tabu={"tenure_alpha": alpha}, memetic={"population": 4, "local_iters": 50})
    w.start(Em())
    w.step(Em())  # init, then the memetic phase
    params = w.params()
    assert params["phase"] == "memetic" and params["tenure_alpha"] == alpha
    arms = {a.name: a for a in ColoringWorkload.arms if a.applies_in("memetic")}
    assert arms["tenure_up"].value_for(params) == pytest.approx(min(10.0, alpha * 1.6 + 0.1))
    assert arms["tenure_down"].value_for(params) == pytest.approx(max(0.05, alpha / 1.6))


def test_the_memetic_phase_reports_the_tenure_a_control_changes():
    w = coloring(["memetic"], tabu={"tenure_alpha": 2.0}, memetic={"population": 4, "local_iters": 50})
    w.start(Em())
    w.step(Em())
    up = next(a for a in ColoringWorkload.arms if a.name == "tenure_up")
    value = up.value_for(w.params())
    assert value == pytest.approx(3.3)
    assert w.set_param("set_tenure", value) == (2.0, value)
    assert w.params()["tenure_alpha"] == value == w.p["tabu"]["tenure_alpha"]


def test_the_population_phase_has_arms_and_they_steer_its_search():
    """Hypertune had no arm in the population phase, the default one: enabled, it did nothing."""
    w = coloring(["population"], population={"population": 4, "crossover_rate": 0.2, "tenure_alpha": 0.6})
    w.start(Em())
    w.step(Em())  # init, then the population phase
    params = w.params()
    assert params["phase"] == "population"
    arms = {a.name: a for a in ColoringWorkload.arms if a.applies_in("population")}
    assert set(arms) == {"tenure_up", "tenure_down", "crossover_up", "crossover_down"}
    assert arms["crossover_up"].value_for(params) == pytest.approx(0.41)
    assert arms["crossover_down"].value_for(params) == pytest.approx(0.1)
    assert arms["crossover_up"].value_for({**params, "crossover_rate": 0.4}) == 0.5  # bounded
    assert arms["crossover_down"].value_for({**params, "crossover_rate": 0.006}) == 0.005
    assert 1.06 * 1.6 + 0.1 != 1.796 and arms["tenure_up"].value_for({"tenure_alpha": 1.06}) == 1.796  # as recorded
    for name in arms:
        value = arms[name].value_for(w.params())
        before, after = w.set_param(arms[name].key, value)
        assert after == value and before != value
    # each from the value in force: 0.2 x 2 + 0.01, then / 2; 0.6 x 1.6 + 0.1, then / 1.6
    assert w.params()["crossover_rate"] == pytest.approx(0.205) and w.params()["tenure_alpha"] == pytest.approx(0.6625)
    assert w._phases["population"].search.p["crossover_rate"] == pytest.approx(0.205)
    assert w.step(Em()) is False  # the search goes on with them


@pytest.mark.parametrize("key", ["skip_phase", "restart_pass"])
@pytest.mark.parametrize("value", [False, 0, 1, "true", None, [True]])
def test_an_action_control_takes_true_only(key, value):
    w = coloring(["tabu", "memetic"], iterative={"max_passes": 3})
    w.start(Em())
    w.step(Em())
    with pytest.raises(ValueError, match=rf"^{key} takes true .*got {value!r:.20}".replace("[", r"\[")):
        w.set_param(key, value)
    assert not w._skip and not w._restart  # nothing was asked for


def test_a_controller_may_skip_a_phase_but_never_end_the_run_by_it():
    w = coloring(["tabu", "memetic"])
    w.start(Em())
    w.step(Em())
    assert w.phase == "tabu"
    w.check_controller_action("skip_phase", True)  # a next phase follows
    assert w.set_param("skip_phase", True) == ("tabu", "next phase")
    assert not w.step(Em()) and w.phase == "memetic"
    with pytest.raises(ValueError, match=r"skip_phase would end the run: memetic is the last phase of pass 0"):
        w.check_controller_action("skip_phase", True)
    w.check_controller_action("set_tenure", 1.0)  # anything else is the workload's to check
    again = coloring(["memetic"], iterative={"enabled": True, "max_passes": 2})
    again.start(Em())
    again.step(Em())
    again.check_controller_action("skip_phase", True)  # the last phase, but a pass follows
    again.set_param("skip_phase", True)
    assert not again.step(Em()) and again.pass_ == 1
    with pytest.raises(ValueError, match="no pass follows"):
        again.check_controller_action("skip_phase", True)


def test_a_controllers_refused_action_is_recorded_but_no_warning_a_persons_is(tmp_path):
    """A refusal is part of how hypertune learns (a control_refused event); it is not a warning
    on the user's terminal, as a person's refused request is."""
    from structlog.testing import capture_logs

    from supervisor import Lab
    from telemetry.jsonl import iter_run

    lab = Lab(tmp_path / "art")
    try:
        spec = {
            "name": "refusals",
            "time_budget_s": 600,
            "workload": {"name": "coloring", "params": {"graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 1}}},
            "hypertune": {"enabled": False},
        }
        exp = lab.start_experiment(spec)
        with capture_logs() as logs:
            exp.registry.whereis("phase").ask(
                {"kind": "set_param", "key": "nope", "value": 1, "why": "hypertune: x", "controller": "hypertune"}
            )
            with pytest.raises(ValueError, match="unknown control"):
                exp.set_param("nope", 2, why="by hand")
        exp.stop()
        warned = [
            e.get("value") for e in logs if e["event"] == "control action refused" and e["log_level"] == "warning"
        ]
        assert warned == ["2"]  # the person's; the controller's is at info (filtered out where logging is configured)
        assert sum(e["name"] == "control_refused" for e in iter_run(exp.run_dir)) == 2  # both recorded
    finally:
        lab.shutdown()
