"""The OpenAPI document of the gateway, generated from the same msgspec Structs that validate the bodies, so the
document cannot drift from what the server accepts; each body's properties carry its API's `field_help` words. Served
at `/openapi.json`. Its map of routes to bodies is the one the API reference (`sagellm.cli.reference`) and the
security suite's fuzzing read too; it sits above the API rooms because it names the bodies of all of them."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.anthropic import field_help as anthropic_help
from sagellm.gateway.anthropic.protocol import CountTokensRequest, MessagesRequest
from sagellm.gateway.http.app import App, HttpRequest, Response
from sagellm.gateway.openai import field_help as openai_help
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.completion.protocol import CompletionRequest
from sagellm.gateway.openai.embedding.protocol import EmbeddingRequest
from sagellm.gateway.openai.responses.protocol import ResponsesRequest
from sagellm.gateway.openai.tokenization.protocol import DetokenizeRequest, TokenizeRequest

# route -> the body it decodes
BODIES: dict[str, type[msgspec.Struct]] = {
    "POST /v1/chat/completions": ChatCompletionRequest,
    "POST /v1/completions": CompletionRequest,
    "POST /v1/responses": ResponsesRequest,
    "POST /v1/embeddings": EmbeddingRequest,
    "POST /tokenize": TokenizeRequest,
    "POST /detokenize": DetokenizeRequest,
    "POST /v1/messages": MessagesRequest,
    "POST /v1/messages/count_tokens": CountTokensRequest,
}
ANTHROPIC_BODIES = (MessagesRequest, CountTokensRequest)
_ERROR = {"$ref": "#/components/schemas/Error"}


def field_help(body: type[msgspec.Struct], field: str) -> str | None:
    """What `field` of `body` does, in the words of the API the body belongs to."""
    helper = anthropic_help.field_help if body in ANTHROPIC_BODIES else openai_help.field_help
    return helper(body.__name__, field)


def openapi_document(app: App, version: str) -> dict[str, Any]:
    (refs, components) = msgspec.json.schema_components(
        list(BODIES.values()), ref_template="#/components/schemas/{name}"
    )
    body_refs = dict(zip(BODIES, refs))
    for body in BODIES.values():
        for name, schema in components[body.__name__].get("properties", {}).items():
            if (words := field_help(body, name)) is not None:
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
        path = route.pattern.pattern.strip("^$").replace("(?P<", "{").replace(">[^/]+)", "}").replace(">.+)", "}")
        operation: dict[str, Any] = {
            "responses": {
                "200": {"description": "OK"},
                "default": {
                    "description": "An OpenAI-shaped error",
                    "content": {"application/json": {"schema": _ERROR}},
                },
            }
        }
        if (body := body_refs.get(f"{route.method} {path}")) is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
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
