"""A daemon's log file (actors/log.py, LogFile): rotated by size, reopened after an outside
rotation, never raising into the code that logged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.log import LogFile


def kept(path: Path, keep: int) -> list[str]:
    """Every line still on disk, oldest first (name.<keep> ... name.1, name)."""
    out: list[str] = []
    for i in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            out += older.read_text().splitlines()
    return out + path.read_text().splitlines()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=40), max_size=80),
    rotate=st.integers(min_value=1, max_value=300),
    keep=st.integers(min_value=1, max_value=4),
)
def test_rotation_keeps_whole_lines_newest_last_and_at_most_keep_old_files(tmp_path_factory, lines, rotate, keep):
    """Property: what is on disk is the newest lines written, whole and in order; no file
    grows past the limit by more than its last line; no more than ``keep`` old files."""
    path = tmp_path_factory.mktemp("log") / "daemon.log"
    f = LogFile(path, rotate_bytes=rotate, keep=keep)
    written = [f"{i} {text}" for i, text in enumerate(lines)]
    for line in written:
        print(line, file=f)  # as structlog's PrintLogger writes: the line, then its newline apart
    f.close()
    on_disk = kept(path, keep)
    assert on_disk == written[len(written) - len(on_disk) :]
    longest = max((len((w + "\n").encode()) for w in written), default=0)
    for p in path.parent.iterdir():
        assert p.stat().st_size < rotate + longest
    assert not path.with_name(f"{path.name}.{keep + 1}").exists()
    total = sum(len((w + "\n").encode()) for w in written)
    if total >= rotate * (keep + 1) + longest * (keep + 1):
        assert len(on_disk) < len(written)  # old lines were dropped, not kept forever


def test_a_file_rotated_from_outside_is_reopened_under_its_name(tmp_path):
    """logrotate's default: rename the file, expect the writer to make a new one."""
    path = tmp_path / "daemon.log"
    f = LogFile(path, rotate_bytes=0, check_s=0)
    f.write("before\n")
    os.rename(path, tmp_path / "daemon.log-20261123")
    f.write("after\n")
    assert (tmp_path / "daemon.log-20261123").read_text() == "before\n"
    assert path.read_text() == "after\n"
    path.unlink()  # removed outright: a new one too
    f.write("again\n")
    assert path.read_text() == "again\n"
    f.close()


def test_a_truncated_file_keeps_being_appended_to(tmp_path):
    """logrotate's copytruncate: the same file, emptied; lines go on at its (new) end."""
    path = tmp_path / "daemon.log"
    f = LogFile(path, rotate_bytes=12, keep=1, check_s=0)
    f.write("one one\n")
    os.truncate(path, 0)
    f.write("two two\n")  # 8 bytes in the file now, not 16: no rotation yet
    assert path.read_text() == "two two\n"
    assert not path.with_name("daemon.log.1").exists()
    f.close()


def test_a_write_that_cannot_land_is_dropped_not_raised(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    f = LogFile(folder / "daemon.log", rotate_bytes=10, check_s=0)
    f.write("kept\n")
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    assert f.write("lost\n") == len("lost\n")  # no exception reaches the logger
    f.flush()
    folder.mkdir()
    f.write("back\n")  # the folder is back: the file is made again
    assert (folder / "daemon.log").read_text() == "back\n"
    f.close()


def test_an_existing_log_counts_towards_the_size(tmp_path):
    """A restarted daemon appends to its old log and rotates it by its whole size."""
    path = tmp_path / "daemon.log"
    path.write_text("x" * 90 + "\n")
    f = LogFile(path, rotate_bytes=100, keep=1)
    f.write("y" * 20 + "\n")
    f.close()
    assert path.with_name("daemon.log.1").read_text() == "x" * 90 + "\n" + "y" * 20 + "\n"
    assert path.read_text() == ""


@pytest.mark.parametrize("rotate, keep", [(-1, 5), (10, 0)])
def test_bad_limits_are_refused(tmp_path, rotate, keep):
    with pytest.raises(ValueError, match="rotate_bytes"):
        LogFile(tmp_path / "daemon.log", rotate_bytes=rotate, keep=keep)
