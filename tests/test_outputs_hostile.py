"""Outputs a hostile user points at odd places: devices, FIFOs, links, run folders, names too
long, folders; two edits of one spec at once; partial files a killed export left.

Every device, FIFO and link here is made in the test's own folder (``mknod`` needs root: those
tests are skipped otherwise); a real ``/dev/null`` or ``/dev/stdout`` is never touched.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from cli import main
from experiments.spec import SpecError
from telemetry.jsonl import iter_run
from tests.fault_helpers import NOBODY, nobody_env, skip_unless_nobody_can_run_this_checkout

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mknod and setuid need root")
NULL, FULL = os.makedev(1, 3), os.makedev(1, 7)  # what /dev/null and /dev/full are, made anew here
FORMATS = ("jsonl", "csv", "parquet")


def event(seq: int, **values: object) -> bytes:
    return orjson.dumps({"v": 1, "seq": seq, "ts": 1_000 + seq, "name": "step", "values": values}) + b"\n"


@pytest.fixture
def art(tmp_path: Path) -> Path:
    """An artifacts folder with one run of three events, and the history file that marks its root."""
    art = tmp_path / "art"
    run = art / "exp" / "run-1"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(b"".join(event(i, conflicts=i) for i in range(3)))
    (art / "history.sqlite3").write_bytes(b"")
    return art


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process ``crucible`` command."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Assert the command is refused with exit 2 and one line, no traceback; return the line."""
    code, _, err = cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (code, err)
    return err


def mknod(path: Path, dev: int, kind: int = stat.S_IFCHR) -> Path:
    os.mknod(path, kind | 0o666, dev)
    return path


# --- 1. devices, FIFOs and links are written through or refused, never replaced --------------------------------


@needs_root
def test_export_streams_into_a_character_device_and_leaves_it_one(art, tmp_path, capsys):
    nul = mknod(tmp_path / "nul", NULL)
    link = tmp_path / "out"
    link.symlink_to(nul)
    for target in (nul, link):
        for fmt in FORMATS:
            code, out, err = cli(
                capsys, "export", "run-1", "--artifacts", str(art), "--format", fmt, "--out", str(target)
            )
            assert code == 0, err
            assert "exported 3 events" in err and not out  # the line goes to stderr: the data may be stdout
    assert stat.S_ISCHR(nul.lstat().st_mode) and nul.lstat().st_rdev == NULL
    assert link.is_symlink() and os.readlink(link) == str(nul)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "nul", "out"]  # no partial file either


@needs_root
def test_a_device_that_fails_a_write_is_one_line_and_stays(art, tmp_path, capsys):
    full = mknod(tmp_path / "full", FULL)
    err = refused(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(full))
    assert "cannot write" in err and "No space left on device" in err
    assert stat.S_ISCHR(full.lstat().st_mode) and full.lstat().st_rdev == FULL


def _drain(fifo: Path, into: list[bytes]) -> threading.Thread:
    """A reader of ``fifo`` that keeps all it reads (a daemon: one left blocked cannot hang the run)."""

    def read() -> None:
        with open(fifo, "rb") as fh:
            into.append(fh.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_streams_into_a_fifo(art, tmp_path, capsys, fmt):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _drain(fifo, got)
    code, _, err = cli(capsys, "export", "run-1", "--artifacts", str(art), "--format", fmt, "--out", str(fifo))
    reader.join(timeout=30)
    assert code == 0 and not reader.is_alive(), err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    data = got[0]
    if fmt == "jsonl":
        assert [orjson.loads(line)["seq"] for line in data.splitlines()] == [0, 1, 2]
    elif fmt == "csv":
        assert len(data.decode().splitlines()) == 4
    else:  # Parquet's writer never seeks: a pipe takes it
        assert pq.read_table(io.BytesIO(data)).column("values.conflicts").to_pylist() == [0, 1, 2]


@needs_root
def test_block_devices_sockets_and_folders_are_refused(art, tmp_path, capsys):
    blk = mknod(tmp_path / "blk", os.makedev(7, 250), stat.S_IFBLK)
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        link = tmp_path / "to-sock"
        link.symlink_to(sock_path)
        for target, kind in ((blk, "a block device"), (sock_path, "a socket"), (link, "a socket")):
            err = refused(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(target))
            assert f"it is {kind}; refusing" in err and repr(str(target)) in err
        assert stat.S_ISBLK(blk.lstat().st_mode) and stat.S_ISSOCK(sock_path.lstat().st_mode) and link.is_symlink()


@needs_root
def test_set_refuses_what_is_not_a_regular_file(tmp_path, capsys):
    nul = mknod(tmp_path / "nul", NULL)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # never opened to wait for a writer: the command must not hang
    link = tmp_path / "link.toml"
    link.symlink_to(nul)
    for spec in (nul, fifo, link):
        err = refused(capsys, "set", str(spec), "seed=3")
        assert "not a regular file" in err and str(spec) in err
    assert stat.S_ISCHR(nul.lstat().st_mode) and stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()


@needs_root
def test_atomic_write_never_renames_over_a_device_or_fifo(tmp_path):
    from actors.files import NotRegularFileError, atomic_write

    nul = mknod(tmp_path / "nul", NULL)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(nul)
    for path in (nul, fifo, link):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            atomic_write(path, b"x")
    assert stat.S_ISCHR(nul.lstat().st_mode) and stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "nul"]  # no temporary file left


