"""`/admin/index/*` (admin key): create, list, show and delete the gateway's retrieval indexes (`store.IndexStore`),
add and remove documents, and query one for its nearest chunks.

    POST   /admin/index                          {"name": "docs", "model": "all-minilm-l6-v2"?}
    GET    /admin/index                          the indexes: documents, chunks, model
    GET    /admin/index/{name}                   one, with its documents
    DELETE /admin/index/{name}
    POST   /admin/index/{name}/documents         {"documents": [{"id": "a", "text": "..."}]}
    DELETE /admin/index/{name}/documents/{id}
    POST   /admin/index/{name}/query             {"query": "...", "k": 4}: the nearest chunks"""

from __future__ import annotations

import msgspec

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.indexes.store import Document, IndexStore


class CreateIndex(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    model: str | None = None


class AddDocuments(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    documents: list[Document]


class QueryIndex(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    query: str
    k: int = 4


class IndexRoutes:
    def __init__(self, store: IndexStore) -> None:
        self.store = store

    def register(self, app: App, admin: Guard | None) -> None:
        app.collection("/admin/index", "name", self, admin)
        app.route("POST", "/admin/index/{name}/documents", self.add, admin)
        app.route("DELETE", "/admin/index/{name}/documents/{document_id}", self.remove, admin)
        app.route("POST", "/admin/index/{name}/query", self.query, admin)

    async def create(self, http: HttpRequest) -> Response:
        body = http.json(CreateIndex)
        return Response(await self.store.create(body.name, body.model), 201)

    async def list(self, _: HttpRequest) -> Response:
        return Response({"object": "list", "data": [self.store.describe(name) for name in self.store.indexes]})

    async def show(self, http: HttpRequest) -> Response:
        name = http.path_params["name"]
        index, _ = self.store.get(name)
        return Response(self.store.describe(name) | {"document_ids": index.documents()})

    async def delete(self, http: HttpRequest) -> Response:
        name = http.path_params["name"]
        await self.store.delete(name)
        return Response({"name": name, "deleted": True})

    async def add(self, http: HttpRequest) -> Response:
        body = http.json(AddDocuments)
        return Response(await self.store.add(http.path_params["name"], body.documents))

    async def remove(self, http: HttpRequest) -> Response:
        name, doc_id = http.path_params["name"], http.path_params["document_id"]
        chunks = await self.store.remove(name, doc_id)
        return Response({"name": name, "document_id": doc_id, "chunks_removed": chunks})

    async def query(self, http: HttpRequest) -> Response:
        body = http.json(QueryIndex)
        hits = await self.store.search(http.path_params["name"], body.query, body.k)
        data = [
            {"score": h.score, "document_id": h.chunk.document_id, "ordinal": h.chunk.ordinal, "text": h.chunk.text}
            for h in hits
        ]
        return Response({"object": "list", "data": data})
