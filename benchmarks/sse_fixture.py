"""A benchmark fixture, not a server: a tiny OpenAI-compatible ASGI app that streams fixed text with fixed delays,
so `sagellm bench serve` can be tested (and its own overhead seen) against a real HTTP server with known answers.

`/v1/completions` and `/v1/chat/completions` stream `max_tokens` tokens as SSE chunks (`tokens_per_chunk` per chunk,
as llama.cpp's server sometimes groups them), a final `usage` chunk when asked for one, then `[DONE]`. The n-th POST
it receives (0-based) can be told to fail: with HTTP 429 or 500, or with an `error` event halfway through its stream.
It records what a test needs to check the client: arrival times, bodies, Authorization headers and the most requests
in flight at once.
Run it on hypercorn + trio: `await nursery.start(serve, app)`, `with serving_in_thread(app)` from sync code, or
`python -m sagellm.benchmarks.sse_fixture --port 8001`."""

from __future__ import annotations

import argparse
import json
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import trio

from sagellm.gateway.http import lifespan

FailMode = Literal["429", "500", "error-event"]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
Scope = dict[str, Any]


class StreamingFixture:
    """The ASGI app. `first_delay_s` before the first chunk (a prefill), `delay_s` before each later one (a decode
    step); `failures` maps the index of a POST (in arrival order) to how it fails."""

    def __init__(
        self,
        *,
        first_delay_s: float = 0.0,
        delay_s: float = 0.0,
        tokens_per_chunk: int = 1,
        usage: bool = True,
        failures: Mapping[int, FailMode] | None = None,
        model: str = "fixture",
    ) -> None:
        if tokens_per_chunk < 1:
            raise ValueError(f"tokens_per_chunk must be >= 1, got {tokens_per_chunk}")
        self.first_delay_s, self.delay_s = first_delay_s, delay_s
        self.tokens_per_chunk = tokens_per_chunk
        self.usage = usage
        self.failures = dict(failures or {})
        self.model = model
        self.arrivals: list[float] = []  # time.monotonic() of each POST
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []  # each POST's Authorization header
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] != "http":
            return
        elif scope["method"] == "GET" and scope["path"] == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        elif scope["method"] == "POST" and scope["path"] in ENDPOINTS:
            body = json.loads(await _read_body(receive))
            self.authorizations.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
            await self._completion(send, body, chat=scope["path"].endswith("chat/completions"))
        else:
            await _json(send, 404, {"error": {"message": f"no route {scope['method']} {scope['path']}", "code": 404}})

    async def _completion(self, send: Any, body: dict[str, Any], *, chat: bool) -> None:
        index = len(self.arrivals)
        self.arrivals.append(time.monotonic())
        self.bodies.append(body)
        mode = self.failures.get(index)
        if mode in ("429", "500"):
            await _json(send, int(mode), {"error": {"message": f"fixture fails request {index}", "code": int(mode)}})
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            last = await self._stream(send, body, index, mode, chat=chat)
        finally:
            self.in_flight -= 1  # before the last event: once the client sees the end, this request is not counted
        await send({"type": "http.response.body", "body": _sse(last), "more_body": False})

    async def _stream(
        self, send: Any, body: dict[str, Any], index: int, mode: FailMode | None, *, chat: bool
    ) -> dict[str, Any] | str:
        """Sends every event of the reply but the last, which it returns: `[DONE]`, or the mid-stream error."""
        tokens = int(body.get("max_tokens") or 16)
        chunks = math.ceil(tokens / self.tokens_per_chunk)

        async def event(payload: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": _sse(payload), "more_body": True})

        if chat:  # OpenAI's first chat chunk names the role and carries no text: it must not count as the first token
            await event(_chunk(chat, "", None, role=True))
        for c in range(chunks):
            await trio.sleep(self.first_delay_s if c == 0 else self.delay_s)
            if mode == "error-event" and c == chunks // 2:
                return {"error": {"message": f"fixture breaks request {index} mid-stream", "code": 500}}
            n = min(self.tokens_per_chunk, tokens - c * self.tokens_per_chunk)
            await event(_chunk(chat, "".join(f"t{c * self.tokens_per_chunk + i} " for i in range(n)), None))
        await event(_chunk(chat, "", "length"))
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            prompt = body["messages"][-1]["content"] if chat else body["prompt"]
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": tokens}
            await event({"object": "chunk", "choices": [], "usage": usage | {"total_tokens": sum(usage.values())}})
        return "[DONE]"


def _sse(payload: dict[str, Any] | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _chunk(chat: bool, text: str, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
    if chat:
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason}
    return {"id": "fixture", "object": "chunk", "model": "fixture", "choices": [choice]}


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


async def serve(
    app: StreamingFixture, *, host: str = "127.0.0.1", port: int = 0, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serves `app` with hypercorn on trio until cancelled; `nursery.start(serve, app)` returns its base URL (port 0
    picks a free port)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, config))
        task_status.started(binds[0])


@contextmanager
def serving_in_thread(app: StreamingFixture) -> Iterator[str]:
    """The fixture served from its own thread and trio loop, for code that runs `trio.run` itself (the CLI)."""
    ready: queue.Queue[tuple[str, trio.CancelScope, trio.lowlevel.TrioToken] | BaseException] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(partial(serve, app))
                ready.put((url, scope, trio.lowlevel.current_trio_token()))

    def thread_main() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # reaches the caller instead of dying silently in the thread
            ready.put(error)

    thread = threading.Thread(target=thread_main, name="sse-fixture", daemon=True)
    thread.start()
    started = ready.get(timeout=30)
    if isinstance(started, BaseException):
        raise RuntimeError(f"the SSE fixture did not start: {started!r}") from started
    url, scope, token = started
    try:
        yield url
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--first-delay-ms", type=float, default=0.0, help="before the first chunk")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="before every later chunk")
    parser.add_argument("--tokens-per-chunk", type=int, default=1)
    args = parser.parse_args()
    app = StreamingFixture(
        first_delay_s=args.first_delay_ms / 1000, delay_s=args.delay_ms / 1000, tokens_per_chunk=args.tokens_per_chunk
    )
    print(f"SSE fixture on http://127.0.0.1:{args.port} (Ctrl-C to stop)")
    trio.run(partial(serve, app, port=args.port))


if __name__ == "__main__":
    main()
