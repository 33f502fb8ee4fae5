"""The gateway's HTTP/1.1 server on a real socket: framing, keep-alive, limits, disconnects and a graceful stop, as
clients (and misbehaving ones) meet them."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from sagellm.gateway.http.app import App, EventStream, HttpRequest, Response
from sagellm.gateway.http.limits import MAX_HEAD_BYTES, HttpLimits
from sagellm.gateway.http.server import serve_http


class Recorder:
    """Routes whose handlers record what they saw: `/echo` answers the body it got, `/stream` streams `n` events
    (waiting `gate` before the last), `/wait` never answers until cancelled."""

    def __init__(self) -> None:
        self.app = App()
        self.cancelled: list[str] = []
        self.disconnected = 0
        self.gate = trio.Event()
        self.waiting = trio.Event()  # set once /wait's handler runs
        self.app.route("POST", "/echo", self.echo)
        self.app.route("GET", "/echo", self.echo)
        self.app.route("GET", "/stream", self.stream)
        self.app.route("GET", "/wait", self.wait)
        self.app.route("GET", "/big", self.big)

    async def echo(self, request: HttpRequest) -> Response:
        return Response({"body": request.body.decode(), "query": request.query, "path": request.path})

    async def stream(self, request: HttpRequest) -> EventStream:
        count = int(request.query.get("n", "3"))
        gated = "gated" in request.query

        async def events() -> AsyncIterator[Any]:
            for i in range(count):
                if gated and i == count - 1:
                    await self.gate.wait()
                yield {"i": i}
            yield b"[DONE]"

        def left() -> None:
            self.disconnected += 1

        return EventStream(events(), on_disconnect=left)

    async def big(self, request: HttpRequest) -> Response:
        return Response(b"x" * int(request.query["bytes"]), content_type="application/octet-stream")

    async def wait(self, request: HttpRequest) -> Response:
        self.waiting.set()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.append(request.path)
        raise AssertionError("unreachable")


@asynccontextmanager
async def serving(recorder: Recorder, **limits: Any) -> AsyncIterator[tuple[int, trio.Event]]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(
            lambda task_status: serve_http(
                recorder.app,
                "127.0.0.1",
                0,
                HttpLimits(**{"max_body_bytes": 1000, **limits}),
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )  # fmt: skip
        )
        yield int(url.rsplit(":", 1)[1]), stop
        stop.set()


async def raw(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Sends raw bytes; what comes back until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received


def statuses(received: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


async def test_kept_alive_requests_share_one_connection_and_pipelined_ones_are_answered_in_order() -> None:
    recorder = Recorder()
    async with serving(recorder) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            replies = [await client.post("/echo?a=1", content=f"body {i}") for i in range(3)]
            assert [r.json()["body"] for r in replies] == ["body 0", "body 1", "body 2"]
            assert replies[0].json()["query"] == {"a": "1"}
        pipelined = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nabGET /echo HTTP/1.1\r\nHost: x\r\n"
        received = await raw(port, pipelined + b"Connection: close\r\n\r\n")
        assert statuses(received) == [200, 200] and b'"body":"ab"' in received
        assert received.index(b'"body":"ab"') < received.index(b'"body":""')
        http10 = await raw(port, b"GET /echo HTTP/1.0\r\n\r\n")  # no keep-alive asked: closed after the reply
        assert statuses(http10) == [200] and b"connection: close" in http10.lower()


async def test_chunked_bodies_and_expect_100_continue() -> None:
    recorder = Recorder()
    async with serving(recorder) as (port, _):
        chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        received = await raw(port, chunked + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n")
        assert statuses(received) == [200] and b'"body":"abcde"' in received
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
        head += b"Connection: close\r\n\r\n"
        await stream.send_all(head)
        with trio.fail_after(5):
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        await stream.send_all(b"xyz")
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert b'"body":"xyz"' in received


async def test_what_does_not_parse_or_fit_is_an_openai_error_and_the_connection_closes() -> None:
    recorder = Recorder()
    async with serving(recorder) as (port, _):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /echo HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            (b"GET /echo HTTP/1.1\r\n\r\n", 400),  # no Host
            (b"GET /echo HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n", 400),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
            (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"a" * 2048, 413),
            (b"GET /echo HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
            (b"DELETE /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        ]
        for request, status in cases:
            received = await raw(port, request)
            assert statuses(received) == [status], (request[:60], received[:200])
            body = json.loads(received.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["message"], body


async def test_a_body_that_never_arrives_is_a_408() -> None:
    recorder = Recorder()
    async with serving(recorder, body_timeout_s=0.2) as (port, _):
        received = await raw(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        assert statuses(received) == [408] and b'"code":"timeout"' in received


async def test_streams_are_chunked_and_a_client_that_leaves_stops_its_stream_or_its_handler() -> None:
    recorder = Recorder()
    async with serving(recorder) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = await client.get("/stream?n=3")
            assert reply.headers["transfer-encoding"] == "chunked"
            assert reply.headers["content-type"] == "text/event-stream"
            assert reply.text == 'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\ndata: [DONE]\n\n'
            async with client.stream("GET", "/stream?n=3&gated=1") as streaming:
                async for line in streaming.aiter_lines():
                    if line.startswith('data: {"i":1}'):
                        break  # leaves while the stream waits for its last event
            with trio.fail_after(5):
                while recorder.disconnected != 1:
                    await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.get, "/wait")
                await recorder.waiting.wait()
                nursery.cancel_scope.cancel()  # the client gives up: the handler is cancelled
            with trio.fail_after(5):
                while recorder.cancelled != ["/wait"]:
                    await trio.sleep(0.01)
        assert recorder.disconnected == 1


async def test_a_stop_closes_idle_connections_at_once_and_lets_a_stream_in_flight_finish() -> None:
    recorder = Recorder()
    async with serving(recorder, graceful_timeout_s=30) as (port, stop):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        await idle.send_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(await idle.receive_some(65536)) == [200]
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        await busy.send_all(b"GET /stream?n=2&gated=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert b'{"i":0}' in await busy.receive_some(65536)
        stop.set()
        with trio.fail_after(5):
            assert await idle.receive_some(100) == b""  # closed without waiting the graceful timeout
        recorder.gate.set()
        received = b""
        with trio.fail_after(5):
            while chunk := await busy.receive_some(65536):
                received += chunk
        assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the stream ended whole, then the connection


async def test_servers_that_reuse_a_port_both_answer_on_it() -> None:
    first, second = Recorder(), Recorder()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def start(recorder: Recorder, port: int, task_status: Any) -> None:
            await serve_http(
                recorder.app, "127.0.0.1", port, HttpLimits(max_body_bytes=1000),
                shutdown_trigger=stop.wait, reuse_port=True, task_status=task_status,
            )  # fmt: skip

        url = await nursery.start(start, first, 0)
        port = int(url.rsplit(":", 1)[1])
        assert await nursery.start(start, second, port) == url
        for _ in range(4):
            assert statuses(await raw(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == [200]
        stop.set()


async def test_a_connection_idle_past_the_keep_alive_timeout_is_closed() -> None:
    recorder = Recorder()
    async with serving(recorder, keep_alive_timeout_s=0.4) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert statuses(await stream.receive_some(65536)) == [200]
        started = trio.current_time()
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b""  # closed by the server
        assert trio.current_time() - started >= 0.4


async def test_a_reply_larger_than_the_socket_buffers_arrives_whole_to_a_slow_reader() -> None:
    recorder = Recorder()
    async with serving(recorder) as (port, _):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /big?bytes=8000000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await trio.sleep(0.2)  # the server fills the socket's buffers and must wait for room
        received = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        assert statuses(head) == [200] and len(body) == 8_000_000 and b"content-length: 8000000" in head
