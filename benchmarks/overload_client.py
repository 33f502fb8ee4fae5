"""The overload benchmark's client, the same against every server: one request per connection (`raw_http`: cheap
enough for a thousand clients on this machine), so leaving is closing the socket, and what came back counted exactly:
the status line and when it came, the output tokens received (each streamed chunk's `token_ids`, which sageLLM and vLLM
both send on `return_token_ids`), the first token's time, what ended the request, and a refusal's Retry-After. On it,
the two loads of the metastable test: a closed loop that measures capacity, and an open loop of clients that time out
and retry."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.raw_http import ConnectionClosed, RawClient, lines

HOST = "127.0.0.1"
COMPLETED = ("length", "stop")  # the finish reasons of a request that ran to its end
RETRYABLE = (429, 503)  # refusals a client sends again (after Retry-After when given)
PROMPT_IDS = (20, 300)  # prompt token ids are drawn from this range: no special token of SmolLM2, inside tiny vocabs
TRANSPORT_ERRORS = (OSError, ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError)


@dataclass
class Attempt:
    """One request as its client saw it; times in seconds of the trio clock."""

    sent: float
    status: int | None = None  # None: no status line came
    status_s: float | None = None  # sent → status line
    first_token_s: float | None = None  # sent → the first output token
    tokens: int = 0  # output tokens received
    end: str | None = None  # a finish reason, an error code, "timeout", "left", "transport ..."
    end_s: float | None = None  # sent → the end
    retry_after_s: float | None = None

    @property
    def completed(self) -> bool:
        return self.end in COMPLETED

    @property
    def refused(self) -> bool:
        return self.status is not None and self.status != 200


def prompt(rng: random.Random, length: int) -> list[int]:
    """Token ids of a fresh prompt (as ids, so every server counts the same prompt tokens; random, so no prefix
    cache shortens one)."""
    return [rng.randrange(*PROMPT_IDS) for _ in range(length)]


def completion(model: str, prompt_ids: list[int] | list[list[int]], max_tokens: int, stream: bool = True) -> dict:
    """A greedy completion of exactly `max_tokens` tokens (EOS ignored) that returns its token ids."""
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    return body | {"stream": stream, "return_token_ids": True}


async def send(
    port: int,
    body: dict[str, Any],
    timeout_s: float,
    leave: trio.Event | None = None,
    into: list[Attempt] | None = None,
) -> Attempt:
    """Sends `body` to /v1/completions on a connection of its own and reads the reply until it ends, `timeout_s`
    passes (end "timeout") or `leave` is set (end "left"); then closes the connection, which is how a client leaves.
    The attempt is appended to `into` as it starts, so a caller can watch it fill."""
    attempt = Attempt(trio.current_time())
    if into is not None:
        into.append(attempt)
    client = RawClient(HOST, port)

    async def leave_on_time(cancel: trio.CancelScope) -> None:
        with trio.move_on_after(timeout_s):
            await (trio.Event() if leave is None else leave).wait()
            attempt.end = attempt.end or "left"
        attempt.end = attempt.end or "timeout"
        cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leave_on_time, nursery.cancel_scope)
            await _exchange(client, body, attempt)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
    attempt.end_s = trio.current_time() - attempt.sent
    return attempt


async def _exchange(client: RawClient, body: dict[str, Any], attempt: Attempt) -> None:
    def since_sent() -> float:
        return trio.current_time() - attempt.sent

    try:
        reply, chunks = await client.post("/v1/completions", body)
        attempt.status, attempt.status_s = reply.status, since_sent()
        if "retry-after" in reply.headers:
            attempt.retry_after_s = float(reply.headers["retry-after"])
        if reply.status != 200 or not body.get("stream"):
            answer = json.loads(b"".join([chunk async for chunk in chunks]) or b"{}")
            attempt.tokens = (answer.get("usage") or {}).get("completion_tokens", 0)
            choices = answer.get("choices") or [{}]
            attempt.end = _error_code(answer, reply.status) or choices[0].get("finish_reason") or "no finish"
            return
        async for line in lines(chunks):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            attempt.end = _error_code(event, None) or attempt.end
            for choice in event.get("choices") or []:
                received = len(choice.get("token_ids") or [])
                if received and attempt.first_token_s is None:
                    attempt.first_token_s = since_sent()
                attempt.tokens += received
                attempt.end = choice.get("finish_reason") or attempt.end
        attempt.end = attempt.end or "no finish"
    except TRANSPORT_ERRORS as error:
        attempt.end = attempt.end or f"transport {type(error).__name__}"


def _error_code(answer: dict[str, Any], status: int | None) -> str | None:
    if "error" not in answer:
        return None if status in (None, 200) else str(status)
    error = answer["error"]
    if not isinstance(error, dict):
        return str(error)
    code = error.get("code")  # ours says what went wrong in `code`; vLLM puts the status there and the kind in `type`
    return code if isinstance(code, str) and code else str(error.get("type") or status)


async def closed_loop(
    port: int, body: Callable[[], dict[str, Any]], clients: int, duration_s: float, timeout_s: float
) -> tuple[list[Attempt], float]:
    """`clients` clients each sending one request after another for `duration_s`; every attempt and the wall time
    (from the start to the end of the last attempt)."""
    attempts: list[Attempt] = []
    start = trio.current_time()
    deadline = start + duration_s

    async def client() -> None:
        while trio.current_time() < deadline:
            attempts.append(await send(port, body(), timeout_s))

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        nursery.start_soon(_report, "capacity", deadline, lambda: f"{sum(a.completed for a in attempts)} completed")
    return attempts, trio.current_time() - start


async def staggered_loop(
    port: int, body: Callable[[], dict[str, Any]], clients: int, request_s: float, duration_s: float, timeout_s: float
) -> tuple[float, float, float]:
    """`clients` clients in a closed loop, started `request_s / clients` apart (`request_s`: how long one request
    takes at this load), so their requests do not move in step: identical requests started together all prefill in
    one step, every round, a cohort no stream of arrivals forms. Completed requests/s and tokens/s in the steady
    window (`duration_s` from one request after the last client started: what ends in it was partly served before it,
    as much as what runs past its end), and that window's length."""
    attempts: list[Attempt] = []
    start = trio.current_time()
    steady = start + request_s * (clients - 1) / clients + request_s
    deadline = steady + duration_s  # the steady window lasts `duration_s` however slow a request is

    async def client(delay: float) -> None:
        await trio.sleep(delay)
        while trio.current_time() < deadline:
            attempts.append(await send(port, body(), timeout_s))

    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, request_s * i / clients)
        nursery.start_soon(_report, "capacity", deadline, lambda: f"{sum(a.completed for a in attempts)} completed")
    ended = [a for a in attempts if a.completed and steady <= a.sent + (a.end_s or 0.0) <= deadline]
    window = deadline - steady
    return len(ended) / window, sum(a.tokens for a in ended) / window, window


