"""Hypertune's steering, action by action: what it learns from an action (an outcome measured
across a phase change, nothing from a refused one or against a missing value), which arms it
offers (never one that would not move, or move the wrong way), pauses of any length left out
of its windows, and the colouring workload's side (the tenure in force in memetic, a
``skip_phase`` that never ends a run for a controller, actions that take ``true`` only)."""

from __future__ import annotations

import contextlib
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Registry
from actors.hypertune import Hypertune, arm_move, arm_value
from actors.messages import decode, encode
from experiments.coloring.workload import ColoringWorkload
from experiments.workloads import declarations
from experiments.workloads.base import Arm
from experiments.workloads.latency import LatencyWorkload
from supervisor import Lab
from telemetry.jsonl import iter_run
from telemetry.schema import rows_to_batch
from tests.test_hypertune import COLORING, FakePhase, S, answer, steps

LATENCY = declarations(LatencyWorkload)


def tree(window_s=1.0, decl=COLORING, **kw):
    reg = Registry()
    phase = FakePhase.start(answers=False)  # each test gives the phase's answer itself
    reg.register("phase", phase)
    return phase, Hypertune.start("exp", True, reg, window_s=window_s, **{**decl, **kw})


def sent(phase):
    """The set_param and note messages hypertune sent the phase (not its takeover)."""
    return phase.ask({"kind": "got"})


def calls(t0_s, n, dt_s, ms, ok=True, concurrency=1):
    rows = [
        {
            "seq": i,
            "ts": int((t0_s + i * dt_s) * S),
            "name": "call",
            "phase": "calls",
            "success": ok,
            "parameters": {"target": "t:f", "calls_per_step": 5, "concurrency": concurrency, "timeout_s": 10.0},
            "values": {"latency_ms": ms},
        }
        for i in range(n)
    ]
    return decode(encode(rows_to_batch(rows, "exp", "run")))


def feed(ht, *batches):
    for b in batches:
        ht.tell_bytes(encode(b))
    return ht.ask({"kind": "get"})


# --- an outcome across a phase change ---------------------------------------------------------------


def test_an_action_that_changes_the_phase_is_learned_on_the_next_phase():
    """skip_phase always changes the phase: its outcome is the score one window after it was
    applied, on the new phase's progress, and the arm counts as tried (UCB no longer picks it
    first at every later stall)."""
    phase, ht = tree(arms=[Arm("skip_phase", "skip_phase", ("memetic",), value=True).to_dict()])
    try:
        memetic = {"phase": "memetic", "population": 10}
        feed(ht, steps(0, 13, 0.1, lambda n: [6] * n, phase="memetic", params=memetic))
        (action,) = sent(phase)
        assert action["key"] == "skip_phase" and action["value"] is True
        # applied: the next phase starts and cuts its conflicts from 9 to 2 in its first second
        tabu = {"phase": "tabu", "tenure_alpha": 0.6, "iters_per_step": 20000}
        state = feed(
            ht,
            answer(action, 1.25, phase="memetic", params=memetic),
            steps(1.3, 13, 0.1, lambda n: [9] + [2] * (n - 1), phase="tabu", params=tabu),
        )
        assert state["stats"] == {"memetic/skip_phase": {"n": 1, "mean": pytest.approx(4.0, rel=0.1)}}
        (note,) = [m for m in sent(phase) if m["kind"] == "note"]
        assert "outcome of skip_phase (skip_phase=True) in memetic: score 28006 -> 28002" in note["notes"]
        assert "in tabu by then" in note["notes"] and note["values"]["reward"] > 0
    finally:
        for r in (ht, phase):
            r.stop()


def test_after_a_phase_change_the_outcome_waits_for_the_new_phases_progress():
    """The first event of a new phase (its ``phase_start``) has no progress value yet: the
    score must not drop by the old phase's conflicts for it."""
    phase, ht = tree(arms=[Arm("skip_phase", "skip_phase", ("memetic",), value=True).to_dict()])
    try:
        memetic = {"phase": "memetic", "population": 10}
        feed(ht, steps(0, 13, 0.1, lambda n: [6] * n, phase="memetic", params=memetic))
        (action,) = sent(phase)
        start = {
            "seq": 0,
            "ts": int(1.3 * S),
            "name": "phase_start",
            "phase": "tabu",
            "values": {"chromatic_number": 28.0, "k": 27.0},
        }
        state = feed(
            ht,
            answer(action, 1.25, phase="memetic", params=memetic),
            decode(encode(rows_to_batch([start], "exp", "run"))),
            steps(2.4, 1, 0.1, lambda n: [8] * n, phase="tabu"),
        )
        assert state["stats"]["memetic/skip_phase"]["mean"] < 0  # 28006 -> 28008, not 28006 -> 28000
    finally:
        for r in (ht, phase):
            r.stop()


