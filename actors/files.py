"""Files that several writers share: atomic replacement and an advisory lock.

* :func:`atomic_write` writes to a temporary file with a name of its own beside the target,
  fsyncs it, then renames it over the target: a reader sees the old content or the new,
  never half of either, and two writers never share (and steal) one temporary file.
* :func:`locked` holds an exclusive ``flock`` on a sidecar ``<name>.lock`` for a
  read-modify-write. ``flock`` locks belong to the open file, so it excludes threads of one
  process as well as other processes. The lock is advisory: only writers that take it are
  serialised. The sidecar stays (deleting it would let two writers lock different inodes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def atomic_write(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (``mode``: the new file's permissions; by
    default those of the file it replaces, else 0644; the umask is not consulted, because
    reading it means setting it, which would race with other threads creating files).

    Raises:
        OSError: when the folder cannot take the file (nothing is left behind).
    """
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (on ``<path>.lock``) for the ``with`` block.

    Raises:
        OSError: when the lock file cannot be created.
    """
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
