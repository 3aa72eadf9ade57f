"""The DIMACS instances shipped inside the package, found by name.

``experiments/coloring/instances/`` holds the standard DIMACS colouring instances that the
tests, the benchmarks and the examples use, gzip-compressed (``<name>.col.gz``), with the
source collection's MIT ``LICENSE`` and ``README.md`` and its table of best-known colour
counts (``best_scores_gcp.txt``: ``name colours *`` when proved optimal, ``-`` when not).
Nothing here reads outside the package.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

INSTANCES_DIR = Path(__file__).with_name("instances")
SUFFIXES = (".col.gz", ".col")
BEST_KNOWN_FILE = INSTANCES_DIR / "best_scores_gcp.txt"


def strip_suffix(name: str) -> str:
    """``DSJC250.5.col.gz`` / ``DSJC250.5.col`` -> ``DSJC250.5``."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def instance_family(name: str) -> str:
    """The family of an instance, by the letters its name starts with: ``DSJC250.5`` -> ``DSJC``,
    ``le450_15c`` -> ``le``; ``graph`` when it starts with none."""
    m = re.match(r"[A-Za-z]+", name or "")
    return m.group(0) if m else "graph"


def instance_names() -> list[str]:
    """The shipped instances, sorted by name."""
    return sorted(strip_suffix(p.name) for p in INSTANCES_DIR.glob("*.col.gz"))


def instance_path(name: str) -> Path | None:
    """The shipped file of an instance (``DSJC250.5``, with or without ``.col``/``.col.gz``),
    or None when no instance has that name."""
    if not isinstance(name, str) or "/" in name or "\\" in name:
        return None
    p = INSTANCES_DIR / f"{strip_suffix(name)}.col.gz"
    return p if strip_suffix(name) and p.is_file() else None


@cache
def best_known() -> dict[str, tuple[int, bool]]:
    """Best-known colour counts: name -> (colours, proved optimal)."""
    out: dict[str, tuple[int, bool]] = {}
    for line in BEST_KNOWN_FILE.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2] in ("*", "-"):
            out[parts[0]] = (int(parts[1]), parts[2] == "*")
    return out
