"""A hypothesis state machine drives a live supervisor and a pure-Python model of OTP's rules."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from actors import ActorDeadError, Registry
from supervisor import ChildRunning, ChildSpec, Supervisor
from tests.actors_fixtures import Worker


class Model:
    """OTP supervisor semantics, without threads: what the live tree must look like."""

    def __init__(self, specs: list[tuple[str, str]], strategy: str, max_restarts: int, max_seconds: float):
        self.children = [{"id": i, "restart": r, "running": True} for i, r in specs]
        self.strategy, self.max_restarts, self.max_seconds = strategy, max_restarts, max_seconds
        self.restarts: list[float] = []
        self.alive = True

    def find(self, cid: str) -> dict | None:
        return next((c for c in self.children if c["id"] == cid), None)

    def exit(self, cid: str, reason: str, now: float) -> None:
        c = self.find(cid)
        c["running"] = False
        abnormal = reason not in ("normal", "shutdown")
        if not (c["restart"] == "permanent" or (c["restart"] == "transient" and abnormal)):
            if c["restart"] == "temporary":
                self.children.remove(c)
            return
        self.restarts = [t for t in self.restarts if t >= now - self.max_seconds] + [now]
        if len(self.restarts) > self.max_restarts:
            self.alive = False
            for ch in self.children:
                ch["running"] = False
            return
        idx = self.children.index(c)
        group = {"one_for_one": [c], "one_for_all": list(self.children), "rest_for_one": self.children[idx:]}[
            self.strategy
        ]
        for g in group:
            if g is not c and g["restart"] == "temporary":
                self.children.remove(g)
            else:
                g["running"] = True

    def terminate(self, cid: str) -> None:
        c = self.find(cid)
        c["running"] = False
        if c["restart"] == "temporary":
            self.children.remove(c)

    def observed(self) -> list[tuple[str, bool]]:
        return [(c["id"], c["running"]) for c in self.children]


IDS = ["a", "b", "c", "d"]


@settings(max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
class SupervisorMachine(RuleBasedStateMachine):
    sup = None

    @initialize(
        restarts=st.lists(st.sampled_from(["permanent", "transient", "temporary"]), min_size=2, max_size=4),
        strategy=st.sampled_from(["one_for_one", "one_for_all", "rest_for_one"]),
        max_restarts=st.integers(0, 4),
    )
    def start(self, restarts, strategy, max_restarts):
        self.now = 0.0
        specs = list(zip(IDS, restarts, strict=False))
        self.model = Model(specs, strategy, max_restarts, 5.0)
        self.sup = Supervisor.start(
            [ChildSpec(i, Worker, kwargs={"tag": i}, restart=r, shutdown=2.0) for i, r in specs],
            strategy=strategy,
            max_restarts=max_restarts,
            max_seconds=5.0,
            clock=lambda: self.now,
            registry=Registry(),
        )

    def running_ids(self) -> list[str]:
        return [c["id"] for c in self.model.children if c["running"]] if self.model.alive else []

    def present_ids(self) -> list[str]:
        return [c["id"] for c in self.model.children] if self.model.alive else []

    @precondition(lambda self: self.running_ids())
    @rule(data=st.data())
    def crash(self, data):
        cid = data.draw(st.sampled_from(self.running_ids()))
        with pytest.raises(RuntimeError):
            self.sup.child_ref(cid).ask({"kind": "crash"})
        self.model.exit(cid, "exception", self.now)

    @precondition(lambda self: self.running_ids())
    @rule(data=st.data(), reason=st.sampled_from(["normal", "shutdown"]))
    def clean_exit(self, data, reason):
        cid = data.draw(st.sampled_from(self.running_ids()))
        ref = self.sup.child_ref(cid)
        if reason == "normal":
            assert ref.stop(timeout=5)
        else:
            ref.tell({"kind": "exit", "reason": reason})
            ref.wait(5)
        self.model.exit(cid, reason, self.now)

    @precondition(lambda self: self.present_ids())
    @rule(data=st.data())
    def terminate(self, data):
        cid = data.draw(st.sampled_from(self.present_ids()))
        self.sup.terminate_child(cid)
        self.model.terminate(cid)

    @precondition(lambda self: self.present_ids())
    @rule(data=st.data())
    def restart(self, data):
        cid = data.draw(st.sampled_from(self.present_ids()))
        if self.model.find(cid)["running"]:
            with pytest.raises(ChildRunning):
                self.sup.restart_child(cid)
        else:
            self.sup.restart_child(cid)
            self.model.find(cid)["running"] = True

    @precondition(lambda self: self.model.alive)
    @rule(dt=st.sampled_from([0.5, 2.0, 6.0]))
    def advance_clock(self, dt):
        self.now += dt

    @precondition(lambda self: not self.model.alive)
    @rule()
    def dead_supervisor_refuses_calls(self):
        with pytest.raises(ActorDeadError):
            self.sup.which_children()

    @invariant()
    def tree_matches_model(self):
        if self.sup is None:
            return
        if not self.model.alive:
            assert self.sup.wait(5) == "reached_max_restart_intensity"
            return
        live = [(c["id"], c["alive"]) for c in self.sup.which_children()]
        assert live == self.model.observed()

    def teardown(self):
        if self.sup is not None:
            self.sup.stop(timeout=10)


TestSupervisorModel = SupervisorMachine.TestCase
