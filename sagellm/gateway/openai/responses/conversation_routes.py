"""`/v1/conversations` and its items, as the openai SDK's `conversations` calls them (conversations.py keeps
them)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.metadata import Metadata
from sagellm.gateway.http.paging import listed, ordered_page
from sagellm.gateway.openai.responses.conversations import ConversationStore, conversation_items
from sagellm.gateway.openai.responses.protocol import refuse_include
from sagellm.runtime.engine.request_limits import MAX_MESSAGES

Items = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_MESSAGES)]


class CreateConversation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    items: Items | None = None
    metadata: Metadata | None = None


class UpdateConversation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metadata: Metadata


class AddItems(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    items: Items


class ConversationRoutes:
    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def register(self, app: App, guard: Guard | None) -> None:
        base, one, item = "/v1/conversations", "/v1/conversations/{conversation_id}", "/items/{item_id}"
        app.route("POST", base, self.create, guard)
        app.route("GET", one, self.retrieve, guard)
        app.route("POST", one, self.update, guard)
        app.route("DELETE", one, self.delete, guard)
        app.route("GET", f"{one}/items", self.list_items, guard)
        app.route("POST", f"{one}/items", self.add_items, guard)
        app.route("GET", f"{one}{item}", self.retrieve_item, guard)
        app.route("DELETE", f"{one}{item}", self.delete_item, guard)

    async def create(self, http: HttpRequest) -> Response:
        body = http.json(CreateConversation)
        items = conversation_items(body.items or [])
        return Response(self.store.create(key_owner(http), items, body.metadata).public())

    async def retrieve(self, http: HttpRequest) -> Response:
        return Response(self._conversation(http).public())

    async def update(self, http: HttpRequest) -> Response:
        conversation = self._conversation(http)
        conversation.metadata = http.json(UpdateConversation).metadata
        self.store.save(conversation)
        return Response(conversation.public())

    async def delete(self, http: HttpRequest) -> Response:
        conversation = self._conversation(http)
        self.store.delete(conversation)
        return Response({"id": conversation.id, "object": "conversation.deleted", "deleted": True})

    async def list_items(self, http: HttpRequest) -> Response:
        """A page of its items: oldest first with `order=asc`, newest first by default (OpenAI's), from `after`."""
        refuse_include(http.query)
        return Response(ordered_page(self._conversation(http).items, http.query))

    async def add_items(self, http: HttpRequest) -> Response:
        conversation = self._conversation(http)
        items = conversation_items(http.json(AddItems).items)
        self.store.add(conversation, items)
        return Response(listed(items))

    async def retrieve_item(self, http: HttpRequest) -> Response:
        return Response(self._item(http)[1])

    async def delete_item(self, http: HttpRequest) -> Response:
        conversation, item = self._item(http)
        conversation.items.remove(item)
        self.store.save(conversation)
        return Response(conversation.public())

    def _conversation(self, http: HttpRequest) -> Any:
        return self.store.get(http.path_params["conversation_id"], key_owner(http))

    def _item(self, http: HttpRequest) -> tuple[Any, dict[str, Any]]:
        conversation, item_id = self._conversation(http), http.path_params["item_id"]
        item = next((i for i in conversation.items if i["id"] == item_id), None)
        if item is None:
            raise ApiError(404, f"no item {item_id!r} in {conversation.id}", param="item_id", code="not_found")
        return conversation, item
