import threading

import pytest

from actors import KILLED, SHUTDOWN, ActorDeadError, Registry
from actors.supervision import MAX_INTENSITY
from supervisor import (
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    DynamicSupervisor,
    Supervisor,
    TooManyChildren,
)
from tests.actors_fixtures import SlowStop, Worker


def urns(sup):
    return {c["id"]: c["urn"] for c in sup.which_children()}


def crash(sup, child_id):
    """Crash a child by ask; the asker's exception arrives after the supervisor has the down."""
    ref = sup.child_ref(child_id)
    with pytest.raises(RuntimeError):
        ref.ask({"kind": "crash"})
    return ref


def three(journal, strategy, **kw):
    return Supervisor.start(
        [ChildSpec(t, Worker, kwargs={"tag": t, "journal": journal}) for t in "abc"],
        strategy=strategy,
        **kw,
    )


@pytest.fixture
def journal():
    return []


def test_children_start_in_order_and_stop_in_reverse(journal):
    sup = three(journal, "one_for_one")
    assert [c["id"] for c in sup.which_children()] == ["a", "b", "c"]
    assert all(c["alive"] and c["restart"] == "permanent" for c in sup.which_children())
    assert sup.stop(timeout=5)
    assert journal == [
        ("start", "a"),
        ("start", "b"),
        ("start", "c"),
        ("stop", "c", SHUTDOWN),
        ("stop", "b", SHUTDOWN),
        ("stop", "a", SHUTDOWN),
    ]


def test_one_for_one_restarts_only_the_crashed_child(journal):
    sup = three(journal, "one_for_one")
    before = urns(sup)
    crash(sup, "b")
    after = urns(sup)
    assert after["a"] == before["a"] and after["c"] == before["c"]
    assert after["b"] != before["b"] and after["b"] is not None
    assert sup.child_ref("b").ask({"kind": "ping"})["tag"] == "b"
    sup.stop()


def test_one_for_all_restarts_everyone_in_order(journal):
    sup = three(journal, "one_for_all")
    before = urns(sup)
    journal.clear()
    crash(sup, "b")
    after = urns(sup)
    assert all(after[k] != before[k] for k in "abc")
    stops = [e for e in journal if e[0] == "stop"]
    assert stops[0][:2] == ("stop", "b") and stops[0][2].startswith("exception")
    assert stops[1:] == [("stop", "c", SHUTDOWN), ("stop", "a", SHUTDOWN)]
    assert [e for e in journal if e[0] == "start"] == [("start", "a"), ("start", "b"), ("start", "c")]
    sup.stop()


def test_rest_for_one_restarts_the_child_and_later_ones(journal):
    sup = three(journal, "rest_for_one")
    before = urns(sup)
    crash(sup, "b")
    after = urns(sup)
    assert after["a"] == before["a"]
    assert after["b"] != before["b"] and after["c"] != before["c"]
    sup.stop()


@pytest.mark.parametrize(
    ("restart", "how", "restarted"),
    [
        ("permanent", "normal", True),
        ("permanent", "crash", True),
        ("transient", "normal", False),
        ("transient", "crash", True),
        ("transient", "shutdown", False),
        ("temporary", "normal", False),
        ("temporary", "crash", False),
    ],
)
def test_restart_types(restart, how, restarted):
    sup = Supervisor.start([ChildSpec("w", Worker, restart=restart)])
    old = sup.child_ref("w")
    if how == "crash":
        crash(sup, "w")
    elif how == "normal":
        old.stop()
    else:
        old.tell({"kind": "exit", "reason": "shutdown"})
        old.wait(5)
    children = sup.which_children()
    if restarted:
        assert children[0]["alive"] and children[0]["urn"] != old.urn
    elif restart == "temporary":
        assert children == []  # a temporary child's spec is removed when it exits
    else:
        assert children[0]["alive"] is False and children[0]["urn"] is None
    assert sup.is_alive()
    sup.stop()


def test_temporary_sibling_is_removed_not_restarted_by_one_for_all():
    sup = Supervisor.start(
        [ChildSpec("p", Worker), ChildSpec("t", Worker, restart="temporary"), ChildSpec("q", Worker)],
        strategy="one_for_all",
    )
    crash(sup, "q")
    assert [c["id"] for c in sup.which_children()] == ["p", "q"]
    sup.stop()


