"""The workload declares itself (objective, arms, takeover, family, search space) and the
framework steers by that data alone: hypertune drives the latency workload exactly as it
drives the colouring pipeline, and no framework module names a colouring field."""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.hypertune import arm_value
from experiments.coloring.catalog import instance_family
from experiments.coloring.workload import ColoringWorkload
from experiments.workloads import (
    Arm,
    Control,
    LatencyWorkload,
    Objective,
    Workload,
    declarations,
    objective_of,
    objectives,
    registry,
)
from supervisor import Lab
from telemetry.jsonl import iter_run
from tests.fault_helpers import until
from tests.test_cli_lazy import imported_after

ROOT = Path(__file__).resolve().parents[1]
FAMILY_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

# the colouring arms as hypertune computed them before they became data
OLD_COLOURING_ARMS = {
    "tabu": {
        "tenure_up": ("set_tenure", lambda p: min(10.0, p.get("tenure_alpha", 0.6) * 1.6 + 0.1)),
        "tenure_down": ("set_tenure", lambda p: max(0.05, p.get("tenure_alpha", 0.6) / 1.6)),
        "batch_up": ("set_batch", lambda p: int(min(10**7, p.get("iters_per_step", 20_000) * 2))),
    },
    "memetic": {
        "mutation_up": ("boost_mutation", lambda p: min(1.0, p.get("mutation_rate", 0.0) + 0.05)),
        "tenure_up": ("set_tenure", lambda p: min(10.0, p.get("tenure_alpha", 0.6) * 1.6 + 0.1)),
        "tenure_down": ("set_tenure", lambda p: max(0.05, p.get("tenure_alpha", 0.6) / 1.6)),
        "skip_phase": ("skip_phase", lambda p: True),
    },
    "thermo": {
        "heat": ("adjust_temperature", lambda p: 1.5),
        "cool": ("adjust_temperature", lambda p: 1 / 1.5),
        "skip_phase": ("skip_phase", lambda p: True),
    },
}


def _arms_in(cls: type[Workload], phase: str) -> list[Arm]:
    return [a for a in cls.arms if a.applies_in(phase)]


# --- the declarations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(registry().values()), ids=list(registry()))
def test_every_workload_declares_what_the_framework_steers_by(cls):
    assert isinstance(cls.objective, Objective) and cls.objective.direction in ("min", "max")
    assert cls.arms and all(isinstance(a, Arm) for a in cls.arms)
    assert len({(a.name, p) for a in cls.arms for p in a.phases or ("*",)}) == sum(
        len(a.phases or ("*",)) for a in cls.arms
    ), "an arm name appears once per phase"
    assert all(isinstance(c, Control) for c in cls.takeover)
    assert FAMILY_NAME.match(cls.family(cls.check_params({})))
    assert objective_of(cls.name) is cls.objective and objectives()[cls.name] is cls.objective
    d = declarations(cls)
    assert orjson.loads(orjson.dumps(d)) == d  # plain data: crosses a process as it is
    assert [Arm.from_dict(a) for a in d["arms"]] == list(cls.arms)
    assert Objective.from_dict(d["objective"]) == cls.objective


def test_readers_know_every_workload_objective_without_importing_a_workload():
    assert objectives() == {name: cls.objective for name, cls in registry().items()}
    code = (
        "import experiments.monitor, cli.render\n"
        "from experiments.workloads import objectives\n"
        "assert sorted(objectives()) == ['coloring', 'latency']\n"
    )
    assert imported_after(code) == []  # a listing or a monitor loads no kernels (nor scipy)


def test_objective_of_an_unknown_name_is_none():
    for name in ("nope", "", None, 3, ["coloring"]):
        assert objective_of(name) is None


