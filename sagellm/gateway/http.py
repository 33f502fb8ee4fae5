"""A small ASGI application: routes, JSON bodies with a size limit, Server-Sent Events, client disconnects.

Why not a web framework: the gateway needs exactly these pieces, on trio (hypercorn's trio worker), with msgspec for
JSON; a framework would bring its own validation, JSON and concurrency model for a dozen routes. A handler is
`async (HttpRequest) -> Response | EventStream`; raising `ApiError` answers with an OpenAI-shaped error. An event
stream's producer is cancelled when the client disconnects, so the request behind it is cancelled too."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import structlog
import trio

from sagellm.common.nursery_errors import single_errors
from sagellm.gateway.config import DEFAULT_MAX_BODY_BYTES
from sagellm.gateway.errors import ApiError

log = structlog.get_logger("sagellm.gateway")
BODY_TIMEOUT_S = 30.0  # a body still arriving after this is given up: a slow client cannot hold a request open


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    query: dict[str, str]
    body: bytes
    path_params: dict[str, str] = field(default_factory=dict)
    scope: dict[str, Any] = field(default_factory=dict)

    def json(self, into: type | None = None) -> Any:
        """The body decoded (and validated into the msgspec type `into`); a bad body is a 400 naming the field."""
        if not self.body:
            raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_request")
        try:
            return msgspec.json.decode(self.body, type=into) if into else msgspec.json.decode(self.body)
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid request: {exc}", param=_field_of(str(exc)), code="invalid_request") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_request") from None
        except UnicodeDecodeError as exc:  # msgspec raises it for a string that is not UTF-8
            raise ApiError(400, f"the request body is not UTF-8: {exc}", code="invalid_request") from None
        except RecursionError:
            raise ApiError(400, "the request body nests arrays or objects too deeply", code="invalid_request") from None


@dataclass
class Response:
    body: bytes | Any = b""  # bytes as is; anything else is encoded as JSON
    status: int = 200
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def encoded(self) -> bytes:
        return self.body if isinstance(self.body, bytes) else msgspec.json.encode(self.body)


@dataclass
class EventStream:
    """`text/event-stream`: each item from `events` is sent as one `data: ...` event (bytes as is, anything else as
    JSON), a tuple of them as that many events in one write (fewer sends when several are ready at once);
    `on_disconnect` runs if the client leaves first."""

    events: AsyncIterator[Any]
    on_disconnect: Callable[[], None] = lambda: None


Handler = Callable[[HttpRequest], Awaitable[Response | EventStream]]
Guard = Callable[[HttpRequest], None]  # raises ApiError to refuse (API keys)


@dataclass
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    guard: Guard | None


class App:
    def __init__(
        self,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allowed_hosts: frozenset[str] | None = None,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        """`allowed_hosts`: the host names a request's `Host` (and a browser's `Origin`) may carry; None: any. A
        gateway on loopback takes only loopback names, so a web page cannot reach it through DNS rebinding, nor
        drive it from another site with a form a browser posts (a cross-site request carries that site's Origin)."""
        self.routes: list[Route] = []
        self.max_body_bytes = max_body_bytes
        self.allowed_hosts = allowed_hosts
        self.body_timeout_s = body_timeout_s

    def route(self, method: str, path: str, handler: Handler, guard: Guard | None = None) -> None:
        """`path` may hold `{name}` segments, given to the handler in `path_params`."""
        pattern = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$")
        self.routes.append(Route(method, pattern, handler, guard))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            route, params = self._match(scope["method"], scope["path"])
            request = await self._read(scope, receive, params)
            self._check_host(request)
            _check_content_type(request)
            if route.guard is not None:
                route.guard(request)
            result = await _unless_disconnected(route.handler, request, receive)
            if result is None:
                return  # the client left before the reply: the handler was cancelled, and with it the request
        except ApiError as error:
            result = Response(error.json(), error.status, headers=error.headers)
        except Exception as exc:
            error_id = secrets.token_hex(6)  # finds the traceback in the gateway's log
            log.exception("handler_failed", path=scope.get("path"), error_id=error_id)
            message = f"internal server error {type(exc).__name__} (error id {error_id} in the gateway log)"
            result = Response(ApiError(500, message, code="internal").json(), 500)
        if isinstance(result, EventStream):
            await _stream(result, receive, send)
        else:
            await _respond(send, result)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is not None:
                if route.method == method:
                    return route, found.groupdict()
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, f"method {method} is not allowed on {path}", allow=allowed)
        raise ApiError(404, f"no route {method} {path}", code="not_found")

    async def _read(self, scope: dict, receive: Callable, params: dict[str, str]) -> HttpRequest:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            with trio.move_on_after(self.body_timeout_s) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s", code="timeout")
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        return HttpRequest(scope["method"], scope["path"], headers, query, b"".join(chunks), params, scope)

    def _check_host(self, request: HttpRequest) -> None:
        if self.allowed_hosts is None:
            return
        for header in ("host", "origin"):
            value = request.headers.get(header)
            if value is not None and host_name(value) not in self.allowed_hosts:
                allowed = ", ".join(sorted(self.allowed_hosts))
                raise ApiError(
                    403, f"{header} {value!r} is not one this gateway answers to ({allowed})", code="forbidden"
                )


