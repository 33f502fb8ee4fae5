"""A refused body's unknown fields named all at once, each with the field it was probably meant to be.

The bodies that forbid unknown fields (`forbid_unknown_fields`: the OpenAI generation routes', the admin routes') are
decoded by msgspec, which stops at the first one and says only `Object contains unknown field `max_tokns``: a client
with two typos would fix one per round trip, and nothing points at `max_tokens`. So when the decoder refuses a body
for that, the body is read once more as a plain object (a cost only a refused request pays) and every top-level key
its struct lacks is named, with the closest field."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.common.typos import likely_meant
from sagellm.gateway.http.errors import ApiError

_UNKNOWN = "Object contains unknown field"


def unknown_fields_error(error: msgspec.ValidationError, body: bytes, into: Any) -> ApiError | None:
    """The 400 for `error` when it is a top-level unknown field of struct `into` (None otherwise: msgspec's own
    message then says where the nested one is)."""
    fields = getattr(into, "__struct_encode_fields__", None)
    if fields is None or not str(error).startswith(_UNKNOWN) or " - at `$" in str(error):
        return None
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    unknown = [key for key in raw if key not in fields] if isinstance(raw, dict) else []
    if not unknown:
        return None
    named = ", ".join(f"`{key}`{_hint(key, fields)}" for key in unknown)
    message = (
        f"unknown field{'s' if len(unknown) > 1 else ''} {named}: this server refuses a field it does not implement "
        "rather than ignore it"
    )
    return ApiError(400, message, param=unknown[0], code="invalid_request")


def _hint(key: str, fields: tuple[str, ...]) -> str:
    meant = likely_meant(key, fields)
    return f" (did you mean `{meant}`?)" if meant else ""