def test_the_declarations_say_what_each_workload_is_judged_by():
    assert ColoringWorkload.objective == Objective("chromatic_number", "min", "colors", "conflicts")
    assert LatencyWorkload.objective == Objective("latency_ms", "min", "latency_ms", None)
    assert Objective("x").label == "x" and Objective("x", "max").better(2, 1) and Objective("x").better(1, 2)
    with pytest.raises(ValueError, match="direction"):
        Objective("x", "down")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="field"):
        Objective("")


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.floats(0.0, 10.0),
    iters=st.integers(1, 10**9),
    rate=st.floats(0.0, 1.0),
    missing=st.sets(st.sampled_from(["tenure_alpha", "iters_per_step", "mutation_rate"])),
)
def test_colouring_arms_compute_what_hypertune_computed_before(alpha, iters, rate, missing):
    params = {"tenure_alpha": alpha, "iters_per_step": iters, "mutation_rate": rate}
    for k in missing:
        del params[k]
    for phase, old in OLD_COLOURING_ARMS.items():
        arms = _arms_in(ColoringWorkload, phase)
        assert [a.name for a in arms] == list(old)  # the same arms, tried in the same order
        for arm in arms:
            key, value_of = old[arm.name]
            want, got = value_of(params), arm.value_for(params)
            assert arm.key == key and type(got) is type(want)
            assert got == pytest.approx(want, rel=1e-11)  # x / 1.6 is x * 0.625; then 12 significant digits
            assert arm_value(arm.to_dict(), params) == got
    assert _arms_in(ColoringWorkload, "init") == []
    population = ["tenure_up", "tenure_down", "crossover_up", "crossover_down"]  # added since
    assert [a.name for a in _arms_in(ColoringWorkload, "population")] == population


@settings(max_examples=200, deadline=None)
@given(
    scale=st.floats(-4, 4),
    shift=st.floats(-4, 4),
    lo=st.none() | st.floats(-100, 0),
    hi=st.none() | st.floats(0, 100),
    x=st.none() | st.floats(-1e3, 1e3) | st.text(max_size=3) | st.booleans(),
    integer=st.booleans(),
)
def test_an_arm_value_is_its_formula_clamped(scale, shift, lo, hi, x, integer):
    arm = Arm("a", "k", param="p", scale=scale, shift=shift, lo=lo, hi=hi, default=1.0, integer=integer)
    params = {} if x is None else {"p": x}
    v = arm.value_for(params)
    base = x if isinstance(x, float) else 1.0  # a missing or non-number parameter reads as the default
    want = float(f"{base * scale + shift:.12g}")  # 12 significant digits: what the records show
    want = min(hi, want) if hi is not None else want
    want = max(lo, want) if lo is not None else want
    assert v == (int(want) if integer else want)
    assert Arm.from_dict(orjson.loads(orjson.dumps(arm.to_dict()))) == arm
    assert Arm("s", "skip", value=True).value_for(params) is True


@settings(max_examples=200, deadline=None)
@given(host=st.text(min_size=1, max_size=40), path=st.text(max_size=20), scheme=st.sampled_from(["http", "https"]))
def test_the_latency_family_is_always_a_file_name(host, path, scheme):
    fam = LatencyWorkload.family({"target": f"{scheme}://{host}/{path}"})
    assert FAMILY_NAME.match(fam) and len(fam) <= 80
    assert LatencyWorkload.family({"target": "time:sleep"}) == "time.sleep"
    assert LatencyWorkload.family({"target": "http://api.example:8080/v1?q=1"}) == "api.example.8080"


def test_the_colouring_family_comes_from_the_workload():
    assert instance_family("DSJC250.5") == "DSJC" and instance_family("le450_15c") == "le"
    assert instance_family("") == "graph" and instance_family("250x") == "graph"
    assert ColoringWorkload.family({"graph": {"file": "flat300_28_0.col.gz"}}) == "flat"
    assert ColoringWorkload.family({"graph": {"generator": "planted", "n": 10}}) == "planted"
    assert ColoringWorkload.family({}) == "coloring"


# --- the latency knob ----------------------------------------------------------------------------------


class Sink:
    """An emitter that keeps what it is given (the workload's own telemetry, nothing faked)."""

    def __init__(self):
        self.events = []

    def set_context(self, **kw):
        pass

    def emit(self, name, values=None, **kw):
        self.events.append({"name": name, "values": values or {}, **kw})


_rendezvous: dict[str, threading.Barrier] = {}


