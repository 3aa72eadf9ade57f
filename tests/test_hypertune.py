import inspect

import numpy as np
import pykka
import pytest
from scipy import stats as st

from actors import Actor, Registry
from actors.hypertune import Hypertune, Policy
from actors.messages import decode, encode
from experiments.coloring.catalog import instance_family
from experiments.coloring.workload import ColoringWorkload
from experiments.tuning import SEARCH_SPACES, ab, ab_report, tune
from experiments.workloads import declarations
from supervisor import Lab
from telemetry.jsonl import iter_run
from telemetry.schema import rows_to_batch
from tests.fault_helpers import until

S = 1_000_000
COLORING = declarations(ColoringWorkload)  # the objective, arms and takeover hypertune steers by


class FakePhase(Actor):
    """Stands for the phase: records the control messages hypertune sends and, as the phase
    does in its events, answers an action (``answers``): applied, at the time hypertune last
    saw (an event time in the past counts as the latest it saw)."""

    def __init__(self, answers=True):
        super().__init__()
        self.got = []
        self.answers = answers

    def handle_set_param(self, msg):
        self.got.append(msg)
        if self.answers and msg.get("event") == "hypertune_action":
            data = encode(answer(msg, 0))
            for ht in pykka.ActorRegistry.get_by_class(Hypertune):  # only the one that waits takes it
                ht.tell(data)

    def handle_note(self, msg):
        self.got.append(msg)

    def handle_got(self, msg):
        return [m for m in self.got if m.get("key") != "external_tenure"]

    def handle_all(self, msg):
        return self.got


def steps(t0_s, n, dt_s, conflicts, k=27, best=28, phase="tabu", params=None):
    rows = [
        {
            "seq": i,
            "ts": int((t0_s + i * dt_s) * S),
            "name": "step",
            "phase": phase,
            "parameters": params or {"phase": phase, "tenure_alpha": 0.6, "iters_per_step": 20000},
            "values": {"chromatic_number": float(best), "k": float(k), "conflicts": float(c)},
        }
        for i, c in enumerate(conflicts(n))
    ]
    return decode(encode(rows_to_batch(rows, "exp", "run")))


def answer(sent, t_s, applied=True, phase="tabu", params=None, reason="out of range"):
    """The event the phase emits for hypertune's ``sent`` set_param: ``hypertune_action`` when it
    applied it, ``control_refused`` (with the controller's reason) when the workload refused it."""
    row = {
        "seq": 0,
        "ts": int(t_s * S),
        "name": "hypertune_action" if applied else "control_refused",
        "phase": phase,
        "parameters": params or {"phase": phase, "tenure_alpha": 0.6, "iters_per_step": 20000},
        "notes": (
            f"{sent['key']}: 0.6 -> {sent['value']!r} ({sent['why']})"
            if applied
            else f"{sent['key']}={sent['value']!r} refused: {reason} ({sent['why']})"
        ),
    }
    return decode(encode(rows_to_batch([row], "exp", "run")))


def test_a_stall_produces_an_action_within_the_window():
    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    ht = Hypertune.start("exp", True, reg, window_s=1.0, **COLORING)
    # 0.9 s of event time without progress: no action yet
    ht.tell_bytes(encode(steps(0, 10, 0.1, lambda n: [5] * n)))
    ht.ask({"kind": "get"})
    assert phase.ask({"kind": "got"}) == []
    # the window is now exceeded: one action, on the tabu phase's arms
    ht.tell_bytes(encode(steps(1.0, 3, 0.1, lambda n: [5] * n)))
    ht.ask({"kind": "get"})
    got = phase.ask({"kind": "got"})
    assert len(got) == 1 and got[0]["kind"] == "set_param" and got[0]["event"] == "hypertune_action"
    assert got[0]["key"] in ("set_tenure", "set_batch")
    assert "no progress for 1.0s in tabu" in got[0]["why"]
    # the phase applies it; the outcome is measured over the next window and recorded
    ht.tell_bytes(encode(steps(2.3, 12, 0.1, lambda n: [3] * n)))
    state = ht.ask({"kind": "get"})
    notes = [m for m in phase.ask({"kind": "got"}) if m["kind"] == "note"]
    assert notes and notes[0]["name"] == "hypertune_outcome" and notes[0]["values"]["reward"] > 0
    assert sum(v["n"] for v in state["stats"].values()) == 1
    for r in (ht, phase):
        r.stop()


