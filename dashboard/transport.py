"""Connection limits for the dashboard's HTTP server, below the app.

uvicorn bounds neither how many connections it holds nor how long a client may take to send
its request's headers. Any local process, token or not, could then open connections and
trickle header bytes until the process runs out of file descriptors, and the experiments in
the same process (their event files, checkpoints, history) fail with it. Here each
connection past :data:`MAX_CONNECTIONS` is closed as it is accepted, and a connection whose
request has not all arrived :data:`HEADER_TIMEOUT_S` after it opened (or after its previous
response) is closed: its headers, and its body too (the guard caps bodies at 64 KiB, which a
client sends at once; a body trickled a byte a minute would hold the connection forever).
Upgraded websockets are the websocket protocol's from then on and are not timed.
"""

from __future__ import annotations

import asyncio
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from actors.log import get_logger

log = get_logger("dashboard.transport")

MAX_CONNECTIONS = 256  # open at once, websockets included; a dashboard has a handful
HEADER_TIMEOUT_S = 10.0  # a browser or client sends its headers at once
LOG_EVERY_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two limits of this module (``uvicorn.Config(http=...)``)."""

    max_connections = MAX_CONNECTIONS
    header_timeout_s = HEADER_TIMEOUT_S
    _said_at = float("-inf")  # a flood is logged once every LOG_EVERY_S, not per connection
    refused = 0  # connections closed as accepted, since the process started

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            GuardedH11Protocol.refused += 1
            now = time.monotonic()
            if now - GuardedH11Protocol._said_at >= LOG_EVERY_S:
                GuardedH11Protocol._said_at = now
                log.warning("connections refused: too many open", limit=self.max_connections, refused=self.refused)
            transport.close()
            return
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on a kept-alive connection has the same time for its headers

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a websocket now
            return
        state = self.conn.their_state
        waiting = state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting or state is h11.SEND_BODY:
            part = "headers" if waiting else "body"
            log.warning(f"connection closed: request {part} late", client=self.client, after_s=self.header_timeout_s)
            self.transport.close()
