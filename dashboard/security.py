"""Who may talk to the dashboard, checked once for every request before any route runs.

The dashboard serves experiment data and takes control actions on a loopback port, where
any web page the same person opens can reach it. So, for HTTP and WebSocket alike:

* **Host** must name this server: ``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT`` or
  the configured host with the port (a 400 otherwise). A page on a name that was made to
  resolve to 127.0.0.1 (DNS rebinding) sends its own name and is refused.
* **Origin**, when a request carries one, must be this server's own (``http://`` + Host): a
  403 otherwise, ``null`` included. Browsers always send it on WebSocket handshakes and POSTs,
  so another page (another port of localhost included, which browsers treat as the same site)
  can neither read the push stream nor press the buttons.
* **The token** is needed for everything but the page and its static files: the
  ``Authorization: Bearer <token>`` header (the page, scripts, Prometheus; the scheme in any
  case), else a 401. It is never taken from a cookie (cookies ignore ports: every other web
  server on the host would be sent it) nor from a URL (URLs stay in the browser's history).
  The page gets it by trading a one-time sign-in code (:class:`OneTimeCodes`, the ``#code=``
  of the URL the CLI prints) at ``POST /api/login``, which needs no token, and keeps it in
  its origin's localStorage. A browser cannot put a header on a WebSocket handshake, so
  ``/ws`` also takes ``?ticket=``: a single-use ticket, valid :data:`TICKET_TTL_S`, that
  ``POST /api/ws-ticket`` hands to a holder of the token.
* **Bodies** are capped at :data:`MAX_BODY` bytes (a 413, read no further). A request whose
  client leaves before its body is complete never reaches a route (it is not half a request).

A refused request's body is not read by the guard; the server skips it by its declared
length (a body trickled in slowly is cut off by :mod:`dashboard.transport`). Header values a
refusal quotes are cut to :data:`ECHO_CHARS` characters.

A refused WebSocket handshake is closed before it is accepted: the client sees HTTP 403.
"""

from __future__ import annotations

import fcntl
import hmac
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.files import atomic_write
from actors.log import get_logger
from experiments.validate import brief

log = get_logger("dashboard")

MAX_BODY = 64 * 1024  # the control API takes {"experiment": "<id>"}: a few dozen bytes
# the page and its files hold no data; /api/login takes a one-time code, not the token
PUBLIC_PATHS = frozenset({"/", "/static/plotly.min.js", "/static/app.js", "/static/favicon.svg", "/api/login"})
TICKET_TTL_S = 30.0  # a websocket ticket is used at once by the page that asked for it
MAX_OPEN_CODES = 64  # unused sign-in codes or tickets kept; the oldest goes first
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
ECHO_CHARS = 80  # of a refused Host or Origin, in the answer and the log


class _ClientLeft(Exception):
    """The client disconnected before its request body was complete."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


class OneTimeCodes:
    """Random codes that each work once: :meth:`issue` one, :meth:`take` spends it.

    ``ttl_s`` None keeps a code until it is used (a sign-in link, printed once); otherwise a
    code older than ``ttl_s`` seconds is refused (a websocket ticket). At most ``max_open``
    unused codes are kept, the oldest dropped first, so asking for codes grows nothing.
    Thread-safe: codes are issued by the CLI's thread and spent on the server's."""

    def __init__(self, ttl_s: float | None = None, max_open: int = MAX_OPEN_CODES, clock: Any = None) -> None:
        self.ttl_s, self.max_open = ttl_s, max_open
        self.clock = clock or time.monotonic
        self._open: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self) -> str:
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._open[code] = self.clock()
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return code

    def take(self, given: str | None) -> bool:
        """True once per issued code (within ``ttl_s``); False for anything else."""
        if not given or len(given) > 64:
            return False
        with self._lock:
            for code in list(self._open):
                if token_matches(given, code):
                    issued = self._open.pop(code)
                    return self.ttl_s is None or self.clock() - issued <= self.ttl_s
        return False


def allowed_hosts(hosts: Iterable[str], port: int) -> frozenset[str]:
    """The Host header values this server answers to (lower case): the loopback names and
    ``hosts`` (the configured host, the bound address), each with the port."""
    names = {*LOOPBACK_NAMES, *(f"[{h}]" if ":" in h and not h.startswith("[") else h for h in hosts)}
    names = {n.lower() for n in names}
    out = {f"{n}:{port}" for n in names}
    if port == 80:  # browsers leave the default port out of Host
        out |= names
    return frozenset(out)


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison; any absent or malformed value is simply no match."""
    if not given:
        return False
    try:
        return hmac.compare_digest(given.encode(), token.encode())
    except UnicodeEncodeError:
        return False