def test_progress_means_no_action_and_disabled_only_observes(tmp_path):
    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    busy = Hypertune.start("exp", True, reg, window_s=0.5, **COLORING)
    busy.tell_bytes(encode(steps(0, 30, 0.1, lambda n: list(range(100, 100 - n, -1)))))  # steady progress
    idle = Hypertune.start("exp", False, reg, window_s=0.5, state_file=tmp_path / "ht.json", **COLORING)
    idle.tell_bytes(encode(steps(0, 30, 0.1, lambda n: [7] * n)))  # stalled, but disabled
    assert busy.ask({"kind": "get"})["actions"] == [] and idle.ask({"kind": "get"})["actions"] == []
    assert phase.ask({"kind": "got"}) == []
    sent = phase.ask({"kind": "all"})  # only the enabled one announced that it steers the tenure
    assert [m["key"] for m in sent] == ["external_tenure"]
    for r in (busy, idle, phase):
        r.stop()
    assert list(tmp_path.iterdir()) == []  # disabled, it learned nothing and wrote nothing (no state, no lock)


def test_malformed_batches_are_counted_and_never_reach_the_policy():
    """Every way a batch can decode and still be wrong (the consumers' shared list) is counted in
    ``bad_batches``; hypertune stays alive and still acts on the good batches that follow."""
    from tests.test_pipeline_faults import MUTATIONS

    reg = Registry()
    phase = FakePhase.start()
    reg.register("phase", phase)
    ht = Hypertune.start("exp", True, reg, window_s=1.0, **COLORING)
    try:
        for _, mutate in MUTATIONS:
            ht.tell_bytes(encode(mutate(steps(0, 10, 0.1, lambda n: [5] * n))))
        ht.tell({"kind": "anomalies", "items": 5})  # not a list of items: ignored, not a crash
        state = ht.ask({"kind": "get"})
        assert state["bad_batches"] == len(MUTATIONS)
        assert state["phase"] is None and state["anomalies_seen"] == 0  # nothing of them was taken in
        ht.tell_bytes(encode(steps(0, 10, 0.1, lambda n: [5] * n)))
        ht.tell_bytes(encode(steps(1.0, 3, 0.1, lambda n: [5] * n)))
        state = ht.ask({"kind": "get"})
        assert state["bad_batches"] == len(MUTATIONS) and len(state["actions"]) == 1
        assert [m["event"] for m in phase.ask({"kind": "got"})] == ["hypertune_action"]
    finally:
        for r in (ht, phase):
            r.stop()


@pytest.mark.parametrize("kind", ["ucb", "epsilon_greedy"])
def test_policy_learns_the_better_arm(kind):
    rng = np.random.default_rng(0)
    means = {"a": 0.2, "b": 0.5, "c": 0.8}
    pol = Policy(kind, seed=1)
    pulls = {a: 0 for a in means}
    for _ in range(3000):
        arm = pol.choose("tabu", list(means))
        pulls[arm] += 1
        pol.update("tabu", arm, float(rng.random() < means[arm]))
    assert max(pulls, key=pulls.get) == "c"
    assert pulls["c"] > 0.7 * sum(pulls.values())
    assert abs(pol.stats["tabu/c"]["mean"] - 0.8) < 0.05


def test_policy_state_round_trips_and_a_corrupt_file_is_ignored(tmp_path):
    pol = Policy("ucb")
    pol.update("tabu", "tenure_up", 2.0)
    path = tmp_path / "p.json"
    path.write_bytes(pol.to_json())
    again = Policy("ucb")
    assert again.load(path) and again.stats == {"tabu/tenure_up": {"n": 1.0, "mean": 2.0}}
    path.write_text("{not json")
    assert not Policy("ucb").load(path)
    path.write_text('{"stats": {"x": {"n": "many"}}}')
    assert not Policy("ucb").load(path)
    with pytest.raises(ValueError, match="policy"):
        Policy("thompson")
    assert instance_family("DSJC250.5") == "DSJC" and instance_family("le450_15c") == "le"


SPEC = {
    "name": "ht",
    "seed": 3,
    "time_budget_s": 3.0,
    "hypertune": {"enabled": True, "window_s": 0.3},
    "workload": {
        "name": "coloring",
        "params": {
            "graph": {"generator": "gnp", "n": 100, "p": 0.5, "seed": 5},
            "phases": ["tabu"],
            "tabu": {"iters_per_step": 3000, "max_iters_per_k": 10**9, "stall_iters": 10**12},
        },
    },
}


