"""OpenAI-shaped errors: one exception type for every failure a route reports, and the body every client expects.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status OpenAI uses for it. A pipeline `RequestError`
becomes one in the serving core (`serving.errors`): this room knows HTTP, not LLMs. Any other `SageLLMError` a route
raises answers with its kind's status and code (`ApiError.of`; `sagellm.common.errors` holds the table)."""

from __future__ import annotations

import math

import msgspec

from sagellm.common.errors import SageLLMError
from sagellm.runtime.pipeline.messages import LimitReached

RETRY_AFTER_S = 1  # what a shed request is told to wait before retrying

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class ApiError(SageLLMError):
    """A route's answer that is an error: its own status (`http_status`, per instance), message, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        allow: list[str] | None = None,
        retry_after_s: float | None = None,
        limit: LimitReached | None = None,
    ) -> None:
        """`allow`: the methods a 405's path takes (its `Allow` header, as HTTP requires); `retry_after_s`: a 429's
        or 503's `Retry-After` (default RETRY_AFTER_S), in whole seconds rounded up; `limit`: the key's limit a 429
        met, told in OpenAI's `x-ratelimit-*` headers."""
        super().__init__(message)
        self.http_status, self.message, self.param, self.code = status, message, param, code
        self.allow = allow or []
        self.retry_after_s = retry_after_s
        self.limit = limit

    @classmethod
    def of(cls, error: SageLLMError) -> ApiError:
        """A SageLLMError as a route's answer: its kind's status and code, a FieldError's field as the `param`."""
        if isinstance(error, ApiError):
            return error
        return cls(error.http_status, str(error), param=getattr(error, "field", None), code=error.code)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        retry_after = math.ceil(self.retry_after_s) if self.retry_after_s is not None else RETRY_AFTER_S
        headers = [(b"retry-after", str(retry_after).encode())] if self.http_status in (429, 503) else []
        if self.allow:
            headers.append((b"allow", ", ".join(sorted(set(self.allow))).encode()))
        if self.limit is not None:
            headers += ratelimit_headers(self.limit)
        return headers

    def body(self) -> dict:
        status = self.http_status
        error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return msgspec.json.encode(self.body())

    @classmethod
    def unsupported(cls, name: str, why: str) -> ApiError:
        """A 400 for a parameter, named first, that this server does not implement: refused, never ignored."""
        return cls(400, f"{name}: {why}", param=name, code="unsupported_parameter")

    @classmethod
    def from_value_error(cls, error: ValueError) -> ApiError:
        """A SamplingParams or request check: its message starts with the field's name (`top_p must be ...`)."""
        message = str(error)
        field = message.split(" ", 1)[0]
        return cls(400, message, param=field if field.isidentifier() else None, code="invalid_request")


def ratelimit_headers(limit: LimitReached) -> list[tuple[bytes, bytes]]:
    """OpenAI's headers for the limit a request met: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset
    as OpenAI writes it: `1.5s`, `6m0s`); a limit on requests in flight, which OpenAI has not, as `-concurrent`."""
    minutes, seconds = divmod(limit.reset_s, 60)
    reset = f"{int(minutes)}m{seconds:.0f}s" if minutes else f"{seconds:.3g}s"
    return [
        (f"x-ratelimit-limit-{limit.kind}".encode(), str(limit.limit).encode()),
        (f"x-ratelimit-remaining-{limit.kind}".encode(), str(limit.remaining).encode()),
        (f"x-ratelimit-reset-{limit.kind}".encode(), reset.encode()),
    ]
