"""What the routes that run requests may ask of a serving core: `ServingApi`.

Two classes answer it: the gateway's `core.ServingCore`, which runs the graph, and an API server's
`api_servers.remote_core.RemoteCore`, which answers from the core's latest state and sends requests over the link. The
OpenAI generation routes (completions, chats, embeddings), the Responses and Messages APIs and sessions are written
against this protocol alone, so they run unchanged in either process; `tests/gateway/test_serving_api.py` checks
that both classes have every member, with the same signatures, and so have their `readiness` objects (`Readiness`).
Routes the gateway's process alone answers (models, request status, LoRA, tokenizers, retrieval indexes) take the
`ServingCore` itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.gateway.serving.prompts import RequestIds
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.served_model import ServedModel


class Embedder(Protocol):
    """What the routes read of a pooling model served in the core or an engine of its (`PoolingCard`'s fields)."""

    @property
    def dim(self) -> int: ...

    @property
    def max_length(self) -> int: ...

    @property
    def task(self) -> str: ...

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def activation(self) -> str: ...


class Readiness(Protocol):
    """What the routes ask before they submit a request: that its model serve (woken, or loaded on demand), and that
    the model stay busy for the request until it is submitted. The core's `readiness.ModelReadiness` answers it, and
    an API server's `api_servers.remote_core.RemoteReadiness`, which asks the core over the link."""

    async def model_ready(self, model: str | None, submits: bool = True) -> None:
        """Returns once `model` serves (woken, or loaded on demand); `submits`: a request of it follows, which keeps
        the model busy until it is submitted (or `not_submitting`). Raises ApiError 503."""
        ...

    def not_submitting(self, model: str | None) -> None:
        """The request `model_ready` was told would follow will not (refused, or its client left, before
        `submit`): the model is no longer held busy for it."""
        ...


class ServingApi(Protocol):
    new_id: RequestIds  # request ids (unique across API servers)

    @property
    def model_name(self) -> str:
        """The name the graph's own model is served as."""
        ...

    @property
    def served(self) -> ServedModel | None:
        """The graph's model's front-end files (tokenizer, config, defaults), None before they are read."""
        ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def max_model_len(self) -> int | None:
        """The context the graph's engines serve."""
        ...

    def models(self) -> list[str]:
        """Every model name requests may ask for."""
        ...

    def embedder(self, model: str) -> Embedder | None:
        """The embedding model `model` served in the core, or None (served elsewhere, or not an embedding model)."""
        ...

    def embedding_model(self, name: str | None) -> str:
        """The embedding model a request asks for (None: the first served). Raises ApiError 404."""
        ...

    def embedding_models(self) -> list[str]:
        """The names of the embedding models served (which write no text: a completion or chat of one is a 400)."""
        ...

    def instance_model(self, name: str | None) -> str | None:
        """A request's `Request.model` for the model a client named: None for the graph's own. Raises ApiError."""
        ...

    @property
    def readiness(self) -> Readiness:
        """Whether a request's model serves now: what a route waits on before it submits."""
        ...

    def sampling_defaults(self, model: str | None = None) -> dict[str, Any] | None:
        """A model's own sampling defaults (None: the graph's); None for a model whose server applies its own."""
        ...

    def engines_of_ours(self, model: str) -> bool:
        """Whether another model's instances are engines of ours (its files read here), not servers we only reach."""
        ...

    def lora_of(self, name: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: a model, not an adapter)."""
        ...

    async def tokenize_prompts(self, requests: list[Request], every: bool = False) -> None:
        """Tokenizes the requests' prompts off the event loop. Raises ApiError 400."""
        ...

    def submit(self, request: Request) -> ItemStream:
        """A request of one prompt into the core. Raises ApiError (refused at the door, shutting down, unreachable)."""
        ...

    def submit_all(self, requests: list[Request]) -> Sequence[ItemStream]:
        """A client's request of several prompts, admitted or refused whole. Raises ApiError."""
        ...
