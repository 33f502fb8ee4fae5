"""The conversations of stored responses (`store`, the default), kept in memory so `previous_response_id`
continues them: the latest MAX_STORED, each readable only by the key that made it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from sagellm.gateway.http.errors import ApiError

MAX_STORED = 1_000  # responses kept for previous_response_id, the oldest forgotten first


class ResponseStore:
    """Stored responses' conversations by id, the latest MAX_STORED; each readable only by the key that made it
    (another key's id is not found, as `/v1/requests/{id}`)."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self.limit = limit
        self._kept: OrderedDict[str, tuple[str, list[dict[str, Any]]]] = OrderedDict()

    def conversation(self, response_id: str | None, owner: str) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        kept = self._kept.get(response_id)
        if kept is None or kept[0] != owner:
            message = f"previous_response_id: no stored response {response_id!r} (the latest {self.limit} are kept)"
            raise ApiError(404, message, param="previous_response_id", code="not_found")
        return list(kept[1])

    def keep(self, response_id: str, owner: str, conversation: list[dict[str, Any]]) -> None:
        self._kept[response_id] = (owner, conversation)
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)
