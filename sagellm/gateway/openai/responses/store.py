"""Stored responses (`store`, the default): each one's body, for `GET /v1/responses/{id}`, and its conversation, so
`previous_response_id` continues it; each readable only by the key that made it. Given a directory (the gateway's
`STATE/responses/`), every one is also a file there, readable by its owner only, so they outlive a restart: a
follow-up's `previous_response_id` works against a gateway started again. The files are written behind the event
loop (`FileWriter`): memory answers every read, the files only a restart.

The cap is per key: a key's newest response forgets that key's oldest, never another key's, so one busy caller
cannot evict everyone else's conversations. A gateway without API keys takes any key a caller sends, so callers can
make owners at will: the total is bounded too, and past it the owner holding the most loses its oldest."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.file_writer import FileWriter
from sagellm.gateway.serving.state_records import kept_records

MAX_STORED_PER_KEY = 1_000  # responses kept per key (API key owner) for previous_response_id, its oldest forgotten
MAX_STORED = 10_000  # responses kept in all: the memory bound whatever the number of keys
RESPONSES_DIR = "responses"  # under the gateway's state directory


class Stored(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    clock: int  # the order responses were kept in, across restarts
    conversation: list[dict[str, Any]]
    body: dict[str, Any] | None = None  # the response object a GET returns (None: kept for its conversation only)
    input_items: list[dict[str, Any]] = []  # what it was answered after, as items with ids (`/input_items`)


class ResponseStore:
    """Stored responses by id, the latest `per_owner` of each owner and `total` in all; each readable only by the
    key that made it (another key's id is not found, as `/v1/requests/{id}`). `root`: the directory that keeps them
    across restarts (None: memory only)."""

    def __init__(self, per_owner: int = MAX_STORED_PER_KEY, total: int = MAX_STORED, root: Path | None = None) -> None:
        self.per_owner, self.total, self.root = per_owner, total, root
        self._files = FileWriter.of(root) if root is not None else None
        self._owned: dict[str, OrderedDict[str, Stored]] = {}  # owner -> response id -> it, oldest first
        self._count = 0  # responses kept, over all owners
        kept = self._load() if root is not None else []
        self._clock = itertools.count(max((s.clock for s in kept), default=-1) + 1)
        for stored in kept:
            self._add(stored)

    def conversation(self, response_id: str | None, owner: str) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        return list(self._stored(response_id, owner, "previous_response_id").conversation)

    def get(self, response_id: str, owner: str) -> dict[str, Any]:
        """The response's body as last kept; a 404 if `owner` has none of that id."""
        body = self._stored(response_id, owner, "response_id").body
        if body is None:
            raise ApiError(404, f"response {response_id!r} is kept only to continue it", param="response_id",
                           code="not_found")  # fmt: skip
        return body

    def input_items(self, response_id: str, owner: str) -> list[dict[str, Any]]:
        return self._stored(response_id, owner, "response_id").input_items

    def context_items(self, response_id: str | None, owner: str) -> list[dict[str, Any]]:
        """What a response continuing `response_id` is answered after: that one's input items and output."""
        if response_id is None:
            return []
        stored = self._stored(response_id, owner, "previous_response_id")
        return [*stored.input_items, *(stored.body or {}).get("output", [])]

    def keep(
        self,
        response_id: str,
        owner: str,
        conversation: list[dict[str, Any]],
        body: dict[str, Any] | None = None,
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        """Keeps (or replaces: a background response's later states) a response's conversation and body, and its
        input items (kept as they were when not given)."""
        owned = self._owned.get(owner, {})
        stored = owned.get(response_id)
        if stored is not None:
            stored.conversation, stored.body = conversation, body
            stored.input_items = stored.input_items if input_items is None else input_items
            self._write(stored)
            return
        stored = Stored(id=response_id, owner=owner, clock=next(self._clock), conversation=conversation, body=body,
                        input_items=input_items or [])  # fmt: skip
        self._write(stored)
        self._add(stored)

    def unfinished(self) -> list[Stored]:
        """The kept responses whose last state is `queued` or `in_progress` (a restart stopped them)."""
        return [s for owned in self._owned.values() for s in owned.values()
                if s.body is not None and s.body.get("status") in ("queued", "in_progress")]  # fmt: skip

    def delete(self, response_id: str, owner: str) -> None:
        self._stored(response_id, owner, "response_id")
        self._forget(owner, response_id)

    # -- keeping ------------------------------------------------------------------------------------------------
    def _stored(self, response_id: str, owner: str, param: str) -> Stored:
        stored = self._owned.get(owner, {}).get(response_id)
        if stored is None:
            message = f"{param}: no stored response {response_id!r} (the latest {self.per_owner} of each key are kept)"
            raise ApiError(404, message, param=param, code="not_found")
        return stored

    def _add(self, stored: Stored) -> None:
        owned = self._owned.setdefault(stored.owner, OrderedDict())
        owned[stored.id] = stored
        self._count += 1
        if len(owned) > self.per_owner:
            self._forget(stored.owner, next(iter(owned)))
        if self._count > self.total:
            largest = self._largest_owner()
            self._forget(largest, next(iter(self._owned[largest])))

    def _largest_owner(self) -> str:
        """The owner holding the most responses; among equals, the one whose oldest is oldest. O(owners), which only
        a store past its total pays."""

        def holding(owner: str) -> tuple[int, int]:
            owned = self._owned[owner]
            return -len(owned), next(iter(owned.values())).clock

        return min(self._owned, key=holding)

    def _forget(self, owner: str, response_id: str) -> None:
        owned = self._owned[owner]
        del owned[response_id]
        self._count -= 1
        if not owned:
            del self._owned[owner]
        if self._files is not None:
            self._files.remove(f"{response_id}.json")

    def _write(self, stored: Stored) -> None:
        if self._files is not None:
            self._files.write(f"{stored.id}.json", msgspec.json.encode(stored))

    def _load(self) -> list[Stored]:
        assert self.root is not None and self._files is not None
        self._files.settle()  # what a gateway before this one in this process left to write
        return sorted(kept_records(self.root, "*.json", Stored), key=lambda s: s.clock)
