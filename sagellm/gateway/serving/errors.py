"""A pipeline `RequestError` as the HTTP error a client sees.

Its code decides the status (`sagellm.runtime.pipeline.messages.HTTP_STATUS`), so an `overloaded` request is a 429
with `Retry-After` whether admission, the policy queue or a router shed it (admission's says when the queue is
expected to have drained enough to take it)."""

from __future__ import annotations

from sagellm.gateway.http.errors import ApiError
from sagellm.runtime.pipeline.messages import HTTP_STATUS, RequestError

# The request fields an invalid request's message starts with when one of them is what is wrong (admission's and the
# prompt checks' wording: `prompt_token_ids must be ...`, `logit_bias must name ...`, and the engine's when they rule
# out every token a constraint allows: `allowed_token_ids rules out ...`).
REQUEST_FIELDS = frozenset(
    {
        "prompt",
        "prompt_token_ids",
        "messages",
        "logit_bias",
        "allowed_token_ids",
        "bad_words",
        "min_tokens",
        "max_tokens",
    }
)


def api_error(error: RequestError, param: str | None = None) -> ApiError:
    status = HTTP_STATUS.get(error.code, 500)
    if param is None and error.code == "invalid_request":
        param = field_named(error.message)
    if param is None and error.code == "model_not_found":
        param = "model"
    return ApiError(status, error.message, param=param, code=error.code, retry_after_s=error.retry_after_s,
                    limit=error.limit)  # fmt: skip


def field_named(message: str) -> str | None:
    """The request field a problem's message names first, if it is one (REQUEST_FIELDS)."""
    first = message.split(" ", 1)[0].rstrip(":")
    return first if first in REQUEST_FIELDS else None
