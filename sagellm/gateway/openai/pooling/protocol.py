"""The bodies of the pooling routes, as vLLM's server takes them: `/rerank` and `/v1/rerank` in Jina's shape,
`/v2/rerank` in Cohere's, `/score`, `/classify` and `/pooling`. A field none of them has is a 400 naming it."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec


class RerankRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Jina's, Cohere's (v2) and vLLM's: the documents ranked by their relevance to the query, the top_n best."""

    query: str
    documents: list[Any]  # texts, or Jina's objects {"text": ...}
    model: str | None = None
    top_n: int | None = None  # None or 0: every document
    return_documents: bool | None = None  # Jina's (default true); Cohere's v2 returns none
    max_tokens_per_doc: Annotated[int, msgspec.Meta(ge=1)] | None = None  # Cohere's: each document's first N tokens
    user: str | None = None


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's: text_1 against each of text_2 (one text against many), or pairwise (two lists of one length)."""

    text_1: str | list[str]
    text_2: str | list[str]
    model: str | None = None
    user: str | None = None


class PoolingInputRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `/classify` and `/pooling`: a text or texts (`/pooling` also token ids, as `/v1/embeddings` takes)."""

    input: str | list[Any]
    model: str | None = None
    user: str | None = None
