"""The conversations of stored responses (`store`, the default), kept in memory so `previous_response_id`
continues them, each readable only by the key that made it.

The cap is per key: a key's newest response forgets that key's oldest, never another key's, so one busy caller
cannot evict everyone else's conversations. A gateway without API keys takes any key a caller sends, so callers can
make owners at will: the total is bounded too, and past it the owner holding the most loses its oldest."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any

from sagellm.gateway.http.errors import ApiError

MAX_STORED_PER_KEY = 1_000  # responses kept per key (API key owner) for previous_response_id, its oldest forgotten
MAX_STORED = 10_000  # responses kept in all: the memory bound whatever the number of keys


class ResponseStore:
    """Stored responses' conversations by id, the latest `per_owner` of each owner and `total` in all; each readable
    only by the key that made it (another key's id is not found, as `/v1/requests/{id}`)."""

    def __init__(self, per_owner: int = MAX_STORED_PER_KEY, total: int = MAX_STORED) -> None:
        self.per_owner, self.total = per_owner, total
        # owner -> response id -> (when it was kept, its conversation), oldest first
        self._owned: dict[str, OrderedDict[str, tuple[int, list[dict[str, Any]]]]] = {}
        self._count = 0  # responses kept, over all owners
        self._clock = itertools.count()

    def conversation(self, response_id: str | None, owner: str) -> list[dict[str, Any]]:
        if response_id is None:
            return []
        kept = self._owned.get(owner, {}).get(response_id)
        if kept is None:
            message = (f"previous_response_id: no stored response {response_id!r} (the latest {self.per_owner} of "
                       "each key are kept)")  # fmt: skip
            raise ApiError(404, message, param="previous_response_id", code="not_found")
        return list(kept[1])

    def keep(self, response_id: str, owner: str, conversation: list[dict[str, Any]]) -> None:
        owned = self._owned.setdefault(owner, OrderedDict())
        owned[response_id] = (next(self._clock), conversation)
        self._count += 1
        if len(owned) > self.per_owner:
            self._forget_oldest(owner)
        if self._count > self.total:
            self._forget_oldest(self._largest_owner())

    def _largest_owner(self) -> str:
        """The owner holding the most responses; among equals, the one whose oldest is oldest. O(owners), which only
        a store past its total pays."""

        def holding(owner: str) -> tuple[int, int]:
            owned = self._owned[owner]
            return -len(owned), next(iter(owned.values()))[0]

        return min(self._owned, key=holding)

    def _forget_oldest(self, owner: str) -> None:
        owned = self._owned[owner]
        owned.popitem(last=False)
        self._count -= 1
        if not owned:
            del self._owned[owner]
