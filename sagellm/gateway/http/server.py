"""HTTP/1.1 on trio sockets: the gateway's server, in the event loop the pipeline runs in.

Why our own: a general ASGI stack (hypercorn, h11) spends most of a streamed request's CPU on machinery per event
(an ASGI message, an h11 event, a protocol hop and a send per token; `benchmarks/README.md` has the measurements).
This server parses a request head with a few bytes operations, hands the `App` a whole `HttpRequest`, and writes each
reply in as few `send`s as it has ready parts: a plain reply in one, a stream's head with its first events in one,
its last events with the end of the reply in one.

What it keeps of a full server: keep-alive (idle connections closed after `keep_alive_timeout_s`), pipelined
requests (served in order), `Content-Length` and chunked request bodies, `Expect: 100-continue`, HTTP/1.0, size limits
(431 for a head, 413 for a body) and a time limit for a head and a body (408; a new connection that sends nothing is
closed at the same header timeout), 400 for what does not parse (and request smuggling's ambiguous framing) and, at
once, for bytes that cannot start an HTTP/1.x request (TLS, bare LF line ends), a cap on connections (the oldest idle
one closed to make room, else a 503), a client's disconnect cancelling its request, and a graceful stop: no new
connections, idle ones closed at once, requests in flight finished within `graceful_timeout_s`.

The connections themselves are `connection.Connection`; which ones the server holds, `connection_slots`; the bytes
of a head and a reply, `framing`."""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from sagellm.gateway.http.app import App
from sagellm.gateway.http.connection import Connection, close_socket
from sagellm.gateway.http.connection_slots import ServerState, refuse
from sagellm.gateway.http.limits import HttpLimits, connection_cap, raise_fd_limit
from sagellm.gateway.http.port import PortInUse

log = structlog.get_logger("sagellm.gateway")
BACKLOG = 1024  # a burst of new clients queues in the kernel instead of being refused


async def serve_http(
    app: App,
    host: str,
    port: int,
    limits: HttpLimits,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    reuse_port: bool = False,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves `app` until `shutdown_trigger()` returns, then stops gracefully; hands its URL to `task_status` once
    listening (port 0 picks a free one). `reuse_port`: other processes may listen on the same port
    (SO_REUSEPORT: the kernel spreads new connections over them). Raises the process's soft descriptor limit to its
    hard one (`limits.raise_fd_limit`) for room to hold `limits.max_connections` (or the cap derived from it)."""
    listeners = await _listen(host, port, reuse_port)
    server = ServerState(app, limits, connection_cap(limits, raise_fd_limit()))
    try:
        await _serve_listeners(server, listeners, shutdown_trigger, task_status)
    finally:
        for listener in listeners:
            close_socket(listener)


async def _serve_listeners(
    server: ServerState,
    listeners: list[socket.socket],
    shutdown_trigger: Callable[[], Awaitable[Any]],
    task_status: trio.TaskStatus,
) -> None:
    async with trio.open_nursery() as nursery:
        accepting = trio.CancelScope()

        async def accept_all() -> None:
            with accepting:
                async with trio.open_nursery() as accepts:
                    for listener in listeners:
                        accepts.start_soon(_accept, server, listener, nursery)

        nursery.start_soon(accept_all)
        nursery.start_soon(_close_idle_connections, server)
        task_status.started(_url(listeners[0]))
        await shutdown_trigger()
        accepting.cancel()
        for listener in listeners:
            close_socket(listener)
        server.stopping = True
        server.close_all_idle()
        with trio.move_on_after(server.limits.graceful_timeout_s):
            while server.connections:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def _close_idle_connections(server: ServerState) -> None:
    """Closes the connections idle past their timeout (keep-alive, or header for a new one), checked a few times per
    timeout: one task for all, where a timer per request would cost every request a cancel scope."""
    timeout = min(server.limits.keep_alive_timeout_s, server.limits.body_timeout_s)
    while True:
        await trio.sleep(min(1.0, timeout / 4))
        server.close_expired(trio.current_time())


async def _accept(server: ServerState, listener: socket.socket, nursery: trio.Nursery) -> None:
    """Each new connection's task runs in the server's nursery, not the listener's, so stopping to accept does not
    cut the connections being served. A connection is counted from its accept; over the cap it is refused, outside
    the count. Running out of file descriptors (or memory) pauses accepting instead of failing the server."""
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await trio.lowlevel.wait_readable(listener)
            continue
        except OSError as error:
            if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                raise
            log.warning("accept_paused", error=str(error))
            await trio.sleep(0.1)
            continue
        sock.setblocking(False)
        if server.has_room():
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an SSE event goes out when written
            connection = Connection(server, sock)
            server.connections.add(connection)
            nursery.start_soon(connection.run)
        else:
            nursery.start_soon(refuse, server, sock)
        await trio.lowlevel.checkpoint()  # a flood of connections does not hold the loop


async def _listen(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address `host` names (one port for all, when port 0 picks it)."""
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in await trio.socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(listeners) > 1:
                address = (address[0], listeners[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as error:  # taken since `serve` checked it (port.check_port_free)
                if error.errno == errno.EADDRINUSE:
                    raise PortInUse(address[1]) from None
                raise
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
