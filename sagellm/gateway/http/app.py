"""The gateway's application: routes, JSON bodies, Server-Sent Events, OpenAI-shaped errors.

Why not a web framework: the gateway needs exactly these pieces, on trio, with msgspec for JSON; a framework would
bring its own validation, JSON and concurrency model for a dozen routes. A handler is
`async (HttpRequest) -> Response | EventStream`; raising `ApiError`, or any other `SageLLMError` (with its kind's
status), answers with an OpenAI-shaped error. The server (`http_server`) reads the request, calls `App.handle` and
writes the reply; when the client disconnects it cancels the handler, or stops the event stream and calls its
`on_disconnect`, so the request behind it is cancelled too."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import structlog

from sagellm.common import tracing
from sagellm.common.errors import InternalError, SageLLMError
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.json_depth import MAX_BODY_DEPTH, too_deep
from sagellm.gateway.http.unknown_fields import unknown_fields_error

log = structlog.get_logger("sagellm.gateway")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # what an echoed X-Request-Id may hold: nothing to inject


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    query: dict[str, str]
    body: bytes
    path_params: dict[str, str] = field(default_factory=dict)
    version: str = "HTTP/1.1"
    owner: str | None = None  # the gateway's own request for a client (a batch's line): the key digest it runs for

    def json(self, into: type | None = None) -> Any:
        """The body decoded (and validated into the msgspec type `into`); a bad body is a 400 naming the field."""
        if not self.body:
            raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_request")
        if (depth := too_deep(self.body)) is not None:
            message = f"the request body nests arrays or objects too deeply: {depth} levels, at most {MAX_BODY_DEPTH}"
            raise ApiError(400, message, code="invalid_request")
        try:
            return msgspec.json.decode(self.body, type=into) if into else msgspec.json.decode(self.body)
        except msgspec.ValidationError as exc:
            if (unknown := unknown_fields_error(exc, self.body, into)) is not None:
                raise unknown from None  # every unknown field named, each with the one it was probably meant to be
            raise ApiError(400, f"invalid request: {exc}", param=_field_of(str(exc)), code="invalid_request") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # msgspec's versions differ in which one bad UTF-8 is
            raise _undecodable(self.body, exc) from None
        except RecursionError:
            raise ApiError(400, "the request body nests arrays or objects too deeply", code="invalid_request") from None


def _undecodable(body: bytes, exc: Exception) -> ApiError:
    """A body msgspec could not decode: said as not UTF-8 where it is not (the position of the first bad byte), else
    as not JSON with msgspec's reason."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return ApiError(400, f"the request body is not UTF-8: {bad}", code="invalid_request")
    return ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_request")


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
    `on_disconnect` runs if the client leaves first. `ndjson`: `application/x-ndjson` instead, each item one JSON
    line (Ollama's streams)."""

    events: AsyncIterator[Any]
    on_disconnect: Callable[[], None] = lambda: None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ndjson: bool = False

    @property
    def content_type(self) -> bytes:
        return b"application/x-ndjson" if self.ndjson else b"text/event-stream"

    def framed(self, item: Any) -> bytes:
        """An item's bytes on the wire (a tuple's, its events' together)."""
        each = item if isinstance(item, tuple) else (item,)
        if self.ndjson:
            return b"".join(msgspec.json.encode(event) + b"\n" for event in each)
        return b"".join(frame(event) for event in each)


@dataclass(frozen=True)
class NamedEvent:
    """An event sent with its name (`event: NAME`) before its data, as Anthropic's streams name every event."""

    name: str
    data: Any


class LastEvents(tuple):
    """The events that end a stream (an `EventStream` item): the server sends them and the reply's end in one
    write."""


Handler = Callable[[HttpRequest], Awaitable[Response | EventStream]]
Guard = Callable[[HttpRequest], None]  # raises ApiError to refuse (API keys)
ErrorShape = Callable[["ApiError"], Response]  # an API's own error body for a status (OpenAI's by default)


class Collection(Protocol):
    """The handlers of a collection of named things under one path (`App.collection`)."""

    async def create(self, http: HttpRequest) -> Response: ...
    async def list(self, http: HttpRequest) -> Response: ...
    async def show(self, http: HttpRequest) -> Response: ...
    async def delete(self, http: HttpRequest) -> Response: ...


@dataclass
class Route:
    method: str
    pattern: re.Pattern
    handler: Handler
    guard: Guard | None
    error_shape: ErrorShape


class App:
    def __init__(self, *, allowed_hosts: frozenset[str] | None = None) -> None:
        """`allowed_hosts`: the host names a request's `Host` (and a browser's `Origin`) may carry; None: any. A
        gateway on loopback takes only loopback names, so a web page cannot reach it through DNS rebinding, nor
        drive it from another site with a form a browser posts (a cross-site request carries that site's Origin)."""
        self.routes: list[Route] = []
        self.allowed_hosts = allowed_hosts
        self.fallback: Handler | None = None  # answers what no route matches (an API server passes it on)
        self._verdicts: dict[str, bool] = {}  # Host / Origin value -> allowed
        self._fixed: dict[tuple[str, str], Route] = {}  # (method, path) -> the route that wins it, for fixed paths

    def route(
        self,
        method: str,
        path: str,
        handler: Handler,
        guard: Guard | None = None,
        error_shape: ErrorShape | None = None,
    ) -> None:
        """`path` may hold `{name}` segments, given to the handler in `path_params`, and a last `{name:path}` one
        that takes the rest of the path, slashes too (a model named by its path); `error_shape`: how the route's
        errors (its guard's too) are written, for an API whose clients parse another shape than OpenAI's."""
        segments = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
        pattern = re.compile("^" + re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", segments) + "$")
        route = Route(method, pattern, handler, guard, error_shape or error_response)
        if "{" not in path and not any(r.method == method and r.pattern.match(path) for r in self.routes):
            self._fixed[method, path] = route  # a dict lookup, not a scan of every pattern, finds it
        self.routes.append(route)

    def collection(self, path: str, item: str, handlers: Collection, guard: Guard | None = None) -> None:
        """A collection's routes, the same for every one: POST `path` creates, GET `path` lists, GET `path/{item}`
        shows one and DELETE `path/{item}` deletes it (`item`: the path parameter that names it)."""
        self.route("POST", path, handlers.create, guard)
        self.route("GET", path, handlers.list, guard)
        self.route("GET", f"{path}/{{{item}}}", handlers.show, guard)
        self.route("DELETE", f"{path}/{{{item}}}", handlers.delete, guard)

    async def handle(
        self, request: HttpRequest, *, host_checked: bool = False, guarded: bool = True
    ) -> Response | EventStream:
        """The reply to one request: the handler's, or an OpenAI-shaped error: a SageLLMError's status and code, and
        for a bug (an InternalError too) a 500 whose error id finds the traceback in the log. `host_checked`: an API
        server that passed the request on checked its Host; `guarded=False`: the gateway's own request, for the
        `owner` it names (a batch's line, whose key was checked when the batch was created), passes no guard. Every
        reply carries an `x-request-id` (`request_id`)."""
        reply = await self._reply(request, host_checked, guarded)
        if not any(name == b"x-request-id" for name, _ in reply.headers):  # (one a core's reply already has stays)
            reply.headers.append((b"x-request-id", request_id(request).encode()))
        return reply

    async def _reply(self, request: HttpRequest, host_checked: bool, guarded: bool = True) -> Response | EventStream:
        shape = error_response  # OpenAI's, until the request's route says otherwise
        try:
            if not host_checked:
                self._check_host(request)
            if self.fallback is not None and not self._matches(request.path):
                return await self.fallback(request)
            route, request.path_params = self._match(request.method, request.path)
            shape = route.error_shape
            _check_content_type(request)
            if route.guard is not None and guarded:
                route.guard(request)
            tracing.incoming.set(request.headers.get("traceparent"))  # what a request it submits is a child of
            return await route.handler(request)
        except Exception as exc:
            if isinstance(exc, SageLLMError) and not isinstance(exc, InternalError):
                return shape(ApiError.of(exc))  # an ApiError as it is
            error_id = secrets.token_hex(6)
            log.exception("handler_failed", path=request.path, error_id=error_id)
            message = f"internal server error {type(exc).__name__} (error id {error_id} in the gateway log)"
            return shape(ApiError(500, message, code="internal"))

    def _matches(self, path: str) -> bool:
        return any(route.pattern.match(path) for route in self.routes)

    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route of a method and path; HEAD is answered by the GET route (the server sends its head alone)."""
        wanted = "GET" if method == "HEAD" else method
        fixed = self._fixed.get((wanted, path))
        if fixed is not None:
            return fixed, {}
        allowed: list[str] = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is not None:
                if route.method == wanted:
                    return route, found.groupdict()
                allowed.append(route.method)
        if allowed:
            raise ApiError(405, f"method {method} is not allowed on {path}", allow=allowed)
        raise ApiError(404, f"no route {method} {path}", code="not_found")

    def _allowed(self, value: str) -> bool:
        """A Host or Origin value's verdict, remembered: clients send the same few values on every request."""
        verdict = self._verdicts.get(value)
        if verdict is None:
            if len(self._verdicts) >= 1024:  # any number of made-up names cannot grow it
                self._verdicts.clear()
            verdict = self._verdicts[value] = host_name(value) in (self.allowed_hosts or ())
        return verdict

    def _check_host(self, request: HttpRequest) -> None:
        if self.allowed_hosts is None:
            return
        for header in ("host", "origin"):
            value = request.headers.get(header)
            if value is not None and not self._allowed(value):
                allowed = ", ".join(sorted(self.allowed_hosts))
                raise ApiError(
                    403, f"{header} {value!r} is not one this gateway answers to ({allowed})", code="forbidden"
                )


def request_id(request: HttpRequest) -> str:
    """The id a reply's `x-request-id` header carries: the client's own (`X-Request-Id`, as vLLM echoes it) when it
    is a short plain token, else a fresh one, so a client can name the request in a report either way."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(16)


def error_response(error: ApiError) -> Response:
    """An ApiError as the reply a client gets: OpenAI's error body, its status and headers."""
    return Response(error.json(), error.http_status, headers=error.headers)


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
    """`Expected int, got str - at $.max_tokens` -> `max_tokens` (msgspec names the field in its message); a map's
    key or value (`at key in $.metadata`, `at $.metadata[...]`) names the map."""
    found = re.search(r"\$\.([\w.\[\]]+)", message)
    return found.group(1).replace("[...]", "") if found else None


# Characters JSON leaves raw that Python's str.splitlines() (and so httpx's `iter_lines`) takes for line breaks:
# NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR. Escaped, a token's text cannot split its event for such clients.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def frame(event: Any) -> bytes:
    """One SSE event: bytes as they are, anything else as JSON; a `NamedEvent` with its `event:` line."""
    if isinstance(event, NamedEvent):
        return b"event: " + event.name.encode() + b"\ndata: " + _one_line(msgspec.json.encode(event.data)) + b"\n\n"
    return b"data: " + _one_line(event if isinstance(event, bytes) else msgspec.json.encode(event)) + b"\n\n"


def _one_line(data: bytes) -> bytes:
    """JSON with the characters other than CR and LF that some clients split lines at escaped (they occur only
    inside its strings, and their UTF-8 bytes only as themselves)."""
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data
