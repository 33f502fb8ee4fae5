"""Pass-through of an OpenAI request to a managed engine: same method, path, query and body, the reply's status,
content type and error body kept, a streamed reply's SSE events relayed one by one as they arrive.

The client's own key is for the gateway and is never forwarded; the engine gets its own. A body whose `model` is
the gateway's name for an engine that knows the model by another name is rewritten to that name. If the engine
cannot be reached the client gets a 503 OpenAI error; if it goes away mid-stream, an error event and `[DONE]` end
the stream (never text), as our own routes do. A client that leaves closes the upstream connection, which cancels
the request at the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import httpx
import msgspec
import trio

from sagellm.common.sse import sse_data
from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import EventStream, HttpRequest, Response

if TYPE_CHECKING:
    from sagellm.gateway.engine_spec import ManagedEngine

DONE = b"[DONE]"
# Connection-level headers and the client's credentials stay at the gateway.
_NOT_FORWARDED = {
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
    "authorization", "x-api-key",
}  # fmt: skip
_KEPT_REPLY_HEADERS = ("retry-after",)


def client() -> httpx.AsyncClient:
    """The manager's client: no read timeout (a long generation streams for minutes) and no pool cap below what
    `max_concurrent` and the engines' own admission already bound."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=60.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )


def auth(engine: ManagedEngine) -> dict[str, str]:
    return {"authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}


async def forward(
    client: httpx.AsyncClient, engine: ManagedEngine, http: HttpRequest, release: Callable[[], None]
) -> Response | EventStream:
    """`release` is called once the engine's reply has been relayed (or failed): the caller counts requests in
    flight with it."""
    headers = {k: v for k, v in http.headers.items() if k not in _NOT_FORWARDED} | auth(engine)
    body = http.body
    if engine.upstream_model and engine.upstream_model != engine.name and body:
        body = _with_model(body, engine.upstream_model)
    request = client.build_request(http.method, engine.url + http.path, params=http.query, content=body,
                                   headers=headers)  # fmt: skip
    try:
        reply = await client.send(request, stream=True)
    except BaseException as exc:  # also a cancellation: the count must not leak
        release()
        if isinstance(exc, httpx.HTTPError):
            raise _unreachable(engine, exc) from None
        raise
    if reply.status_code == 200 and reply.headers.get("content-type", "").startswith("text/event-stream"):
        return EventStream(_relay(engine, reply, release))
    try:
        content = await reply.aread()
    except httpx.HTTPError as exc:
        raise _unreachable(engine, exc) from None
    finally:
        with trio.CancelScope(shield=True):
            await reply.aclose()
        release()
    kept = [(k.encode(), reply.headers[k].encode()) for k in _KEPT_REPLY_HEADERS if k in reply.headers]
    content_type = reply.headers.get("content-type", "application/json")
    return Response(content, reply.status_code, content_type=content_type, headers=kept)


async def _relay(engine: ManagedEngine, reply: httpx.Response, release: Callable[[], None]) -> AsyncIterator[bytes]:
    """Each SSE event's data, as the gateway's EventStream frames it again (`data: ...`)."""
    try:
        async for data in sse_data(reply.aiter_lines()):
            yield data.encode()
    except httpx.HTTPError as exc:
        error = ApiError(503, f"engine {engine.id} failed mid-stream: {exc}", code="instance_lost")
        yield msgspec.json.encode(error.body())
        yield DONE
    finally:
        with trio.CancelScope(shield=True):  # also when the client left and the stream is being cancelled
            await reply.aclose()
        release()


def _with_model(body: bytes, model: str) -> bytes:
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body  # the engine answers the bad body itself
    if isinstance(decoded, dict):
        decoded["model"] = model
    return msgspec.json.encode(decoded)


def _unreachable(engine: ManagedEngine, exc: Exception) -> ApiError:
    reason = str(exc) or type(exc).__name__
    return ApiError(503, f"engine {engine.id} serving {engine.name!r} is unreachable: {reason}", code="unavailable")
