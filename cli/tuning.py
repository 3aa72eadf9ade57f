"""``crucible tune`` and ``crucible ab``: search starting parameters, and measure hypertune on against off."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from cli import render
from cli.commands import help_of
from cli.errors import EXIT_FAILED, UsageError, folder_arg, interrupted, one_line
from experiments.validate import SECONDS, SEED, Num

TRIAL_KEYS = frozenset({"trial", "params", "seconds_to_best", "run_dir", "failed"})  # the other key: the objective
PARALLEL = Num(1, 1024, integer=True)


def trial_line(row: dict[str, Any]) -> str:
    """One finished trial: its objective's value, when it reached its best (where the workload
    records it: an unknown time is said so, never shown as 0), and its parameters."""
    if "failed" in row:
        return f"trial {row['trial']}: failed ({row['failed']}) with {row['params']}"
    field = next((k for k in row if k not in TRIAL_KEYS), "objective")
    when = row.get("seconds_to_best")
    after = f"best after {when:.2f} s" if when is not None else "time to best unknown"
    return f"trial {row['trial']}: {field}={row.get(field, float('nan')):g} ({after}) with {row['params']}"


def json_numbers(v: Any) -> Any:
    """``v`` with every infinite float as the string ``"inf"`` or ``"-inf"`` (JSON has no
    infinity, and null would lose which arm was better); NaN stays null (undefined)."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: json_numbers(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_numbers(x) for x in v]
    return v


def cmd_tune(args: argparse.Namespace) -> int:
    with _sigterm_interrupts() as term:
        try:  # seconds of imports (scipy, optuna): a Ctrl-C there is an interrupt too, not a traceback
            from experiments.remote import RayBackendError
            from experiments.tuning import SeedFromError, tune
        except KeyboardInterrupt:
            return _interrupted("tune", term)

        console = render.console()
        done: list[dict[str, Any]] = []  # the trials finished so far: printed too when interrupted

        def on_trial(row: dict[str, Any]) -> None:
            done.append(row)
            if not args.json:
                render.say(console, trial_line(row))

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
                on_trial=on_trial,
                on_skipped=_skipped,
                **_runner(args),
            )
        except SeedFromError as exc:  # a path that is no run, or no usable run: refused before any trial
            raise UsageError(f"--seed-from: {exc}") from None
        except ValueError as exc:  # SpecError, or parameters a trial refuses
            raise UsageError(str(exc)) from None
        except RayBackendError as exc:  # no Ray installed, no cluster at the address
            raise UsageError(f"--backend ray: {exc}") from None
        except KeyboardInterrupt:
            if args.json:  # what had finished is still worth having (their run folders hold the rest)
                print(orjson.dumps({"interrupted": True, "trials": done}).decode(), flush=True)
            return _interrupted("tune", term)
        if args.json:
            print(orjson.dumps(res).decode())
        failed = [r for r in res["trials"] if "failed" in r]
        if res["trials"] and len(failed) == len(res["trials"]):  # nothing learned: no proposal, not a success
            first = failed[0]
            print(f"crucible tune: every trial failed; trial {first['trial']}: {first['failed']}", file=sys.stderr)
            return EXIT_FAILED
        if failed:  # a proposal from the others; but not every trial counted
            print(
                f"crucible tune: warning: {len(failed)} of {len(res['trials'])} trial(s) failed; "
                f"trial {failed[0]['trial']}: {' '.join(str(failed[0]['failed']).split())}",
                file=sys.stderr,
            )
        if not args.json:
            left_out = len(res["skipped_prior_runs"])
            render.say(  # names and values from the spec and the runs: shown as they are, never as markup
                console,
                f"learned from {res['seeded_from_prior_runs']} prior run(s)"
                f"{f' ({left_out} left out)' if left_out else ''} and {len(res['trials'])} trial(s)"
                f"{f' ({len(failed)} failed)' if failed else ''}; "
                f"best {res['objective']} = {res['best_value']}",
            )
            render.say(console, "proposed next configuration (--set):")
            for k, v in (res["proposal"] or {}).items():
                render.say(console, f"  workload.params.{k}={v}")
        return 0


def _skipped(path: Path, why: str) -> None:
    """A prior run left out of the study, on stderr before the trials (with --json too)."""
    print(f"crucible tune: warning: --seed-from {str(path)!r} left out: {' '.join(why.split())}", file=sys.stderr)


def run_line(row: dict[str, Any]) -> str:
    """One finished A/B run."""
    what = f"failed ({row['failed']})" if "failed" in row else f"final {row['final']:g}"
    return f"  hypertune {row['arm']:>3}  seed {row['seed']}: {what}"


def _interrupted(command: str, term: list[int]) -> int:
    return interrupted(command, "the running experiments were stopped", signum=term[0] if term else signal.SIGINT)


@contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """SIGTERM ends the command as a Ctrl-C does (the running experiments are stopped, and
    flush what they hold; exit 143), rather than killing the process in the middle of a run;
    the list holds the signal once one came."""
    got: list[int] = []

    def on_term(signum: int, frame: Any) -> None:
        if not got:
            got.append(signum)
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, old)


