"""The gateway's retrieval indexes, and chats that answer from one (their routes: `routes`, `/admin/index/*`).

An index is made for one of the gateway's embedding models; documents added to it are cut into chunks that model
takes whole (`runtime.rag.chunking`), embedded through the serving graph like any `/v1/embeddings` input (so they
share the embedding engine's batches), and kept in a FAISS index saved under $SAGELLM_HOME/indexes/NAME, where
the `rag_retrieve` operator and the next gateway find it. A chat request that names an index (`"index": NAME`, in
the OpenAI SDK `extra_body`) has its last user message embedded and answered from the index's nearest chunks, given
to the model as numbered sources; the reply carries them (`sources`: number, document, chunk, score)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import trio

from sagellm.common.home import indexes_dir
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.request_stream import embedded
from sagellm.runtime.pipeline.messages import Request

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODEL_FILE = "model.json"  # beside the index's own files: the embedding model its vectors come from
MAX_DOCUMENTS = 256  # per request
MAX_K = 64


class Document(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str
    text: str


class IndexStore:
    """The gateway's indexes by name, each with the embedding model it was made for; loaded from `directory` at
    start, saved there after every change."""

    def __init__(self, core: ServingCore, directory: Path | None = None) -> None:
        from sagellm.runtime.rag import VectorIndex

        self.core, self.directory = core, directory or indexes_dir()
        self.indexes: dict[str, tuple[Any, str]] = {}
        self._lock = trio.Lock()  # one change at a time (an add embeds, then writes)
        for folder in sorted(self.directory.glob("*")) if self.directory.is_dir() else []:
            if (folder / MODEL_FILE).is_file():
                model = json.loads((folder / MODEL_FILE).read_text())["model"]
                self.indexes[folder.name] = (VectorIndex.load(folder), model)

    def get(self, name: str) -> tuple[Any, str]:
        if name not in self.indexes:
            have = ", ".join(map(repr, self.indexes)) or "none"
            raise ApiError(404, f"no index {name!r}; the indexes here: {have}", param="index", code="index_not_found")
        return self.indexes[name]

    async def create(self, name: str, model: str | None) -> dict[str, Any]:
        from sagellm.runtime.rag import VectorIndex

        if not NAME.match(name):
            raise ApiError(400, f"name: letters, digits, '.', '_' and '-', at most 64, got {name!r}", param="name")
        model = self.core.embedding_model(model)
        async with self._lock:
            if name in self.indexes:
                raise ApiError(409, f"index {name!r} exists; delete it first", param="name", code="index_exists")
            dim = len((await self.embed(["dimension"], model))[0])
            try:
                index = VectorIndex(name, dim)
            except ImportError as error:  # FAISS is an extra: `sagellm[rag]`
                raise ApiError(501, str(error), code="not_implemented") from None
            self._save(index, model)
            self.indexes[name] = (index, model)
        return self.describe(name)

    async def delete(self, name: str) -> None:
        async with self._lock:
            self.get(name)
            del self.indexes[name]
            await trio.to_thread.run_sync(shutil.rmtree, self.directory / name, True)

    async def add(self, name: str, documents: list[Document]) -> dict[str, Any]:
        from sagellm.runtime.rag import chunk_document

        if not documents or len(documents) > MAX_DOCUMENTS:
            raise ApiError(400, f"documents: 1 to {MAX_DOCUMENTS} per request, got {len(documents)}", param="documents")
        async with self._lock:
            index, model = self.get(name)
            known = set(index.documents())
            seen: set[str] = set()
            for doc in documents:
                if not doc.id or doc.id in known or doc.id in seen:
                    why = "is empty" if not doc.id else "is there already (delete it first)"
                    raise ApiError(400, f"documents: id {doc.id!r} {why}", param="documents")
                if not doc.text.strip():
                    raise ApiError(400, f"documents: {doc.id!r} has no text", param="documents")
                seen.add(doc.id)
            count = self._token_counter(model)
            chunks = {doc.id: chunk_document(doc.id, doc.text, count) for doc in documents}
            texts = [c.text for doc_chunks in chunks.values() for c in doc_chunks]
            vectors = await self.embed(texts, model)
            start = 0
            for doc_id, doc_chunks in chunks.items():
                index.add(doc_id, doc_chunks, vectors[start : start + len(doc_chunks)])
                start += len(doc_chunks)
            await trio.to_thread.run_sync(self._save, index, model)
        return self.describe(name) | {"added": {doc_id: len(c) for doc_id, c in chunks.items()}}

    async def remove(self, name: str, document_id: str) -> int:
        async with self._lock:
            index, model = self.get(name)
            if document_id not in index.documents():
                raise ApiError(404, f"index {name!r} has no document {document_id!r}", code="document_not_found")
            removed = index.remove(document_id)
            await trio.to_thread.run_sync(self._save, index, model)
            return removed

    async def search(self, name: str, query: str, k: int) -> list[Any]:
        if not query.strip():
            raise ApiError(400, "query: empty", param="query")
        if not 1 <= k <= MAX_K:
            raise ApiError(400, f"k: 1 to {MAX_K}, got {k}", param="k")
        index, model = self.get(name)
        vector = (await self.embed([query], model))[0]
        return await trio.to_thread.run_sync(index.search, vector, k)

    async def ground(self, request: Request, name: str, k: int) -> list[dict[str, object]]:
        """A chat answered from index `name`: its last user message is the question, the nearest chunks become
        numbered sources in front of it (the request's messages are replaced); -> the sources, for the reply."""
        from sagellm.runtime.rag import grounded, question_of, served_token_counter, source_budget

        question = question_of(request.messages)
        if not question:
            raise ApiError(400, "index: the chat's last user message must be text to search with", param="index")
        hits = await self.search(name, question, k)
        count = served_token_counter(self.core.tokenizer)
        request.messages, cited = grounded(question, hits, count, source_budget(self.core.max_model_len))
        return cited

    async def embed(self, texts: list[str], model: str) -> np.ndarray:
        """The texts' vectors, through the serving graph (the embedding engine's batches), as `/v1/embeddings`."""
        streams = [
            self.core.submit(Request(request_id=self.core.new_id("embd"), phase="embed", model=model, prompt=text))
            for text in texts
        ]
        return np.array([e.vector for e in await embedded(streams)], dtype=np.float32)

    def describe(self, name: str) -> dict[str, Any]:
        index, model = self.get(name)
        documents = index.documents()
        return {"name": name, "model": model, "dim": index.dim, "documents": len(documents), "chunks": len(index)}

    def _token_counter(self, model: str) -> Any:
        """The embedding model's own token count (its limit counts those), or words where it runs elsewhere."""
        embedder = self.core.embedder(model)
        tokenizer = getattr(getattr(embedder, "engine", None), "tokenizer", None)
        if tokenizer is None:
            return lambda text: len(text.split()) * 2  # subword tokens run ~1.3x words: stay well under the limit
        return lambda text: len(tokenizer(text)["input_ids"])

    def _save(self, index: Any, model: str) -> None:
        folder = self.directory / index.name
        index.save(folder)
        (folder / MODEL_FILE).write_text(json.dumps({"model": model}) + "\n")
