"""The body of `POST /v1/embeddings`."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]  # like `prompt`
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
