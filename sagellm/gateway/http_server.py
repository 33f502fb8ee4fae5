"""HTTP/1.1 on trio sockets: the gateway's server, in the event loop the pipeline runs in.

Why our own: a general ASGI stack (hypercorn, h11) spends most of a streamed request's CPU on machinery per event
(an ASGI message, an h11 event, a protocol hop and a send per token; `benchmarks/README.md` has the measurements).
This server parses a request head with a few bytes operations, hands the `App` a whole `HttpRequest`, and writes each
reply in as few `send`s as it has ready parts: a plain reply in one, a stream's head with its first events in one,
its last events with the end of the reply in one.

What it keeps of a full server: keep-alive (idle connections closed after `keep_alive_timeout_s`), pipelined
requests (served in order), `Content-Length` and chunked request bodies, `Expect: 100-continue`, HTTP/1.0, size limits
(431 for a head, 413 for a body) and a time limit for a body (408), 400 for what does not parse (and request
smuggling's ambiguous framing), a client's disconnect cancelling its request, and a graceful stop: no new
connections, idle ones closed at once, requests in flight finished within `graceful_timeout_s`.

Each connection has a reader task that owns the socket's receiving side: it buffers what arrives and, at end of
stream, cancels the request being served, so a client that leaves stops its request wherever it is (queued, running,
streaming). The connection's own task parses, runs the handler and writes. Sockets are plain non-blocking sockets
waited on with trio's `wait_readable` / `wait_writable`: a write that goes out at once costs no turn of the event
loop (trio's socket streams yield after every send)."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, unquote

import structlog
import trio

from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import App, EventStream, HttpRequest, LastEvents, Response, error_response, frame

log = structlog.get_logger("sagellm.gateway")
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is a 431
READ_BYTES = 64 * 1024
KEEP_ALIVE_TIMEOUT_S = 75.0  # as long as common proxies keep theirs (nginx: 75 s): a pooled connection is not cut
BODY_TIMEOUT_S = 30.0  # a head or body still arriving after this is given up: a slow client cannot hold a request
BACKLOG = 1024  # a burst of new clients queues in the kernel instead of being refused
STREAM_HEADERS = b"content-type: text/event-stream\r\ncache-control: no-cache\r\n"


@dataclass
class HttpLimits:
    max_body_bytes: int
    body_timeout_s: float = BODY_TIMEOUT_S
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S
    graceful_timeout_s: float = 30.0


class _Close(Exception):
    """The connection ends here: a malformed request (answered first, when `response` is given) or a client gone."""

    def __init__(self, response: Response | None = None) -> None:
        self.response = response


@dataclass
class _Server:
    app: App
    limits: HttpLimits
    connections: set[_Connection] = field(default_factory=set)
    stopping: bool = False


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
    (SO_REUSEPORT: the kernel spreads new connections over them)."""
    listeners = await _listen(host, port, reuse_port)
    server = _Server(app, limits)
    try:
        await _serve_listeners(server, listeners, shutdown_trigger, task_status)
    finally:
        for listener in listeners:
            _close(listener)