def test_intensity_exceeded_stops_children_in_reverse_and_exits_abnormally(journal):
    sup = three(journal, "one_for_one", max_restarts=2, max_seconds=60)
    crash(sup, "a")
    crash(sup, "a")
    refs = [sup.child_ref(i) for i in "bc"]
    journal.clear()
    crash(sup, "a")  # third restart within the window: over the intensity
    assert sup.wait(5) == MAX_INTENSITY
    assert not sup.is_alive()
    assert all(not r.is_alive() for r in refs)
    assert [e[:2] for e in journal] == [("stop", "a"), ("stop", "c"), ("stop", "b")]


def test_intensity_window_slides_with_the_clock():
    now = [0.0]
    sup = Supervisor.start([ChildSpec("w", Worker)], max_restarts=1, max_seconds=5.0, clock=lambda: now[0])
    crash(sup, "w")
    sup.which_children()  # the supervisor has handled the down (FIFO) before the clock moves
    now[0] = 6.0  # the first restart has left the window
    crash(sup, "w")
    assert sup.is_alive()
    assert sup.restart_times() == [6.0]
    now[0] = 7.0
    crash(sup, "w")
    assert sup.wait(5) == MAX_INTENSITY


def test_zero_max_restarts_exits_on_first_restart():
    sup = Supervisor.start([ChildSpec("w", Worker)], max_restarts=0)
    crash(sup, "w")
    assert sup.wait(5) == MAX_INTENSITY


class _FailsInOnStart(Worker):
    """Starts (its thread runs), then its on_start raises: pykka stops such an actor without
    its on_failure, so only the base class's guard tells the supervisor."""

    def on_start(self) -> None:
        if self.journal is not None and sum(e[0] == "start" for e in self.journal) > 1:
            raise RuntimeError("cannot restore")


def test_an_on_start_that_raises_is_a_crash_the_supervisor_restarts_and_then_gives_up_on():
    journal: list = []
    given_up: list = []
    sup = Supervisor.start(
        [ChildSpec("w", _FailsInOnStart, kwargs={"tag": "w", "journal": journal})],
        max_restarts=2,
        max_seconds=60,
        on_give_up=lambda child, reason: given_up.append((child, reason)),
    )
    crash(sup, "w")  # the restarts' on_start raise: each a crash, two restarts, then over the intensity
    assert sup.wait(10) == MAX_INTENSITY
    assert given_up == [("w", "exception: RuntimeError: cannot restore")]
    assert [e for e in journal if e[0] == "stop"][-1] == ("stop", "w", "exception: RuntimeError: cannot restore")


def test_escalation_parent_restarts_the_failed_supervisor():
    inner_spec = ChildSpec(
        "inner",
        Supervisor,
        kwargs={"children": [ChildSpec("w", Worker, kwargs={"tag": "leaf"})], "max_restarts": 0},
    )
    outer = Supervisor.start([ChildSpec("sibling", Worker), inner_spec], strategy="one_for_one")
    inner = outer.child_ref("inner")
    sibling_urn = outer.child_ref("sibling").urn
    leaf = inner.child_ref("w")
    with pytest.raises(RuntimeError):
        leaf.ask({"kind": "crash"})
    assert inner.wait(5) == MAX_INTENSITY
    new_inner = outer.child_ref("inner")
    assert new_inner is not None and new_inner.urn != inner.urn
    assert new_inner.child_ref("w").ask({"kind": "ping"})["tag"] == "leaf"
    assert outer.child_ref("sibling").urn == sibling_urn
    outer.stop()
    assert not new_inner.is_alive()


def test_escalation_all_the_way_up():
    inner_spec = ChildSpec("inner", Supervisor, kwargs={"children": [ChildSpec("w", Worker)], "max_restarts": 0})
    outer = Supervisor.start([inner_spec], max_restarts=0)
    leaf = outer.child_ref("inner").child_ref("w")
    with pytest.raises(RuntimeError):
        leaf.ask({"kind": "crash"})
    assert outer.wait(5) == MAX_INTENSITY


def test_shutdown_timeout_kills_a_child_that_does_not_stop():
    gate = threading.Event()
    try:
        sup = Supervisor.start([ChildSpec("slow", SlowStop, kwargs={"gate": gate}, shutdown=0.05)])
        child = sup.child_ref("slow")
        assert sup.stop(timeout=5)
        assert child.exit_reason == KILLED
        with pytest.raises(ActorDeadError):
            child.ask({"kind": "ping"})
    finally:
        gate.set()


