"""How long a ``crucible`` command takes to start: every shell use pays it.

Run: ``python -m bench.cli [--rounds 9]``.

Each command runs ``--rounds`` times in a fresh interpreter (numba's cache warm: one untimed
run first); the medians are printed beside two anchors measured in the same run:

* ``python -c pass``: the interpreter alone;
* ``python -c "import numpy, structlog, rich.console"``: the libraries every command needs (the
  floor a command can reach without lazier imports of its own).

Commands, as the ``crucible`` console script runs them (``from cli import main``):
``crucible --help``, ``crucible list --json`` and ``crucible monitor --summary`` on an
artifacts folder with one recorded run (made here by ``crucible run`` on a tiny latency
spec), and ``crucible ls --help`` (a lab daemon's client). ``--tree DIR`` measures the
checkout in DIR instead of this one (a "before" figure from a worktree of an older commit).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = 'name = "b"\ntime_budget_s = 0.2\n[workload.params]\ntarget = "math:sqrt"\nargs = [2.0]\n'


def median_s(argv: list[str], rounds: int, cwd: Path) -> float:
    """The median wall time of ``argv`` (run in ``cwd``) over ``rounds`` runs, after one untimed run."""
    subprocess.run(argv, capture_output=True, check=True, cwd=cwd)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True, cwd=cwd)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tree", type=Path, default=Path.cwd(), help="the checkout to measure (default: here)")
    args = ap.parse_args(argv)
    py = sys.executable
    crucible = [py, "-c", "import sys; from cli import main; sys.exit(main())"]  # the console script
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "b.toml"
        spec.write_text(SPEC)
        art = str(Path(tmp) / "art")
        run = [*crucible, "run", str(spec), "--artifacts", art, "--no-live"]
        subprocess.run(run, capture_output=True, check=True, cwd=args.tree)
        rows = [
            ("python -c pass (anchor)", [py, "-c", "pass"]),
            ("import numpy, structlog, rich (anchor)", [py, "-c", "import numpy, structlog, rich.console"]),
            ("crucible --help", [*crucible, "--help"]),
            ("crucible list --json", [*crucible, "list", "--json", "--artifacts", art]),
            ("crucible monitor --summary", [*crucible, "monitor", "--latest", "--summary", "--artifacts", art]),
            ("crucible ls --help", [*crucible, "ls", "--help"]),
        ]
        got = {name: median_s(cmd, args.rounds, args.tree) for name, cmd in rows}
    bare, floor = got[rows[0][0]], got[rows[1][0]]
    print(f"{'command':<42} {'median s':>9} {'x bare':>8} {'x floor':>8}")
    for name, _ in rows:
        print(f"{name:<42} {got[name]:>9.3f} {got[name] / bare:>8.2f} {got[name] / floor:>8.2f}")


if __name__ == "__main__":
    main()
