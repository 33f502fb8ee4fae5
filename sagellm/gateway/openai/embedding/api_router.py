"""`POST /v1/embeddings`: OpenAI's embeddings of a text, texts or token ids, each input a pipeline request of its own
to the embedding model (`phase: embed`), its vector as floats or base64 (little-endian float32, as OpenAI's)."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.embedding.protocol import EmbeddingRequest
from sagellm.gateway.serving.interface import Embedder, ServingApi
from sagellm.gateway.serving.request_stream import embedded
from sagellm.runtime.engine.request_limits import MAX_EMBEDDING_INPUTS
from sagellm.runtime.pipeline.messages import Embedding, Request


class EmbeddingRoutes:
    def __init__(self, core: ServingApi) -> None:
        self.core = core

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/embeddings", self.embeddings, guard)

    async def embeddings(self, http: HttpRequest) -> Response:
        body = http.json(EmbeddingRequest)
        model = self.core.embedding_model(body.model)
        card = await self.ready_card(model)
        if card is not None and card.task != "embed":
            why = "a sequence classifier, not an embedding model; its scores are served by /rerank, /score, /classify"
            raise ApiError(400, f"model: {model} is {why} and /pooling", param="model")
        results = await self.vectors(model, embedding_inputs(body.input), body.dimensions, key_owner(http), body.user)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(r.vector, body.encoding_format)}
            for i, r in enumerate(results)
        ]
        tokens = sum(r.prompt_tokens for r in results)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Response({"object": "list", "data": data, "model": model, "usage": usage})

    async def ready_card(self, model: str) -> Embedder | None:
        """`model`'s card (its task, length, labels) once it serves: a pooling model on demand is loaded first, as
        its card is read when its engine starts."""
        await self.core.readiness.model_ready(model, submits=False)
        return self.core.embedder(model)

    async def vectors(
        self,
        model: str,
        inputs: list[str] | list[list[int]] | list[tuple[str, str]],
        dimensions: int | None,
        owner: str,
        user: str | None = None,
        truncate: bool = False,
        pair_max_tokens: int | None = None,
    ) -> list[Embedding]:
        """Each input's vector from the embedding model `model`, each a pipeline request of its own; `dimensions`:
        the size the caller asks for (a 400 unless it is the model's); a pair of texts is a cross-encoder's input;
        `truncate`: an input over the model's length is cut to it (Ollama's default), not refused;
        `pair_max_tokens`: a pair's second text cut to its first that many tokens (Cohere's `max_tokens_per_doc`).
        Ollama's `/api/embed` and the pooling routes run through here."""
        await self.core.readiness.model_ready(model)  # a model on demand: loaded, and held busy for these requests
        try:
            embedder = self.core.embedder(model)
            if dimensions is not None and (embedder is None or dimensions != embedder.dim):
                has = (
                    f"has {embedder.dim}" if embedder is not None else "is served elsewhere; its size is not asked for"
                )
                raise ApiError(400, f"dimensions: {model} {has}, got {dimensions}", param="dimensions")
        except BaseException:  # refused before they were submitted: the model is not held
            self.core.readiness.not_submitting(model)
            raise
        now = time.time()
        requests = [
            Request(
                request_id=self.core.new_id("embd"),
                phase="embed",
                model=model,
                user=user,
                arrival_time=now,
                owner=owner,
                truncate=truncate,
                pair_max_tokens=pair_max_tokens if isinstance(item, tuple) else None,
                **_input_fields(item),
            )  # fmt: skip
            for item in inputs
        ]
        return await embedded(self.core.submit_all(requests))


def _input_fields(item: str | list[int] | tuple[str, str]) -> dict[str, Any]:
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, tuple):
        return {"prompt": item[0], "pair": item[1]}
    return {"prompt_token_ids": item}


def embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    if value and (all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value)):
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ApiError(
                400, f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}", param="input"
            )
        return list(value)
    raise ApiError(
        400, "input: a non-empty string, list of strings, token ids or list of token-id lists", param="input"
    )


def _encode_vector(vector: Any, encoding: str) -> list[float] | str:
    array = np.asarray(vector, dtype=np.float32)
    if encoding == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array.tolist()