# --- refused actions, arms that cannot move ---------------------------------------------------------


def test_a_refused_action_is_not_learned_and_offered_again_only_when_the_parameters_change():
    phase, ht = tree(arms=[a for a in COLORING["arms"] if a["name"] in ("heat", "cool")])  # untried heat: first
    try:
        hot = {"phase": "thermo", "t_min": 0.05, "t_max": 900.0}
        feed(ht, steps(0, 13, 0.1, lambda n: [6] * n, phase="thermo", params=hot))
        (heat,) = sent(phase)
        assert heat["key"] == "adjust_temperature" and heat["value"] == 1.5  # heat, tried first
        assert heat["controller"] == "hypertune"
        state = feed(
            ht,
            answer(heat, 1.25, applied=False, phase="thermo", params=hot, reason="thermo.t_max must be <= 1000"),
            steps(1.3, 2, 0.1, lambda n: [6] * n, phase="thermo", params=hot),
        )
        assert state["stats"] == {}  # nothing learned from what never happened
        assert state["actions"][0]["not_applied"] == "refused by the workload: thermo.t_max must be <= 1000"
        note = next(m for m in sent(phase) if m["kind"] == "note")
        assert note["values"] == {"refused": 1.0}
        assert note["notes"] == (
            "outcome of heat (adjust_temperature=1.5) in thermo: "
            "refused by the workload: thermo.t_max must be <= 1000; not learned"
        )
        # the stall goes on: the next arm at once, not heat again while the parameters are the same
        cool = [m for m in sent(phase) if m["kind"] == "set_param"][1]
        assert cool["value"] == pytest.approx(1 / 1.5)
        cooler = {**hot, "t_max": 600.0}
        feed(ht, answer(cool, 1.45, phase="thermo", params=cooler))
        state = feed(ht, steps(1.5, 25, 0.1, lambda n: [6] * n, phase="thermo", params=cooler))
        assert state["stats"]["thermo/cool"]["n"] == 1
        again = [m for m in sent(phase) if m["kind"] == "set_param"][2]
        assert again["value"] == 1.5  # the parameters changed: heat may be accepted now
        feed(ht, answer(again, 3.95, applied=False, phase="thermo", params=cooler, reason="no"))
        feed(ht, steps(4.0, 40, 0.1, lambda n: [6] * n, phase="thermo", params={**cooler, "t_max": 400.0}))
        later = [m["value"] for m in sent(phase) if m["kind"] == "set_param"][3:]
        assert later and all(v == pytest.approx(1 / 1.5) for v in later)  # refused twice: not again here
        # a new phase offers every arm again
        assert feed(ht, steps(9, 1, 0.1, lambda n: [6] * n, phase="tabu"))["phase"] == "tabu"
    finally:
        for r in (ht, phase):
            r.stop()


def test_an_answer_for_another_action_or_a_users_refusal_is_not_taken_as_hypertunes():
    phase, ht = tree()
    try:
        feed(ht, steps(0, 13, 0.1, lambda n: [6] * n))
        (action,) = sent(phase)
        users = {**action, "why": "requested"}  # a person's refusal of the same key: no "(hypertune:"
        state = feed(ht, answer(users, 1.25, applied=False))
        assert state["pending"]["applied"] is None and state["stats"] == {}
        state = feed(ht, answer(action, 1.3))
        assert state["pending"]["applied"] is True
    finally:
        for r in (ht, phase):
            r.stop()


@pytest.mark.parametrize(
    ("concurrency", "offered"),
    [(1, 2), (3, 6), (32, 64), (64, 32), (200, 100), (256, 128)],
)
def test_a_latency_arm_that_cannot_move_its_way_is_not_offered(concurrency, offered):
    """concurrency_down at 1 would send 1, concurrency_up at 64 would send 64 and at 200 would
    send 64 (a decrease): none of them is offered; the arm that moves is taken."""
    phase, ht = tree(decl=LATENCY)
    try:
        feed(ht, calls(0, 12, 0.1, 5.0, concurrency=concurrency))
        (action,) = sent(phase)
        assert action["key"] == "concurrency" and action["value"] == offered
    finally:
        for r in (ht, phase):
            r.stop()


