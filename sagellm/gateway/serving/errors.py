"""A pipeline `RequestError` as the HTTP error a client sees.

Its code decides the status (`sagellm.runtime.pipeline.messages.HTTP_STATUS`), so an `overloaded` request is a 429
with `Retry-After` whether admission, the policy queue or a router shed it (admission's says when the queue is
expected to have drained enough to take it)."""

from __future__ import annotations

from sagellm.gateway.http.errors import ApiError
from sagellm.runtime.pipeline.messages import HTTP_STATUS, RequestError


def api_error(error: RequestError, param: str | None = None) -> ApiError:
    status = HTTP_STATUS.get(error.code, 500)
    return ApiError(status, error.message, param=param, code=error.code, retry_after_s=error.retry_after_s)
