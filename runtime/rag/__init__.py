"""Retrieval-augmented generation's core: documents cut into chunks an embedding model takes whole (`chunking`), a
vector index of those chunks searched by cosine similarity (`index`, on FAISS: `pip install 'sagellm[rag]'`), and
the prompt that asks a model to answer from the chunks found and cite them (`prompt`).

Synchronous and free of serving: the embedding engine makes the vectors, callers (a pipeline operator, the gateway,
a SAGE app) move them here. Importing this package does not import FAISS; making or loading an index does."""

from sagellm.runtime.rag.chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP_TOKENS, Chunk, TokenCounter, chunk_document
from sagellm.runtime.rag.index import Hit, IndexNotFound, VectorIndex
from sagellm.runtime.rag.prompt import (
    DEFAULT_MAX_SOURCE_TOKENS,
    build_messages,
    cited_sources,
    grounded,
    question_of,
    select_sources,
    served_token_counter,
    source_budget,
)

__all__ = [
    "DEFAULT_MAX_SOURCE_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_OVERLAP_TOKENS",
    "Chunk",
    "Hit",
    "IndexNotFound",
    "TokenCounter",
    "VectorIndex",
    "build_messages",
    "chunk_document",
    "cited_sources",
    "grounded",
    "question_of",
    "select_sources",
    "served_token_counter",
    "source_budget",
]
