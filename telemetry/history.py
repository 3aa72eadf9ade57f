"""Where the history lives, and the one way to open it: :func:`open_history`.

Every writer (the Recorder) and every reader (queries of a stopped experiment, ``crucible
list``, ``export``, ``compare``, ``monitor --summary``, the experiment export) opens the history
through :func:`open_history`, so each reads what the others wrote, wherever that is.

A *target* names the history:

* ``None`` (the default): the environment variable ``CRUCIBLE_HISTORY`` if it is set and not
  empty (``CRUCIBLE_HISTORY=`` counts as unset, as shells write "no value"), else the embedded
  SQLite file ``<artifacts>/history.sqlite3``. An empty or blank target given explicitly
  (``--history ''``) is an error, not the default: it names nothing;
* ``"postgresql://user:password@host:port/database?..."`` (or ``postgres://``): a PostgreSQL
  database (:mod:`telemetry.store_pg`; needs the ``postgres`` extra). libpq's parameters go
  in the query string (``?sslmode=require&connect_timeout=10``);
* ``"sqlite:///relative/path.sqlite3"``, ``"sqlite:////absolute/path.sqlite3"`` or a plain
  path: a SQLite file (:mod:`telemetry.store`).

Both stores answer every query the same way (:class:`~telemetry.batchstore.BatchStore`).
Logs and error messages show a target through :func:`describe_history`: a URL's password
is masked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from telemetry.batchstore import (
    BatchStore,
    HistoryConfigError,
    HistoryConnectError,
    HistoryDamaged,
    HistoryError,
    HistoryGone,
    HistoryUnavailable,
)
from telemetry.store import DB_NAME, HistoryStore
from telemetry.store_pg import CONNECT_TIMEOUT_S, PgHistoryStore, is_postgres_url, mask_url

__all__ = [
    "ENV",
    "BatchStore",
    "HistoryConfigError",
    "HistoryConnectError",
    "HistoryDamaged",
    "HistoryError",
    "HistoryGone",
    "HistoryTarget",
    "HistoryUnavailable",
    "describe_history",
    "is_postgres_url",
    "open_history",
    "prepare_history",
    "resolve_history",
]

ENV = "CRUCIBLE_HISTORY"
"""The environment variable that names the history when no target is given."""

HistoryTarget = str | Path | None


def resolve_history(target: HistoryTarget, artifacts: str | Path | None = None) -> str | Path:
    """The history a target names: a PostgreSQL URL (a ``str``) or a SQLite file (a ``Path``).

    Raises:
        HistoryConfigError: an unknown URL scheme, an empty target, or no target and no
            artifacts folder.
    """
    if target is None:
        target = os.environ.get(ENV) or None  # empty: unset (a blank one is refused below)
    if target is None:
        if artifacts is None:
            raise HistoryConfigError(f"no history named: give a target, set {ENV}, or give an artifacts folder")
        return Path(artifacts) / DB_NAME
    if isinstance(target, Path):
        return target
    if not isinstance(target, str):
        raise HistoryConfigError(f"a history target is a URL or a path, got {type(target).__name__} {target!r}")
    if not target.strip():  # would silently mean the default, or a file named by blanks in the cwd
        raise HistoryConfigError(
            f"empty history target {target!r}: give a postgresql:// URL, a sqlite:/// URL or a file path, "
            "or leave it out for the default"
        )
    if is_postgres_url(target):
        return target
    if target.startswith("sqlite:"):
        if not target.startswith("sqlite:///") or len(target) == len("sqlite:///"):
            raise HistoryConfigError(
                f"bad SQLite history URL {target!r}: use sqlite:///relative/file or sqlite:////absolute/file"
            )
        return Path(target[len("sqlite:///") :])
    if "://" in target:
        scheme = urlsplit(target).scheme
        raise HistoryConfigError(
            f"unknown history URL scheme {scheme!r} in {mask_url(target)}: "
            "use postgresql://user@host:port/database, sqlite:///file or a file path"
        )
    return Path(target)


def describe_history(target: HistoryTarget, artifacts: str | Path | None = None) -> str:
    """The history a target names, fit for a log line or a message (a password masked)."""
    try:
        where = resolve_history(target, artifacts)
    except HistoryConfigError:
        return mask_url(str(target))
    return mask_url(where) if isinstance(where, str) else str(where)


def open_history(
    target: HistoryTarget = None,
    *,
    artifacts: str | Path | None = None,
    readonly: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> BatchStore:
    """Open the history a target names (see the module docs); a writer creates or migrates
    its schema, a reader (``readonly``) never writes.

    Raises:
        HistoryConfigError: a malformed target or URL, or a PostgreSQL URL without psycopg.
        HistoryConnectError: the server refused, timed out (``connect_timeout`` seconds) or
            rejected the credentials; the message names the URL, its password masked.
        FileNotFoundError: ``readonly`` and there is no history there yet.
        sqlite3.Error: the SQLite file is not a database.
    """
    with _naming_the_environment(target):
        where = resolve_history(target, artifacts)
        if isinstance(where, str):
            return PgHistoryStore(where, readonly=readonly, connect_timeout=connect_timeout)
        return HistoryStore(where, readonly=readonly)


@contextlib.contextmanager
def _naming_the_environment(target: HistoryTarget) -> Iterator[None]:
    """A history named by ``$CRUCIBLE_HISTORY`` fails with a message that says so: the user
    gave no target, and must learn where the URL came from."""
    try:
        yield
    except HistoryError as exc:
        if target is None and os.environ.get(ENV):
            raise type(exc)(f"${ENV}: {exc}") from None
        raise


def prepare_history(target: HistoryTarget, artifacts: str | Path | None = None) -> str | Path:
    """Resolve a target once for a host that opens it many times (a Lab: one Recorder per run),
    and prove it usable now, rather than at its first run: a server reachable, a SQLite file
    that opens for writing (its folder there, a database of ours); the schema created or migrated.

    Raises:
        HistoryConfigError, HistoryConnectError: as :func:`open_history`.
    """
    with _naming_the_environment(target):
        where = resolve_history(target, artifacts)
        open_history(where).close()
    return where