# --- 2. an export never lands where a run's readers look -------------------------------------------------------


def test_export_never_writes_into_a_run_folder_or_makes_one_up(art, tmp_path, capsys):
    run = art / "exp" / "run-1"
    (tmp_path / "elsewhere").mkdir()
    for out, said in (
        (run / "events.000001.jsonl", "readers would take a file named 'events.000001.jsonl'"),
        (art / "exp" / "fakerun" / "events.jsonl", "readers would take a file named 'events.jsonl'"),
        (art / "exp" / "fakerun" / "summary.json", "readers would take"),
        (tmp_path / "elsewhere" / "events.000002.jsonl.gz", "readers would take"),
        (tmp_path / "elsewhere" / "Lifecycle.JSON", "readers would take"),
        (run / "export.csv", f"inside the run folder {str(run.resolve())!r}"),
        (run / "sub" / "export.csv", "inside the run folder"),
        (art / "history.sqlite3-wal", "reserves names like 'history.sqlite3'"),
        (art / "daemon.log.3", "reserves names like 'daemon.log'"),
        (art / "hypertune" / "latency-x.json", "hypertune's learned state"),
    ):
        err = refused(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(out))
        assert said in err and repr(str(out)) in err, err
        assert not out.exists()
    assert not (art / "exp" / "fakerun").exists() and not (run / "sub").exists()
    assert [e["seq"] for e in iter_run(run)] == [0, 1, 2]  # read once each, as before
    code, out, _ = cli(capsys, "list", "--json", "--artifacts", str(art))
    assert code == 0 and [orjson.loads(line)["run_id"] for line in out.splitlines()] == ["run-1"]


def test_a_link_to_a_run_file_is_refused_and_a_link_to_a_plain_file_is_followed(art, tmp_path, capsys):
    run = art / "exp" / "run-1"
    before = (run / "events.jsonl").read_bytes()
    bad = tmp_path / "innocent.jsonl"
    bad.symlink_to(run / "events.000009.jsonl")  # dangling: writing it would add a segment to the run
    refused(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(bad))
    assert not (run / "events.000009.jsonl").exists() and (run / "events.jsonl").read_bytes() == before
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert cli(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(link))[0] == 0
    assert link.is_symlink() and len(real.read_text().splitlines()) == 3


# --- 3. paths that cannot be written are one line, exit 2 ------------------------------------------------------