def test_brutal_kill_does_not_wait(journal):
    sup = Supervisor.start([ChildSpec("w", Worker, kwargs={"journal": journal, "tag": "w"}, shutdown="brutal_kill")])
    child = sup.child_ref("w")
    sup.terminate_child("w")
    assert child.exit_reason == KILLED
    assert ("stop", "w", SHUTDOWN) not in journal  # killed: terminate() never ran
    sup.stop()


def test_infinity_waits_for_the_child():
    gate = threading.Event()
    sup = Supervisor.start([ChildSpec("slow", SlowStop, kwargs={"gate": gate}, shutdown="infinity")])
    child = sup.child_ref("slow")
    done = threading.Event()
    t = threading.Thread(target=lambda: (sup.stop(), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.2)  # still waiting for the slow terminate
    gate.set()
    assert done.wait(5)
    assert child.exit_reason == SHUTDOWN


def test_killed_supervisor_takes_children_with_it():
    sup = Supervisor.start([ChildSpec("w", Worker)])
    child = sup.child_ref("w")
    sup.kill()
    assert child.wait(5) == KILLED


def test_auto_shutdown_any_significant():
    sup = Supervisor.start(
        [ChildSpec("main", Worker, restart="transient", significant=True), ChildSpec("helper", Worker)],
        auto_shutdown="any_significant",
    )
    helper = sup.child_ref("helper")
    sup.child_ref("main").stop()
    assert sup.wait(5) == SHUTDOWN
    assert helper.exit_reason == SHUTDOWN


def test_auto_shutdown_all_significant():
    sup = Supervisor.start(
        [ChildSpec(i, Worker, restart="temporary", significant=True) for i in ("x", "y")],
        auto_shutdown="all_significant",
    )
    sup.child_ref("x").stop()
    assert sup.is_alive() and sup.count_children()["active"] == 1
    sup.child_ref("y").stop()
    assert sup.wait(5) == SHUTDOWN


def test_backoff_delays_restart_and_stashes_messages_sent_to_the_name():
    reg = Registry()
    sup = Supervisor.start([ChildSpec("w", Worker, name="w")], backoff=(0.2, 1.0, 0.0), registry=reg)
    old = reg.whereis("w")
    with pytest.raises(RuntimeError):
        old.ask({"kind": "crash"})
    assert sup.which_children()[0]["restarting"] is True
    assert reg.whereis("w") is None
    for v in range(5):
        assert reg.send("w", {"kind": "note", "v": v})
    new = reg.await_name("w", timeout=5, not_urn=old.urn)
    assert new is not None and new.urn != old.urn
    for v in range(5, 8):
        reg.send("w", {"kind": "note", "v": v})
    assert new.ask({"kind": "notes"}) == list(range(8))  # nothing lost, order kept
    sup.stop()


def test_backoff_delay_doubles_caps_and_jitters():
    from actors.supervision import backoff_delay

    assert [backoff_delay(n, 0.01, 0.08, 0.0, 0.9) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.08, 0.08]
    assert backoff_delay(2, 0.01, 0.08, 0.5, 0.0) == 0.02
    assert backoff_delay(2, 0.01, 0.08, 0.5, 0.999) == pytest.approx(0.02 * 1.4995)


def test_failed_restart_is_retried_and_counted():
    refuse = threading.Event()
    sup = Supervisor.start([ChildSpec("w", Worker, kwargs={"fail_start": refuse})], max_restarts=3, max_seconds=60)
    refuse.set()
    crash(sup, "w")
    assert sup.wait(5) == MAX_INTENSITY  # every retry counts towards the intensity


def test_dynamic_supervisor_max_children():
    dyn = DynamicSupervisor.start(max_children=2)
    a = dyn.start_child(ChildSpec("a", Worker, kwargs={"tag": "a"}))
    dyn.start_child(ChildSpec("b", Worker))
    with pytest.raises(TooManyChildren, match="max_children=2"):
        dyn.start_child(ChildSpec("c", Worker))
    dyn.terminate_child("b")
    with pytest.raises(ValueError, match="duplicate child id 'b'"):
        dyn.start_child(ChildSpec("b", Worker))
    with pytest.raises(TooManyChildren):  # a terminated child still holds its slot until deleted
        dyn.start_child(ChildSpec("c", Worker))
    assert a.ask({"kind": "ping"})["tag"] == "a"
    with pytest.raises(RuntimeError):
        a.ask({"kind": "crash"})
    assert dyn.child_ref("a").urn != a.urn  # one_for_one restart
    dyn.delete_child("b")
    dyn.start_child(ChildSpec("c", Worker))
    assert dyn.count_children() == {"specs": 2, "active": 2, "supervisors": 0, "workers": 2}
    dyn.stop()


def test_management_calls_restart_terminate_delete():
    sup = Supervisor.start([ChildSpec("w", Worker)])
    with pytest.raises(ChildRunning):
        sup.restart_child("w")
    with pytest.raises(ChildRunning):
        sup.delete_child("w")
    sup.terminate_child("w")
    assert sup.which_children()[0]["alive"] is False
    ref = sup.restart_child("w")
    assert ref.ask({"kind": "ping"})["count"] == 1
    sup.terminate_child("w")
    sup.delete_child("w")
    assert sup.which_children() == []
    sup.stop()


@pytest.mark.parametrize("call", ["child_ref", "terminate_child", "restart_child", "delete_child"])
def test_unknown_child_id_is_a_clear_keyerror_and_supervisor_keeps_running(call):
    sup = Supervisor.start([ChildSpec("w", Worker)])
    with pytest.raises(ChildNotFound, match=r"no child 'ghost'.*children: w") as err:
        getattr(sup, call)("ghost")
    assert isinstance(err.value, KeyError)
    assert sup.is_alive() and sup.child_ref("w").is_alive()
    sup.stop()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"restart": "sometimes"}, "unknown restart type 'sometimes'"),
        ({"shutdown": -1}, "shutdown must be >= 0"),
        ({"shutdown": "later"}, "shutdown must be seconds"),
        ({"restart": "permanent", "significant": True}, "significant"),
    ],
)
def test_bad_child_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChildSpec("x", Worker, **kwargs)


