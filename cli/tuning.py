"""``crucible tune`` and ``crucible ab``: search starting parameters, and measure hypertune on against off."""

from __future__ import annotations

import argparse
from typing import Any

import orjson
from rich.console import Console

from cli import render
from cli.errors import UsageError
from experiments.validate import SECONDS, SEED, Num

TRIAL_KEYS = frozenset({"trial", "params", "seconds_to_best", "run_dir"})  # a trial row's other key is the objective


def trial_line(row: dict[str, Any]) -> str:
    """One finished trial: its objective's value, when it reached its best, and its parameters."""
    field = next((k for k in row if k not in TRIAL_KEYS), "objective")
    return (
        f"trial {row['trial']}: {field}={row.get(field, float('nan')):g} "
        f"(best after {row['seconds_to_best']:.2f} s) with {row['params']}"
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from experiments.tuning import tune

    console = Console()
    try:
        res = tune(
            args.spec,
            args.trials,
            args.artifacts,
            seed_from=args.seed_from or [],
            budget=args.budget,
            objective=args.objective,
            seed=args.seed,
            overrides=args.set or None,
            on_trial=None if args.json else lambda r: console.print(trial_line(r), markup=False, highlight=False),
        )
    except ValueError as exc:  # SpecError, or parameters a trial refuses
        raise UsageError(str(exc)) from None
    if args.json:
        print(orjson.dumps(res).decode())
    else:
        console.print(
            f"learned from {res['seeded_from_prior_runs']} prior run(s) and {len(res['trials'])} trial(s); "
            f"best {res['objective']} = {res['best_value']}"
        )
        console.print("proposed next configuration (--set):")
        for k, v in (res["proposal"] or {}).items():
            console.print(f"  workload.params.{k}={v}")
    return 0


def cmd_ab(args: argparse.Namespace) -> int:
    from experiments.tuning import ab

    console = Console()
    try:
        rep = ab(
            args.spec,
            args.runs,
            args.artifacts,
            budget=args.budget,
            target=args.target,
            overrides=args.set or None,
            on_run=None
            if args.json
            else lambda r: console.print(f"  hypertune {r['arm']:>3}  seed {r['seed']}: final {r['final']:g}"),
        )
    except ValueError as exc:  # SpecError, or parameters a run refuses
        raise UsageError(str(exc)) from None
    if args.json:
        print(orjson.dumps({k: v for k, v in rep.items() if k != "runs"}).decode())
        return 0
    console.print(render.ab_table(rep, args.runs))
    for key in ("final_best", "time_to_target"):
        c = rep[key]
        console.print(
            f"{key}: Mann-Whitney p = {c['p_value']:.4g}, effect size (Hedges g, on - off) = "
            f"{c['effect_size']:.3f}, CI of the difference = {c.get('ci')}"
        )
    return 0


def add_commands(sub: Any) -> None:
    tu = sub.add_parser("tune", help="propose starting parameters from prior runs and new trials (Optuna TPE)")
    tu.add_argument("spec")
    tu.add_argument("--trials", type=Num(1, 10_000, integer=True).arg(), default=8, help="1 to 10000 (default 8)")
    tu.add_argument("--seed-from", action="append", metavar="RUN_DIR", help="learn from a prior run (repeatable)")
    tu.add_argument("--budget", type=SECONDS.arg(), help="seconds per trial, up to 365 days (default: the spec's)")
    tu.add_argument(
        "--objective", help="field to judge runs by (default: the workload's declared objective; another is minimised)"
    )
    tu.add_argument("--seed", type=SEED.arg(), default=0, help="0 to 2^32-1")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE")
    tu.add_argument("--json", action="store_true")
    tu.add_argument("--artifacts", default="artifacts")
    tu.set_defaults(func=cmd_tune)
    abp = sub.add_parser("ab", help="A/B: hypertune on vs off over N seeds, with statistics")
    abp.add_argument("spec")
    abp.add_argument("--runs", type=Num(2, 1000, integer=True).arg(), default=5, help="runs per arm, 2 to 1000")
    abp.add_argument("--budget", type=SECONDS.arg(), help="seconds per run, up to 365 days (default: the spec's)")
    abp.add_argument("--target", type=Num(0, 1e12).arg(), help="time-to-target threshold (default: best reached)")
    abp.add_argument("--set", action="append", metavar="KEY=VALUE")
    abp.add_argument("--json", action="store_true")
    abp.add_argument("--artifacts", default="artifacts")
    abp.set_defaults(func=cmd_ab)
