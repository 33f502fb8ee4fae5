"""The gateway's HTTP/1.1 server at its edges, on real sockets: a cap on connections (the oldest idle one
closed to make room, else a 503 at once), a new connection that sends nothing closed at the header timeout, and bytes
that cannot start an HTTP/1.x request (TLS, bare LF line ends, no method) answered 400 at once instead of after it."""

from __future__ import annotations

import json
import resource
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from sagellm.common.errors import InvalidInput
from sagellm.gateway.http.app import App, HttpRequest, Response
from sagellm.gateway.http.limits import (
    FD_HEADROOM,
    MAX_DERIVED_CONNECTIONS,
    MIN_CONNECTIONS,
    HttpLimits,
    connection_cap,
    raise_fd_limit,
)
from sagellm.gateway.http.server import serve_http
from tests.gateway.test_http_server import raw, statuses

HELLO = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


class Holder:
    """`/hello` answers at once; `/hold` holds its request until `release` is set, counting those it holds."""

    def __init__(self) -> None:
        self.app = App()
        self.held = 0
        self.release = trio.Event()
        self.app.route("GET", "/hello", self.hello)
        self.app.route("GET", "/hold", self.hold)

    async def hello(self, request: HttpRequest) -> Response:
        return Response({"hello": True})

    async def hold(self, request: HttpRequest) -> Response:
        self.held += 1
        await self.release.wait()
        return Response({"held": True})


@asynccontextmanager
async def serving(app: App, **limits: Any) -> AsyncIterator[int]:
    """`serve_http` on 127.0.0.1 (a free port) with `limits` over a 1000-byte body limit; yields its port."""
    stop = trio.Event()
    http_limits = HttpLimits(**{"max_body_bytes": 1000, **limits})

    async def serve(task_status: trio.TaskStatus) -> None:
        await serve_http(app, "127.0.0.1", 0, http_limits, shutdown_trigger=stop.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve)
        yield int(url.rsplit(":", 1)[1])
        stop.set()


@asynccontextmanager
async def idle_connections(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """`count` connections opened one after another that send nothing; closed on the way out."""
    async with AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(count)]
        yield streams


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Whether the server has closed `stream` (it reads the end, or a reset), waiting up to 5 s for it."""
    with trio.move_on_after(5):
        try:
            return await stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            return True
    return False


def client_hello() -> bytes:
    """The first bytes a TLS client sends: a real ClientHello, from Python's own TLS."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def error_of(received: bytes) -> dict[str, Any]:
    return json.loads(received.split(b"\r\n\r\n", 1)[1])["error"]


async def test_bytes_that_cannot_start_an_http_request_are_a_400_at_once_and_split_heads_still_parse() -> None:
    holder = Holder()
    async with serving(holder.app) as port:  # the default 30 s header timeout: a 400 must not wait for it
        cases = [
            (client_hello(), "not TLS"),
            (b"GET / HTTP/1.1\n\n", "bare LF"),
            (b"GET /hello HTTP/1.1\r\nHost: x\n", "bare LF"),  # an incomplete head
            (b"GET /hello HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", "bare LF"),  # a complete one
            (b"SSH-2.0-OpenSSH_9.6\r\n", "HTTP method"),
            (b"*1\r\n$4\r\nPING\r\n", "HTTP method"),  # Redis
        ]
        for request, message in cases:
            with trio.fail_after(5):  # well before the 30 s a head may take
                received = await raw(port, request)
            assert statuses(received) == [400], (request[:40], received[:200])
            assert message in error_of(received)["message"]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        for piece in (b"GE", b"T /hello HTTP/1.1\r", b"\nHost: x\r\n", b"Connection: close\r\n\r", b"\n"):
            await stream.send_all(piece)  # a head in pieces, a CRLF split between two of them
            await trio.sleep(0.05)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert statuses(received) == [200] and received.endswith(b'{"hello":true}')
        await stream.aclose()


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout_a_kept_alive_one_is_not() -> None:
    holder = Holder()
    async with serving(holder.app, body_timeout_s=0.5, keep_alive_timeout_s=30) as port:
        kept = await trio.open_tcp_stream("127.0.0.1", port)
        await kept.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(await kept.receive_some(65536)) == [200]
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        assert await closed_by_server(silent)
        assert trio.current_time() - started >= 0.4  # (the server's clock started a moment before ours)
        await trio.sleep(0.5)  # past the header timeout twice over: the kept-alive connection still serves
        await kept.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert statuses(await kept.receive_some(65536)) == [200]
        await kept.aclose()
        await silent.aclose()


async def test_idle_connections_beyond_the_cap_make_room_and_a_request_is_served() -> None:
    holder = Holder()
    # 300 connections more than the cap that send nothing: each new one closes the oldest idle one
    async with serving(holder.app, max_connections=200) as port, idle_connections(port, 500) as idle:
        with trio.fail_after(5):
            received = await raw(port, HELLO)
        assert statuses(received) == [200]
        assert await closed_by_server(idle[0])


async def test_a_new_connection_is_a_503_at_once_when_every_slot_holds_a_request() -> None:
    holder = Holder()
    async with serving(holder.app, max_connections=20) as port:
        busy = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
        for stream in busy:
            await stream.send_all(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            while holder.held < 20:
                await trio.sleep(0.01)
        for request in (b"", HELLO):  # one that sends nothing, one that sends its request first
            with trio.fail_after(5):
                received = await raw(port, request)
            assert statuses(received) == [503], received[:200]
            assert b"\r\nretry-after: " in received.lower()
            error = error_of(received)
            assert error["code"] == "too_many_connections" and "20 connections" in error["message"]
        holder.release.set()  # the held requests are answered; their connections, kept alive, are idle now
        for stream in busy:
            with trio.fail_after(5):
                assert statuses(await stream.receive_some(65536)) == [200]
        with trio.fail_after(5):
            assert statuses(await raw(port, HELLO)) == [200]  # an idle one made room
        for stream in busy:
            await stream.aclose()


def test_the_cap_is_derived_from_the_descriptor_limit_unless_given() -> None:
    assert connection_cap(HttpLimits(max_body_bytes=1), 20_000) == 20_000 - FD_HEADROOM
    assert connection_cap(HttpLimits(max_body_bytes=1), 256) == MIN_CONNECTIONS
    assert connection_cap(HttpLimits(max_body_bytes=1), 1 << 20) == MAX_DERIVED_CONNECTIONS  # (Docker's usual limit)
    assert connection_cap(HttpLimits(max_body_bytes=1, max_connections=5), 20_000) == 5
    with pytest.raises(InvalidInput, match="max_connections"):
        HttpLimits(max_body_bytes=1, max_connections=0)
    soft = raise_fd_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft  # raised to the hard limit where the kernel lets it
