"""vLLM's routes for LoRA adapters loaded at run time (admin key):

    POST /v1/load_lora_adapter    {"lora_name": NAME, "lora_path": PEFT directory, "base_model_name": MODEL}
    POST /v1/unload_lora_adapter  {"lora_name": NAME}

A loaded adapter is served as a model named NAME (listed in /v1/models with its `parent`, the base model: the graph's,
or the model loaded on demand `base_model_name` names, as vLLM's `--lora-modules` JSON form names it); an unload
lets its requests in flight finish. Errors as vLLM's: 400 for an adapter the engines cannot serve (saying why) or a
name in use, 404 for an unknown name or a path that is not there."""

from __future__ import annotations

import structlog

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.openai.lora.protocol import LoadLoraAdapter, UnloadLoraAdapter
from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")


class LoraRoutes:
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def register(self, app: App, admin: Guard | None, launch: Guard | None) -> None:
        """`launch` (the admin key, even under --admin-auth loopback) guards the load, which reads a path the
        request names with the gateway's rights."""
        app.route("POST", "/v1/load_lora_adapter", self.load, launch)
        app.route("POST", "/v1/unload_lora_adapter", self.unload, admin)

    async def load(self, http: HttpRequest) -> Response:
        body = http.json(LoadLoraAdapter)
        ref = self.core.lora.add(body.lora_name, body.lora_path, body.base_model_name)
        log.info("lora_adapter_loaded", name=ref.lora_name, path=ref.lora_path)
        return Response({"success": True, "message": f"LoRA adapter {ref.lora_name!r} added"})

    async def unload(self, http: HttpRequest) -> Response:
        name = http.json(UnloadLoraAdapter).lora_name
        self.core.lora.remove(name)
        log.info("lora_adapter_unloaded", name=name)
        return Response({"success": True, "message": f"LoRA adapter {name!r} removed"})