def test_no_arm_that_moves_means_no_action():
    only_down = [a for a in LATENCY["arms"] if a["name"] == "concurrency_down"]
    phase, ht = tree(decl={**LATENCY, "arms": only_down})
    try:
        state = feed(ht, calls(0, 30, 0.1, 5.0, concurrency=1))
        assert sent(phase) == [] and state["actions"] == []
    finally:
        for r in (ht, phase):
            r.stop()


@settings(max_examples=300, deadline=None)
@given(
    scale=st.floats(0.01, 4) | st.floats(-4, -0.01),
    shift=st.floats(-4, 4),
    lo=st.none() | st.floats(-100, 50),
    hi=st.none() | st.floats(-50, 100),
    x=st.floats(-1e3, 1e3),
    integer=st.booleans(),
)
def test_an_offered_arm_always_moves_the_way_its_formula_does(scale, shift, lo, hi, x, integer):
    arm = Arm("a", "k", param="p", scale=scale, shift=shift, lo=lo, hi=hi, integer=integer).to_dict()
    v = arm_move(arm, {"p": x})
    way = x * scale + shift - x
    if v is None:  # not offered: the clamp (or int()) leaves it still, or turns it around
        got = arm_value(arm, {"p": x})
        assert way == 0 or got == x or (got > x) != (way > 0)
    else:
        assert v == arm_value(arm, {"p": x}) and v != x and (v > x) == (way > 0)


def test_the_documented_up_and_down_arms_never_move_the_other_way():
    arms = {a.name: a.to_dict() for a in (*ColoringWorkload.arms, *LatencyWorkload.arms)}
    assert arm_move(arms["concurrency_up"], {"concurrency": 200}) is None
    assert arm_move(arms["concurrency_up"], {"concurrency": 64}) is None
    assert arm_move(arms["concurrency_down"], {"concurrency": 1}) is None
    assert arm_move(arms["tenure_down"], {"tenure_alpha": 0.0}) is None  # 0.05 would raise it
    assert arm_move(arms["tenure_up"], {"tenure_alpha": 10.0}) is None
    assert arm_move(arms["tenure_up"], {"tenure_alpha": 2.0}) == pytest.approx(3.3)
    assert arm_move(arms["skip_phase"], {}) is True


# --- a missing baseline, a reward that is not a number ----------------------------------------------------


def test_no_action_and_no_reward_before_the_objective_has_a_value():
    """Failed calls first (a target still starting), then successful ones: hypertune waits for
    a first value; finding one is never scored as a loss of 1000 x it per second."""
    phase, ht = tree(decl=LATENCY)
    try:
        state = feed(ht, calls(0, 16, 0.1, 9.0, ok=False))
        assert sent(phase) == [] and state["actions"] == []
        feed(ht, calls(1.6, 13, 0.1, 5.0))
        (action,) = sent(phase)
        state = feed(
            ht,
            answer(action, 2.85, phase="calls", params={"concurrency": 2}),
            calls(2.9, 12, 0.1, 5.0, concurrency=2),
        )
        assert state["stats"] == {"calls/concurrency_up": {"n": 1, "mean": 0.0}}
    finally:
        for r in (ht, phase):
            r.stop()


# --- pauses ---------------------------------------------------------------------------------------------


def pause(ht, at_s, paused, length_s=None):
    """The phase's ``paused`` / ``unpaused`` mark at ``at_s`` (``unpaused`` with the pause's length)."""
    values = {"active_s": 0.0} if length_s is None else {"active_s": 0.0, "paused_s": length_s}
    row = {"seq": 0, "ts": int(at_s * S), "name": "paused" if paused else "unpaused", "phase": "tabu", "values": values}
    feed(ht, decode(encode(rows_to_batch([row], "exp", "run"))))


