"""The README's Python examples run as written: a user copies them first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the examples that stand alone (Supervision's names Store and Worker are the reader's own)
RUNNABLE = ["Experiments and the Lab", "The actor API", "Telemetry"]


def example(section: str) -> str:
    """The first Python block of the README section with this heading."""
    text = (ROOT / "README.md").read_text()
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert body is not None, f"no README section {section!r}"
    block = re.search(r"^```python\n(.*?)^```", body.group(1), re.S | re.M)
    assert block is not None, f"no Python example in README section {section!r}"
    return block.group(1)


@pytest.mark.parametrize("section", RUNNABLE)
def test_a_readme_example_runs_as_written(section, tmp_path):
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")  # its specs, by the README's relative paths
    script = tmp_path / "example.py"
    script.write_text(example(section))
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