def test_actions_apply_at_safe_points_and_show_in_telemetry(tmp_path):
    state_file = tmp_path / "policy.json"
    lab = Lab(tmp_path / "art")
    # the run ends once hypertune has acted and judged an action, not by a budget a slow machine
    # could spend before the colouring stalls
    spec = {**SPEC, "time_budget_s": 600, "hypertune": {**SPEC["hypertune"], "state_file": str(state_file)}}
    exp = lab.start_experiment(spec)
    until(lambda: any(e["name"] == "hypertune_outcome" for e in iter_run(exp.run_dir)), 120, "a hypertune outcome")
    exp.stop()
    lab.shutdown()
    events = list(iter_run(exp.run_dir))
    actions = [e for e in events if e["name"] == "hypertune_action"]
    assert actions, "the colouring stalls below its chromatic number: hypertune must act"
    first = actions[0]
    assert "hypertune: no progress for" in first["notes"] and " -> " in first["notes"]
    key = first["notes"].split(":")[0]
    if key == "set_tenure":  # the new value shows in the next steps' parameters
        after = float(first["notes"].split(" -> ")[1].split(" ")[0])
        nxt = next(e for e in events if e["name"] == "step" and e["ts"] > first["ts"])
        assert nxt["parameters"]["tenure_alpha"] == pytest.approx(after)
    assert any(e["name"] == "hypertune_outcome" for e in events)
    assert state_file.exists() and Policy("ucb").load(state_file)


def test_a_hypertune_crash_restarts_it_without_stopping_the_phase(tmp_path):
    lab = Lab(tmp_path / "art")
    exp = lab.start_experiment({**SPEC, "time_budget_s": 600})
    exp.pause()  # everything parked: a deterministic moment
    phase = exp.registry.whereis("phase")
    ht = exp.registry.whereis("hypertune")
    exp.registry.send("hypertune", {"kind": "crash"})
    assert exp.registry.await_name("hypertune", timeout=30, not_urn=ht.urn) is not None
    assert exp.registry.whereis("phase") == phase and phase.is_alive()
    exp.resume()
    exp.stop()
    lab.shutdown()
    assert exp.summary()["restarts"] == {"hypertune": 1}


def test_corrupt_policy_state_never_blocks_a_run(tmp_path):
    bad = tmp_path / "policy.json"
    bad.write_text("garbage")
    lab = Lab(tmp_path / "art")
    exp = lab.start_experiment(
        {**SPEC, "time_budget_s": 0.5, "hypertune": {"enabled": True, "window_s": 0.3, "state_file": str(bad)}}
    )
    assert exp.wait(30) and exp.reason == "budget"
    lab.shutdown()
    assert bad.read_text() == "garbage"  # a file it could not read is not its to replace


def test_a_state_file_that_is_another_file_is_never_overwritten(tmp_path):
    """``state_file`` pointed at a spec, another run's events or a folder: the policy learns in
    memory, and the file is left byte for byte (the save is refused, as a full disk is)."""
    pol = Policy("ucb")
    pol.update("tabu", "tenure_up", 1.0)
    victim = tmp_path / "events.jsonl"
    victim.write_bytes(b'{"seq": 0}\n{"seq": 1}\n')
    folder = tmp_path / "dir"
    folder.mkdir()
    for target in (victim, folder):
        with pytest.raises(FileExistsError, match="not a hypertune state file"):
            pol.save(target)
    assert victim.read_bytes() == b'{"seq": 0}\n{"seq": 1}\n' and folder.is_dir()
    assert pol.stats == {"tabu/tenure_up": {"n": 1.0, "mean": 1.0}}
    fresh = tmp_path / "new.json"
    pol.save(fresh)  # a missing file is created
    assert Policy("ucb").load(fresh)


