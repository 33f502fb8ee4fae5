"""A benchmark fixture, not a server: a tiny OpenAI-compatible app that streams fixed text with fixed delays,
so `sagellm bench serve` can be tested (and its own overhead seen) against a real HTTP server with known answers.

`/v1/completions` and `/v1/chat/completions` stream `max_tokens` tokens as SSE chunks (`tokens_per_chunk` per chunk,
as llama.cpp's server sometimes groups them), a final `usage` chunk when asked for one, then `[DONE]`. The n-th POST
it receives (0-based) can be told to fail: with HTTP 429 or 500, or with an `error` event halfway through its stream.
It records what a test needs to check the client: arrival times, bodies, Authorization headers and the most requests
in flight at once.
Run it on the gateway's HTTP server: `await nursery.start(serve, app)`, `with serving_in_thread(app)` from sync code, or
`python -m sagellm.benchmarks.sse_fixture --port 8001`."""

from __future__ import annotations

import argparse
import json
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import trio

from sagellm.common.errors import InvalidInput, StartFailed
from sagellm.gateway.http.app import App, EventStream, HttpRequest, Response
from sagellm.gateway.http.limits import HttpLimits
from sagellm.gateway.http.server import serve_http

FailMode = Literal["429", "500", "error-event"]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


class StreamingFixture:
    """The app. `first_delay_s` before the first chunk (a prefill), `delay_s` before each later one (a decode
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
            raise InvalidInput(f"tokens_per_chunk must be >= 1, got {tokens_per_chunk}")
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
        self.app = App()
        self.app.route("GET", "/v1/models", self._models)
        for path in ENDPOINTS:
            self.app.route("POST", path, partial(self._completion, chat=path.endswith("chat/completions")))

    async def _models(self, _: HttpRequest) -> Response:
        return Response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completion(self, request: HttpRequest, *, chat: bool) -> Response | EventStream:
        body = json.loads(request.body)
        self.authorizations.append(request.headers.get("authorization"))
        index = len(self.arrivals)
        self.arrivals.append(time.monotonic())
        self.bodies.append(body)
        mode = self.failures.get(index)
        if mode in ("429", "500"):
            error = {"error": {"message": f"fixture fails request {index}", "code": int(mode)}}
            return Response(error, status=int(mode))
        return EventStream(self._stream(body, index, mode, chat=chat))

    async def _stream(
        self, body: dict[str, Any], index: int, mode: FailMode | None, *, chat: bool
    ) -> AsyncIterator[Any]:
        """Every event of the reply; the last is `[DONE]`, or the mid-stream error."""
        tokens = int(body.get("max_tokens") or 16)
        chunks = math.ceil(tokens / self.tokens_per_chunk)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if chat:  # OpenAI's first chat chunk names the role and carries no text: it is not the first token
                yield _chunk(chat, "", None, role=True)
            for c in range(chunks):
                await trio.sleep(self.first_delay_s if c == 0 else self.delay_s)
                if mode == "error-event" and c == chunks // 2:
                    last: Any = {"error": {"message": f"fixture breaks request {index} mid-stream", "code": 500}}
                    break
                n = min(self.tokens_per_chunk, tokens - c * self.tokens_per_chunk)
                yield _chunk(chat, "".join(f"t{c * self.tokens_per_chunk + i} " for i in range(n)), None)
            else:
                yield _chunk(chat, "", "length")
                if self.usage and (body.get("stream_options") or {}).get("include_usage"):
                    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": tokens}
                    usage["total_tokens"] = sum(usage.values())
                    yield {"object": "chunk", "choices": [], "usage": usage}
                last = b"[DONE]"
        finally:
            self.in_flight -= 1  # before the last event: once the client sees the end, this request is not counted
        yield last


def _chunk(chat: bool, text: str, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
    if chat:
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason}
    return {"id": "fixture", "object": "chunk", "model": "fixture", "choices": [choice]}


async def serve(
    app: StreamingFixture, *, host: str = "127.0.0.1", port: int = 0, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serves `app` until cancelled; `nursery.start(serve, app)` returns its base URL (port 0 picks a free port)."""
    limits = HttpLimits(max_body_bytes=8 * 1024 * 1024, graceful_timeout_s=1)
    await serve_http(app.app, host, port, limits, shutdown_trigger=trio.sleep_forever, task_status=task_status)


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
        raise StartFailed(f"the SSE fixture did not start: {started!r}") from started
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
