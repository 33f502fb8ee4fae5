"""The OpenAPI document of the gateway, generated from the same msgspec Structs that validate the bodies, so the
document cannot drift from what the server accepts; each body's properties carry `field_help`'s words. Served at
`/openapi.json`."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.http.app import App, HttpRequest, Response
from sagellm.gateway.openai.field_help import field_help
from sagellm.gateway.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from sagellm.gateway.openai.tokenizer_routes import DetokenizeRequest, TokenizeRequest

_BODIES = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
_ERROR = {"$ref": "#/components/schemas/Error"}


def openapi_document(app: App, version: str) -> dict[str, Any]:
    (refs, components) = msgspec.json.schema_components(
        list(_BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    body_refs = dict(zip(_BODIES, refs))
    for body in _BODIES.values():
        for name, schema in components[body.__name__].get("properties", {}).items():
            if (words := field_help(body.__name__, name)) is not None:
                schema["description"] = words
    components["Error"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {k: {"type": ["string", "null"]} for k in ("message", "type", "param", "code")},
            }
        },
    }
    paths: dict[str, Any] = {}
    for route in app.routes:
        path = route.pattern.pattern.strip("^$").replace("(?P<", "{").replace(">[^/]+)", "}")
        operation: dict[str, Any] = {
            "responses": {
                "200": {"description": "OK"},
                "default": {
                    "description": "An OpenAI-shaped error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
            }
        }
        if path in body_refs and route.method == "POST":
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_refs[path]}}}
        if route.guard is not None:
            operation["security"] = [{"bearer": []}]
        names = route.pattern.groupindex  # `{session_id}`, `{engine_id}`: every path parameter is declared
        if names:
            schema = {"type": "string"}
            operation["parameters"] = [{"name": n, "in": "path", "required": True, "schema": schema} for n in names]
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "sageLLM gateway", "version": version},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def register(app: App, version: str) -> None:
    """`/openapi.json`, and `/`: what answers here, for a client that checks the server is up (Claude Code's
    `HEAD /`) or a person who opens it in a browser."""

    async def document(_: HttpRequest) -> Response:
        return Response(openapi_document(app, version))

    async def root(_: HttpRequest) -> Response:
        return Response({"name": "sageLLM", "version": version, "openapi": "/openapi.json"})

    app.route("GET", "/openapi.json", document)
    app.route("GET", "/", root)
