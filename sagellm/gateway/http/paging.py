"""OpenAI's cursor pages for the lists it returns (`limit`, `after`): `{"object": "list", "data", "first_id",
"last_id", "has_more"}`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sagellm.gateway.http.errors import ApiError

DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def page(items: Sequence[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """The page of `items` (each a dict with an `id`, in the list's order) that `query` asks for: those after the
    `after` id, at most `limit`; a 400 naming a bad limit."""
    raw = query.get("limit")
    if raw is not None and not (raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
        raise ApiError(400, f"limit: a number from 1 to {MAX_LIMIT}, got {raw!r}", param="limit")
    limit = DEFAULT_LIMIT if raw is None else int(raw)
    after = query.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    shown = list(items[:limit])
    return listed(shown, len(items) > limit)


def ordered_page(items: Sequence[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """`page` of a list kept oldest first, shown newest first unless `order=asc` (OpenAI's item lists)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, f"order: asc or desc, got {order!r}", param="order")
    return page(items if order == "asc" else list(reversed(items)), query)


def listed(items: list[dict[str, Any]], more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}  # fmt: skip
