"""How the media room says no: a client's media that cannot be used is always a 400 naming the request's part
(`messages[0].content[1].image_url`), never a 5xx, whatever failed underneath (a host, a socket, a decoder)."""

from __future__ import annotations

from sagellm.gateway.http.errors import ApiError


def refused(param: str, why: str) -> ApiError:
    """The error to raise for the part named `param`; `why` says what was wrong and, where it helps, what to send."""
    return ApiError(400, f"{param}: {why}", param=param, code="invalid_request")