def test_surrogate_proposes_only_values_within_bounds(tmp_path):
    spec = {
        "name": "tune",
        "time_budget_s": 0.2,
        "workload": {"name": "latency", "params": {"target": "math:sqrt", "args": [2.0]}},
    }
    first = tune(spec, 2, tmp_path / "art", objective="latency_ms", seed=1)
    prior = [r["run_dir"] for r in first["trials"]]
    res = tune(spec, 3, tmp_path / "art", objective="latency_ms", seed=2, seed_from=prior)
    lo, hi, _ = SEARCH_SPACES["latency"]["calls_per_step"]
    assert res["seeded_from_prior_runs"] == 2 and len(res["trials"]) == 3
    for row in first["trials"] + res["trials"]:
        assert lo <= row["params"]["calls_per_step"] <= hi
    assert lo <= res["proposal"]["calls_per_step"] <= hi


def test_ab_report_statistics_match_scipy():
    on = [28, 28, 29, 28, 28, 28]
    off = [29, 29, 29, 28, 30, 29]
    rows = [{"arm": "on", "final": f, "trace": [(0.0, 40.0), (1.0 + i, float(f))]} for i, f in enumerate(on)]
    rows += [{"arm": "off", "final": f, "trace": [(0.0, 40.0), (2.0 + i, float(f))]} for i, f in enumerate(off)]
    rep = ab_report(rows, budget=20.0)
    assert rep["target"] == 28
    assert rep["final_best"]["p_value"] == pytest.approx(st.mannwhitneyu(off, on, alternative="two-sided").pvalue)
    on_ttt = rep["arms"]["on"]["time_to_target"]
    off_ttt = rep["arms"]["off"]["time_to_target"]
    assert on_ttt == [1.0, 2.0, 20.0, 4.0, 5.0, 6.0]  # seed 2 never reached 28: censored at the budget
    assert off_ttt == [20.0, 20.0, 20.0, 5.0, 20.0, 20.0]
    assert rep["time_to_target"]["p_value"] == pytest.approx(st.mannwhitneyu(off_ttt, on_ttt).pvalue)
    a, b = np.array(off_ttt), np.array(on_ttt)
    sp = np.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    assert rep["time_to_target"]["effect_size"] == pytest.approx((b.mean() - a.mean()) / sp * (1 - 3 / (4 * 12 - 9)))
    lo, hi = rep["final_best"]["ci"]
    assert lo < np.mean(on) - np.mean(off) < hi


# --- the shared state file: experiments of one family save concurrently -------------------------------


def _pulls(seed, k, arms=("tenure_up", "tenure_down", "batch_up")):
    rng = np.random.default_rng(seed)
    return [(arms[int(rng.integers(len(arms)))], float(rng.normal(seed, 1.0))) for _ in range(k)]


def _expected(all_pulls):
    out = {}
    for arm, r in all_pulls:
        out.setdefault(f"tabu/{arm}", []).append(r)
    return {key: (len(rs), float(np.mean(rs))) for key, rs in out.items()}


