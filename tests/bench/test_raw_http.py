"""The load generators' raw HTTP client against a real gateway (the instant-engine server, a subprocess on
127.0.0.1): streamed replies (chunked SSE) line by line, a refusal with its body, one connection kept alive across
requests and opened again after the server closed it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from functools import partial

import httpx
import pytest
import trio

from sagellm.benchmarks.chaos_server import free_port
from sagellm.benchmarks.chaos_streams import raw_stream
from sagellm.benchmarks.raw_http import RawClient, lines
from sagellm.common.processes import python_module


@pytest.fixture(scope="module")
def instant_url():
    port = free_port()
    command = python_module("sagellm.benchmarks.instant_server", "--port", str(port), "--tokens", "5")
    server = subprocess.Popen(command, env={**os.environ, "SAGELLM_LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield port
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0


def test_streams_refusals_and_keep_alive_over_one_connection(instant_url):
    async def main() -> None:
        client = RawClient("127.0.0.1", instant_url)
        for _ in range(3):  # one connection, kept alive
            ends: list[str] = []
            ttft: list[float] = []
            await raw_stream(client, list(range(8)), 5, ends, ttft)
            assert ends == ["length"] and len(ttft) == 1
        first = client._stream
        reply, body = await client.post("/v1/completions", {"prompt": "text", "max_tokens": 2})
        text = b"".join([chunk async for chunk in body])
        assert reply.status == 400 and b"no tokenizer" in text  # the instant server has none
        assert client._stream is first
        reply, body = await client.post("/v1/completions", {"prompt": [1, 2], "max_tokens": 5, "stream": True})
        events = [line async for line in lines(body) if line.startswith("data: ")]
        assert reply.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
        client._stream.socket.shutdown(socket.SHUT_RDWR)  # as a server closing an idle connection does
        ends = []
        await raw_stream(client, list(range(8)), 5, ends, [])
        assert ends == ["length"]  # opened again, sent again
        await client.aclose()

    trio.run(main)


def test_a_request_on_a_connection_the_server_closed_silently_goes_again_on_a_new_one():
    """As llama.cpp's server does after a few requests: the reply says nothing of closing, then the socket closes."""
    served = []

    async def main() -> None:
        async def handler(stream: trio.SocketStream) -> None:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            served.append(request.split(b"\r\n")[0])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            serve = partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            client = RawClient("127.0.0.1", listener.socket.getsockname()[1])
            for _ in range(3):
                reply, body = await client.get("/v1/models")
                assert (reply.status, body) == (200, b"{}")
                await trio.sleep(0.05)  # the server's close reaches the client's socket
            await client.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert served == [b"GET /v1/models HTTP/1.1"] * 3
