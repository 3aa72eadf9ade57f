"""The telemetry-overhead benchmark measures what it says: every TabuCol iteration counted,
and the same work in both arms (no timing is asserted here; see bench/overhead.py)."""

from __future__ import annotations

from typing import Any

import experiments.coloring.phase as phase_module  # where the phases' chunked TabuCol calls the kernel
from bench.overhead import run_bare, run_tree


def test_the_tally_counts_every_tabucol_iteration_across_k_reductions(monkeypatch):
    real = phase_module.tabucol
    done: list[int] = []
    ks: set[int] = set()

    def counting(*args: Any) -> Any:
        out = real(*args)
        done.append(int(out[0]))  # iterations this call did
        ks.add(int(args[2]))  # the k it worked at
        return out

    monkeypatch.setattr(phase_module, "tabucol", counting)
    tally = run_bare("DSJC125.5", 1, 150_000)
    assert tally.iters == sum(done) >= 150_000
    assert tally.steps == len(done)
    assert len(ks) > 1  # k went down on the way: the state's counter was reset and banked
    assert tally.t_first is not None and tally.rate() > 0


def test_both_arms_do_the_same_work(tmp_path):
    bare = run_bare("DSJC125.5", 3, 60_000)
    tree, summary = run_tree("DSJC125.5", 3, 60_000, str(tmp_path))
    assert (tree.iters, tree.end, tree.steps) == (bare.iters, bare.end, bare.steps)
    assert summary["reason"] == "completed" and summary["events_emitted"] > tree.steps
