"""Files that several writers share: atomic replacement and advisory locks.

* :func:`atomic_write` writes to a temporary file with a name of its own beside the target,
  fsyncs it, then renames it over the target: a reader sees the old content or the new,
  never half of either, and two writers never share (and steal) one temporary file.
* :func:`replace_file` is that rename, refused when the target exists and is not a regular
  file (a device, a FIFO, a socket, a folder; a link is followed to what it names): a rename
  would put a plain file where ``/dev/null`` or a pipe was. A link to a regular file, or a
  dangling one, is itself replaced (its target is never opened: see
  :func:`dashboard.security.write_token_file`).
* :func:`locked` holds an exclusive ``flock`` on a sidecar ``<name>.lock`` for a
  read-modify-write. ``flock`` locks belong to the open file, so it excludes threads of one
  process as well as other processes. The lock is advisory: only writers that take it are
  serialised. The sidecar stays (deleting it would let two writers lock different inodes).
* :func:`locked_file` locks the file itself, no sidecar, for a file that is edited by
  :func:`atomic_write` (each edit a new inode): it re-takes the lock on the new inode when an
  edit landed while it waited, and gives up after a bounded wait.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class NotRegularFileError(OSError):
    """The path is a device, FIFO or socket (or a link to one): never renamed over, never edited."""


def file_kind(mode: int) -> str:
    """A file type in words, for an error line (``a character device``)."""
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def check_replaceable(path: str | Path) -> None:
    """Refuse ``path`` as the target of a rename unless it is missing or a regular file (a link
    is followed: a link to ``/dev/null`` is refused and kept).

    Raises:
        IsADirectoryError: a folder.
        NotRegularFileError: a device, FIFO or socket.
    """
    try:
        st = os.stat(path)
    except OSError:  # missing, a dangling link, a loop: nothing there that a rename would destroy
        return
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    raise NotRegularFileError(
        errno.EEXIST, f"it is {file_kind(st.st_mode)}, not a regular file; refusing to replace it", str(path)
    )


def replace_file(tmp: str | Path, path: str | Path) -> None:
    """Rename ``tmp`` over ``path``, unless ``path`` is not a regular file (see :func:`check_replaceable`).

    Raises:
        OSError: the rename failed or was refused (``tmp`` is left for the caller to remove).
    """
    check_replaceable(path)
    os.replace(tmp, path)


def atomic_write(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (``mode``: the new file's permissions; by
    default those of the file it replaces, else 0644; the umask is not consulted, because
    reading it means setting it, which would race with other threads creating files).

    Raises:
        OSError: when the folder cannot take the file, or ``path`` is not a regular file
            (:class:`NotRegularFileError`); nothing is left behind.
    """
    path = Path(path)
    check_replaceable(path)  # before anything is written; again at the rename
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
        replace_file(tmp, path)
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


def _flock_within(fd: int, deadline: float) -> bool:
    """Take an exclusive ``flock`` on ``fd`` before ``deadline`` (monotonic); False if it stayed taken."""
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))  # flock has no timed wait; polling keeps the wait bounded
            pause = min(pause * 2, 0.1)


@contextlib.contextmanager
def locked_file(path: str | Path, timeout: float = 10.0) -> Iterator[os.stat_result]:
    """Hold an exclusive ``flock`` on the regular file ``path`` itself for the ``with`` block;
    yields its ``stat``. Writers that replace it by :func:`atomic_write` under this lock are
    serialised: a lock taken on an inode that an edit replaced meanwhile is taken again on the
    new one, so each edit reads the one before it. The file is opened without blocking and
    checked before it is locked: a FIFO or device is refused, never waited on.

    Raises:
        NotRegularFileError / IsADirectoryError: ``path`` is not a regular file.
        TimeoutError: another writer held it for longer than ``timeout`` seconds.
        OSError: it cannot be opened (missing, no permission).
    """
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
            if not stat.S_ISREG(st.st_mode):
                raise NotRegularFileError(errno.EINVAL, f"it is {file_kind(st.st_mode)}, not a regular file", str(path))
            if not _flock_within(fd, deadline):
                raise TimeoutError(
                    errno.ETIMEDOUT, f"another writer has held it for more than {timeout:g} s", str(path)
                )
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                yield st
                return
        finally:
            os.close(fd)  # closing releases the lock
        # an edit renamed a new file over the one we locked while we waited: lock that one
