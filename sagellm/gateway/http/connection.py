"""One HTTP/1.1 connection of the gateway's server (`server.serve_http`): requests parsed, served in order, replied.

Each connection has a reader task that owns the socket's receiving side: it buffers what arrives and, at end of
stream, cancels the request being served, so a client that leaves stops its request wherever it is (queued, running,
streaming). The connection's own task parses, runs the handler and writes. Sockets are plain non-blocking sockets
waited on with trio's `wait_readable` / `wait_writable`: a write that goes out at once costs no turn of the event
loop (trio's socket streams yield after every send)."""

from __future__ import annotations

import socket
from contextlib import aclosing, suppress
from urllib.parse import parse_qsl, unquote

import structlog
import trio

from sagellm.common.pulse import Pulse
from sagellm.gateway.http.app import EventStream, HttpRequest, LastEvents
from sagellm.gateway.http.connection_slots import ServerState
from sagellm.gateway.http.framing import (
    Close,
    check_head_start,
    error_reply,
    head_bytes,
    keeps_alive,
    parse_head,
    reply_bytes,
)
from sagellm.gateway.http.limits import MAX_HEAD_BYTES, READ_BYTES

log = structlog.get_logger("sagellm.gateway")
STREAM_HEADERS = b"cache-control: no-cache\r\n"