def test_bad_supervisor_arguments_start_nothing():
    journal = []
    with pytest.raises(ValueError, match="duplicate child id 'a'"):
        Supervisor.start(
            [ChildSpec("a", Worker, kwargs={"journal": journal}), ChildSpec("a", Worker, kwargs={"journal": journal})]
        )
    assert journal == []
    with pytest.raises(ValueError, match="unknown strategy"):
        Supervisor.start([], strategy="one_for_some")


def test_failed_start_stops_the_already_started_children():
    journal = []
    refuse = threading.Event()
    refuse.set()
    with pytest.raises(RuntimeError, match="start refused"):
        Supervisor.start(
            [
                ChildSpec("a", Worker, kwargs={"journal": journal, "tag": "a"}),
                ChildSpec("b", Worker, kwargs={"fail_start": refuse}),
            ]
        )
    assert journal == [("start", "a"), ("stop", "a", SHUTDOWN)]


def test_messages_queued_for_a_crashed_named_child_reach_its_replacement():
    reg = Registry()
    gate = threading.Event()
    sup = Supervisor.start([ChildSpec("w", Worker, kwargs={"gate": gate}, name="w")], registry=reg)
    old = reg.whereis("w")
    reg.send("w", {"kind": "block"})
    reg.send("w", {"kind": "crash"})
    for v in range(3):
        reg.send("w", {"kind": "note", "v": v})  # queued behind the crash
    gate.set()
    new = reg.await_name("w", timeout=5, not_urn=old.urn)
    reg.send("w", {"kind": "note", "v": 3})
    assert new.ask({"kind": "notes"}) == [0, 1, 2, 3]
    sup.stop()


def test_topic_subscription_by_name_survives_restart():
    from actors import Topics

    reg, topics = Registry(), Topics()
    sup = Supervisor.start([ChildSpec("w", Worker, name="w")], registry=reg, backoff=(0.05, 0.1, 0.0))
    topics.subscribe_name("events", "w", reg)
    old = reg.whereis("w")
    with pytest.raises(RuntimeError):
        old.ask({"kind": "crash"})
    topics.publish("events", {"kind": "note", "v": "during restart"})
    new = reg.await_name("w", timeout=5, not_urn=old.urn)
    topics.publish("events", {"kind": "note", "v": "after"})
    assert new.ask({"kind": "notes"}) == ["during restart", "after"]
    sup.stop()
