"""What a client sees when a route fails unexpectedly: a 500 in OpenAI's shape whose error id finds the traceback
in the gateway's log."""

from __future__ import annotations

import json
from typing import Any

from structlog.testing import capture_logs

from sagellm.gateway.config import LOOPBACK_NAMES
from sagellm.gateway.http.app import App, HttpRequest, Response, host_name


async def call(app: App, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One request through the app, without a server."""
    reply = await app.handle(HttpRequest(method, path, headers or {}, {}, b""))
    assert isinstance(reply, Response)
    return reply.status, json.loads(reply.encoded())


async def test_an_unexpected_failure_is_a_500_with_an_error_id_in_the_log() -> None:
    async def broken(_: HttpRequest) -> Response:
        raise KeyError("a bug")

    app = App()
    app.route("GET", "/broken", broken)
    with capture_logs() as logs:
        status, body = await call(app, "GET", "/broken")
    assert status == 500 and body["error"]["code"] == "internal" and "KeyError" in body["error"]["message"]
    (logged,) = [e for e in logs if e["event"] == "handler_failed"]
    assert logged["error_id"] in body["error"]["message"] and logged["path"] == "/broken" and logged["exc_info"]


async def ok(_: HttpRequest) -> Response:
    return Response({"ok": True})


async def test_a_loopback_gateway_answers_only_to_loopback_names_and_same_site_pages() -> None:
    """DNS rebinding points evil.example at 127.0.0.1 (its requests carry Host: evil.example); a page on another
    site posting a form carries that site's Origin. Clients that are not browsers send no Origin."""
    app = App(allowed_hosts=LOOPBACK_NAMES)
    app.route("GET", "/x", ok)
    for headers, status in [
        ({"host": "127.0.0.1:8000"}, 200),
        ({"host": "localhost:8000", "origin": "http://localhost:3000"}, 200),
        ({"host": "[::1]:8000"}, 200),
        ({}, 200),  # HTTP/1.0 without Host
        ({"host": "evil.example:8000"}, 403),
        ({"host": "127.0.0.1:8000", "origin": "https://evil.example"}, 403),
    ]:
        assert (await call(app, "GET", "/x", headers))[0] == status, headers
    anywhere = App(allowed_hosts=None)
    anywhere.route("GET", "/x", ok)
    assert (await call(anywhere, "GET", "/x", {"host": "evil.example"}))[0] == 200


def test_host_names_without_port_scheme_or_brackets() -> None:
    assert [host_name(v) for v in ("127.0.0.1:8000", "LocalHost", "[::1]:80", "http://a.b:9/x", "::1")] == [
        "127.0.0.1", "localhost", "::1", "a.b", "::1"
    ]  # fmt: skip


async def test_a_named_failure_answers_with_its_kinds_status() -> None:
    """A SageLLMError a route raises is its kind's status and code (a FieldError's field the param); an InternalError
    is a bug like any other."""
    from sagellm.common.errors import FieldError, InternalError, Unavailable

    app = App()
    for path, error in [("/field", FieldError("top_k", "top_k must be >= 1")), ("/down", Unavailable("no backend")),
                        ("/bug", InternalError("never"))]:  # fmt: skip
        app.route("GET", path, _raising(error))
    expected = {"message": "top_k must be >= 1", "type": "invalid_request_error", "param": "top_k"}
    assert await call(app, "GET", "/field") == (400, {"error": {**expected, "code": "invalid_request"}})
    status, body = await call(app, "GET", "/down")
    assert status == 503 and body["error"]["code"] == "unavailable"
    status, body = await call(app, "GET", "/bug")
    assert status == 500 and "InternalError" in body["error"]["message"] and "error id" in body["error"]["message"]


def _raising(error: Exception):
    async def handler(_: HttpRequest) -> Response:
        raise error

    return handler
