"""The chaos benchmark's streamed completions: each one's ends (a finish reason or an error code, once per end seen)
and its time to the first token, over httpx or over one keep-alive raw connection (`raw_http`, cheap enough for the
overload's clients not to be what is measured). A request the server's closing of a pooled connection lost before
it was answered is sent again, once, as SDKs do, and counted in `RETRIED`."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import trio

from sagellm.benchmarks.raw_http import ConnectionClosed, RawClient, lines

STREAM_TIMEOUT_S = 120  # a stream with nothing for this long hung
RETRIED: list[str] = []  # requests sent again after the server closed their pooled connection (reported)


async def stream(client: httpx.AsyncClient, prompt: str, max_tokens: int, ends: list[str], ttft: list[float]) -> None:
    """One streamed completion: appends what ended it (a finish reason or an error code) to `ends`, once per end
    seen, and its time to the first token to `ttft`."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    for attempt in range(2):
        sent = time.monotonic()
        try:
            await _stream_once(client, body, ends, ttft, sent)
            return
        except httpx.RemoteProtocolError as error:
            if attempt or ends or ttft:  # not the pooled-connection race: a lost request
                ends.append(f"transport {type(error).__name__}")
                return
            RETRIED.append(
                str(prompt)
            )  # the server closed a pooled connection as it was reused: sent again, as SDKs do
        except httpx.HTTPError as error:
            ends.append(f"transport {type(error).__name__}")
            return


async def _stream_once(
    client: httpx.AsyncClient, body: dict[str, Any], ends: list[str], ttft: list[float], sent: float
) -> None:
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            code = json.loads(await reply.aread())["error"]["code"]
            unsaid = reply.status_code == 429 and "retry-after" not in reply.headers
            ends.append(f"{reply.status_code} {code}" + (" without Retry-After" if unsaid else ""))
            return
        async for line in reply.aiter_lines():
            end, token = stream_event(line)
            if token and not ttft:
                ttft.append(time.monotonic() - sent)
            if end is not None:
                ends.append(end)


async def raw_stream(
    client: RawClient, prompt: str | list[int], max_tokens: int, ends: list[str], ttft: list[float]
) -> None:
    """`stream` over one keep-alive raw connection (the overload's clients: cheap enough not to be what is measured).
    A connection the server closed as it was reused is opened again and the request sent again, once."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}
    for attempt in range(2):
        sent, answered = time.monotonic(), False
        try:
            reply, chunks = await client.post("/v1/completions", body)
            answered = True
            if reply.status != 200:
                code = json.loads(b"".join([c async for c in chunks]))["error"]["code"]
                unsaid = reply.status == 429 and "retry-after" not in reply.headers
                ends.append(f"{reply.status} {code}" + (" without Retry-After" if unsaid else ""))
                return
            async for line in lines(chunks):
                end, token = stream_event(line)
                if token and not ttft:
                    ttft.append(time.monotonic() - sent)
                if end is not None:
                    ends.append(end)
            return
        except (OSError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as error:
            await client.aclose()
            if attempt or answered:
                ends.append(f"transport {type(error).__name__}")
                return
            RETRIED.append(str(prompt))


def stream_event(line: str) -> tuple[str | None, bool]:
    """One line of a streamed completion: what it ends the stream with (a finish reason or an error code), if
    anything, and whether it carries a token."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None, False
    event = json.loads(line.removeprefix("data: "))
    if "error" in event:
        return event["error"]["code"], False
    return event["choices"][0]["finish_reason"], True
