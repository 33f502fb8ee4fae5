"""A minimal HTTP/1.1 client on trio sockets for load generators: one keep-alive connection per simulated client,
a JSON POST, and the reply read as it arrives (Content-Length or chunked), so a streamed completion's SSE lines come
one by one. It exists because a general client costs more CPU per request (httpx on trio: 15-30 ms here) than the
gateway it loads, and on a shared 2-core machine a load generator that eats a core measures itself. It speaks only
what the benchmarks need: no TLS, no redirects, no proxies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

HEAD_LIMIT = 64 * 1024


# Not a SageLLMError: a reply cut short is an outcome the benchmarks measure and catch, never an error a user sees.
class ConnectionClosed(Exception):
    """The server closed the connection before the reply ended."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


class RawClient:
    """One connection to `host:port`, opened when first used and again after the server closes it; `headers` go
    with every request (an Authorization, say)."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self._extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._stream: trio.SocketStream | None = None
        self._buffer = bytearray()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def post(self, path: str, body: Any) -> tuple[Reply, AsyncIterator[bytes]]:
        """Sends `body` as JSON; returns the reply's status and headers at once, and its body as it arrives."""
        return await self.request("POST", path, json.dumps(body).encode())

    async def get(self, path: str) -> tuple[Reply, bytes]:
        """The reply and its whole body."""
        reply, body = await self.request("GET", path)
        return reply, b"".join([chunk async for chunk in body])

    async def request(self, method: str, path: str, payload: bytes | None = None) -> tuple[Reply, AsyncIterator[bytes]]:
        """Sends the request and reads the reply's head. On a kept-alive connection that the server had closed
        meanwhile (servers close idle ones, and some after a number of requests, without saying so) nothing of it
        was read, so it is sent once more on a new connection, as HTTP clients do."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self._extra}"
        if payload is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        message = (head + "\r\n").encode() + (payload or b"")
        reused = self._stream is not None
        try:
            reply = await self._exchange(message)
        except (ConnectionClosed, trio.BrokenResourceError, ConnectionError):
            if not reused or self._buffer:  # a new connection, or the reply had begun: a real failure
                raise
            await self.aclose()
            reply = await self._exchange(message)
        return reply, self._body(reply)

    async def _exchange(self, message: bytes) -> Reply:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._buffer.clear()
        await self._stream.send_all(message)
        return await self._read_head()

    async def _read_head(self) -> Reply:
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if len(self._buffer) > HEAD_LIMIT:
                raise ValueError("the reply's head is over 64 KiB")
            await self._fill()
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Reply(int(lines[0].split()[1]), headers)

    async def _body(self, reply: Reply) -> AsyncIterator[bytes]:
        if reply.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while (end := self._buffer.find(b"\r\n")) < 0:
                    await self._fill()
                size = int(self._buffer[:end].split(b";")[0], 16)
                del self._buffer[: end + 2]
                while len(self._buffer) < size + 2:
                    await self._fill()
                chunk = bytes(self._buffer[:size])
                del self._buffer[: size + 2]
                if size == 0:
                    break
                yield chunk
        else:
            length = int(reply.headers.get("content-length", "0"))
            while len(self._buffer) < length:
                await self._fill()
            yield bytes(self._buffer[:length])
            del self._buffer[:length]
        if reply.headers.get("connection", "").lower() == "close":
            await self.aclose()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            await self.aclose()
            raise ConnectionClosed("the server closed the connection")
        self._buffer += data


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Reads the rest of a reply, so its connection is ready for the next request."""
    async for _ in chunks:
        pass


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """A body's text lines as they complete (SSE events are lines)."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode().rstrip("\r")
    if pending:
        yield pending.decode()
