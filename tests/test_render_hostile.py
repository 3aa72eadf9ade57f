"""What a hostile tester found in what ``crucible`` shows, and the fixes:

* recorded or user-given text (folder and run names, a lifecycle ``reason``, an event's
  ``phase``) read as rich markup (a ``MarkupError``, or ``[bold red]evil`` shown as ``evil``)
  or passed terminal escapes (``ESC]0;…BEL`` retitles the terminal) through;
* ``crucible list`` on a narrow terminal cut every run id to the same ``20261123T2…``;
* ``crucible compare`` said "effect size 0" for two constant runs that differ, and printed
  numpy overflow warnings and a table of inf/nan for values near 1.8e308;
* a user who can write neither ``kernels/__pycache__`` nor a home folder could run no
  command: numba's ``cache=True`` found no cache folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text

from cli import render
from supervisor import main
from telemetry import stats
from tests.fault_helpers import NOBODY, nobody_env, skip_unless_nobody_can_run_this_checkout

ROOT = Path(__file__).resolve().parent.parent
LATENCY = (
    'name = "lat"\ntime_budget_s = 30\nseed = 1\n[workload.params]\ntarget = "math:sqrt"\n'
    "args = [2.0]\ncalls_per_step = 20\ncalls = 100\n[metrics]\npublish_interval_s = 0.1\n"
)
EVIL_MARKUP = "[bold red]evil"
EVIL_ESC = "e\x1b]0;PWNED\x07x"
EVIL_ESC_SHOWN = "e\\x1b]0;PWNED\\x07x"


def rendered(renderable: object, width: int = 300) -> str:
    """What a console without colours prints for ``renderable``: any escape in it came from the data."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue()


