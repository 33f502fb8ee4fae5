"""The routes of the models loaded on demand (admin key), llama.cpp's router's:

    POST /models/load      {"model": NAME}   start loading it (its status in /v1/models goes loading -> loaded)
    POST /models/unload    {"model": NAME}   drain it (its requests finish), then unload it
    GET  /v1/management/models               every model: status, engine, memory, requests, idle time

Load and unload answer {"success": true} at once, as llama.cpp's do; `/v1/models` shows where they got. A name the
gateway does not serve is a 404 naming those it does."""

from __future__ import annotations

import msgspec

from sagellm.gateway.control.model_pool import ModelPool
from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError


class ModelName(msgspec.Struct, forbid_unknown_fields=True):
    model: str


class ModelRoutes:
    def __init__(self, models: ModelPool | None) -> None:
        self.models = models

    def register(self, app: App, admin: Guard | None, launch: Guard | None) -> None:
        """`launch` (the admin key, even under --admin-auth loopback) guards the load, which starts a process."""
        app.route("POST", "/models/load", self.load, launch)
        app.route("POST", "/models/unload", self.unload, admin)
        app.route("GET", "/v1/management/models", self.list_models, admin)

    async def load(self, http: HttpRequest) -> Response:
        name = http.json(ModelName).model
        self._pool(name).load(name)
        return Response({"success": True})

    async def unload(self, http: HttpRequest) -> Response:
        name = http.json(ModelName).model
        self._pool(name).unload(name)
        return Response({"success": True})

    async def list_models(self, _: HttpRequest) -> Response:
        pool = self.models
        return Response({"object": "list", "data": [pool.details(n) for n in pool.names()] if pool else []})

    def _pool(self, name: str) -> ModelPool:
        if self.models is None:
            raise ApiError(400, "this gateway loads no model on demand (serve with --model NAME=MODEL)",
                           param="model")  # fmt: skip
        if name not in self.models.models:
            served = ", ".join(repr(n) for n in self.models.names())
            raise ApiError(404, f"the model {name!r} does not exist here; this server loads {served}", param="model",
                           code="model_not_found")  # fmt: skip
        return self.models
