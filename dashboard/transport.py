"""Connection limits for the dashboard's HTTP server, below the app.

uvicorn bounds neither how many connections it holds nor how long a client may take to send
its request's headers. Any local process, token or not, could then open connections and
trickle header bytes until the process runs out of file descriptors, and the experiments in
the same process (their event files, checkpoints, history) fail with it. Here a connection
past :data:`MAX_CONNECTIONS` makes room by closing the oldest connection still waiting for
its request's headers or the rest of its body (headers and a body come at once from any
client; a login or a request answered 401 needs no token to leave its body unfinished);
only when every open one is busy (a request under way, a websocket) is the new one closed
as it is accepted. A flood of half-sent requests then churns among its own connections, and
a client that sends its request at once (the page, a script with the token) still gets in. A connection whose
request has not all arrived :data:`HEADER_TIMEOUT_S` after it opened (or after its previous
response) is closed: its headers, and its body too (the guard caps bodies at 64 KiB, which a
client sends at once; a body trickled a byte a minute would hold the connection forever).
Upgraded websockets are the websocket protocol's from then on and are not timed.

A websocket whose client stops reading is aborted, not closed (:class:`GuardedWebSocketProtocol`):
a close frame would wait behind the pushes the client never takes, and a plain close waits for
the kernel to hand them over, which for such a client is never. The connection, its slot among
:data:`MAX_CONNECTIONS` and its buffers would then be held for as long as the client keeps
the TCP connection open. Every websocket is pinged: one whose pong has not come
:data:`WS_PING_TIMEOUT_S` after the ping is aborted too, so a client that stopped reading is
noticed even when few pushes go out, and so is a peer that vanished without closing (a laptop
put to sleep, a network gone), which TCP alone would keep for hours.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from actors.log import get_logger

log = get_logger("dashboard.transport")

MAX_CONNECTIONS = 256  # open at once, websockets included; a dashboard has a handful
HEADER_TIMEOUT_S = 10.0  # a browser or client sends its headers at once
LOG_EVERY_S = 10.0
WS_CLOSE_TIMEOUT_S = 5.0  # a websocket whose client does not answer a close frame is aborted after this
WS_PING_INTERVAL_S = 10.0  # each websocket is pinged this long after its last pong...
WS_PING_TIMEOUT_S = 10.0  # ...and aborted when the pong has not come this long after the ping


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two limits of this module (``uvicorn.Config(http=...)``)."""

    max_connections = MAX_CONNECTIONS
    header_timeout_s = HEADER_TIMEOUT_S
    _said_at = float("-inf")  # a flood is logged once every LOG_EVERY_S, not per connection
    refused = 0  # connections closed as accepted, since the process started
    evicted = 0  # connections waiting for their headers closed to make room for a new one

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_at = time.monotonic()
        if len(self.connections) > self.max_connections:
            victim = self._oldest_waiting()
            if victim is None:  # every other connection is busy: this one cannot be served
                GuardedH11Protocol.refused += 1
                self._say("connections refused: too many open, none of them idle")
                transport.close()
                return
            GuardedH11Protocol.evicted += 1
            self._say("connections closed while waiting for their headers: too many open")
            victim._drop()
        self._arm()

    def _say(self, what: str) -> None:
        now = time.monotonic()
        if now - GuardedH11Protocol._said_at >= LOG_EVERY_S:
            GuardedH11Protocol._said_at = now
            log.warning(what, limit=self.max_connections, refused=self.refused, evicted=self.evicted)

    def _waiting(self) -> bool:
        """Open, still HTTP (not a websocket), and waiting for its client: for a request's
        headers (none sent yet, or some but not all, on a new connection or a kept-alive one),
        or for the rest of a request's body. A body is at most 64 KiB, which any client sends
        at once; one still arriving is a client holding the slot (a login, or a request its
        401 answered before the body came, needs no token to do that)."""
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return False
        if self.conn.their_state is h11.SEND_BODY:
            return True
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _oldest_waiting(self) -> GuardedH11Protocol | None:
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c is not self and c._waiting()]
        return min(waiting, key=lambda c: c._armed_at, default=None)

    def _drop(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.connections.discard(self)  # counted out now: connection_lost comes on the next turn of the loop
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on a kept-alive connection has the same time for its headers

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a websocket now
            return
        waiting = self._waiting()
        if waiting or self.conn.their_state is h11.SEND_BODY:
            part = "headers" if waiting else "body"
            log.warning(f"connection closed: request {part} late", client=self.client, after_s=self.header_timeout_s)
            self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol (``uvicorn.Config(ws=...)``) that never waits on a client
    that stopped reading: a close asked for while the transport's writing is paused (its buffer
    full of what the client has not taken) aborts the connection at once, and a closing
    handshake the client does not finish is aborted after :data:`WS_CLOSE_TIMEOUT_S`, as is a
    connection still open that long after the app returned. An abort frees the connection and
    its slot and the kernel's buffer for it at once (the client gets a reset, not a FIN that
    the kernel would keep trying to deliver behind the unsent pushes)."""

    aborted = 0  # connections aborted, since the process started
    ping_interval_s = WS_PING_INTERVAL_S
    ping_timeout_s = WS_PING_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = WS_CLOSE_TIMEOUT_S
        self.ping_interval = self.ping_interval_s  # uvicorn's keepalive, with its own timeout below
        self.ping_timeout = self.ping_timeout_s

    def keepalive_timeout(self) -> None:
        """No pong in time: the client stopped reading or is gone. uvicorn's own answer (a close
        frame, then a close that waits for the buffer to drain) would wait on it forever."""
        self.pong_timer = None
        self.pending_ping_payload = None
        self._abort("no answer to a ping")

    async def send(self, message: Any) -> None:
        stalled = not self.writable.is_set() and not self.disconnected and not self.close_sent
        if message["type"] == "websocket.close" and self.handshake_complete and stalled:
            self._abort("the client stopped reading")
            return
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn's timer closes the transport, and a close waits for the buffer to drain
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._abort, "no answer to the close frame")

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:  # the app is done; the transport's close may wait on a client that reads nothing
            self.loop.call_later(self.close_timeout + 1.0, self._abort, "still open after the app returned")

    def _abort(self, why: str) -> None:
        if self.disconnected or self.transport is None:
            return
        GuardedWebSocketProtocol.aborted += 1
        log.info("websocket connection aborted", why=why, client=self.client)
        self.close_sent = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset: the kernel drops what the client never took, rather than keep trying
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()
