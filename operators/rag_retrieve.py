"""The `rag_retrieve` operator: a chat request answered from a retrieval index (`runtime.rag`).

The request's last user message is the question. It is embedded with the index's embedding model (all-MiniLM-L6-v2
by default, in this operator: one short text a request, a few milliseconds), the index's nearest chunks become
numbered sources in a system message that asks for an answer from them, citing them, and the request goes on to
admission, the policy queue and the engines like any chat. The sources each request was given stay readable
(`cited[request_id]`, the latest CITED_REMEMBERED), so an app can show an answer with where it came from. Placed
before admission, which renders the rewritten messages with the served model's chat template."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import msgspec

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.home import indexes_dir
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import MapOperator, OperatorContext, register_operator
from sagellm.runtime.pipeline.served_model import served_model

CITED_REMEMBERED = 10_000  # requests whose sources are kept for the app to read (the oldest go first)


@register_operator
class RagRetrieve(MapOperator):
    name = "rag_retrieve"
    accepts = (Request,)
    parameter_help: ClassVar[dict[str, str]] = {
        "index": "a folder saved by `VectorIndex.save`, or the name of one under $SAGELLM_HOME/indexes",
        "embedding_model": "the model the index's chunks were embedded with (a path or cache name)",
        "k": "chunks retrieved per question",
        "max_source_tokens": "most tokens of sources in the prompt, the best first (at most half the context)",
    }

    def __init__(
        self, index: str, embedding_model: str = "all-minilm-l6-v2", k: int = 4, max_source_tokens: int = 1500
    ) -> None:
        if k < 1:
            raise FieldError("k", f"k must be >= 1, got {k}")
        if max_source_tokens < 1:
            raise FieldError("max_source_tokens", f"max_source_tokens must be >= 1, got {max_source_tokens}")
        self.index_name, self.embedding_model = index, embedding_model
        self.k, self.max_source_tokens = k, max_source_tokens
        self.cited: dict[str, list[dict[str, object]]] = {}  # request id -> the sources its prompt numbered

    def open(self, ctx: OperatorContext) -> None:
        super().open(ctx)
        # Imported here: listing operators must not load torch or FAISS.
        from sagellm.runtime.embedding.engine import EmbeddingEngine
        from sagellm.runtime.models.model_cache import resolve_model
        from sagellm.runtime.rag import IndexNotFound, VectorIndex, served_token_counter

        folder = Path(self.index_name).expanduser()
        if not folder.is_dir():
            folder = indexes_dir() / self.index_name
        if not folder.is_dir():
            where = f"a folder, or a name under {indexes_dir()}"
            raise IndexNotFound(f"no retrieval index {self.index_name!r} ({where})")
        self.index = VectorIndex.load(folder)
        self.embedder = EmbeddingEngine(resolve_model(self.embedding_model), name=self.embedding_model)
        if self.embedder.dim != self.index.dim:
            raise InvalidInput(
                f"index {self.index_name!r} holds {self.index.dim}-wide vectors; {self.embedding_model} makes "
                f"{self.embedder.dim}-wide ones: give the model it was built with"
            )
        self.served = served_model(ctx.graph_attrs)
        self.count_tokens = served_token_counter(self.served.tokenizer if self.served is not None else None)

    def execute(self, item: Request) -> Request | RequestError:
        from sagellm.runtime.rag import grounded, question_of, source_budget

        question = question_of(item.messages, item.prompt)
        if not question:
            message = "rag_retrieve answers a chat's last user message (or a prompt); this request has no text"
            return RequestError(request_id=item.request_id, code="invalid_request", message=message)
        hits = self.index.search(self.embedder.embed([question]).embeddings[0], self.k)
        context = self.served.max_model_len if self.served is not None else None
        budget = source_budget(context, self.max_source_tokens)
        messages, self.cited[item.request_id] = grounded(question, hits, self.count_tokens, budget)
        if len(self.cited) > CITED_REMEMBERED:
            del self.cited[next(iter(self.cited))]
        return msgspec.structs.replace(item, messages=messages, prompt=None)
