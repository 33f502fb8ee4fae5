"""Which connections one server holds (`ServerState`): at most its cap, the idle ones in the order they went idle
(closed at their timeout, or the oldest to make room for a new client), and the 503 a client over the cap gets.

Why a cap: every connection holds a file descriptor, and the engine, ZeroMQ sockets and logs of the same process need
theirs. Without one, 22,000 connections that never send a byte take every descriptor and real requests time out.
Why the oldest idle connection is closed to make room before anyone is refused: connections that never send a request
would otherwise hold every slot until their header timeout and turn real clients away; nginx does the same
(`ngx_drain_connections` closes the oldest "reusable" connections, idle or awaiting a request, when it runs out).
The client of an idle connection loses nothing it asked for: a pooled client opens another, as after a
keep-alive timeout. Only when every slot holds a request in progress is a new client answered 503."""

from __future__ import annotations

import socket
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import trio

from sagellm.gateway.http.app import App
from sagellm.gateway.http.framing import error_reply, reply_bytes
from sagellm.gateway.http.limits import READ_BYTES, HttpLimits

LINGER_S = 1.0  # how long a refused connection is read from before it closes
MAX_LINGERING = 64  # refused connections lingering at once (each holds a descriptor); beyond, closed at once


class Connection(Protocol):
    """What the slots ask of a connection (`connection.Connection`)."""

    @property
    def reclaimable(self) -> bool:
        """Idle and holding nothing a client waits for: it may be closed to make room."""
        ...

    @property
    def idle_timeout_s(self) -> float: ...

    def close(self) -> None: ...


@dataclass
class ServerState:
    """What the connections of one server share: its app, limits and cap, the open connections (counted from their
    accept, so a burst cannot overshoot the cap), the idle ones oldest first, whether it stops."""

    app: App
    limits: HttpLimits
    max_connections: int
    connections: set[Connection] = field(default_factory=set)
    idle: OrderedDict[Connection, float] = field(default_factory=OrderedDict)  # waiting for a request: since when
    lingering: int = 0  # refused connections still being read from
    stopping: bool = False

    def has_room(self) -> bool:
        """Whether a new connection may be served: the server is under its cap, or gets under it by closing the
        connection idle the longest."""
        if len(self.connections) < self.max_connections:
            return True
        oldest = next((connection for connection in self.idle if connection.reclaimable), None)
        if oldest is None:
            return False
        oldest.close()
        return True

    def close_expired(self, now: float) -> None:
        """Closes the idle connections past their timeout: the keep-alive timeout for one that has served a request,
        the header timeout for one that has not. Walks from the oldest and stops at the first younger than the
        shorter timeout: a check reads the connections idle past it, not every connection."""
        shortest = min(self.limits.keep_alive_timeout_s, self.limits.body_timeout_s)
        expired = []
        for connection, since in self.idle.items():
            idle_for = now - since
            if idle_for < shortest:
                break
            if idle_for >= connection.idle_timeout_s:
                expired.append(connection)
        self._close(expired)

    def close_all_idle(self) -> None:
        """When the server stops: the idle connections close now (a busy one after its reply)."""
        self._close(list(self.idle))

    @staticmethod
    def _close(connections: list[Connection]) -> None:
        for connection in connections:
            if connection.reclaimable:
                connection.close()


async def refuse(server: ServerState, sock: socket.socket) -> None:
    """Answers a connection over the cap with a 503 (OpenAI's error body, `Retry-After`) and closes it; it never takes
    a slot. The reply goes out in one non-blocking send: it fits in a new socket's empty buffer. Then the socket is shut
    for writing and read from, until the client closes or for `LINGER_S`, before it closes: closing with bytes of the
    request unread would send a reset, which can destroy the 503 before the client reads it."""
    message = f"the server holds its limit of {server.max_connections} connections; retry shortly"
    reply = reply_bytes(error_reply(503, message, "too_many_connections"), keep_alive=False, head_only=False)
    lingers = server.lingering < MAX_LINGERING
    server.lingering += 1 if lingers else 0
    try:
        _drain(sock)
        sock.send(reply)
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER_S if lingers else 0):
            while _drain(sock):
                await trio.lowlevel.wait_readable(sock)
    except (OSError, trio.ClosedResourceError):
        pass
    finally:
        server.lingering -= 1 if lingers else 0
        sock.close()


def _drain(sock: socket.socket) -> bool:
    """Reads and drops what has arrived; whether the client may still send more (it has not closed)."""
    try:
        for _ in range(16):  # a client that keeps sending cannot hold the loop here
            if not sock.recv(READ_BYTES):
                return False
    except BlockingIOError:
        pass
    return True
