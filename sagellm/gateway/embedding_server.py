"""`serve_embeddings()`: a server with only an embedding model (`sagellm serve --no-llm -e MODEL`), the process
behind an `embedding` engine of the control plane.

It answers what an OpenAI-compatible embedding server does, `/v1/embeddings` and `/v1/models`, plus `/health`, with
the gateway's own embedding route, so the two cannot answer differently; no graph and no LLM load."""

from __future__ import annotations

import time
from functools import partial

import structlog
import trio
from hypercorn.trio import serve as hypercorn_serve

from sagellm.gateway.auth import key_guard
from sagellm.gateway.config import GatewayConfig
from sagellm.gateway.embeddings import EmbeddingService
from sagellm.gateway.http import App, HttpRequest, Response
from sagellm.gateway.openai_routes import OpenAIRoutes
from sagellm.gateway.server import hypercorn_config, stop_on_signal

log = structlog.get_logger("sagellm.gateway")


def build_embedding_app(embeddings: EmbeddingService, config: GatewayConfig) -> App:
    app = App(max_body_bytes=config.max_body_bytes, allowed_hosts=config.host_names())
    guard = key_guard(config.api_keys, "API")
    created = int(time.time())

    async def models(_: HttpRequest) -> Response:
        card = {"id": embeddings.name, "object": "model", "created": created, "owned_by": "sagellm"}
        return Response({"object": "list", "data": [card | {"max_model_len": embeddings.max_length}]})

    async def health(_: HttpRequest) -> Response:
        return Response({"status": "ok", "model": embeddings.name})

    app.route("GET", "/health", health)
    app.route("GET", "/v1/models", models, guard)
    app.route("POST", "/v1/embeddings", OpenAIRoutes(None, embeddings).embeddings, guard)
    return app


async def serve_embeddings(model: str, config: GatewayConfig, *, handle_signals: bool = False) -> None:
    """Loads `model`, then serves until SIGINT/SIGTERM (with `handle_signals`) or cancellation."""
    embeddings = EmbeddingService(model)
    await embeddings.load()
    hyper = hypercorn_config(config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        signals = trio.CancelScope()
        if handle_signals:
            nursery.start_soon(stop_on_signal, stop, signals)
        app = build_embedding_app(embeddings, config)
        binds = await nursery.start(partial(hypercorn_serve, app, hyper, shutdown_trigger=stop.wait))
        log.info("embedding_server_ready", url=binds[0], model=embeddings.name)
        await stop.wait()
        signals.cancel()