def _runner(args: argparse.Namespace) -> dict[str, Any]:
    """``--parallel``, ``--backend``, ``--ray-address`` and ``--min-free-mib`` as the keyword
    arguments of ``tune`` and ``ab``."""
    from cli.run import backend_options

    backend, address = backend_options(args)
    return {
        "parallel": args.parallel,
        "backend": backend,
        "address": address,
        "min_free_bytes": args.min_free_mib << 20,
    }


def cmd_ab(args: argparse.Namespace) -> int:
    with _sigterm_interrupts() as term:
        try:  # seconds of imports (scipy, optuna): a Ctrl-C there is an interrupt too, not a traceback
            from experiments.remote import RayBackendError
            from experiments.tuning import ABFailed, ab
        except KeyboardInterrupt:
            return _interrupted("ab", term)

        console = render.console()
        try:
            rep = ab(
                args.spec,
                args.runs,
                args.artifacts,
                budget=args.budget,
                target=args.target,
                overrides=args.set or None,
                on_run=None if args.json else lambda r: render.say(console, run_line(r)),
                warm_up=args.warm_up,
                **_runner(args),
            )
        except ValueError as exc:  # SpecError, or parameters a run refuses
            raise UsageError(str(exc)) from None
        except RayBackendError as exc:  # no Ray installed, no cluster at the address
            raise UsageError(f"--backend ray: {exc}") from None
        except KeyboardInterrupt:
            return _interrupted("ab", term)
        except ABFailed as exc:
            print(f"crucible ab: {one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            print(orjson.dumps(json_numbers({k: v for k, v in rep.items() if k != "runs"})).decode())
            return 0
        console.print(render.ab_table(rep, args.runs))
        for r in rep["failed"]:
            render.say(console, f"failed, left out: hypertune {r['arm']} seed {r['seed']}: {r['failed']}")
        for key in ("final_best", "time_to_target"):
            c = rep[key]
            render.say(
                console,
                f"{key}: Mann-Whitney p = {c['p_value']:.4g}, effect size (Hedges g, on - off) = "
                f"{c['effect_size']:.3f}, CI of the difference = {c.get('ci')}",
            )
        return 0


def _add_runner_flags(p: argparse.ArgumentParser, what: str) -> None:
    from cli.run import add_min_free_option

    p.add_argument(
        "--parallel",
        type=PARALLEL.arg(),
        default=1,
        metavar="N",
        help=f"{what} at once, 1 to 1024 (default 1: one after another)",
    )
    p.add_argument(
        "--backend",
        choices=("embedded", "ray"),
        default="embedded",
        help="embedded: this machine, worker processes when --parallel > 1 (default); ray: Ray tasks",
    )
    p.add_argument("--ray-address", metavar="A", help="the Ray cluster (HOST:PORT, ray://HOST:PORT or auto)")
    add_min_free_option(p)


def add_commands(sub: Any) -> None:
    tu = sub.add_parser("tune", help=help_of("tune"))
    tu.add_argument("spec")
    tu.add_argument("--trials", type=Num(1, 10_000, integer=True).arg(), default=8, help="1 to 10000 (default 8)")
    tu.add_argument(
        "--seed-from",
        action="append",
        metavar="RUN_DIR",
        help="learn from a prior run's folder (repeatable); a path that is no run, or no usable run, is an error",
    )
    tu.add_argument("--budget", type=SECONDS.arg(), help="seconds per trial, up to 365 days (default: the spec's)")
    tu.add_argument(
        "--objective", help="field to judge runs by (default: the workload's declared objective; another is minimised)"
    )
    tu.add_argument("--seed", type=SEED.arg(), default=0, help="0 to 2^32-1")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE")
    tu.add_argument("--json", action="store_true")
    tu.add_argument("--artifacts", default="artifacts", type=folder_arg)
    _add_runner_flags(tu, "trials")
    tu.set_defaults(func=cmd_tune, prints_result=True)
    abp = sub.add_parser("ab", help=help_of("ab"))
    abp.add_argument("spec")
    abp.add_argument(
        "--runs", type=Num(2, 1000, integer=True).arg(), default=5, help="runs per arm, 2 to 1000 (default 5)"
    )
    abp.add_argument("--budget", type=SECONDS.arg(), help="seconds per run, up to 365 days (default: the spec's)")
    abp.add_argument("--target", type=Num(0, 1e12).arg(), help="time-to-target threshold (default: best reached)")
    abp.add_argument("--set", action="append", metavar="KEY=VALUE")
    abp.add_argument("--json", action="store_true")
    abp.add_argument("--artifacts", default="artifacts", type=folder_arg)
    abp.add_argument(
        "--no-warmup",
        dest="warm_up",
        action="store_false",
        help="skip the warm-up run (ab-warmup) each process makes before the measured ones",
    )
    _add_runner_flags(abp, "runs")
    abp.set_defaults(func=cmd_ab, prints_result=True)
