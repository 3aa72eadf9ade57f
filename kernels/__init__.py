"""Numeric hot paths: numba kernels (CPU, nogil, cache=True) and array-API code.

Importing the package first makes sure numba's ``cache=True`` has somewhere to write: numba
raises at decoration time ("no locator available") when neither ``kernels/__pycache__`` nor
its user-wide cache folder is writable (a read-only install run by a user without a home),
which would fail every command, ``--help`` included. Then ``NUMBA_CACHE_DIR`` is pointed at
a private per-user folder under the temporary folder; when even that cannot be had, the
kernels compile without a cache. A ``NUMBA_CACHE_DIR`` the user set is left as it is.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("kernels")  # kernels sit below the actor runtime: structlog itself

numba_cache: str = "numba's own"
"""Where numba caches the compiled kernels: ``numba's own`` (in-tree or user-wide), ``user``
(``NUMBA_CACHE_DIR`` set by the user), a folder this module chose, or ``none``."""


def _writable(path: Path) -> bool:
    """Whether numba can cache in ``path``: the test numba's locators make (create the
    folder, then a file in it)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _user_wide_cache() -> Path:
    """numba's user-wide cache folder (``appdirs.user_cache_dir`` of ``numba``), found
    without importing numba."""
    home = Path(os.path.expanduser("~"))
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "numba"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home) / "numba" / "Cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "numba"


def _private_temp_cache() -> Path | None:
    """A per-user cache folder under the temporary folder, or None. Only a folder this user
    owns that no one else may write is used: a cache file numba loads is code it runs."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        who = str(uid) if uid is not None else getpass.getuser()
    except (KeyError, OSError, ImportError):
        who = "user"
    try:
        path = Path(tempfile.gettempdir()) / f"crucible-numba-{who}"
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:  # FileNotFoundError: no usable temporary folder at all
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if uid is not None and (st.st_uid != uid or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        return None
    return path if _writable(path) else None


def _compile_without_cache() -> None:
    """Let a ``cache=True`` kernel fall back to no cache where numba finds no cache folder,
    rather than raise at its decoration."""
    from numba.core import dispatcher

    enable = dispatcher.Dispatcher.enable_caching
    if getattr(enable, "_crucible_guard", False):
        return

    def enable_caching(self: Any) -> None:
        try:
            enable(self)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "no locator" not in str(exc):
                raise

    enable_caching._crucible_guard = True  # type: ignore[attr-defined]
    dispatcher.Dispatcher.enable_caching = enable_caching  # type: ignore[method-assign]


def ensure_numba_cache(here: Path | None = None) -> str:
    """Make numba's ``cache=True`` work for the kernels in ``here`` (this package); returns
    what :data:`numba_cache` says. Runs before any kernel module imports numba's caching."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return "user"
    here = Path(__file__).resolve().parent if here is None else here
    if _writable(here / "__pycache__") or _writable(_user_wide_cache()):
        return "numba's own"
    path = _private_temp_cache()
    if path is None:
        _compile_without_cache()
        chosen = "none"
    else:
        os.environ["NUMBA_CACHE_DIR"] = str(path)
        config = sys.modules.get("numba.core.config")
        if config is not None:  # numba read its environment already: have it read it again
            config.reload_config()
        chosen = str(path)
    if structlog.is_configured():  # unconfigured, structlog would print on stdout, amid --json output
        log.info("numba cache moved", reason="no writable numba cache folder", cache=chosen)
    return chosen


numba_cache = ensure_numba_cache()