def _assert_stats(stats, all_pulls):
    want = _expected(all_pulls)
    assert set(stats) == set(want)
    for key, (n, mean) in want.items():
        assert stats[key]["n"] == n and stats[key]["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-9)


def test_a_save_merges_the_pulls_of_others_instead_of_overwriting(tmp_path):
    path = tmp_path / "coloring-DSJC.json"
    a, b = Policy("ucb"), Policy("ucb")
    assert not a.load(path) and not b.load(path)  # two runs of one family start together
    pa, pb = _pulls(1, 7), _pulls(2, 5)
    for arm, r in pa:
        a.update("tabu", arm, r)
    a.save(path)
    for arm, r in pb:
        b.update("tabu", arm, r)
    b.save(path)  # before the fix, b's save replaced a's learning
    _assert_stats(Policy.read_state(path), pa + pb)
    _assert_stats(b.stats, pa + pb)  # b continues from everything learned
    more = _pulls(3, 4)
    for arm, r in more:
        a.update("tabu", arm, r)
    a.save(path)  # a adds only its new pulls: nothing counted twice
    _assert_stats(Policy.read_state(path), pa + pb + more)


def test_concurrent_saves_from_threads_lose_nothing(tmp_path):
    import threading

    path = tmp_path / "state.json"
    n_threads, k = 6, 20
    start = threading.Barrier(n_threads)
    errors = []

    def run(seed):
        try:
            pol = Policy("ucb", seed=seed)
            pol.load(path)
            start.wait()
            for arm, r in _pulls(seed, k):
                pol.update("tabu", arm, r)
                pol.save(path)  # as hypertune does after every outcome
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _assert_stats(Policy.read_state(path), [p for s in range(n_threads) for p in _pulls(s, k)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.lock"]  # no stray temp files


WRITER = (
    """
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[4])
from actors.hypertune import Policy
"""
    + inspect.getsource(_pulls)
    + """
path, seed, k = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pol = Policy("ucb", seed=seed)
pol.load(path)
print("ready", flush=True)
sys.stdin.readline()  # every writer starts at once
for arm, r in _pulls(seed, k):
    pol.update("tabu", arm, r)
    pol.save(path)
"""
)


def test_concurrent_saves_from_processes_lose_nothing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    path = tmp_path / "state.json"
    n_procs, k = 4, 25
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(s), str(k), root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in range(n_procs)
    ]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * n_procs
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n_procs, errs
    _assert_stats(Policy.read_state(path), [p for s in range(n_procs) for p in _pulls(s, k)])


def test_an_unreadable_state_is_ignored_and_an_unwritable_one_never_stops_the_actor(tmp_path):
    path = tmp_path / "p.json"
    for text in (
        '{"stats": {"tabu/x": {"n": 1, "mean": NaN}}}',
        '{"stats": {"tabu/x": {"n": -1, "mean": 0}}}',
        '{"stats": {"tabu/x": {"n": true, "mean": 0}}}',
        "[1, 2]",
        '{"stats": []}',
    ):
        path.write_text(text)
        assert Policy.read_state(path) is None and not Policy("ucb").load(path)
    pol = Policy("ucb")
    pol.update("tabu", "tenure_up", 1.0)
    with pytest.raises(FileExistsError):  # a corrupt file is left for its owner to look at or delete
        pol.save(path)
    assert path.read_text() == '{"stats": []}'
    path.unlink()
    pol.save(path)
    assert Policy.read_state(path) == {"tabu/tenure_up": {"n": 1.0, "mean": 1.0}}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    ht = Hypertune.start("exp", True, state_file=str(blocker / "state.json"))
    try:
        ht.ask({"kind": "get"})
    finally:
        ht.stop()  # terminate() saves: a warning, not a crash


def test_prior_runs_with_unreadable_records_are_skipped(tmp_path):
    from experiments.tuning import _prior_params, run_objective, seconds_to_best

    space = SEARCH_SPACES["latency"]
    rd = tmp_path / "run"
    rd.mkdir()
    for text in ("{not json", "[1, 2]", '{"phases": 3}', '{"phases": {"a": {"best": {"latency_ms": "x"}}}}'):
        (rd / "summary.json").write_text(text)
        assert run_objective(rd, "latency_ms") is None
    (rd / "summary.json").write_bytes(b"\xff")
    assert run_objective(rd, "latency_ms") is None
    for text in ("{", '{"workload": 3}', '{"workload": {"seconds_to_best": "soon"}}', "[]"):
        (rd / "checkpoint.json").write_text(text)
        assert seconds_to_best(rd) is None
    ok = {"workload": {"name": "latency", "params": {"calls_per_step": 20}}}
    assert _prior_params(ok, "latency", space) == {"calls_per_step": 20}
    for bad in (
        None,
        {},
        {"workload": []},
        {"workload": {"name": "coloring", "params": {}}},
        {"workload": {"name": "latency", "params": {"calls_per_step": "20"}}},
        {"workload": {"name": "latency", "params": {"calls_per_step": float("nan")}}},
        {"workload": {"name": "latency", "params": {"calls_per_step": 10**6}}},
        {"workload": {"name": "latency", "params": []}},
    ):
        assert _prior_params(bad, "latency", space) is None


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda art: tune("experiments/latency.toml", 0, art), "trials must be >= 1"),
        (lambda art: tune("experiments/latency.toml", 2, art, budget=float("nan")), "budget must be a finite number"),
        (lambda art: tune("experiments/latency.toml", 2, art, seed=-1), "seed must be >= 0"),
        (lambda art: ab("experiments/latency.toml", 1, art), "runs per arm"),
        (lambda art: ab("experiments/latency.toml", 2, art, budget=-1.0), "budget must be >= 0.001"),
        (lambda art: ab("experiments/latency.toml", 2, art, target=float("inf")), "target must be a finite number"),
    ],
)
def test_tune_and_ab_refuse_bad_numbers_before_running_anything(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path / "art")
    assert not (tmp_path / "art").exists()
