"""The embedding engine: sentence vectors from an encoder model (all-MiniLM-L6-v2 by default) for
`POST /v1/embeddings`. It runs the encoder through `transformers` rather than the decoder runtime, since an
embedding is one forward pass with no KV cache, sampling or scheduling."""

from sagellm.runtime.embedding.engine import EmbeddingEngine, EmbeddingInputError, EmbeddingResult, InputTooLongError

__all__ = ["EmbeddingEngine", "EmbeddingInputError", "EmbeddingResult", "InputTooLongError"]