def meet(group: str, timeout: float) -> dict[str, float]:
    """A call that succeeds only when every call of its group is in flight at the same time
    (within ``timeout``: long where they must meet, a loaded machine starts threads slowly;
    short where they must not, as the first call waits alone)."""
    _rendezvous[group].wait(timeout=timeout)  # BrokenBarrierError: not concurrent
    return {"cost_usd": 0.0}


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_puts_that_many_calls_in_flight_at_once(concurrency):
    group = f"g{concurrency}"
    _rendezvous[group] = threading.Barrier(4)
    p = LatencyWorkload.check_params(
        {
            "target": f"{__name__}:meet",
            "args": [group, 60.0 if concurrency == 4 else 0.5],
            "calls_per_step": 4,
            "concurrency": concurrency,
        }
    )
    w = LatencyWorkload(p)
    sink = Sink()
    w.start(sink)
    w.step(sink)
    calls = [e for e in sink.events if e["name"] == "call"]
    assert [e["step"] for e in calls] == [1, 2, 3, 4]  # in the order they were made
    if concurrency == 4:  # all four met: they ran at the same time
        assert all(e["success"] for e in calls) and w.failures == 0
    else:  # one at a time, the first waits alone and fails, and so on
        assert not any(e["success"] for e in calls) and w.failures == 4
    assert w.params()["concurrency"] == concurrency


def test_concurrency_is_validated_and_survives_a_restart():
    w = LatencyWorkload(LatencyWorkload.check_params({"target": "math:sqrt", "args": [2.0]}))
    assert w.params()["concurrency"] == 1
    for bad in (0, 257, 2.5, float("nan"), "2", None):
        with pytest.raises(ValueError, match="concurrency"):
            w.set_param("concurrency", bad)
    with pytest.raises(ValueError, match="concurrency"):
        LatencyWorkload.check_params({"concurrency": -1})
    assert w.set_param("concurrency", 8) == (1, 8)
    again = LatencyWorkload(LatencyWorkload.check_params({"target": "math:sqrt", "args": [2.0]}))
    again.restore(w.checkpoint())
    assert again.params()["concurrency"] == 8
    with pytest.raises(ValueError, match="no tunable parameter"):
        w.set_param("target", "os:getcwd")


# --- one hypertune, two workloads ----------------------------------------------------------------------


def test_hypertune_steers_the_latency_workload_in_a_real_lab_tree(tmp_path):
    """The latency objective stops improving (a fixed 2 ms call: new lowest latencies become
    ever rarer), hypertune sees the stall, acts on the latency arm, the phase applies it and
    the outcome is recorded: the same actor code that steers the colouring pipeline."""
    lab = Lab(tmp_path / "art")
    exp = lab.start_experiment(
        {
            "name": "lat-ht",
            "seed": 1,
            "time_budget_s": 120.0,
            "hypertune": {"enabled": True, "window_s": 0.3},
            "workload": {"name": "latency", "params": {"target": "time:sleep", "args": [0.002], "calls_per_step": 5}},
        }
    )
    seen: dict = {}

    def learned() -> bool:  # one outcome measured and learned from
        ht = exp.registry.whereis("hypertune")
        seen["state"] = ht.ask({"kind": "get"}) if ht is not None else {"stats": {}}
        return sum(v["n"] for v in seen["state"]["stats"].values()) >= 1

    try:
        until(learned, 90, "a hypertune outcome")
        exp.stop()
    finally:
        lab.shutdown()
    state = seen["state"]
    first = state["actions"][0]
    assert (first["phase"], first["arm"], first["key"], first["value"]) == ("calls", "concurrency_up", "concurrency", 2)
    events = list(iter_run(exp.run_dir))
    actions = [e for e in events if e["name"] == "hypertune_action"]
    assert actions, "the stall must produce an action"
    a = actions[0]
    assert a["notes"].startswith("concurrency: 1 -> 2 (hypertune: no progress for ")
    assert "in calls (best latency_ms " in a["notes"] and "arm concurrency_up by ucb" in a["notes"]
    assert a["parameters"]["concurrency"] == 2  # applied: the parameters in force say so
    outcomes = [e for e in events if e["name"] == "hypertune_outcome"]
    assert outcomes and outcomes[0]["ts"] > a["ts"]
    assert math.isfinite(outcomes[0]["values"]["reward"]) and outcomes[0]["values"]["window_s"] >= 0.3
    assert "outcome of concurrency_up (concurrency=2) in calls" in outcomes[0]["notes"]
    assert not any(e["name"] == "control_refused" for e in events)
    assert not any(e["name"] == "control" for e in events)  # the latency workload declares no takeover
    state_file = tmp_path / "art" / "hypertune" / "latency-time.sleep.json"  # <workload>-<family>.json
    saved = orjson.loads(state_file.read_bytes())["stats"]
    assert saved["calls/concurrency_up"]["n"] >= 1


