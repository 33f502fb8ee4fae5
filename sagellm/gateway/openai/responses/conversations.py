"""OpenAI's conversations (`/v1/conversations`): a list of items (messages, function calls and their outputs) that
responses created with `conversation` read as their history and add their input and output to, so a client keeps
no state of its own. Kept as `STATE/conversations/ID.json`, readable by their owner only, and each belongs to the
API key that made it (a digest is kept, never the key): another key's is a 404. A key keeps at most
MAX_CONVERSATIONS, each at most MAX_ITEMS items."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.responses.protocol import input_messages, new_id
from sagellm.gateway.serving.file_writer import FileWriter
from sagellm.gateway.serving.state_records import kept_records

CONVERSATIONS_DIR = "conversations"
MAX_CONVERSATIONS = 1_000  # per API key
MAX_ITEMS = 4_096  # per conversation
ID_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


class Conversation(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    created_at: int
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    items: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def history(self) -> list[dict[str, Any]]:
        """Its items as the chat messages a response continues (reasoning items left out, as a new turn does)."""
        return input_messages([i for i in self.items if i.get("type") != "reasoning"])


def conversation_items(given: str | list[dict[str, Any]], where: str = "items") -> list[dict[str, Any]]:
    """Items as a conversation keeps them (`kept_items`), checked first as a response's input is (a 400 naming the
    bad one)."""
    items = _as_items(given)
    try:
        input_messages([i for i in items if i.get("type") != "reasoning"])
    except ApiError as error:
        raise ApiError(400, error.message.replace("input[", f"{where}["), param=where) from None
    return kept_items(items)


def kept_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items already checked (a response's input, which its chat was made of) as a conversation keeps them: each
    with an id, a message's text as content parts (`input_text`, an assistant's `output_text`)."""
    kept = []
    for item in _as_items(given):
        kind = item.get("type", "message")
        item = {**item, "type": kind, "id": item.get("id") or new_id(ID_PREFIX.get(kind, "item"))}
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        if kind == "message":
            item.setdefault("status", "completed")
        kept.append(item)
    return kept


def _as_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given


class ConversationStore:
    """Conversations by id, each also a file under `root` (written behind the event loop, as stored responses are)."""

    def __init__(self, root: Path) -> None:
        self.root, self._files = root, FileWriter.of(root)
        self._files.settle()  # what a gateway before this one in this process left to write
        self.kept = {c.id: c for c in kept_records(root, "conv_*.json", Conversation)}

    def create(self, owner: str, items: list[dict[str, Any]], metadata: dict[str, str] | None) -> Conversation:
        if sum(c.owner == owner for c in self.kept.values()) >= MAX_CONVERSATIONS:
            raise ApiError(400, f"this key already keeps {MAX_CONVERSATIONS} conversations, the most it may")
        conversation = Conversation(id=new_id("conv"), owner=owner, created_at=int(time.time()),
                                    metadata=metadata or {})  # fmt: skip
        self.add(conversation, items)
        return conversation

    def get(self, conversation_id: str, owner: str) -> Conversation:
        conversation = self.kept.get(conversation_id)
        if conversation is None or conversation.owner != owner:
            raise ApiError(404, f"no conversation {conversation_id!r}", param="conversation_id", code="not_found")
        return conversation

    def add(self, conversation: Conversation, items: list[dict[str, Any]]) -> None:
        if len(conversation.items) + len(items) > MAX_ITEMS:
            raise ApiError(400, f"a conversation holds at most {MAX_ITEMS} items; start another", param="items")
        conversation.items.extend(items)
        self.save(conversation)

    def save(self, conversation: Conversation) -> None:
        self._files.write(f"{conversation.id}.json", msgspec.json.encode(conversation))
        self.kept[conversation.id] = conversation

    def delete(self, conversation: Conversation) -> None:
        self._files.remove(f"{conversation.id}.json")
        self.kept.pop(conversation.id, None)