@dataclass
class Client:
    """One arrival of the open loop and every attempt it made."""

    arrived: float
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].completed


async def open_loop(
    port: int, body: Callable[[], dict[str, Any]], rate: float, duration_s: float, timeout_s: float, seed: int
) -> tuple[list[Client], float]:
    """Poisson arrivals at `rate` per second for `duration_s`. Each arrival is a client that sends its request, gives
    up on an attempt after `timeout_s` (closing its connection) and sends it again at once; a 429 or 503 it sends
    again after its Retry-After (at once without one); it stops once its request completes, on another answer, or
    when the window closes (no attempt starts after it). The clients and the window's start."""
    rng = random.Random(seed)
    clients: list[Client] = []
    start = trio.current_time()
    end = start + duration_s

    async def client(me: Client) -> None:
        request = body()  # a retry sends the same request again
        while trio.current_time() < end:
            attempt = await send(port, request, timeout_s)
            me.attempts.append(attempt)
            if attempt.completed or (attempt.refused and attempt.status not in RETRYABLE):
                return
            wait = (attempt.retry_after_s or 0.0) if attempt.refused else 0.0
            if attempt.end.startswith("transport") and (attempt.end_s or 0) < 0.01:
                wait = 0.1  # a server that closes at once: do not spin
            await trio.sleep_until(min(trio.current_time() + wait, end))

    def state() -> str:
        tried = [a for c in clients for a in c.attempts]
        refused, timed_out = sum(a.refused for a in tried), sum(a.end == "timeout" for a in tried)
        return f"{len(clients)} clients, {sum(c.completed for c in clients)} completed, {refused} refusals, " + (
            f"{timed_out} timeouts"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report, "overload", end, state)
        arrival = start
        while (arrival := arrival + rng.expovariate(rate)) < end:
            await trio.sleep_until(arrival)
            clients.append(Client(trio.current_time()))
            nursery.start_soon(client, clients[-1])
    return clients, start


async def _report(phase: str, until: float, state: Callable[[], str], every_s: float = 10.0) -> None:
    """A progress line every `every_s` until `until`: the long waits say where they are."""
    start = trio.current_time()
    while (now := trio.current_time()) + every_s <= until:
        await trio.sleep(every_s)
        progress(f"  {phase}: {now + every_s - start:.0f} s of {until - start:.0f}: {state()}", "overload")


def percentile_ms(values: list[float], q: float) -> float | None:
    """The `q`th percentile of `values` (seconds) in ms; None when there are none (JSON has no NaN)."""
    return float(np.percentile(values, q)) * 1000 if values else None
