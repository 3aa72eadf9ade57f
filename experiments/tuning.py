"""Across runs: surrogate tuning of starting parameters (Optuna) and the hypertune A/B.

``tune`` learns from prior runs' telemetry which starting parameters give better outcomes
and proposes the next configuration: Optuna's ask/tell with the TPE sampler over a declared
search space; prior run directories (``--seed-from``) enter the study as completed trials
read from their ``spec.json`` and ``summary.json``. ``ab`` runs N seeds with hypertune on
and N with it off on the same budget and compares the arms with the stats module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.log import get_logger
from actors.recorder import summary_best
from experiments.lab import Lab
from experiments.spec import load_spec
from experiments.workloads import registry as workload_registry
from telemetry import stats
from telemetry.jsonl import iter_run

log = get_logger("experiments.tuning")

# workload -> dotted parameter (under workload.params) -> (low, high, kind) ; kind: float | int | logint
SEARCH_SPACES: dict[str, dict[str, tuple[float, float, str]]] = {
    "coloring": {
        "tabu.tenure_alpha": (0.2, 3.0, "float"),
        "tabu.tenure_a": (2, 30, "int"),
        "tabu.iters_per_step": (2_000, 100_000, "logint"),
        "memetic.population": (4, 20, "int"),
        "memetic.local_iters": (2_000, 100_000, "logint"),
        "memetic.mutation_rate": (0.0, 0.3, "float"),
    },
    "latency": {"calls_per_step": (1, 200, "logint")},
}


def distributions(space: dict[str, tuple[float, float, str]]) -> dict[str, Any]:
    import optuna

    out: dict[str, Any] = {}
    for name, (lo, hi, kind) in space.items():
        if kind == "float":
            out[name] = optuna.distributions.FloatDistribution(lo, hi)
        else:
            out[name] = optuna.distributions.IntDistribution(int(lo), int(hi), log=kind == "logint")
    return out


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def run_objective(run_dir: Path, field: str) -> float | None:
    """The best (lowest) value of ``field`` over the run's phases, from its summary."""
    p = run_dir / "summary.json"
    if not p.exists():
        return None
    return summary_best(orjson.loads(p.read_bytes()), field)


def seconds_to_best(run_dir: Path) -> float | None:
    cp = run_dir / "checkpoint.json"
    if not cp.exists():
        return None
    return (orjson.loads(cp.read_bytes()).get("workload") or {}).get("seconds_to_best")


def tune(spec: str | Path | dict[str, Any], trials: int, artifacts: str | Path, *,
         seed_from: list[str | Path] = (), budget: float | None = None, objective: str = "chromatic_number",
         seed: int = 0, overrides: list[str] | None = None,
         on_trial: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``trials`` experiments proposed by TPE (after learning from ``seed_from``); return the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_spec(spec, overrides, workload_registry())
    wl = base["workload"]["name"]
    if wl not in SEARCH_SPACES:
        raise ValueError(f"no search space declared for workload {wl!r}; known: {', '.join(SEARCH_SPACES)}")
    space = SEARCH_SPACES[wl]
    dists = distributions(space)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    seeded = 0
    for rd in seed_from:
        rd = Path(rd)
        spec_file = rd / "spec.json"
        value = run_objective(rd, objective)
        if not spec_file.exists() or value is None:
            log.warning("skipping a prior run without spec or summary", run_dir=str(rd))
            continue
        prior = orjson.loads(spec_file.read_bytes())
        if prior["workload"]["name"] != wl:
            log.warning("skipping a prior run of another workload", run_dir=str(rd))
            continue
        params = {name: _get(prior["workload"]["params"], name) for name in space}
        if any(v is None for v in params.values()) or not all(
                space[k][0] <= v <= space[k][1] for k, v in params.items()):
            log.warning("skipping a prior run outside the search space", run_dir=str(rd))
            continue
        params = {k: (int(v) if space[k][2] != "float" else float(v)) for k, v in params.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value)))
        seeded += 1
    results = []
    lab = Lab(artifacts)
    try:
        for i in range(trials):
            trial = study.ask(dists)
            sets = [f"workload.params.{k}={v}" for k, v in trial.params.items()]
            if budget is not None:
                sets.append(f"time_budget_s={budget}")
            sets.append(f"seed={seed + i}")
            exp = lab.start_experiment(spec, overrides=list(overrides or []) + sets)
            exp.wait()
            value = run_objective(exp.run_dir, objective)
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            ttb = seconds_to_best(exp.run_dir) or 0.0
            study.tell(trial, float(value))
            row = {"trial": i, "params": trial.params, objective: value, "seconds_to_best": ttb,
                   "run_dir": str(exp.run_dir)}
            results.append(row)
            if on_trial:
                on_trial(row)
    finally:
        lab.shutdown()
    return {"objective": objective, "seeded_from_prior_runs": seeded, "trials": results,
            "best_value": study.best_value if len(study.trials) else None,
            "proposal": study.best_params if len(study.trials) else None,
            "search_space": {k: list(v) for k, v in space.items()}}