def test_paths_that_cannot_be_files_are_one_line(art, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long_name = "x" * 300 + ".csv"
    for out, said in (
        (".", "names a folder"),
        ("/", "names a folder"),
        ("", "must name a file"),
        ("newdir/", "names a folder"),
        (str(tmp_path), "it is a folder"),
        (str(tmp_path / long_name), "File name too long"),
        (str(art / "exp" / "run-1" / "events.jsonl" / "x.csv"), "cannot write there"),
    ):
        err = refused(capsys, "export", "run-1", "--artifacts", str(art), "--out", out)
        assert said in err and f"--out {out!r}" in err, err
    err = refused(capsys, "list", "--artifacts", "x" * 300)
    assert "File name too long" in err
    near_limit = tmp_path / ("y" * 250 + ".csv")  # a name the file system takes: so must its partial file
    assert cli(capsys, "export", "run-1", "--artifacts", str(art), "--format", "csv", "--out", str(near_limit))[0] == 0
    assert len(near_limit.read_text().splitlines()) == 4


@pytest.fixture
def shared_art() -> Iterator[Path]:
    """A run in a folder another user may read (pytest's own folders are root's only)."""
    top = Path(tempfile.mkdtemp(prefix="crucible-hostile-"))
    try:
        run = top / "art" / "exp" / "run-1"
        run.mkdir(parents=True)
        (run / "events.jsonl").write_bytes(b"".join(event(i, conflicts=i) for i in range(3)))
        (top / "numba").mkdir()
        (top / "closed").mkdir(mode=0o700)
        for p in (top, *top.rglob("*")):
            if p.name != "closed":
                p.chmod(0o777 if p.is_dir() else 0o666)
        yield top
    finally:
        shutil.rmtree(top)


def test_a_folder_another_user_may_not_enter_is_one_line(shared_art):
    skip_unless_nobody_can_run_this_checkout()
    argv = ["export", "run-1", "--artifacts", str(shared_art / "art"), "--out", str(shared_art / "closed" / "x.jsonl")]
    code = "import sys; from cli import main; sys.exit(main(sys.argv[1:]))"
    nobody = list(NOBODY)
    env = nobody_env(NUMBA_CACHE_DIR=str(shared_art / "numba"), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [*nobody, sys.executable, "-c", code, *argv],
        cwd=shared_art,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("cannot write there: Permission denied")


# --- 4. integers beyond a double's exact range ------------------------------------------------------------------


def test_parquet_keeps_large_integers_exact(tmp_path, capsys):
    run = tmp_path / "art" / "exp" / "run-1"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_bytes(
        event(0, m=2**62, mixed=2**62 + 1, huge=2**64 - 1) + event(1, m=-(2**63), mixed=0.5) + event(2, m=3)
    )
    out = tmp_path / "x.parquet"
    code, _, err = cli(capsys, "export", str(run), "--format", "parquet", "--out", str(out))
    assert code == 0, err
    t = pq.read_table(out)
    assert str(t.schema.field("values.m").type) == "int64"
    assert t.column("values.m").to_pylist() == [2**62, -(2**63), 3]
    assert t.column("values.mixed").to_pylist() == [float(2**62 + 1), 0.5, None]  # the nearest double
    assert t.column("values.huge").to_pylist() == [float(2**64 - 1), None, None]


# --- 5. edits of one spec at once ------------------------------------------------------------------------------


def test_two_edits_at_once_are_both_kept(tmp_path, monkeypatch):
    """B starts its edit while A holds what it read: without a lock B's edit is written and then
    overwritten by A's, made from the text before it."""
    from experiments import specedit

    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n')
    a_read, b_going = threading.Event(), threading.Event()
    real_load, real_lock = specedit._load_doc, getattr(specedit, "locked_file", None)

    def load(path):
        doc = real_load(path)
        if threading.current_thread().name == "A":
            a_read.set()
            assert b_going.wait(timeout=30)
        return doc

    def lock(*a, **k):
        if threading.current_thread().name == "B":
            b_going.set()  # B asks for the lock; it has it once A is done
        return real_lock(*a, **k)

    monkeypatch.setattr(specedit, "_load_doc", load)
    monkeypatch.setattr(specedit, "locked_file", lock, raising=False)
    errors: list[Exception] = []

    def edit(assignment: str, after: threading.Event | None) -> None:
        try:
            if after is not None:
                assert after.wait(timeout=30)
            specedit.set_values(spec, [assignment])
        except (SpecError, OSError, AssertionError) as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        finally:
            b_going.set()

    a = threading.Thread(target=edit, args=("seed=104", None), name="A")
    b = threading.Thread(target=edit, args=("time_budget_s=54", a_read), name="B")
    a.start()
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)
    assert not errors and not a.is_alive() and not b.is_alive()
    text = spec.read_text()
    assert "seed = 104" in text and "time_budget_s = 54" in text, text


def test_an_edit_that_waits_too_long_gives_up_and_changes_nothing(tmp_path, capsys, monkeypatch):
    from actors.files import locked_file
    from experiments import specedit

    spec = tmp_path / "s.toml"
    spec.write_text('name = "s"\n')
    monkeypatch.setattr(specedit, "EDIT_LOCK_S", 0.05)
    with locked_file(spec):
        err = refused(capsys, "set", str(spec), "seed=3")
    assert "not edited: another writer has held it" in err
    assert spec.read_text() == 'name = "s"\n'
    assert cli(capsys, "set", str(spec), "seed=3")[0] == 0 and "seed = 3" in spec.read_text()


# --- 6. partial files of killed exports ------------------------------------------------------------------------


def test_an_export_removes_the_partial_files_of_dead_exports(art, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process (as after a SIGKILL)
    out = tmp_path / "out.jsonl"
    dead = tmp_path / f".out.jsonl.{gone.pid}.partial"
    alive = tmp_path / f".out.jsonl.{os.getppid()}.partial"  # an export still under way: left alone
    other = tmp_path / f".other.jsonl.{gone.pid}.partial"  # another output's: not this export's to judge
    for p in (dead, alive, other):
        p.write_text("half\n")
    assert cli(capsys, "export", "run-1", "--artifacts", str(art), "--out", str(out))[0] == 0
    assert not dead.exists() and alive.exists() and other.exists()
    assert len(out.read_text().splitlines()) == 3