def listing(capsys: pytest.CaptureFixture[str], art: Path) -> str:
    capsys.readouterr()
    assert main(["list", "--artifacts", str(art)]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished latency run (its folder), to copy under hostile names."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "lat.toml").write_text(LATENCY)
    assert main(["run", str(root / "lat.toml"), "--artifacts", str(root / "art"), "--no-live"]) == 0
    (run,) = (root / "art" / "lat").iterdir()
    return run


def copy_run(run: Path, art: Path, name: str) -> Path:
    dest = art / "lat" / name
    shutil.copytree(run, dest)
    return dest


# --- 1. markup and escapes -------------------------------------------------------------------------


def test_list_shows_markup_and_escapes_in_names_and_reasons_as_text(one_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    art = tmp_path / "wa[/b]"  # a closing tag in the folder's name: a MarkupError before
    copy_run(one_run, art, one_run.name)
    copy_run(one_run, art, EVIL_MARKUP)
    reasoned = copy_run(one_run, art, "reasoned")
    life = json.loads((reasoned / "lifecycle.json").read_text())
    life["reason"] = "[/bold] \x1b[31mred"
    (reasoned / "lifecycle.json").write_text(json.dumps(life))
    copy_run(one_run, art, EVIL_ESC)
    out = listing(capsys, art)
    assert "\x1b" not in out and "\x07" not in out
    assert f"{art}/lat/{EVIL_MARKUP}" in out  # the path that exists, brackets and all
    assert f"{art}/lat/{EVIL_ESC_SHOWN}" in out and "[/bold] \\x1b[31mred" in out


def test_monitor_summary_shows_a_phase_and_a_title_that_look_like_markup_as_text(one_run, tmp_path, capsys):
    art = tmp_path / "art"
    run = copy_run(one_run, art, EVIL_ESC)
    events = run / "events.jsonl"
    events.write_text(events.read_text().replace('"phase":"calls"', '"phase":"[/x]"'))
    capsys.readouterr()
    assert main(["monitor", str(run), "--summary", "--artifacts", str(art)]) == 0
    out = capsys.readouterr().out
    assert "[/x]" in out and EVIL_ESC_SHOWN in out and "\x1b" not in out


@pytest.mark.parametrize(
    "draw",
    [
        lambda s: render.monitor_summary_table(s, {s: {"events": s, "duration_s": 1.0, "best": {s: 1.0}}}),
        lambda s: render.summary_table({"experiment_id": s, "run_id": s, "status": s, "reason": s, "run_dir": s}),
        lambda s: render.figures_table(s, {s: s}),
        lambda s: render.instances_table(
            [{"name": s, "vertices": 1, "edges": 1, "density": 0.5, "best_known": None, "proved_optimal": False}]
        ),
        lambda s: render.compare_table(s, {**stats.compare([1.0, 2.0, 3.0], [2.0, 3.0, 5.0]), "test": s}),
        lambda s: render.runs_table(
            s,
            [
                {
                    "experiment": s,
                    "run_id": s,
                    "status": s,
                    "reason": s,
                    "events": None,
                    "duration_s": None,
                    "path": s,
                    "evidence": [s],
                }
            ],
        ),
    ],
    ids=["monitor_summary", "summary", "figures", "instances", "compare", "runs"],
)
@pytest.mark.parametrize("hostile", ["[/b]", EVIL_MARKUP, EVIL_ESC])
def test_every_table_shows_recorded_text_as_it_is_without_control_characters(draw, hostile):
    out = rendered(draw(hostile))
    assert "\x1b" not in out and "\x07" not in out
    assert hostile.replace("\x1b", "\\x1b").replace("\x07", "\\x07") in out


def test_the_monitor_view_and_say_escape_control_characters(capsys):
    view = render.MonitorView(f"crucible monitor: {EVIL_ESC}", [])
    view.add({}, f"[{EVIL_MARKUP}] {EVIL_ESC}")
    out = rendered(view.table())
    assert f"[{EVIL_MARKUP}] {EVIL_ESC_SHOWN}" in out and "\x1b" not in out
    buf = io.StringIO()
    render.say(Console(file=buf, color_system=None), f"a line with {EVIL_ESC}\u202e and a break\nhere")
    assert buf.getvalue() == f"a line with {EVIL_ESC_SHOWN}\\u202e and a break\\x0ahere\n"


# --- 2. run ids and paths whole on a narrow terminal -------------------------------------------


@pytest.mark.parametrize("columns", ["3", "20", "80"])
def test_a_narrow_terminal_lists_every_run_id_and_path_whole(one_run, tmp_path, capsys, monkeypatch, columns):
    art = tmp_path / "art"
    runs = [copy_run(one_run, art, f"20261123T2{i}0000Z-abcde{i}") for i in range(3)]
    monkeypatch.setenv("COLUMNS", columns)
    lines = listing(capsys, art).splitlines()
    for run in runs:  # each on a line of its own, id first, path whole
        assert any(line.startswith(run.name) and line.endswith(str(run)) for line in lines), lines


def test_a_terminal_wide_enough_draws_the_table_with_ids_and_paths_whole(one_run, tmp_path, capsys, monkeypatch):
    art = tmp_path / "art"
    run = copy_run(one_run, art, "20261123T200000Z-abcdef")
    monkeypatch.setenv("COLUMNS", "300")
    out = listing(capsys, art)
    assert "┃ run " in out and f" {run.name} " in out and f" {run} " in out


# --- 3. compare: undefined figures said, no overflow ---------------------------------------------


def test_two_constant_runs_that_differ_have_an_infinite_effect_not_zero():
    r = stats.compare([5.0] * 10, [7.0] * 10)
    assert r["effect_size"] == math.inf and r["cohens_d"] == math.inf
    assert stats.cohens_d([7.0] * 10, [5.0] * 10) == -math.inf
    assert "neither run varies" in r["note"]
    out = rendered(render.compare_table("m", r))
    assert "+inf" in out and "neither run varies" in out


def test_two_runs_with_the_same_constant_value_have_no_effect_size_and_no_table():
    r = stats.compare([5.0] * 10, [5.0] * 10)
    assert math.isnan(r["effect_size"]) and "one value 5" in r["note"]
    shown = render.compare_table("m", r)
    assert isinstance(shown, Text) and "no comparison" in shown.plain and len(shown.plain.splitlines()) == 1


def test_values_near_the_float64_limit_compare_without_overflow_warnings():
    big = [1.7e308 * (1 + 1e-3 * (i % 3)) for i in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = stats.compare(big, [5.0] * 10)
        far = stats.compare(big, [-v for v in big])
    assert all(math.isfinite(r[k]) for k in ("mean_control", "mean_treatment", "p_value", "effect_size"))
    assert all(math.isfinite(v) for v in r["ci"]) and r["note"] is None
    assert r["mean_control"] == pytest.approx(1.7e308 * 1.0009)  # (0 + 1 + 2 + 0 + ... + 0) e-3 / 10
    assert math.isinf(far["ci"][0]) and "beyond the float64 range" in far["note"]
    out = rendered(render.compare_table("m", far))
    assert len(out.strip().splitlines()) == 1 and "no comparison" in out and "nan" not in out


def test_scaling_leaves_ordinary_figures_as_they_were():
    a, b = np.array([3.1, 2.9, 3.3, 3.0, 2.8]), np.array([3.6, 3.4, 3.9, 3.5, 3.7])
    sp = math.sqrt((4 * a.var(ddof=1) + 4 * b.var(ddof=1)) / 8)
    assert stats.cohens_d(a, b) == pytest.approx((b.mean() - a.mean()) / sp, rel=1e-12)
    lo, hi = stats.diff_interval(a, b)
    assert lo < b.mean() - a.mean() < hi


def test_compare_on_the_command_line_says_why_in_json_and_as_one_line(one_run, tmp_path, capsys):
    art = tmp_path / "art"
    ids = []
    for name, values in (("20261123T000000Z-aaaaa1", [5.0] * 10), ("20261123T000000Z-aaaaa2", [7.0] * 10)):
        run = copy_run(one_run, art, name)
        (run / "events.jsonl").write_text(
            "".join(
                json.dumps(
                    {"v": 1, "seq": i, "ts": 1 + i, "experiment_id": "lat", "run_id": name, "pass": 0}
                    | {"name": "call", "phase": "calls", "step": i, "values": {"m": v}}
                )
                + "\n"
                for i, v in enumerate(values)
            )
        )
        ids.append(name)
    (art / "history.sqlite3").unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["compare", *ids, "--metric", "m", "--artifacts", str(art), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["effect_size"] is None and "neither run varies" in r["note"]  # inf: JSON has null, the note says why


# --- 4. numba's cache where nothing of the user's is writable ---------------------------------------


def _kernels_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the package whose ``__pycache__`` is a file (unwritable even to root), and an
    environment whose home is under a file (no user-wide cache) and whose temp folder is ours."""
    pkg = tmp_path / "pkg" / "kernels"
    pkg.mkdir(parents=True)
    for name in ("__init__.py", "coloring.py"):
        shutil.copy(ROOT / "kernels" / name, pkg / name)
    (pkg / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "XDG_"))}
    env.update(HOME=str(blocker / "home"), TMPDIR=str(tmp_path / "tmp"), PYTHONDONTWRITEBYTECODE="1")
    return pkg.parent, env


def _import_and_compile(pkg: Path, env: dict[str, str], before: str = "") -> str:
    code = (
        f"import sys, tempfile; sys.path.insert(0, {str(pkg)!r}); {before}\n"
        "import numpy as np, kernels, kernels.coloring as c\n"
        "c.seed_rng(1)\n"
        "assert c.count_conflicts(np.array([0, 1, 2]), np.array([1, 0]), np.array([0, 0])) == 1\n"
        "print(kernels.numba_cache)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_kernels_cache_in_a_private_temp_folder_when_numba_has_none(tmp_path):
    pkg, env = _kernels_copy(tmp_path)
    where = Path(_import_and_compile(pkg, env))
    assert where.parent == tmp_path / "tmp" and where.name.startswith("crucible-numba-")
    assert where.stat().st_mode & 0o077 == 0 and list(where.rglob("*.nbi"))


def test_kernels_compile_without_a_cache_when_nothing_is_writable(tmp_path):
    pkg, env = _kernels_copy(tmp_path)
    assert _import_and_compile(pkg, env, f"tempfile.tempdir = {str(tmp_path / 'a-file' / 'tmp')!r}") == "none"


def test_a_shared_temp_cache_folder_is_not_used(tmp_path):
    """A folder others may write is refused: numba would load (run) what they put there."""
    pkg, env = _kernels_copy(tmp_path)
    uid = os.getuid()
    shared = tmp_path / "tmp" / f"crucible-numba-{uid}"
    shared.mkdir()
    shared.chmod(0o777)
    assert _import_and_compile(pkg, env) == "none" and not list(shared.iterdir())


def test_the_users_numba_cache_dir_is_kept(tmp_path):
    pkg, env = _kernels_copy(tmp_path)
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    assert _import_and_compile(pkg, env) == "user" and list((tmp_path / "mine").rglob("*.nbi"))


def test_nobody_without_a_home_can_run_a_command(tmp_path):
    """The tester's case: the checkout's ``kernels/__pycache__`` is not nobody's, and nor is any home."""
    skip_unless_nobody_can_run_this_checkout()
    tmp = Path(tempfile.mkdtemp(prefix="crucible-nobody-"))
    try:
        tmp.chmod(0o777)
        env = {k: v for k, v in nobody_env().items() if not k.startswith(("NUMBA_", "XDG_"))}
        env.update(HOME="/nonexistent", TMPDIR=str(tmp))
        crucible = Path(sys.executable).parent / "crucible"
        cmd = [*NOBODY, str(crucible), "instances"]
        p = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "proved optimal" in p.stdout, p.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
