"""The embedding model behind `/v1/embeddings` and the client's `.embed()`: loads once, off the event loop, and
runs one batch at a time in a worker thread (the model is not thread-safe and the cores are few; concurrent
requests queue on a lock rather than oversubscribing them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from sagellm.gateway.errors import ApiError
from sagellm.runtime.embedding import EmbeddingEngine, EmbeddingInputError, InputTooLongError
from sagellm.runtime.models.model_cache import resolve_model


class EmbeddingService:
    def __init__(self, model: str) -> None:
        """`model`: a path or a cache name (downloaded on first use); clients call it by that name, or a path by the
        directory's name."""
        self.model = model
        self.engine: Any = None
        self._lock = trio.Lock()

    async def load(self) -> None:
        self.engine = await trio.to_thread.run_sync(self._load)

    def _load(self) -> EmbeddingEngine:
        path = resolve_model(self.model)
        return EmbeddingEngine(path, name=None if Path(self.model).expanduser().exists() else self.model)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    async def embed(self, inputs: list[str] | list[list[int]]) -> tuple[list[Any], list[int]]:
        """(vectors, prompt tokens per input); an input the model cannot take is a 400 naming it."""
        async with self._lock:
            try:
                result = await trio.to_thread.run_sync(self.engine.embed, inputs)
            except InputTooLongError as exc:
                raise ApiError(400, str(exc), param="input", code="context_length_exceeded") from None
            except EmbeddingInputError as exc:
                raise ApiError(400, str(exc), param="input", code="invalid_request") from None
        return list(result.embeddings.numpy()), list(result.prompt_tokens)
