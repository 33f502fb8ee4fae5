"""What an API server passes on to the core's own HTTP server (`api_server.CoreProxy`), against a real server on
127.0.0.1 (the benchmark's SSE fixture): the method, path, query, headers and body go as they came; a reply comes
back with its status, type and Retry-After, an event stream as it streams; a core that does not answer is a 503."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from sagellm.benchmarks.sse_fixture import StreamingFixture, serve
from sagellm.gateway.api_server import CoreProxy
from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import EventStream, HttpRequest, Response


def proxy_to(url: str) -> CoreProxy:
    return CoreProxy(SimpleNamespace(snapshot=SimpleNamespace(core_url=url)))  # type: ignore[arg-type]


async def test_replies_and_streams_come_back_as_the_core_gave_them() -> None:
    fixture = StreamingFixture(failures={1: "429"})
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, fixture)
        proxy = proxy_to(url)
        body = b'{"model": "fixture", "prompt": "a b", "max_tokens": 4, "stream": true}'
        headers = {"authorization": "Bearer k", "content-type": "application/json", "connection": "keep-alive"}
        streamed = await proxy(HttpRequest("POST", "/v1/completions", headers, {"x": "1"}, body))
        assert isinstance(streamed, EventStream) and streamed.framed
        text = b"".join([chunk async for chunk in streamed.events]).decode()
        assert text.count("data: ") == 6 and text.rstrip().endswith("data: [DONE]")  # 4 tokens, the end, [DONE]
        assert fixture.authorizations == ["Bearer k"] and fixture.bodies[0]["prompt"] == "a b"
        refused = await proxy(HttpRequest("POST", "/v1/completions", headers, {}, body))
        assert isinstance(refused, Response) and refused.status == 429
        models = await proxy(HttpRequest("GET", "/v1/models", {}, {}, b""))
        assert isinstance(models, Response) and models.status == 200 and b"fixture" in models.body
        nursery.cancel_scope.cancel()


async def test_a_core_that_does_not_answer_is_a_503() -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        await proxy_to(f"http://127.0.0.1:{port}")(HttpRequest("GET", "/health", {}, {}, b""))
    except ApiError as error:
        assert error.status == 503 and "did not answer" in str(error.message)
    else:
        raise AssertionError("expected a 503")