async def _serve_listeners(
    server: _Server,
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
            _close(listener)
        server.stopping = True
        for connection in list(server.connections):
            connection.close_if_idle_since(float("inf"))  # idle ones close now; a busy one after its reply
        with trio.move_on_after(server.limits.graceful_timeout_s):
            while server.connections:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def _close_idle_connections(server: _Server) -> None:
    """Closes the kept-alive connections idle past the keep-alive timeout, checked a few times per timeout: one
    task for all, where a timer per request would cost every request a cancel scope."""
    timeout = server.limits.keep_alive_timeout_s
    while True:
        await trio.sleep(min(1.0, timeout / 4))
        before = trio.current_time() - timeout
        for connection in list(server.connections):
            connection.close_if_idle_since(before)


async def _accept(server: _Server, listener: socket.socket, nursery: trio.Nursery) -> None:
    """Each new connection's task runs in the server's nursery, not the listener's, so stopping to accept does not
    cut the connections being served. Running out of file descriptors (or memory) pauses accepting instead of
    failing the server."""
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
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # an SSE event goes out when written
        nursery.start_soon(_Connection(server, sock).run)
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
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _close(sock: socket.socket) -> None:
    """Closes a socket a task may be waiting on (the waiter gets ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Connection:
    def __init__(self, server: _Server, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.limits = server.limits
        self.buffer = bytearray()
        self.eof = False
        self.arrived = trio.Event()  # fired when bytes (or the end) arrive; replaced after each wait
        self.room = trio.Event()  # set when a request was taken out of the buffer (the reader may read on)
        self.idle_since: float | None = None  # while waiting for a next request: since when
        self.scope = trio.CancelScope()  # the connection's tasks: cancelled when it closes from outside

    async def run(self) -> None:
        self.server.connections.add(self)
        try:
            with self.scope:
                await self._run()
        finally:
            self.server.connections.discard(self)
            _close(self.sock)

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read)
            try:
                await self._serve()
            except _Close as close:
                if close.response is not None:
                    await self._send_quietly(_reply_bytes(close.response, keep_alive=False, head_only=False))
            except Exception:  # a bug in a reply's stream: this connection ends, the server goes on
                log.exception("connection_failed")
            nursery.cancel_scope.cancel()

    def close_if_idle_since(self, before: float) -> None:
        """Closes the connection if it has waited for a next request since before `before` (the keep-alive timeout;
        infinity when the server stops)."""
        if self.idle_since is not None and self.idle_since < before and not self.buffer:
            self.scope.cancel()

    # -- receiving ------------------------------------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            while True:
                while len(self.buffer) > MAX_HEAD_BYTES + self.limits.max_body_bytes:  # pipelined ahead: wait
                    self.room = trio.Event()
                    await self.room.wait()
                await trio.lowlevel.wait_readable(self.sock)  # waits first: a read right after a request finds nothing
                try:
                    data = self.sock.recv(READ_BYTES)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self.buffer += data
                self._fire()
        except (OSError, trio.ClosedResourceError):
            pass
        self.eof = True
        self._fire()
        self.scope.cancel()  # the client left: the request being served stops, wherever it is

    def _fire(self) -> None:
        self.arrived.set()
        self.arrived = trio.Event()

    async def _wait_arrival(self) -> None:
        await self.arrived.wait()

    async def _more(self, deadline: float) -> None:
        """Waits for more bytes; the end of stream closes the connection, the deadline answers 408."""
        if self.eof:
            raise _Close()
        with trio.move_on_at(deadline):
            await self._wait_arrival()
            return
        raise _Close(_error(408, f"the request did not arrive within {self.limits.body_timeout_s:g} s", "timeout"))

    # -- serving --------------------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while not self.server.stopping:
            if self.buffer:  # pipelined: the next request is here already; others get a turn first
                await trio.lowlevel.checkpoint()
            else:  # (the server closes the connection if this lasts past the keep-alive timeout, or it stops)
                self.idle_since = trio.current_time()
                while not self.buffer and not self.eof:
                    await self._wait_arrival()
                self.idle_since = None
                if not self.buffer:
                    return
            request, keep_alive, head_only = await self._request()
            self.room.set()
            reply_keeps = keep_alive and not self.server.stopping
            result = await self.server.app.handle(request)
            if isinstance(result, EventStream):
                reply_keeps = await self._stream(result, reply_keeps, request.version)
            else:
                await self._send(_reply_bytes(result, reply_keeps, head_only))
            if not reply_keeps or self.eof:
                return

    async def _request(self) -> tuple[HttpRequest, bool, bool]:
        """The next request, its body whole: (request, keep the connection alive after it, a HEAD)."""
        deadline = trio.current_time() + self.limits.body_timeout_s
        while (end := self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)) < 0:
            if len(self.buffer) >= MAX_HEAD_BYTES + 4:
                raise _Close(_error(431, f"the request head is over {MAX_HEAD_BYTES} bytes"))
            await self._more(deadline)
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        method, target, version, headers = _parse_head(head)
        keep_alive = _keeps_alive(version, headers.get("connection", ""))
        body = await self._body(headers, version, deadline)
        path, _, query = target.partition("?")
        query_params = dict(parse_qsl(query)) if query else {}
        request = HttpRequest(method, unquote(path), headers, query_params, body, version=version)
        return request, keep_alive, method == "HEAD"

    async def _body(self, headers: dict[str, str], version: str, deadline: float) -> bytes:
        limit = self.limits.max_body_bytes
        chunked = "transfer-encoding" in headers
        if chunked and (headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers):
            raise _Close(_error(400, "only `Transfer-Encoding: chunked` alone is accepted as a body's framing"))
        declared = headers.get("content-length")
        if not chunked and declared is None:
            return b""
        if declared is not None and not declared.isdigit():
            raise _Close(_error(400, f"Content-Length {declared!r} is not a number of bytes"))
        if declared is not None and int(declared) > limit:
            raise _Close(_error(413, f"request body of {declared} bytes is over the limit of {limit}"))
        if headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1" and not self.buffer:
            await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not chunked:
            size = int(declared or 0)
            while len(self.buffer) < size:
                await self._more(deadline)
            body = bytes(self.buffer[:size])
            del self.buffer[:size]
            return body
        return await self._chunked_body(limit, deadline)

    async def _chunked_body(self, limit: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            while (line_end := self.buffer.find(b"\r\n")) < 0:
                await self._more(deadline)
            size_field = bytes(self.buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                length = int(size_field, 16)
            except ValueError:
                raise _Close(_error(400, f"bad chunk size {size_field[:20]!r}")) from None
            size += length
            if size > limit:
                raise _Close(_error(413, f"request body is over the limit of {limit} bytes"))
            if length == 0:
                del self.buffer[: line_end + 2]
                while (trailer_end := self.buffer.find(b"\r\n")) != 0:  # trailers, until an empty line
                    if trailer_end > 0:
                        del self.buffer[: trailer_end + 2]
                    else:
                        await self._more(deadline)
                del self.buffer[:2]
                return b"".join(parts)
            while len(self.buffer) < line_end + 2 + length + 2:
                await self._more(deadline)
            start = line_end + 2
            parts.append(bytes(self.buffer[start : start + length]))
            del self.buffer[: start + length + 2]

    # -- sending --------------------------------------------------------------------------------------------------
    async def _stream(self, stream: EventStream, keep_alive: bool, version: str) -> bool:
        """Sends an event stream (chunked; close-delimited to an HTTP/1.0 client); whether the connection may carry
        another request after it."""
        chunked = version == "HTTP/1.1"
        keep_alive &= chunked
        pending = _head(200, STREAM_HEADERS + (b"transfer-encoding: chunked\r\n" if chunked else b""), keep_alive)
        ended = False
        end = b"0\r\n\r\n" if chunked else b""
        try:
            async with aclosing(stream.events):
                async for item in stream.events:
                    body = b"".join(frame(event) for event in (item if isinstance(item, tuple) else (item,)))
                    if body:  # (an empty chunk would end a chunked reply)
                        pending += b"%x\r\n%b\r\n" % (len(body), body) if chunked else body
                    if isinstance(item, LastEvents):
                        pending, end = pending + end, b""  # the reply's end goes in the same write
                    if pending:
                        await self._send(pending)
                        pending = b""
            if pending:  # no event at all
                await self._send(pending)
            ended = True
        finally:
            if not ended:
                stream.on_disconnect()  # the client left (or the stream failed): its request stops
        if end:
            await self._send(end)
        return keep_alive

    async def _send(self, data: bytes) -> None:
        """Writes all of `data`; waits only while the socket's buffer is full. A send that goes out at once does not
        yield (a stream yields where it waits for its next events), so a reply costs no loop turn per write."""
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self.sock.send(view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
        except (OSError, trio.ClosedResourceError):
            raise _Close() from None

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1), suppress(_Close):
            await self._send(data)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers (names lower-cased; repeated ones joined with ", "); raises _Close with a 400 or 505
    for what does not parse."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _Close(_error(400, f"bad request line {lines[0][:100]!r}"))
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Close(_error(505, f"{version[:20]!r} is not served; use HTTP/1.1"))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            raise _Close(_error(400, f"bad header line {line[:100]!r}"))
        key, text = name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise _Close(_error(400, "conflicting Content-Length headers"))
            text = headers[key] if key == "content-length" else f"{headers[key]}, {text}"
        headers[key] = text
    if version == "HTTP/1.1" and "host" not in headers:
        raise _Close(_error(400, "an HTTP/1.1 request must carry a Host header"))
    return method.upper(), target, version, headers


def _keeps_alive(version: str, connection: str) -> bool:
    tokens = {t.strip().lower() for t in connection.split(",")}
    return "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens


def _error(status: int, message: str, code: str | None = None) -> Response:
    default = "invalid_request" if status < 500 else "unsupported"
    return error_response(ApiError(status, message, code=code or default))


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header's value, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _head(status: int, headers: bytes, keep_alive: bool) -> bytes:
    reason = _REASONS.get(status, b"")
    connection = b"" if keep_alive else b"connection: close\r\n"
    return b"HTTP/1.1 %d %b\r\ndate: %b\r\nserver: sagellm\r\n%b%b\r\n" % (status, reason, _date(), headers, connection)


def _reply_bytes(response: Response, keep_alive: bool, head_only: bool) -> bytes:
    body = response.encoded()
    headers = b"content-type: %b\r\ncontent-length: %d\r\n" % (response.content_type.encode(), len(body))
    headers += b"".join(b"%b: %b\r\n" % (name, value) for name, value in response.headers)
    return _head(response.status, headers, keep_alive) + (b"" if head_only else body)