def presented_token(headers: Headers) -> str | None:
    """The token a request carries: its bearer header's, else None."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":  # an auth scheme is case-insensitive (RFC 9110 11.1)
        return value.strip()
    return None


def kept_token(path: Path) -> str | None:
    """The token a lab daemon wrote before a restart, when it can be trusted: a regular file
    (not a link) owned by this user, readable by nobody else, holding one well-formed token.
    Clients keep working across a crash-restart; anything doubtful gives None (a new token)."""
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            return None
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    ok = len(token) == len(new_token()) and all(c.isalnum() or c in "-_" for c in token)
    return token if ok else None


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` readable by its owner only (0600), never through a link.

    :func:`actors.files.atomic_write` creates a new file beside ``path`` (``O_EXCL``, mode
    0600 from the start) and renames it over ``path``: a symlink planted at ``path`` is
    replaced itself, its target is never opened, and a reader never sees half a token.

    Raises:
        OSError: when the folder cannot take the file, or ``path`` is a directory.
    """
    if path.is_symlink():
        log.warning("replacing a symlink at the token file's place; its target is left alone", path=str(path))
    elif path.is_dir():
        raise IsADirectoryError(
            f"the dashboard's token file {path} is a directory, not a file: remove it (a dashboard writes "
            "its token there), or use another --artifacts folder",
        )
    atomic_write(path, (token + "\n").encode(), mode=0o600)


