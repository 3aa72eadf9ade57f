"""actors.files: atomic replacement and the advisory lock."""

import os
import threading

import pytest

import actors.files
from actors.files import atomic_write, locked


def test_atomic_write_replaces_keeps_the_mode_and_leaves_nothing_behind(tmp_path):
    p = tmp_path / "state.json"
    atomic_write(p, b"one")
    assert p.read_bytes() == b"one" and p.stat().st_mode & 0o777 == 0o644
    p.chmod(0o600)
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and p.stat().st_mode & 0o777 == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_replace_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    p.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(actors.files.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, b"new")
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_locked_excludes_other_threads(tmp_path):
    p = tmp_path / "shared.json"
    inside, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first():
        with locked(p):
            inside.set()
            release.wait(10)

    def second():
        inside.wait(10)
        with locked(p):
            second_in.set()

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start()
    t2.start()
    assert inside.wait(10)
    assert not second_in.wait(0.2)  # held off while the first holds the lock
    release.set()
    assert second_in.wait(10)
    t1.join()
    t2.join()
    assert os.path.exists(tmp_path / "shared.json.lock")
