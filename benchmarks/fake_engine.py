"""A benchmark fixture, not an engine: an OpenAI-compatible server on aiohttp that streams a fixed 16-word reply to
every chat or text completion, with no model and no compute, from chunks formatted once at start. It is the floor of
`sagellm bench gateway` and the engine behind vllm-router there: fast enough (thousands of requests per second on
one core) that the front end in front of it, not it, is what the benchmark sees.

    python -m sagellm.benchmarks.fake_engine --port 8001 [--tokens 16] [--server ours]

`--server ours` serves the same chunks, each in its own write as aiohttp writes them, on sageLLM's own HTTP server
(`sagellm.gateway.http.server`): what our HTTP stack alone costs beside aiohttp's, the floor under our gateway.
aiohttp (installed with vllm-router, by the bench and test extras) is imported where it is used, so `bench gateway`
reads REPLY without it."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from sagellm.gateway.http.app import App

REPLY = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun today"
MODEL = "fake"


def chunks(tokens: int, chat: bool) -> list[bytes]:
    """The SSE events of one reply: (chat: a role event,) one per word, a finish event, [DONE]."""
    words = REPLY.split()
    texts = [(" " if i else "") + words[i % len(words)] for i in range(tokens)]

    def event(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice, kind = {"index": 0, "text": text or "", "finish_reason": finish}, "text_completion"
        body = {"id": "fake", "object": kind, "model": MODEL, "choices": [choice]}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    head = [event(None, role=True)] if chat else []
    return [*head, *(event(t) for t in texts), event(None, "length"), b"data: [DONE]\n\n"]


def app(tokens: int) -> web.Application:
    from aiohttp import web

    replies = {chat: chunks(tokens, chat) for chat in (True, False)}

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for chunk in replies[request.path.endswith("chat/completions")]:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    application = web.Application()
    application.router.add_post("/v1/chat/completions", stream)
    application.router.add_post("/v1/completions", stream)
    application.router.add_get("/v1/models", models)
    application.router.add_get("/health", health)
    return application


def our_app(tokens: int) -> App:
    """`app`'s routes and replies on our own HTTP server's `App`."""
    from sagellm.gateway.http.app import App, EventStream, HttpRequest, Response

    replies = {chat: [c.removeprefix(b"data: ").removesuffix(b"\n\n") for c in chunks(tokens, chat)]
               for chat in (True, False)}  # fmt: skip  # (the server frames each event)

    async def events(chat: bool) -> AsyncIterator[bytes]:
        for event in replies[chat]:
            yield event

    async def stream(request: HttpRequest) -> EventStream:
        return EventStream(events(request.path.endswith("chat/completions")))

    async def models(_: HttpRequest) -> Response:
        return Response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def health(_: HttpRequest) -> Response:
        return Response({"status": "ok"})

    application = App()
    application.route("POST", "/v1/chat/completions", stream)
    application.route("POST", "/v1/completions", stream)
    application.route("GET", "/v1/models", models)
    application.route("GET", "/health", health)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=16, help="words streamed per reply (default: 16)")
    parser.add_argument("--server", choices=("aiohttp", "ours"), default="aiohttp", help="whose HTTP server")
    args = parser.parse_args()
    if args.server == "ours":
        import trio

        from sagellm.gateway.http.limits import HttpLimits
        from sagellm.gateway.http.server import serve_http

        limits = HttpLimits(max_body_bytes=1 << 20)
        trio.run(partial(serve_http, our_app(args.tokens), "127.0.0.1", args.port, limits,
                         shutdown_trigger=trio.sleep_forever))  # fmt: skip
        return
    from aiohttp import web

    web.run_app(app(args.tokens), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