def _open_lock(lock: Path) -> int:
    """The dashboards' lock file, opened never through a link; something else planted at its
    place (a link, a folder) is refused with a message that names it, not a bare errno."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if lock.is_symlink() or lock.is_dir():
            kind = "a symlink" if lock.is_symlink() else "a directory"
            raise OSError(
                f"the dashboard's lock file {lock} is {kind}, not a file: it is never used through a link "
                "or replaced; remove it (no dashboard may be serving this folder), or use another --artifacts folder"
            ) from None
        raise OSError(f"cannot open the dashboard's lock file {lock}: {exc.strerror or exc}") from None


class TokenClaim:
    """The token of the dashboards that serve one artifacts folder at once, and this dashboard's
    hold on it: a shared ``flock`` on ``<token file>.lock``, kept until :meth:`release`.

    The first dashboard on a folder (no other holds the lock) takes a new token and writes the
    token file, or keeps the one it finds when ``keep`` (a lab daemon, whose clients hold it
    across a restart). A dashboard that starts while another serves the same folder (a second
    ``crucible run --dashboard``, a plain run beside a daemon) takes the file's token instead of
    writing its own over it: the file stays good for every dashboard that is up, and the first
    one's users are not locked out. The first takes the lock exclusively while it decides and
    writes the file, so a second never reads one half decided. When the others are up but the
    file is gone or doubtful (deleted, chmod 644, a link), their token is nowhere to be learnt:
    this one refuses to start and leaves the file alone, rather than lock their users out.

    Raises:
        OSError: the folder cannot take the lock file or the token file, something other than a
            file is at the lock file's place, or others serve the folder with no trusted token file.
    """

    def __init__(self, path: Path, keep: bool = False) -> None:
        lock = path.with_name(path.name + ".lock")
        self._fd: int | None = _open_lock(lock)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:  # another dashboard serves this folder: its file, once written
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # (a shared lock waits out an exclusive one only)
                alone = False
            kept = kept_token(path) if keep or not alone else None
            if kept is None and not alone:  # the others' token is nowhere this one can trust: never mint one
                raise OSError(
                    f"another dashboard serves {path.parent} (it holds {lock.name}), but its token file {path} "
                    "is missing or cannot be trusted (it must be a regular file of this user's with mode 0600, "
                    "not a link): this dashboard cannot learn that dashboard's token, and a new one would lock "
                    "its users out. Stop the other dashboards on this folder, or put their token back in the "
                    "file (chmod 600), or use another --artifacts folder"
                )
            self.token = kept or new_token()
            if kept is None:  # alone: this dashboard's token is the folder's now
                write_token_file(path, self.token)
            if alone:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # held while this dashboard serves
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of the folder's token (the file stays: a daemon's clients read it across restarts)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _json(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = orjson.dumps({"error": message})
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class Guard:
    """ASGI middleware that applies the checks in this module's docs to every request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: Iterable[str],
        port: int,
        token: str,
        tickets: OneTimeCodes | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.app = app
        self.hosts = allowed_hosts(hosts, port)
        self.token = token
        self.tickets = tickets  # the websocket's single-use tickets (POST /api/ws-ticket)
        self.max_body = max_body

    def refusal(self, scope: Scope) -> tuple[int, str] | None:
        """Why this request is refused (status, message), or None to let it through."""
        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            known = ", ".join(sorted(self.hosts))
            return 400, f"Host {brief(host, ECHO_CHARS)!r} is not this dashboard; use one of {known}"
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            shown = brief(origin, ECHO_CHARS)
            return 403, f"cross-origin request from {shown!r} refused; the dashboard serves its own page only"
        if scope["path"] not in PUBLIC_PATHS and not self.authorised(scope, headers):
            if presented_token(headers):  # a token, not this dashboard's: say so, or a stale one reads as none sent
                return 401, (
                    "the token sent is not this dashboard's (another dashboard's, or from before a restart of a "
                    "plain run?): send the contents of this dashboard's <artifacts>/dashboard.token"
                )
            return 401, (
                "this needs the dashboard token: send 'Authorization: Bearer <token>' with the contents of "
                "<artifacts>/dashboard.token, or open the sign-in link that crucible run --dashboard or "
                "crucible lab serve prints"
            )
        return None

    def authorised(self, scope: Scope, headers: Headers) -> bool:
        if token_matches(presented_token(headers), self.token):
            return True
        if scope["type"] == "websocket" and self.tickets is not None:  # a browser: a ticket, never the token
            ticket = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("ticket")
            return ticket is not None and len(ticket) == 1 and self.tickets.take(ticket[0])
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            log.warning(
                "dashboard request refused", status=refused[0], why=refused[1], path=scope["path"], kind=scope["type"]
            )
        if scope["type"] == "websocket":
            if refused is not None:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
            await self.app(scope, receive, send)
            return
        if refused is None:
            try:
                body = await self._read_body(scope, receive)
            except _ClientLeft:
                log.info("dashboard request dropped: the client left before its body was complete", path=scope["path"])
                return
            if body is None:
                refused = 413, f"request body over {self.max_body} bytes"
            else:
                await self.app(scope, _replay(body, receive), send)
                return
        await _respond(send, *_json(*refused))

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is over the cap (the rest is not read).

        Raises:
            _ClientLeft: the client disconnected before the last chunk.
        """
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                raise _ClientLeft
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "MAX_BODY",
    "Guard",
    "OneTimeCodes",
    "TokenClaim",
    "allowed_hosts",
    "new_token",
    "presented_token",
    "token_matches",
    "write_token_file",
]
