"""The load generators' raw HTTP client against a real gateway (the instant-engine server, a subprocess on
127.0.0.1): streamed replies (chunked SSE) line by line, a refusal with its body, one connection kept alive across
requests and opened again after the server closed it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest
import trio

from sagellm.benchmarks.chaos import free_port, raw_stream
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