# --- the framework names no workload's fields ------------------------------------------------------------

FRAMEWORK_DIRS = ("actors", "experiments", "telemetry")
EXEMPT = ("experiments/coloring/",)
COLOURING_WORDS = re.compile(r"chromatic_number|tenure", re.IGNORECASE)


def _framework_files():
    for d in FRAMEWORK_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(EXEMPT):
                yield rel, path.read_text(encoding="utf-8")


def test_no_framework_module_names_a_colouring_field():
    offenders = [
        f"{rel}:{n}: {line.strip()}"
        for rel, text in _framework_files()
        for n, line in enumerate(text.splitlines(), 1)
        if COLOURING_WORDS.search(line)
    ]
    assert offenders == []


# the command line and the dashboard read the declared objective: they name no colouring field,
# in code, comments or docstrings, in Python or in the page's script and markup
CLIENT_DIRS = ("cli", "dashboard")
CLIENT_SUFFIXES = (".py", ".js", ".html")
CLIENT_WORDS = re.compile(r"chromatic_number|conflicts|tenure|colours", re.IGNORECASE)


def _client_files():
    for d in CLIENT_DIRS:
        for path in sorted((ROOT / d).rglob("*")):
            if path.suffix in CLIENT_SUFFIXES and path.is_file():
                yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_no_cli_or_dashboard_module_names_a_colouring_field():
    files = dict(_client_files())
    assert {"cli/render.py", "dashboard/server.py", "dashboard/static/app.js", "dashboard/static/index.html"} <= set(
        files
    )
    offenders = [
        f"{rel}:{n}: {line.strip()}"
        for rel, text in files.items()
        for n, line in enumerate(text.splitlines(), 1)
        if CLIENT_WORDS.search(line)
    ]
    assert offenders == []


def test_hypertune_names_no_workload_at_all():
    text = (ROOT / "actors" / "hypertune.py").read_text(encoding="utf-8")
    for word in ("chromatic", "conflict", "tenure", "graph", "dimacs", "colo", "latency", "concurrency"):
        assert word not in text.lower(), word


def _calls(t0_s, values, ok=True, phase="calls"):
    from actors.messages import encode
    from telemetry.schema import rows_to_batch

    rows = [
        {"seq": i, "ts": int((t0_s + i * 0.1) * 1e6), "name": "call", "phase": phase, "success": ok, "values": {"x": v}}
        for i, v in enumerate(values)
    ]
    return encode(rows_to_batch(rows, "exp", "run"))


def test_a_max_objective_stalls_acts_and_rewards_in_its_own_direction():
    """Higher is better here: a rising value is progress, a failed call's high value is not, and
    the reward of an action is positive when the value rises after it."""
    from actors import Registry
    from actors.hypertune import Hypertune
    from tests.test_hypertune import FakePhase

    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    arm = Arm("more", "boost", value=2)
    ht = Hypertune.start(
        "exp", True, reg, window_s=1.0, objective=Objective("x", "max").to_dict(), arms=[arm.to_dict()]
    )
    try:
        ht.tell_bytes(_calls(0, [float(v) for v in range(1, 11)]))  # rising: progress, no action
        ht.tell_bytes(_calls(1.0, [100.0] * 12, ok=False))  # failed calls: no progress whatever they say
        state = ht.ask({"kind": "get"})
        assert state["best"] == 10.0 and len(state["actions"]) == 1
        assert phase.ask({"kind": "got"})[0]["key"] == "boost"
        ht.tell_bytes(_calls(2.2, [20.0] * 12))  # after the action the value rose
        state = ht.ask({"kind": "get"})
        assert state["stats"]["calls/more"]["n"] == 1 and state["stats"]["calls/more"]["mean"] > 0
    finally:
        for r in (ht, phase):
            r.stop()