def test_a_pause_shorter_than_the_window_is_no_stall():
    """0.9 s without progress, a 1.9 s pause, 0.05 s more: 0.95 s of active time, not 2.85."""
    phase, ht = tree(window_s=2.0)
    try:
        feed(ht, steps(0, 10, 0.1, lambda n: [5] * n))
        pause(ht, 0.92, True)
        pause(ht, 2.82, False)
        state = feed(ht, steps(2.85, 1, 0.1, lambda n: [5] * n))
        assert sent(phase) == [] and state["paused_s"] == pytest.approx(1.9)
        feed(ht, steps(2.9, 12, 0.1, lambda n: [5] * n))  # active 2.0 s reached at 3.92
        (action,) = sent(phase)
        assert "no progress for 2.0s in tabu" in action["why"]
    finally:
        for r in (ht, phase):
            r.stop()


def test_a_pause_is_left_out_of_an_outcomes_window():
    phase, ht = tree(window_s=1.0)
    try:
        feed(ht, steps(0, 13, 0.1, lambda n: [5] * n))
        (action,) = sent(phase)
        feed(ht, answer(action, 1.25), steps(1.3, 3, 0.1, lambda n: [4] * n))
        pause(ht, 1.55, True)
        pause(ht, 1.95, False)
        # events held through the pause carry times inside it: they count at its end
        state = feed(ht, steps(1.6, 2, 0.1, lambda n: [4] * n), steps(2.0, 5, 0.1, lambda n: [4] * n))
        assert state["stats"] == {} and state["paused_s"] == pytest.approx(0.4)
        state = feed(ht, steps(2.5, 3, 0.1, lambda n: [4] * n))  # 1.0 s of active time at 2.65
        (note,) = [m for m in sent(phase) if m["kind"] == "note"]
        assert note["values"]["window_s"] == pytest.approx(1.0, abs=0.06)
        assert state["stats"]["tabu/tenure_up"]["mean"] == pytest.approx(1.0, rel=0.1)
    finally:
        for r in (ht, phase):
            r.stop()


def test_a_hypertune_that_missed_the_pauses_start_takes_its_length_from_the_unpaused_mark():
    """Restarted during a pause, hypertune never saw ``paused``: the ``unpaused`` mark says how
    long the pause lasted, and the stall window leaves it out all the same."""
    phase, ht = tree(window_s=2.0)
    try:
        feed(ht, steps(0, 10, 0.1, lambda n: [5] * n))
        pause(ht, 2.82, False, length_s=1.9)
        state = feed(ht, steps(2.85, 1, 0.1, lambda n: [5] * n))
        assert sent(phase) == [] and state["paused_s"] == pytest.approx(1.9)
        pause(ht, 2.9, False)  # an unpaused mark without a length (an older run's) adds nothing
        assert feed(ht)["paused_s"] == pytest.approx(1.9)
    finally:
        for r in (ht, phase):
            r.stop()


PAUSE_S = 1.0


def test_the_phase_tells_hypertune_of_its_pauses(tmp_path):
    """The real signal: the phase marks its pause and its resume in its events, the first
    before the Lab detaches hypertune and the second after it attaches it again; the second
    says how long the pause lasted."""
    lab = Lab(tmp_path / "art")
    spec = {
        "name": "ht-pause",
        "seed": 1,
        "time_budget_s": 600.0,
        "hypertune": {"enabled": True, "window_s": 5.0},
        "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0], "calls_per_step": 5}},
    }
    try:
        exp = lab.start_experiment(spec)
        exp.pause()
        paused = exp.phase_status()["active_s"]
        ht = exp.registry.whereis("hypertune")
        assert ht.ask({"kind": "get"})["paused_s"] == 0  # the pause under way is not over
        exp.registry.whereis("phase").ask({"kind": "status"})  # a round trip: time passes, paused
        time.sleep(PAUSE_S)  # a pause long enough that a thread preempted beside its marks cannot blur it
        exp.resume()
        state = ht.ask({"kind": "get"})
        assert state["paused_s"] > 0
        assert exp.phase_status()["active_s"] >= paused
        exp.stop()
    finally:
        lab.shutdown()
    marks = [e for e in iter_run(exp.run_dir) if e["name"] in ("paused", "unpaused")]
    assert [e["name"] for e in marks] == ["paused", "unpaused"]
    # paused_s is measured on the phase's clock at its safe points, the marks' ts as they are emitted: a
    # thread preempted between the two on a loaded machine shifts one side. Half the pause still tells
    # a length of nothing or of twice the pause from the real one.
    paused_s = marks[1]["values"]["paused_s"]
    assert paused_s >= PAUSE_S and paused_s == pytest.approx((marks[1]["ts"] - marks[0]["ts"]) / 1e6, abs=PAUSE_S / 2)