def _check_content_type(request: HttpRequest) -> None:
    """A body sent as text/plain is refused: it is the one type a web page's form can post cross-site, without a
    CORS preflight, whose body can still be valid JSON (a CSRF). Urlencoded and multipart bodies never parse as JSON,
    so `curl -d` (urlencoded by default) keeps working."""
    if request.body and request.headers.get("content-type", "").lower().startswith("text/plain"):
        raise ApiError(415, "send JSON bodies as Content-Type: application/json, not text/plain", code="unsupported")


def host_name(value: str) -> str:
    """The host of a `Host` header or an `Origin` ("http://host:port"): no scheme, port or IPv6 brackets."""
    authority = value.split("://", 1)[-1].split("/", 1)[0].lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _field_of(message: str) -> str | None:
    """`Expected int, got str - at $.max_tokens` -> `max_tokens` (msgspec names the field in its message)."""
    found = re.search(r"at `?\$\.([\w.\[\]]+)", message)
    return found.group(1) if found else None


async def _unless_disconnected(
    handler: Handler, request: HttpRequest, receive: Callable
) -> Response | EventStream | None:
    """The handler's reply, or None when the client disconnects first: the handler is cancelled then, so a request
    whose client gave up (a timeout, a retry) stops using the engine instead of running to its end unread. A stream,
    once returned, watches for its own disconnect (`_stream`)."""
    result: Response | EventStream | None = None
    with single_errors():  # the handler's ApiError, raised as itself
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            result = await handler(request)
            nursery.cancel_scope.cancel()
    return result


async def _respond(send: Callable, response: Response) -> None:
    body = response.encoded()
    headers = [(b"content-type", response.content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": response.status, "headers": headers + response.headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(stream: EventStream, receive: Callable, send: Callable) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    disconnected = False
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        try:
            async with aclosing(stream.events):
                async for item in stream.events:
                    body = b"".join(_frame(event) for event in (item if isinstance(item, tuple) else (item,)))
                    await send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError:  # the transport went away mid-send
            disconnected = True
        nursery.cancel_scope.cancel()
    if disconnected:
        stream.on_disconnect()
        return
    # The end is sent once nothing watches for a disconnect: the server readies the connection for its next request
    # inside this call (and tells this app the stream closed), which a watcher's cancel must not interrupt, or the
    # kept-alive connection is never seen idle and a graceful shutdown waits its whole timeout for it.
    with suppress(OSError):
        await send({"type": "http.response.body", "body": b""})


def _frame(event: Any) -> bytes:
    return b"data: " + (event if isinstance(event, bytes) else msgspec.json.encode(event)) + b"\n\n"


async def lifespan(receive: Callable, send: Callable) -> None:
    """ASGI lifespan: nothing to set up or tear down (the gateway starts its graph before serving); the benchmark's
    fixture server answers with it too."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
