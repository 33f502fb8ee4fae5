"""What the gateway's HTTP server allows a client: sizes and times (`HttpLimits`, and the fixed bounds beside it)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is a 431
READ_BYTES = 64 * 1024
KEEP_ALIVE_TIMEOUT_S = 75.0  # as long as common proxies keep theirs (nginx: 75 s): a pooled connection is not cut
BODY_TIMEOUT_S = 30.0  # a head or body still arriving after this is given up: a slow client cannot hold a request


@dataclass
class HttpLimits:
    max_body_bytes: int
    body_timeout_s: float = BODY_TIMEOUT_S
    keep_alive_timeout_s: float = KEEP_ALIVE_TIMEOUT_S
    graceful_timeout_s: float = 30.0
