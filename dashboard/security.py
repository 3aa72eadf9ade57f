"""Who may talk to the dashboard, checked once for every request before any route runs.

The dashboard serves experiment data and takes control actions on a loopback port, where
any web page the same person opens can reach it. So, for HTTP and WebSocket alike:

* **Host** must name this server: ``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT`` or
  the configured host with the port (a 400 otherwise). A page on a name that was made to
  resolve to 127.0.0.1 (DNS rebinding) sends its own name and is refused.
* **Origin**, when a request carries one, must be this server's own (``http://`` + Host): a
  403 otherwise, ``null`` included. Browsers always send it on WebSocket handshakes and POSTs,
  so another page (another port of localhost included, which cookies treat as the same site)
  can neither read the push stream nor press the buttons.
* **The token** is needed for everything but the page's static files: the ``Authorization:
  Bearer <token>`` header (scripts, Prometheus) or the cookie the page's first load sets
  (a 401 otherwise). The cookie is HttpOnly and SameSite=Strict, named per port because
  browsers share cookies between the ports of one host.
* **Bodies** are capped at :data:`MAX_BODY` bytes (a 413, read no further). A request whose
  client leaves before its body is complete never reaches a route (it is not half a request).

A refused request's body is not read by the guard; the server skips it by its declared
length (a body trickled in slowly is cut off by :mod:`dashboard.transport`). Header values a
refusal quotes are cut to :data:`ECHO_CHARS` characters.

A refused WebSocket handshake is closed before it is accepted: the client sees HTTP 403.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

import orjson
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.files import atomic_write
from actors.log import get_logger
from experiments.validate import brief

log = get_logger("dashboard")

MAX_BODY = 64 * 1024  # the control API takes {"experiment": "<id>"}: a few dozen bytes
PUBLIC_PATHS = frozenset({"/", "/static/plotly.min.js", "/static/app.js", "/static/favicon.svg"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
ECHO_CHARS = 80  # of a refused Host or Origin, in the answer and the log


class _ClientLeft(Exception):
    """The client disconnected before its request body was complete."""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def cookie_name(port: int) -> str:
    """One cookie per port: cookies ignore ports, two Labs on one machine must not clash."""
    return f"crucible_token_{port}"


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


def presented_token(headers: Headers, cookie: str) -> str | None:
    """The token a request carries: the bearer header first, else the page's cookie."""
    auth = headers.get("authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return cookie_parser(headers.get("cookie", "")).get(cookie)


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
    atomic_write(path, (token + "\n").encode(), mode=0o600)


def _json(status: int, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = orjson.dumps({"error": message})
    return status, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


class Guard:
    """ASGI middleware that applies the checks in this module's docs to every request."""

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str], port: int, token: str, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.hosts = allowed_hosts(hosts, port)
        self.token = token
        self.cookie = cookie_name(port)
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
        if scope["path"] not in PUBLIC_PATHS and not self.authorised(headers):
            return 401, (
                "this needs the dashboard token: open the URL with ?token=... that crucible run --dashboard "
                "or crucible lab serve prints, or send 'Authorization: Bearer <token>' (see dashboard.token)"
            )
        return None

    def authorised(self, headers: Headers) -> bool:
        return token_matches(presented_token(headers, self.cookie), self.token)

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
    "allowed_hosts",
    "cookie_name",
    "new_token",
    "presented_token",
    "token_matches",
    "write_token_file",
]
