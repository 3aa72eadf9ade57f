"""Across runs: surrogate tuning of starting parameters (Optuna) and the hypertune A/B.

``tune`` learns from prior runs' telemetry which starting parameters give better outcomes
and proposes the next configuration: Optuna's ask/tell with the TPE sampler over a declared
search space; prior run directories (``--seed-from``) enter the study as completed trials
read from their ``spec.json`` and ``summary.json``. ``ab`` runs N seeds with hypertune on
and N with it off on the same budget and compares the arms with the stats module. Both judge
a run by its workload's declared objective (``experiments.workloads.base.Objective``: the
field and whether lower or higher is better), unless ``tune`` is given another field.

Both run their experiments one after another in one Lab, or with ``parallel=N`` N at a time
in worker processes or on Ray (:mod:`experiments.parallel`): ``ab`` runs the same runs and
reports them in the same order; ``tune`` asks TPE for N proposals at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from actors.log import get_logger
from experiments.lab import MIN_FREE_BYTES
from experiments.parallel import Job, JobResult, JobRunner, check_parallel, run_jobs
from experiments.spec import load_spec
from experiments.validate import SECONDS, SEED, Num
from experiments.workloads import Objective, objective_of
from experiments.workloads import registry as workload_registry
from telemetry import stats
from telemetry.jsonl import RunFileError, iter_run
from telemetry.rundir import (
    CHECKPOINT,
    LIFECYCLE,
    SPEC,
    SUMMARY,
    RunStatus,
    folder_of_runs,
    read_json,
    read_record,
    summary_best,
    summary_fields,
)

log = get_logger("experiments.tuning")


# workload -> dotted parameter (under workload.params) -> (low, high, kind) ; kind: float | int | logint
def search_spaces() -> dict[str, dict[str, tuple[float, float, str]]]:
    """Each workload's declared search space (``Workload.search_space``): every dimension it may
    search, plug-ins and registered workloads included; :func:`search_space` gives those a given
    spec uses."""
    return {name: dict(cls.search_space) for name, cls in workload_registry().items() if cls.search_space}


SEARCH_SPACES: dict[str, dict[str, tuple[float, float, str]]] = search_spaces()
""":func:`search_spaces` as this module was imported (a workload registered later is in the
function's answer, not here)."""


def search_space(wl: str, params: dict[str, Any] | None) -> dict[str, tuple[float, float, str]]:
    """What ``tune`` searches for a spec of workload ``wl`` with these (checked) parameters: the
    declared space, narrowed by the workload to the dimensions the spec uses
    (``Workload.search_space_for``; colouring: those of the phases it runs)."""
    cls = workload_registry()[wl]
    narrow = getattr(cls, "search_space_for", None)  # optional (the workload protocol)
    return dict(narrow(params)) if narrow is not None else dict(cls.search_space)


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


TRIALS = Num(1, 10_000, integer=True)
RUNS = Num(2, 1000, integer=True)


def run_objective(run_dir: Path, field: str, direction: str = "min") -> float | None:
    """The best value of ``field`` over the run's phases, from its summary: the lowest, or
    with ``direction="max"`` the highest."""
    summary = read_record(run_dir, SUMMARY)
    return None if summary is None else summary_best(summary, field, direction)


def _objective(workload: str, field: str | None) -> Objective:
    """The workload's objective, or ``field`` to minimise when one is given that differs."""
    own = objective_of(workload)
    if own is not None and (field is None or field == own.field):
        return own
    if field is None:
        raise ValueError(f"workload {workload!r} declares no objective: name a field to minimise")
    return Objective(field, "min")


def seconds_to_best(run_dir: Path) -> float | None:
    workload = (read_record(run_dir, CHECKPOINT) or {}).get("workload")
    v = workload.get("seconds_to_best") if isinstance(workload, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _params_problem(spec: dict[str, Any] | None, wl: str, space: dict[str, tuple[float, float, str]]) -> str | None:
    """Why a prior run's spec gives no starting parameters inside the search space, or None."""
    workload = (spec or {}).get("workload")
    if not isinstance(workload, dict):
        return "its spec names no workload"
    if workload.get("name") != wl:
        return f"a run of workload {workload.get('name')!r}, not {wl!r}"
    if not isinstance(workload.get("params"), dict):
        return "its spec has no workload.params table"
    if wl in search_spaces():  # its parameters must be the ones the trials search (colouring: the same phases)
        try:
            theirs = search_space(wl, workload["params"])
        except (TypeError, ValueError, AttributeError):
            theirs = None
        if theirs is not None and set(theirs) != set(space):
            differ = sorted(set(theirs) ^ set(space))
            return f"its parameters are not the ones searched (it ran other phases): {', '.join(differ)}"
    for name, (lo, hi, _) in space.items():
        problem = Num(lo, hi).problem(_get(workload["params"], name))
        if problem:
            return f"workload.params.{name} is outside the search space: {problem}"
    return None


def _prior_params(
    spec: dict[str, Any] | None, wl: str, space: dict[str, tuple[float, float, str]]
) -> dict[str, Any] | None:
    """A prior run's starting parameters inside the search space, or None (see :func:`_params_problem`)."""
    if spec is None or _params_problem(spec, wl, space):
        return None
    params = {name: _get(spec["workload"]["params"], name) for name in space}
    return {k: (int(v) if space[k][2] != "float" else float(v)) for k, v in params.items()}


class SeedFromError(ValueError):
    """Prior runs that ``tune`` was told to learn from and cannot: a path that does not exist,
    cannot be read or is no run directory, or runs none of which is usable. Caught before any
    trial runs: a mistyped path must not cost a study that silently learns from nothing."""


def _check_run_dir(path: Path) -> None:
    """Refuse a path that is not a run directory this process can read.

    Raises:
        SeedFromError: naming the path, and the runs under it when it is an artifacts or
            experiment folder.
    """
    if not path.exists():
        raise SeedFromError(f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise SeedFromError(f"{str(path)!r} is a file, not a run directory")
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise SeedFromError(f"{str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    if SPEC in names or SUMMARY in names:
        return
    if (holds := folder_of_runs(path)) is not None:  # an experiment or artifacts folder: its runs named
        raise SeedFromError(str(holds))
    raise SeedFromError(f"{str(path)!r} is not a run directory (it has no {SPEC} or {SUMMARY})")


def _record(run_dir: Path, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """A run's record, or None and why it is missing or damaged.

    Raises:
        SeedFromError: the record exists but this process may not read it.
    """
    path = run_dir / name
    try:
        record = read_json(path)
    except RunFileError as exc:  # a folder in its place, no permission
        raise SeedFromError(str(exc)) from None
    except OSError as exc:
        raise SeedFromError(f"run file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:
        return None, f"its {name} is damaged ({str(exc).removeprefix(f'{path}: ')})"
    return record, None if record is not None else f"it has no {name}"


ENDED_BY_ITSELF = ("budget", "completed")
"""The reasons a run ends that make its best a trial's: its time budget ran out, or its
workload finished. A run stopped (by a person, a signal) or failed part-way has a best of
a shorter search, which would stand in the study for what its parameters reach."""


def _ending_problem(run_dir: Path) -> str | None:
    """Why a prior run did not run to its own end (stopped early, failed, still running), or None."""
    life, why = _record(run_dir, LIFECYCLE)
    if life is None:
        return f"{why}: whether it ran to its end is unknown"
    status, reason = life.get("status"), life.get("reason")
    if status in (RunStatus.STOPPED, RunStatus.ARCHIVED) and reason in ENDED_BY_ITSELF:
        return None
    active = life.get("active_duration")
    after = f" after {active:.3g} s" if isinstance(active, (int, float)) and not isinstance(active, bool) else ""
    return f"it did not run to its end (status {status!r}, reason {reason!r}{after}): its best is of a shorter search"


def _budget_problem(spec: dict[str, Any], budget: float | None) -> str | None:
    """Why a prior run's time budget is not the trials' (its best is of another search length), or None."""
    if budget is None:
        return None
    theirs = spec.get("time_budget_s")
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and math.isclose(theirs, budget, rel_tol=1e-9):
        return None
    return f"it ran with a time budget of {theirs!r} s, the trials with {budget:g} s"


def _prior_trial(
    run_dir: Path, wl: str, space: dict[str, tuple[float, float, str]], obj: Objective, budget: float | None = None
) -> tuple[dict[str, Any] | None, float | None, str | None]:
    """A prior run's (parameters, objective value, None), or (None, None, why it is no use)."""
    spec, why = _record(run_dir, SPEC)
    if spec is None:
        return None, None, why
    why = _params_problem(spec, wl, space) or _budget_problem(spec, budget) or _ending_problem(run_dir)
    if why:
        return None, None, why
    summary, why = _record(run_dir, SUMMARY)
    if summary is None:
        return None, None, why
    value = summary_best(summary, obj.field, obj.direction)
    if value is None:
        return None, None, f"its {SUMMARY} has no {obj.field}"
    return _prior_params(spec, wl, space), value, None


def prior_trials(
    seed_from: Iterable[str | Path],
    wl: str,
    space: dict[str, tuple[float, float, str]],
    obj: Objective,
    budget: float | None = None,
) -> tuple[list[tuple[dict[str, Any], float]], list[tuple[Path, str]]]:
    """The (starting parameters, objective value) of each usable prior run in ``seed_from``,
    and (path, reason) of each run left out as no use: no or a damaged spec or summary,
    another workload, parameters outside the search space, a time budget other than
    ``budget`` (the trials'; None: any), a run that did not end by itself (its budget ran
    out or its workload finished: one stopped or failed part-way, or with no lifecycle
    record, has the best of a shorter search), no value of the objective. When
    every one is left out, that is an error: whoever named them meant the study to learn
    from them, and a study that learns from nothing should not run in their place.

    Raises:
        SeedFromError: a path that does not exist, is not a run directory or cannot be read,
            or no usable run among them.
    """
    paths = [Path(p) for p in seed_from]
    for path in paths:  # every path before any record: a typo is found at once
        _check_run_dir(path)
    found: list[tuple[dict[str, Any], float]] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        params, value, why = _prior_trial(path, wl, space, obj, budget)
        if params is None or value is None:
            skipped.append((path, why or "no use"))
        else:
            found.append((params, value))
    if paths and not found:
        reasons = "; ".join(f"{str(p)!r}: {why}" for p, why in skipped[:3])
        if len(skipped) > 3:
            reasons += f"; and {len(skipped) - 3} more"
        none = "" if len(paths) == 1 else f"none of the {len(paths)} prior runs is usable: "
        raise SeedFromError(f"nothing to learn from: {none}{reasons}")
    return found, skipped


def _trial_row(field: str, direction: str, run_dir: Path) -> dict[str, Any]:
    """A trial's figures from its run directory (run where the trial ran); ``seconds_to_best``
    is None where the workload does not record it. Without a value, ``fields`` lists what the
    run did record (a mistyped objective is told from a run that never reached one)."""
    row = {"value": run_objective(run_dir, field, direction), "seconds_to_best": seconds_to_best(run_dir)}
    if row["value"] is None:
        row["fields"] = sorted(summary_fields(read_record(run_dir, SUMMARY) or {}))
    return row


SEEDS = 2**32


def trial_seed(seed: int, i: int) -> int:
    """Trial ``i``'s seed: ``seed + i``, wrapped into the spec's range 0..2**32-1 (a study
    started near the top of the range still gives every trial a seed of its own)."""
    return (seed + i) % SEEDS


def trial_experiment_id(base: str, i: int) -> str:
    """Trial ``i``'s experiment id: the spec's name, then ``name-2``, ``name-3``... (what one Lab
    names runs of one spec started one after another), fixed before any trial starts; the name
    is cut so that the whole stays an id (128 characters)."""
    suffix = "" if i == 0 else f"-{i + 1}"
    return base[: 128 - len(suffix)] + suffix


def tune(
    spec: str | Path | dict[str, Any],
    trials: int,
    artifacts: str | Path,
    *,
    seed_from: Iterable[str | Path] = (),
    budget: float | None = None,
    objective: str | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    on_skipped: Callable[[Path, str], None] | None = None,
    parallel: int = 1,
    backend: str = "embedded",
    address: str | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> dict[str, Any]:
    """Run ``trials`` experiments proposed by TPE (after learning from ``seed_from``); return the study.

    ``seed_from`` names prior run directories, read before any trial by :func:`prior_trials`:
    one that does not exist or cannot be read, or a list with no usable run, is a
    :class:`SeedFromError`; a run that is no use among usable ones is left out and told to
    ``on_skipped`` (path, reason), by default a warning log.

    ``objective`` is the field a run is judged by: by default the workload's declared objective
    (in its direction); another field is minimised. ``parallel=N`` runs the trials N at a time
    (see :mod:`experiments.parallel`; ``backend`` ``embedded`` or ``ray`` at ``address``): TPE asks
    N proposals, the N run together, then all N are told, in trial order. With N = 1 this is
    the sequential study; with N > 1 each proposal is made from fewer finished trials, and
    TPE's ``constant_liar`` keeps a batch's proposals apart. For a given seed and N the
    proposals depend only on the trials' values. A trial that fails is a row with ``failed``
    (its reason) and is told to the study as failed; ``failed_trials`` counts them.

    Trial ``i`` runs with seed ``(seed + i) mod 2**32``: every trial's seed stays in the spec's
    range, whatever ``seed`` is. A prior run enters the study only if it ran with the trials'
    time budget (``budget``, else the spec's) and to its own end (see :func:`prior_trials`).

    ``min_free_bytes``: the free disk a trial needs to start (see
    :data:`experiments.lab.MIN_FREE_BYTES`); a trial started below it fails, saying so.
    """
    import optuna

    TRIALS.check("trials", trials)
    SEED.check("seed", seed)
    parallel = check_parallel(parallel, backend)
    if budget is not None:
        SECONDS.check("budget", budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_spec(spec, overrides, workload_registry())
    wl = base["workload"]["name"]
    spaces = search_spaces()
    if wl not in spaces:
        raise ValueError(f"no search space declared for workload {wl!r}; known: {', '.join(spaces)}")
    space = search_space(wl, base["workload"].get("params"))
    obj = _objective(wl, objective)
    trial_budget = budget if budget is not None else base.get("time_budget_s")
    priors, skipped = prior_trials(seed_from, wl, space, obj, trial_budget)
    for path, why in skipped:
        if on_skipped is None:
            log.warning("skipping a prior run", run_dir=str(path), reason=why)
        else:
            on_skipped(path, why)
    dists = distributions(space)
    study = optuna.create_study(
        direction="maximize" if obj.direction == "max" else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=parallel > 1),
    )
    for params, value in priors:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value)))
    read_row = functools.partial(_trial_row, obj.field, obj.direction)
    results: list[dict[str, Any]] = []

    def finished(first: int, batch: list[Any], rows: list[dict[str, Any]], res: JobResult) -> None:
        row: dict[str, Any] = {"trial": first + res.index, "params": batch[res.index].params}
        value = res.row.get("value")
        if res.failed or value is None:
            row["failed"] = res.error or f"no {obj.field} from an event that did not fail, in the run's summary"
            if not res.failed:
                row["fields"] = res.row.get("fields")
        else:
            row.update({obj.field: value, "seconds_to_best": res.row["seconds_to_best"]})
        row["run_dir"] = res.run_dir
        rows[res.index] = row
        if on_trial:
            on_trial(row)

    with JobRunner(artifacts, parallel, backend=backend, address=address, min_free_bytes=min_free_bytes) as runner:
        for first in range(0, trials, parallel):
            batch = [study.ask(dists) for _ in range(min(parallel, trials - first))]
            jobs = []
            for k, trial in enumerate(batch):
                sets = [f"workload.params.{name}={v}" for name, v in trial.params.items()]
                if budget is not None:
                    sets.append(f"time_budget_s={budget}")
                sets.append(f"seed={trial_seed(seed, first + k)}")
                exp_id = trial_experiment_id(base["name"], first + k)
                jobs.append(Job(base, tuple(sets), exp_id, read_row))  # read once: a pipe cannot be read again
            rows: list[dict[str, Any]] = [{} for _ in batch]
            runner.run(jobs, functools.partial(finished, first, batch, rows))
            for row in rows:  # a field no run records: every later trial would fail the same way
                fields = row.get("fields")
                if fields and obj.field not in fields:
                    raise ValueError(
                        f"objective {obj.field!r}: trial {row['trial']}'s run records no such field "
                        f"(its run: {row['run_dir']}); its fields: {', '.join(fields)}"
                    )
            for trial, row in zip(batch, rows, strict=True):  # told in trial order, whatever order they ended in
                if "failed" in row:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, float(row[obj.field]))
            results.extend(rows)
    done = any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    return {
        "objective": obj.field,
        "direction": obj.direction,
        "seeded_from_prior_runs": len(priors),
        "skipped_prior_runs": [{"run_dir": str(path), "reason": why} for path, why in skipped],
        "parallel": parallel,
        "trials": results,
        "failed_trials": sum(1 for r in results if "failed" in r),
        "best_value": study.best_value if done else None,
        "proposal": study.best_params if done else None,
        "search_space": {k: list(v) for k, v in space.items()},
    }


def run_trace(run_dir: Path, objective: Objective) -> tuple[float, list[tuple[float, float]]]:
    """(final best, [(seconds from start, best) at each new best]) of the objective's field,
    from a run's events (every event that carries it; a failed call never counts)."""
    t0 = None
    trace: list[tuple[float, float]] = []
    best = math.inf if objective.direction == "min" else -math.inf
    for ev in iter_run(run_dir):
        if t0 is None:
            t0 = ev["ts"]
        v = (ev.get("values") or {}).get(objective.field)
        if not isinstance(v, (int, float)) or ev.get("success") is False:
            continue
        if objective.better(v, best):
            best = v
            trace.append(((ev["ts"] - t0) / 1e6, v))
    return best, trace


class ABFailed(RuntimeError):
    """Too few runs of an arm finished to compare the arms (the failed runs and their reasons named)."""


AB_WARMUP_S = 2.0
"""The warm-up run's budget (or the A/B's, if shorter): the phase's first steps, where a
process loads its compiled kernels, run whatever the budget."""


def _ab_row(objective: Objective, run_dir: Path) -> dict[str, Any]:
    """An A/B run's final value and trace, from its run directory (read where the run ran)."""
    final, trace = run_trace(run_dir, objective)
    return {"final": final, "trace": trace}


def ab(
    spec: str | Path | dict[str, Any],
    runs: int,
    artifacts: str | Path,
    *,
    budget: float | None = None,
    target: float | None = None,
    overrides: list[str] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    parallel: int = 1,
    backend: str = "embedded",
    address: str | None = None,
    warm_up: bool = True,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> dict[str, Any]:
    """N seeds with hypertune on, N with it off (interleaved, each seed's pair in turn the
    other way round), same budget; compare the arms.

    ``warm_up``: each process first runs ``ab-warmup`` (hypertune off, at most
    :data:`AB_WARMUP_S`), left out of the statistics: a process's first run pays for its
    imports and compiled kernels, which handicapped the arm that ran first.

    ``parallel=N`` runs N at a time (see :mod:`experiments.parallel`; ``backend`` ``embedded`` or
    ``ray`` at ``address``): the same runs (seeds, arms, experiment ids), reported in the same
    order; ``on_run`` sees each as it ends. A run that fails is a row with ``failed`` (its
    reason), listed in the report's ``failed`` and left out of the statistics.
    ``min_free_bytes``: the free disk a run needs to start (see
    :data:`experiments.lab.MIN_FREE_BYTES`); a run started below it fails, saying so.

    Raises:
        ABFailed: an arm has fewer than two finished runs.
    """
    RUNS.check("the A/B's runs per arm", runs)
    parallel = check_parallel(parallel, backend)
    if budget is not None:
        SECONDS.check("budget", budget)
    if target is not None:
        Num().check("target", target)
    base = load_spec(spec, overrides, workload_registry())
    obj = _objective(base["workload"]["name"], None)
    budget = float(budget if budget is not None else base["time_budget_s"])
    # counterbalanced: each seed's pair in the other order than the last's (on/off, off/on, ...),
    # so that neither arm always runs first, after a warm-up run that no arm pays for
    arms = [
        (seed, arm, enabled)
        for seed in range(runs)
        for arm, enabled in ((("on", True), ("off", False)) if seed % 2 == 0 else (("off", False), ("on", True)))
    ]
    jobs = [
        Job(
            base,  # read once: a pipe cannot be read again, and a file edited meanwhile is not this A/B's
            (
                f"seed={seed}",
                f"hypertune.enabled={str(enabled).lower()}",
                f"time_budget_s={budget}",
            ),
            f"ab-{arm}-{seed}",
            functools.partial(_ab_row, obj),
        )
        for seed, arm, enabled in arms
    ]
    rows: list[dict[str, Any]] = [{} for _ in jobs]

    def finished(res: JobResult) -> None:
        seed, arm, _ = arms[res.index]
        row: dict[str, Any] = {"arm": arm, "seed": seed}
        if res.failed:
            row["failed"] = res.error
        elif not math.isfinite(res.row.get("final", math.nan)):  # every event failed, or none had the field
            row["failed"] = f"no {obj.field} from an event that did not fail"
        else:
            row.update(res.row)
        row["run_dir"] = res.run_dir
        rows[res.index] = row
        if on_run:
            on_run(row)

    warmup = (
        Job(base, ("hypertune.enabled=false", f"time_budget_s={min(budget, AB_WARMUP_S)}"), "ab-warmup")
        if warm_up
        else None
    )
    run_jobs(
        jobs,
        artifacts,
        parallel,
        backend=backend,
        address=address,
        on_result=finished,
        warmup=warmup,
        min_free_bytes=min_free_bytes,
    )
    failed = [r for r in rows if "failed" in r]
    for arm in ("on", "off"):
        if sum(1 for r in rows if r["arm"] == arm and "failed" not in r) < 2:
            reasons = "; ".join(f"{r['arm']} seed {r['seed']}: {r['failed']}" for r in failed)
            raise ABFailed(f"the A/B needs two finished runs per arm; hypertune {arm} has fewer ({reasons})")
    rep = ab_report([r for r in rows if "failed" not in r], budget, target, obj)
    rep["runs"] = rows
    rep["failed"] = failed
    rep["parallel"] = parallel
    rep["warm_up"] = warm_up
    return rep


def ab_report(
    rows: list[dict[str, Any]], budget: float, target: float | None = None, objective: Objective | None = None
) -> dict[str, Any]:
    """Per-arm final values of the objective (``final_best``: each run's best of the objective's
    field) and time-to-target, with Mann-Whitney p-values, effect sizes and CIs; ``objective``,
    ``direction`` and ``label`` say what was compared. The target is ``target`` or the best any
    run reached, best in the objective's direction (lower when none is given)."""
    obj = objective or Objective("final", "min")
    finals = [r["final"] for r in rows]
    tgt = float(target if target is not None else (max(finals) if obj.direction == "max" else min(finals)))

    def reached(v: float) -> bool:
        return not obj.better(tgt, v)  # v is the target or better

    def ttt(r: dict[str, Any]) -> float:
        return next((t for t, v in r["trace"] if reached(v)), budget)  # censored at the budget

    arms: dict[str, dict[str, Any]] = {}
    for arm in ("on", "off"):
        rs = [r for r in rows if r["arm"] == arm]
        f = [r["final"] for r in rs]
        t = [ttt(r) for r in rs]
        arms[arm] = {
            "runs": len(rs),
            "final": f,
            "final_mean": float(np.mean(f)),
            "final_median": float(np.median(f)),
            "time_to_target": t,
            "reached_target": sum(1 for r in rs if reached(r["final"])),
            "ttt_median": float(np.median(t)),
        }

    def compare(key: str) -> dict[str, Any]:
        a, b = np.array(arms["off"][key], dtype=float), np.array(arms["on"][key], dtype=float)
        if np.all(a == a[0]) and np.all(b == a[0]):
            return {"p_value": 1.0, "effect_size": 0.0, "ci": [0.0, 0.0], "note": "identical in every run"}
        mw = stats.mann_whitney(a, b)
        out = {
            "p_value": mw["p_value"],
            "rank_biserial": mw["rank_biserial"],
            "effect_size": stats.hedges_g(a, b),
            "mean_difference_on_minus_off": float(b.mean() - a.mean()),
        }
        try:
            out["ci"] = list(stats.diff_interval(a, b))
        except (ValueError, ZeroDivisionError):
            out["ci"] = None
        return out

    return {
        "objective": obj.field if objective is not None else None,
        "direction": obj.direction,
        "label": obj.label if objective is not None else None,
        "target": tgt,
        "budget_s": budget,
        "arms": arms,
        "final_best": compare("final"),
        "time_to_target": compare("time_to_target"),
        "runs": rows,
    }