# --- the colouring workload's side, through the phase ----------------------------------------------


def test_the_phase_refuses_a_controllers_skip_that_would_end_the_run(tmp_path):
    """The refusal is a control_refused event in the phase, naming the controller's reason (its
    answer, for hypertune); a person's skip of the same phase is theirs to make."""
    lab = Lab(tmp_path / "art")
    spec = {
        "name": "skip",
        "seed": 1,
        "time_budget_s": 600.0,
        "workload": {
            "name": "coloring",
            "params": {
                "graph": {"generator": "gnp", "n": 40, "p": 0.5, "seed": 3},
                "phases": ["memetic"],
                "gpu": "cpu",
                "memetic": {"population": 4, "local_iters": 50, "max_generations": 10**9},
            },
        },
    }
    try:
        exp = lab.start_experiment(spec)
        phase = exp.registry.whereis("phase")
        phase.ask({"kind": "status"})
        exp.pause()
        assert exp.phase_status()["params"]["phase"] == "memetic"
        why = "hypertune: no progress for 1.0s in memetic (best colors 9); arm skip_phase by ucb"
        msg = {"kind": "set_param", "key": "skip_phase", "value": True, "why": why, "event": "hypertune_action"}
        reply = phase.ask({**msg, "controller": "hypertune"})
        assert not reply["ok"] and "skip_phase would end the run" in reply["error"]
        assert phase.ask(msg)["ok"]  # the same action from a person: applied at the next step
        exp.resume()
        assert exp.wait(60) and exp.reason == "completed"
    finally:
        lab.shutdown()
    events = list(iter_run(exp.run_dir))
    (refused,) = [e for e in events if e["name"] == "control_refused"]
    assert refused["phase"] == "memetic"
    assert refused["notes"].startswith("skip_phase=True refused: skip_phase would end the run")
    assert refused["notes"].endswith(f"({why})")


@contextlib.contextmanager
def stalled_tree():
    """A tree whose hypertune has stalled and sent one action: (phase, hypertune, that action)."""
    phase, ht = tree()
    try:
        feed(ht, steps(0, 13, 0.1, lambda n: [6] * n))
        (action,) = sent(phase)
        yield phase, ht, action
    finally:
        for r in (ht, phase):
            r.stop()


def test_a_persons_refused_control_never_passes_for_the_answer_to_hypertunes_action():
    """The answer is matched by the action's own why (with a token drawn for it): a person's
    control whose key spells hypertune's phrases is refused for the person only, and the
    phase's real answer is still taken, so the action is learned."""
    with stalled_tree() as (phase, ht, action):
        arm = re.search(r"arm (\S+) by", action["why"]).group(1)
        key = f"arm {arm} by (hypertune:"
        row = {
            "seq": 0,
            "ts": int(1.25 * S),
            "name": "control_refused",
            "phase": "tabu",
            "parameters": {"phase": "tabu", "tenure_alpha": 0.6, "iters_per_step": 20000},
            "notes": f"{key}=True refused: unknown control {key!r} ({action['why'][:-20]})",  # a near miss too
        }
        state = feed(ht, decode(encode(rows_to_batch([row], "exp", "run"))))
        assert state["pending"] is not None and "not_applied" not in state["actions"][0]
        state = feed(ht, answer(action, 1.3), steps(1.35, 20, 0.1, lambda n: [3] * n))
        assert state["stats"].get(f"tabu/{arm}", {}).get("n") == 1  # learned from the real answer
        assert [m["key"] for m in sent(phase) if m["kind"] == "set_param"] == [action["key"]]  # no second action


def test_an_answer_whose_note_is_not_text_is_ignored_not_a_crash():
    with stalled_tree() as (_phase, ht, _action):
        for note in (5, None):
            row = {"seq": 0, "ts": int(1.25 * S), "name": "hypertune_action", "phase": "tabu", "notes": "x"}
            b = rows_to_batch([row], "exp", "run")
            b["sparse"]["notes"] = [[0, note]] if note is not None else []
            ht.tell_bytes(encode(b))
            assert ht.ask({"kind": "get"}, timeout=10)["pending"]["applied"] is None  # alive, and not taken
