"""How long a ``crucible`` command takes to start: every shell use pays it.

Run: ``python -m bench.cli [--rounds 9]``.

Each command runs ``--rounds`` times in a fresh interpreter (numba's cache warm: one untimed
run first); the medians are printed beside two anchors measured in the same run:

* ``python -c pass``: the interpreter alone;
* ``python -c "import numpy, structlog, rich.console"``: the libraries every command needs (the
  floor a command can reach without lazier imports of its own).

Commands: ``crucible --help`` and ``crucible list --json`` on an artifacts folder with one
recorded run (made here by ``crucible run`` on a tiny latency spec).
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


def median_s(argv: list[str], rounds: int) -> float:
    """The median wall time of ``argv`` over ``rounds`` runs, after one untimed run."""
    subprocess.run(argv, capture_output=True, check=True)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    py = sys.executable
    crucible = [py, "-m", "supervisor"]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "b.toml"
        spec.write_text(SPEC)
        art = str(Path(tmp) / "art")
        subprocess.run([*crucible, "run", str(spec), "--artifacts", art, "--no-live"], capture_output=True, check=True)
        rows = [
            ("python -c pass (anchor)", [py, "-c", "pass"]),
            ("import numpy, structlog, rich (anchor)", [py, "-c", "import numpy, structlog, rich.console"]),
            ("crucible --help", [*crucible, "--help"]),
            ("crucible list --json", [*crucible, "list", "--json", "--artifacts", art]),
        ]
        got = {name: median_s(cmd, args.rounds) for name, cmd in rows}
    bare, floor = got[rows[0][0]], got[rows[1][0]]
    print(f"{'command':<42} {'median s':>9} {'x bare':>8} {'x floor':>8}")
    for name, _ in rows:
        print(f"{name:<42} {got[name]:>9.3f} {got[name] / bare:>8.2f} {got[name] / floor:>8.2f}")


if __name__ == "__main__":
    main()
