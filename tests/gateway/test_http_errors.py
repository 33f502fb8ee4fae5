"""What a client sees when a route fails unexpectedly: a 500 in OpenAI's shape whose error id finds the traceback
in the gateway's log."""

from __future__ import annotations

import json
from typing import Any

import trio
from structlog.testing import capture_logs

from sagellm.gateway.http import App, HttpRequest, Response


async def call(app: App, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request through the ASGI app, without a server."""
    sent: list[dict[str, Any]] = []
    bodies = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if bodies:
            return bodies.pop()
        await trio.sleep_forever()  # as a server does until the client disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": []}
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


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
