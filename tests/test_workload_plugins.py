"""A workload class an embedder or an installed package provides runs as a built-in does: it is
registered (``experiments.workloads.register``) or declared as an entry point
(``crucible.workloads``), a spec names it, a real Lab runs it, and the readers (``crucible
list``, the monitor's labels, tuning) take its declarations from the class."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from cli import main
from experiments import workloads
from experiments.monitor import run_objectives
from experiments.spec import SpecError, load_spec
from experiments.workloads import (
    ENTRY_POINT_GROUP,
    Arm,
    Control,
    Objective,
    WorkloadError,
    objective_of,
    objectives,
    register,
    registry,
    unregister,
)
from supervisor import Lab
from telemetry.jsonl import iter_run

ROOT = Path(__file__).resolve().parents[1]


class ToyLoss:
    """A loss that halves each step, for ``steps`` steps and then until its control ``lr`` was
    steered (so that a test's ``set_param`` never finds it finished)."""

    name: ClassVar[str] = "toyloss"
    objective: ClassVar[Objective] = Objective("loss", "min", "L")
    arms: ClassVar[tuple[Arm, ...]] = (Arm("lr_up", "lr", param="lr", scale=2.0, hi=1.0),)
    takeover: ClassVar[tuple[Control, ...]] = ()
    search_space: ClassVar[dict[str, tuple[float, float, str]]] = {"lr": (1e-4, 1.0, "float")}

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - {"steps", "lr"}
        if unknown:
            raise ValueError(f"unknown toyloss parameter(s) {sorted(unknown)}")
        return {"steps": 5, "lr": 0.1, **params}

    @classmethod
    def family(cls, params: dict[str, Any]) -> str:
        return "toy"

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.p = dict(params)
        self.i = 0

    def start(self, emitter: Any) -> None:
        emitter.set_context(phase="train")

    def step(self, emitter: Any) -> bool:
        self.i += 1
        emitter.emit("step", {"loss": 2.0**-self.i, "lr": self.p["lr"]}, step=self.i)
        time.sleep(0.001)
        return self.i >= self.p["steps"] and self.p["lr"] != 0.1

    def checkpoint(self) -> dict[str, Any]:
        return {"i": self.i, "lr": self.p["lr"]}

    def restore(self, state: dict[str, Any]) -> None:
        self.i = int(state.get("i", 0))
        self.p["lr"] = state.get("lr", self.p["lr"])

    def params(self) -> dict[str, Any]:
        return {"lr": self.p["lr"], "steps": self.p["steps"]}

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        if key != "lr":
            raise ValueError(f"toyloss has no control {key!r}")
        before, self.p["lr"] = self.p["lr"], float(value)
        return before, self.p["lr"]


@pytest.fixture
def toyloss():
    register("toyloss", ToyLoss)
    yield ToyLoss
    unregister("toyloss")


# --- registration -------------------------------------------------------------------------------------


def test_a_registered_workload_runs_in_a_real_lab_and_its_objective_is_listed(toyloss, tmp_path, capsys):
    art = tmp_path / "art"
    lab = Lab(art)
    try:
        exp = lab.start_experiment(
            {"name": "toy", "time_budget_s": 60.0, "workload": {"name": "toyloss", "params": {"steps": 40}}}
        )
        assert exp.set_param("lr", 0.5)["after"] == 0.5  # its own control, steered through the tree
        assert exp.wait(60)
        summary = exp.summary()
    finally:
        lab.shutdown()
    assert exp.status() == "stopped" and exp.reason == "completed"
    events = list(iter_run(exp.run_dir))
    last = [e["values"]["loss"] for e in events if e["name"] == "step"][-1]
    assert last <= 2.0**-40
    assert any(e["name"] == "control" and e["parameters"]["lr"] == 0.5 for e in events)
    assert summary["phases"]["train"]["best"]["loss"] == last
    capsys.readouterr()
    assert main(["list", "--json", "--artifacts", str(art)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["best"]["loss"] == last  # was {}: objectives() knew latency and coloring only
    assert main(["list", "--artifacts", str(art)]) == 0
    assert f"L {last:.6g}" in capsys.readouterr().out  # the objective's label, not "-"

    # a reader that does not know the workload (another process: the CLI, a script that did not
    # register it) takes the objective the run's lifecycle record carries; it showed "best -"
    unregister("toyloss")
    assert objective_of("toyloss") is None
    assert main(["list", "--json", "--artifacts", str(art)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["best"] == {"loss": last} and row["objective"] == ToyLoss.objective.to_dict()
    assert main(["list", "--artifacts", str(art)]) == 0
    assert f"L {last:.6g}" in capsys.readouterr().out
    assert run_objectives(exp.run_dir) == [ToyLoss.objective]  # the monitor's too


class NoisyAcc(ToyLoss):
    """50 noisy accuracies a step (a tenth of them failed), its objective their maximum."""

    name: ClassVar[str] = "noisyacc"
    objective: ClassVar[Objective] = Objective("acc", "max", "accuracy")

    def step(self, emitter: Any) -> bool:
        rng = np.random.default_rng(self.i)
        for v, ok in zip(rng.normal(size=50), rng.random(50) > 0.1, strict=True):
            emitter.emit("step", {"acc": float(v)}, step=self.i, success=bool(ok))
        self.i += 1
        return self.i >= self.p["steps"]


def test_a_sampled_runs_best_is_the_runs_own_in_the_objectives_direction(tmp_path, capsys):
    """What a sampling strategy drops still counts in the run's figures, and the summary's
    best follows the objective's direction: the best in summary.json and in `crucible list`
    is the maximum over the whole run, where it was the best of a 2 % sample (or the minimum)."""
    register("noisyacc", NoisyAcc)
    art = tmp_path / "art"
    lab = Lab(art)
    try:
        exp = lab.start_experiment(
            {
                "name": "noisy",
                "time_budget_s": 60.0,
                "workload": {"name": "noisyacc", "params": {"steps": 40}},
                "sampling": {"strategy": "uniform", "config": {"rate": 0.02}},
            }
        )
        assert exp.wait(60)
        summary = exp.summary()
    finally:
        lab.shutdown()
        unregister("noisyacc")
    acc, ok = [], []
    for i in range(40):
        rng = np.random.default_rng(i)
        acc += rng.normal(size=50).tolist()
        ok += (rng.random(50) > 0.1).tolist()
    best = max(a for a, good in zip(acc, ok, strict=True) if good)
    assert summary["events_sampled_out"] > 1000  # sampled indeed
    assert summary["phases"]["train"]["best"]["acc"] == best == summary["phases"]["train"]["max_ok"]["acc"]
    on_disk = [e["values"]["acc"] for e in iter_run(exp.run_dir) if e["name"] == "step"]
    assert len(on_disk) < 100 and summary["phases"]["train"]["min"]["acc"] == min(acc)  # over every event
    from experiments.monitor import run_summary

    assert run_summary(exp.run_dir)["phases"]["train"]["best"]["acc"] == best  # monitor --summary's too
    capsys.readouterr()
    assert main(["list", "--json", "--artifacts", str(art)]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["best"] == {"acc": best}


class CrashOnce(ToyLoss):
    """ToyLoss that crashes at its third step, once: as docs/experiments.md's example, no
    ``phase`` attribute; its ``start()`` sets the phase."""

    name: ClassVar[str] = "crashonce"
    crashed: ClassVar[list[bool]] = []

    def step(self, emitter: Any) -> bool:
        if self.i == 2 and not CrashOnce.crashed:
            CrashOnce.crashed.append(True)
            raise RuntimeError("crash at step 3")
        return super().step(emitter)


def test_a_restarts_first_events_are_in_the_phase_the_workload_set(tmp_path):
    """The ``phase_restart`` of a workload with no ``phase`` attribute (the docs' example) went
    out before its ``start()`` set the phase: a phase of no name (``-``) in every summary."""
    register("crashonce", CrashOnce)
    lab = Lab(tmp_path / "art")
    try:
        spec = {"name": "c", "time_budget_s": 60.0, "workload": {"name": "crashonce", "params": {"lr": 0.5}}}
        exp = lab.start_experiment(spec)
        assert exp.wait(60) and exp.reason == "completed"
        summary = exp.summary()
    finally:
        lab.shutdown()
        unregister("crashonce")
    events = list(iter_run(exp.run_dir))
    assert CrashOnce.crashed and "phase_restart" in [e["name"] for e in events]
    assert {e.get("phase") for e in events} == {"train"}, [(e["name"], e.get("phase")) for e in events]
    assert list(summary["phases"]) == ["train"]


def test_the_readers_take_a_registered_workloads_declarations(toyloss):
    from experiments.monitor import LABELED, SHORT
    from experiments.tuning import search_space, search_spaces

    assert objective_of("toyloss") is ToyLoss.objective and objectives()["toyloss"] is ToyLoss.objective
    assert SHORT["loss"] == "L" and LABELED["L"] == "loss"
    assert search_spaces()["toyloss"] == {"lr": (1e-4, 1.0, "float")}
    assert search_space("toyloss", {}) == {"lr": (1e-4, 1.0, "float")}
    assert load_spec({"workload": {"name": "toyloss"}}, workloads=registry())["workload"]["params"]["steps"] == 5
    unregister("toyloss")
    assert "loss" not in SHORT and objective_of("toyloss") is None
    with pytest.raises(SpecError, match="unknown workload 'toyloss'"):
        load_spec({"workload": {"name": "toyloss"}}, workloads=registry())


def test_register_works_as_a_decorator_and_again_with_the_same_class():
    try:

        @register("toyloss2")
        class Toy2(ToyLoss):
            name = "toyloss2"

        assert registry()["toyloss2"] is Toy2
        assert register("toyloss2", Toy2) is Toy2  # the same class again: a no-op
    finally:
        unregister("toyloss2")


def test_a_clash_or_a_class_off_the_protocol_is_refused_naming_both(toyloss):
    class Other(ToyLoss):
        pass

    with pytest.raises(WorkloadError, match=r"tests.test_workload_plugins:.*Other as 'toyloss'.*ToyLoss is registered"):
        register("toyloss", Other)
    latency = type("Latency", (ToyLoss,), {"name": "latency"})
    with pytest.raises(WorkloadError, match=r"'latency': that is the built-in experiments.workloads.latency"):
        register("latency", latency)
    with pytest.raises(WorkloadError, match="class attribute name is 'toyloss'; it must be 'other'"):
        register("other", Other)
    with pytest.raises(WorkloadError, match="may only use letters"):
        register("my wl", type("W", (ToyLoss,), {"name": "my wl"}))
    with pytest.raises(WorkloadError, match="a workload is a class"):
        register("toyloss3", ToyLoss({}))
    bad = type("Bad", (ToyLoss,), {"name": "bad", "objective": "loss"})
    with pytest.raises(WorkloadError, match="objective must be an Objective"):
        register("bad", bad)
    bad = type("Bad", (ToyLoss,), {"name": "bad", "arms": [Arm("a", "lr")]})
    with pytest.raises(WorkloadError, match="arms must be a tuple of Arm"):
        register("bad", bad)
    bad = type("Bad", (ToyLoss,), {"name": "bad", "search_space": {"lr": (0, 1, "log")}})
    with pytest.raises(WorkloadError, match=r"search_space\['lr'\]"):
        register("bad", bad)
    bad = type("Bad", (), {"name": "bad", "objective": Objective("x"), "arms": (), "takeover": (), "search_space": {}})
    with pytest.raises(WorkloadError, match=r"missing method.*check_params, family, start, step"):
        register("bad", bad)
    assert {"latency", "coloring", "toyloss"} <= set(registry()) and not {"bad", "other", "my wl"} & set(registry())


# --- entry points -------------------------------------------------------------------------------------

PLUGIN = """
from experiments.workloads.base import Arm, Objective


class Acc:
    name = "{name}"
    objective = Objective("acc", "max", "accuracy")
    arms = (Arm("lr_up", "lr", param="lr", scale=2.0),)
    takeover = ()
    search_space = {{}}

    @classmethod
    def check_params(cls, params):
        return {{"steps": 3, **params}}

    @classmethod
    def family(cls, params):
        return "acc"

    def __init__(self, params, seed=0):
        self.p, self.i = dict(params), 0

    def start(self, emitter):
        emitter.set_context(phase="fit")

    def step(self, emitter):
        self.i += 1
        emitter.emit("step", {{"acc": self.i / 10}}, step=self.i)
        return self.i >= self.p["steps"]

    def checkpoint(self):
        return {{"i": self.i}}

    def restore(self, state):
        self.i = state.get("i", 0)

    def params(self):
        return dict(self.p)

    def set_param(self, key, value):
        raise ValueError(f"no control {{key!r}}")
"""


def make_dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution, as pip leaves one: its modules and a ``.dist-info`` whose
    ``entry_points.txt`` declares ``entry_points`` in the workloads' group."""
    for mod, text in modules.items():
        (site / f"{mod}.py").write_text(text)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    monkeypatch.undo()
    for mod in ("accplugin", "brokenplugin"):
        sys.modules.pop(mod, None)
    workloads.discover(refresh=True)


def test_an_installed_packages_entry_point_is_a_workload_in_every_process(site, tmp_path):
    make_dist(site, "acc_plugin", {"accwl": "accplugin:Acc"}, {"accplugin": PLUGIN.format(name="accwl")})
    assert workloads.discover(refresh=True) == {
        "accwl": f"entry point accwl = 'accplugin:Acc' in group {ENTRY_POINT_GROUP!r} of acc_plugin"
    }
    assert registry()["accwl"].__module__ == "accplugin"
    assert objectives()["accwl"] == Objective("acc", "max", "accuracy")
    with pytest.raises(WorkloadError, match=r"cannot register .* as 'accwl': entry point accwl = 'accplugin:Acc'"):
        register("accwl", type("Acc", (ToyLoss,), {"name": "accwl"}))
    # the CLI, another process that registered nothing, runs a spec naming it and lists its objective
    spec = tmp_path / "acc.toml"
    spec.write_text('name = "acc"\ntime_budget_s = 60\n[workload]\nname = "accwl"\nparams = {steps = 4}\n')
    art = tmp_path / "art"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}

    def crucible(*argv: str) -> str:
        code = f"from cli import main\nraise SystemExit(main({list(argv)!r}))"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    crucible("run", str(spec), "--artifacts", str(art), "--no-live")
    (row,) = [json.loads(line) for line in crucible("list", "--json", "--artifacts", str(art)).splitlines()]
    assert row["status"] == "stopped" and row["best"]["acc"] == 0.4  # "max": the highest
    assert "accuracy 0.4" in crucible("list", "--artifacts", str(art))


def test_a_broken_entry_point_is_named_and_the_others_still_load(site, tmp_path, capsys):
    make_dist(site, "acc_plugin", {"accwl": "accplugin:Acc"}, {"accplugin": PLUGIN.format(name="accwl")})
    make_dist(
        site,
        "broken_plugin",
        {"brokenwl": "brokenplugin:Nope", "missingwl": "no_such_module_here:X", "latency": "accplugin:Acc"},
        {"brokenplugin": "raise RuntimeError('the plug-in needs a GPU driver')\n"},
    )
    found = workloads.discover(refresh=True)
    assert set(found) == {"accwl", "brokenwl", "missingwl", "latency"}
    reg = registry()
    assert {"latency", "coloring", "accwl"} <= set(reg) and "brokenwl" not in reg
    assert reg["latency"].__module__ == "experiments.workloads.latency"  # a plug-in never takes a built-in's name
    assert "the name 'latency' is the built-in" in reg.broken["latency"]
    with pytest.raises(SpecError) as e:
        load_spec({"name": "b", "workload": {"name": "brokenwl"}}, workloads=reg, source="b.toml")
    msg = str(e.value)
    assert msg.startswith("b.toml: workload.name: workload plug-in entry point brokenwl = 'brokenplugin:Nope'")
    assert "of broken_plugin cannot be loaded: RuntimeError: the plug-in needs a GPU driver" in msg
    with pytest.raises(SpecError, match=r"no_such_module_here:X.* cannot be loaded: ModuleNotFoundError"):
        load_spec({"workload": {"name": "missingwl"}}, workloads=reg)
    assert set(objectives()) == {"latency", "coloring", "accwl"}  # the readers go on without it
    assert load_spec({"workload": {"name": "accwl"}}, workloads=reg)["workload"]["params"] == {"steps": 3}


def test_an_entry_point_off_the_protocol_is_refused_at_discovery(site):
    make_dist(site, "acc_plugin", {"wrongname": "accplugin:Acc"}, {"accplugin": PLUGIN.format(name="accwl")})
    workloads.discover(refresh=True)
    reg = registry()
    assert "wrongname" not in reg
    assert "class attribute name is 'accwl'; it must be 'wrongname'" in reg.broken["wrongname"]


def test_a_plug_in_that_registers_itself_as_it_is_loaded_loads_once(site):
    text = "from experiments.workloads import register\n" + PLUGIN.format(name="selfreg").replace(
        "class Acc:", '@register("selfreg")\nclass Acc:'
    )
    make_dist(site, "self_plugin", {"selfreg": "selfplugin:Acc"}, {"selfplugin": text})
    try:
        workloads.discover(refresh=True)
        cls = registry()["selfreg"]
        assert cls.__module__ == "selfplugin" and not registry().broken
        assert register("selfreg", cls) is cls  # its own class again: a no-op, not a clash
    finally:
        unregister("selfreg")
        sys.modules.pop("selfplugin", None)