class Connection:
    """Counted in `server.connections` by whoever accepted it (`server._accept`), from before its task starts."""

    def __init__(self, server: ServerState, sock: socket.socket) -> None:
        self.server, self.sock = server, sock
        self.limits = server.limits
        self.buffer = bytearray()
        self.eof = False
        self.arrived = Pulse()  # fired when bytes (or the end) arrive
        self.room = Pulse()  # fired when a request was taken out of the buffer (the reader may read on)
        self.opened = trio.current_time()
        self.served = 0  # requests answered
        self.scope = trio.CancelScope()  # the connection's tasks: cancelled when it closes from outside

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
        finally:
            self.server.connections.discard(self)
            self.server.idle.pop(self, None)
            close_socket(self.sock)

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read)
            try:
                await self._serve()
            except Close as close:
                if close.response is not None:
                    await self._send_quietly(reply_bytes(close.response, keep_alive=False, head_only=False))
            except Exception:  # a bug in a reply's stream: this connection ends, the server goes on
                log.exception("connection_failed")
            nursery.cancel_scope.cancel()

    @property
    def reclaimable(self) -> bool:
        """Waiting for a request with none of it arrived: closing the connection loses its client nothing."""
        return self in self.server.idle and not self.buffer

    @property
    def idle_timeout_s(self) -> float:
        """How long it may wait for a request: the keep-alive timeout after one, the header timeout before the first
        (a connection that never sends one is closed as soon as a slow head would be)."""
        return self.limits.keep_alive_timeout_s if self.served else self.limits.body_timeout_s

    def close(self) -> None:
        """Closes the connection from outside (idle past its timeout, reclaimed, or the server stops): its slot is
        free at once, its tasks end at their next checkpoint."""
        self.server.connections.discard(self)
        self.server.idle.pop(self, None)
        self.scope.cancel()

    # -- receiving ------------------------------------------------------------------------------------------------
    async def _read(self) -> None:
        try:
            while True:
                while len(self.buffer) > MAX_HEAD_BYTES + self.limits.max_body_bytes:  # pipelined ahead: wait
                    await self.room.wait()
                await trio.lowlevel.wait_readable(self.sock)  # waits first: a read right after a request finds nothing
                try:
                    data = self.sock.recv(READ_BYTES)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self.buffer += data
                self.arrived.fire()
        except (OSError, trio.ClosedResourceError):
            pass
        self.eof = True
        self.arrived.fire()
        self.scope.cancel()  # the client left: the request being served stops, wherever it is

    async def _more(self, deadline: float) -> None:
        """Waits for more bytes; the end of stream closes the connection, the deadline answers 408."""
        if self.eof:
            raise Close()
        with trio.move_on_at(deadline):
            await self.arrived.wait()
            return
        raise Close(error_reply(408, f"the request did not arrive within {self.limits.body_timeout_s:g} s", "timeout"))

    # -- serving --------------------------------------------------------------------------------------------------
    async def _serve(self) -> None:
        while not self.server.stopping:
            if self.buffer:  # pipelined: the next request is here already; others get a turn first
                await trio.lowlevel.checkpoint()
            else:  # (the server closes the connection if this lasts past its idle timeout, or it stops)
                self.server.idle[self] = trio.current_time()
                while not self.buffer and not self.eof:
                    await self.arrived.wait()
                self.server.idle.pop(self, None)  # (gone already if closed from outside)
                if not self.buffer:
                    return
            request, keep_alive, head_only = await self._request()
            self.room.fire()
            reply_keeps = keep_alive and not self.server.stopping
            result = await self.server.app.handle(request)
            if isinstance(result, EventStream):
                reply_keeps = await self._stream(result, reply_keeps, request.version)
            else:
                await self._send(reply_bytes(result, reply_keeps, head_only))
            self.served += 1
            if not reply_keeps or self.eof:
                return

    async def _request(self) -> tuple[HttpRequest, bool, bool]:
        """The next request, its body whole: (request, keep the connection alive after it, a HEAD). Head and body
        are due within the body timeout of the request's first bytes; a first request's head, of the connection's
        opening (the header timeout)."""
        deadline = trio.current_time() + self.limits.body_timeout_s
        head_deadline = deadline if self.served else self.opened + self.limits.body_timeout_s
        while (end := self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)) < 0:
            check_head_start(self.buffer)
            if len(self.buffer) >= MAX_HEAD_BYTES + 4:
                raise Close(error_reply(431, f"the request head is over {MAX_HEAD_BYTES} bytes"))
            await self._more(head_deadline)
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        method, target, version, headers = parse_head(head)
        keep_alive = keeps_alive(version, headers.get("connection", ""))
        body = await self._body(headers, version, deadline)
        path, _, query = target.partition("?")
        query_params = dict(parse_qsl(query)) if query else {}
        request = HttpRequest(method, unquote(path), headers, query_params, body, version=version)
        return request, keep_alive, method == "HEAD"

    async def _body(self, headers: dict[str, str], version: str, deadline: float) -> bytes:
        limit = self.limits.max_body_bytes
        chunked = "transfer-encoding" in headers
        if chunked and (headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers):
            raise Close(error_reply(400, "only `Transfer-Encoding: chunked` alone is accepted as a body's framing"))
        declared = headers.get("content-length")
        if not chunked and declared is None:
            return b""
        if declared is not None and not declared.isdigit():
            raise Close(error_reply(400, f"Content-Length {declared!r} is not a number of bytes"))
        if declared is not None and int(declared) > limit:
            raise Close(error_reply(413, f"request body of {declared} bytes is over the limit of {limit}"))
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
                raise Close(error_reply(400, f"bad chunk size {size_field[:20]!r}")) from None
            size += length
            if size > limit:
                raise Close(error_reply(413, f"request body is over the limit of {limit} bytes"))
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
        headers = b"content-type: %b\r\n" % stream.content_type + STREAM_HEADERS
        headers += b"".join(b"%b: %b\r\n" % (name, value) for name, value in stream.headers)
        pending = head_bytes(200, headers + (b"transfer-encoding: chunked\r\n" if chunked else b""), keep_alive)
        ended = False
        end = b"0\r\n\r\n" if chunked else b""
        try:
            async with aclosing(stream.events):
                async for item in stream.events:
                    body = stream.framed(item)
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
            raise Close() from None

    async def _send_quietly(self, data: bytes) -> None:
        with trio.move_on_after(1), suppress(Close):
            await self._send(data)


def close_socket(sock: socket.socket) -> None:
    """Closes a socket a task may be waiting on (the waiter gets ClosedResourceError)."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
        sock.close()
