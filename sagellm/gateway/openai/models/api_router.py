"""`GET /v1/models`: the models this gateway serves as OpenAI's model cards (the graph's, attached servers', models
loaded on demand with their status, and LoRA adapters as vLLM lists them: with their `parent`), each with its
`max_model_len` where it is known here and, for the graph's own model and the embedding model, the inputs it reads
(`input_modalities`: text, and image for a model with a vision encoder); `GET /v1/models/{model}` one of those
cards (the openai SDK's `models.retrieve`), or OpenAI's 404 `model_not_found` for a name not served."""

from __future__ import annotations

import time
from typing import Any

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore


class ModelsRoutes:
    def __init__(self, core: ServingCore) -> None:
        self.core = core
        self.created = int(time.time())

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("GET", "/v1/models", self.models, guard)
        app.route("GET", "/v1/models/{model:path}", self.model, guard)  # a model named by its path has slashes

    async def models(self, http: HttpRequest) -> Response:
        return Response({"object": "list", "data": self._cards(key_owner(http))})

    async def model(self, http: HttpRequest) -> Response:
        cards = self._cards(key_owner(http))
        name = http.path_params["model"]
        card = next((card for card in cards if card["id"] == name), None)
        if card is None:
            served = ", ".join(repr(card["id"]) for card in cards)
            message = f"the model {name!r} does not exist here; this server has {served}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return Response(card)

    def _cards(self, owner: str) -> list[dict[str, Any]]:
        """The cards of the models (and adapters) the caller's key may use."""

        def card(name: str) -> dict[str, Any]:
            embedder = self.core.embedder(name)
            own = self.core.max_model_len if name == self.core.model_name else None
            length = {"max_model_len": embedder.max_length if embedder is not None else own}
            pool = self.core.readiness.models_on_demand
            status = {}
            if pool is not None:  # the graph's own models are loaded as long as it runs
                status = {"status": pool.status(name) if name in pool.models else {"value": "loaded"}}
            inputs = self._input_modalities(name, embedder is not None)
            return {"id": name, "object": "model", "created": self.created, "owned_by": "sagellm", **length, **status,
                    **inputs}  # fmt: skip

        def adapter(name: str, path: str, parent: str) -> dict[str, Any]:  # vLLM's card of a LoRA adapter
            return {**card(parent), "id": name, "root": path, "parent": parent}

        adapters = [adapter(ref.lora_name, ref.lora_path, parent) for ref, parent in self.core.lora.listed()]
        cards = [card(name) for name in self.core.models()] + adapters
        return [card for card in cards if self.core.tenants.ring.may_use(owner, card["id"])]

    def _input_modalities(self, name: str, embedder: bool) -> dict[str, list[str]]:
        """What a model reads (OpenRouter's and LiteLLM's `input_modalities`), where this server knows: the graph's
        own model (text, images with a vision encoder, audio with an audio encoder) and the embedding model;
        nothing said of others'."""
        served = self.core.served
        if name == self.core.model_name and served is not None and not embedder:
            config = served.config
            return {"input_modalities": ["text"] + ["image"] * (config.vision is not None)
                    + ["audio"] * (config.audio is not None)}  # fmt: skip
        return {"input_modalities": ["text"]} if embedder else {}