def run_trace(run_dir: Path) -> tuple[float, list[tuple[float, float]]]:
    """(final best, [(seconds from start, best) at each new best]) from a run's events."""
    t0 = None
    trace: list[tuple[float, float]] = []
    best = math.inf
    for ev in iter_run(run_dir):
        if t0 is None:
            t0 = ev["ts"]
        v = (ev.get("values") or {}).get("chromatic_number")
        if ev["name"] in ("init", "new_best") and isinstance(v, (int, float)) and v < best:
            best = v
            trace.append(((ev["ts"] - t0) / 1e6, v))
    return best, trace


def ab(spec: str | Path | dict[str, Any], runs: int, artifacts: str | Path, *, budget: float | None = None,
       target: float | None = None, overrides: list[str] | None = None,
       on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """N seeds with hypertune on, N with it off (interleaved), same budget; compare the arms."""
    if runs < 2:
        raise ValueError("the A/B needs --runs >= 2 per arm")
    base = load_spec(spec, overrides, workload_registry())
    budget = float(budget if budget is not None else base["time_budget_s"])
    rows: list[dict[str, Any]] = []
    lab = Lab(artifacts)
    try:
        for seed in range(runs):
            for arm, enabled in (("on", True), ("off", False)):
                sets = [*(overrides or []), f"seed={seed}", f"hypertune.enabled={str(enabled).lower()}",
                        f"time_budget_s={budget}"]
                exp = lab.start_experiment(spec, overrides=sets, experiment_id=f"ab-{arm}-{seed}")
                exp.wait()
                final, trace = run_trace(exp.run_dir)
                row = {"arm": arm, "seed": seed, "final": final, "trace": trace, "run_dir": str(exp.run_dir)}
                rows.append(row)
                if on_run:
                    on_run(row)
    finally:
        lab.shutdown()
    return ab_report(rows, budget, target)


def ab_report(rows: list[dict[str, Any]], budget: float, target: float | None = None) -> dict[str, Any]:
    """Per-arm final colours and time-to-target, with Mann-Whitney p-values, effect sizes and CIs."""
    finals = [r["final"] for r in rows]
    tgt = float(target if target is not None else min(finals))

    def ttt(r: dict[str, Any]) -> float:
        return next((t for t, v in r["trace"] if v <= tgt), budget)  # censored at the budget

    arms: dict[str, dict[str, Any]] = {}
    for arm in ("on", "off"):
        rs = [r for r in rows if r["arm"] == arm]
        f = [r["final"] for r in rs]
        t = [ttt(r) for r in rs]
        arms[arm] = {"runs": len(rs), "final": f, "final_mean": float(np.mean(f)), "final_median": float(np.median(f)),
                     "time_to_target": t, "reached_target": sum(1 for r in rs if r["final"] <= tgt),
                     "ttt_median": float(np.median(t))}

    def compare(key: str) -> dict[str, Any]:
        a, b = np.array(arms["off"][key], dtype=float), np.array(arms["on"][key], dtype=float)
        if np.all(a == a[0]) and np.all(b == a[0]):
            return {"p_value": 1.0, "effect_size": 0.0, "ci": [0.0, 0.0], "note": "identical in every run"}
        mw = stats.mann_whitney(a, b)
        out = {"p_value": mw["p_value"], "rank_biserial": mw["rank_biserial"], "effect_size": stats.hedges_g(a, b),
               "mean_difference_on_minus_off": float(b.mean() - a.mean())}
        try:
            out["ci"] = list(stats.diff_interval(a, b))
        except (ValueError, ZeroDivisionError):
            out["ci"] = None
        return out

    return {"target": tgt, "budget_s": budget, "arms": arms, "final_colors": compare("final"),
            "time_to_target": compare("time_to_target"), "runs": rows}
