"""The hand-made bad inputs of the chaos report: each one can break a gateway (kill it, fail other requests'
batch, or get a 500), so each must get its own clear 4xx and hurt nothing else. A case is a request as a
client can send it, and the status an OpenAI-style server owes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HUGE = 10**30  # past every integer type on the wire (msgpack stops at 2**64)


@dataclass(frozen=True)
class BadInput:
    name: str
    path: str
    status: int  # what the gateway must answer
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"prompt": "Hi", "max_tokens": 4, **fields}


BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("priority 10^30", "/v1/chat/completions", 400, json=_chat(priority=HUGE)),
    BadInput(
        "X-Request-Priority 10^30", "/v1/chat/completions", 400, json=_chat(), headers={"X-Request-Priority": str(HUGE)}
    ),  # fmt: skip
    BadInput("top_k 10^30", "/v1/completions", 400, json=_completion(top_k=HUGE)),
    BadInput("stop_token_ids [10^30]", "/v1/completions", 400, json=_completion(stop_token_ids=[HUGE])),
    BadInput("max_tokens 10^30", "/v1/completions", 400, json=_completion(max_tokens=HUGE)),
    BadInput("max_tokens -1", "/v1/completions", 400, json=_completion(max_tokens=-1)),
    BadInput("float token ids [[1.5, 2.0]]", "/v1/completions", 400, json={"prompt": [[1.5, 2.0]], "max_tokens": 4}),
    BadInput('nested strings [["a"]]', "/v1/completions", 400, json={"prompt": [["a"]], "max_tokens": 4}),
    BadInput("token id past the vocabulary", "/v1/completions", 400, json={"prompt": [10**9], "max_tokens": 4}),
    BadInput(
        "chat role 'hacker'",
        "/v1/chat/completions",
        400,
        json={"messages": [{"role": "hacker", "content": "Hi"}], "max_tokens": 4},
    ),  # fmt: skip
    BadInput("temperature 'hot'", "/v1/completions", 400, json=_completion(temperature="hot")),
    BadInput(
        "not UTF-8",
        "/v1/completions",
        400,
        content=b'{"prompt": "\xff\xfe", "max_tokens": 4}',
        headers={"Content-Type": "application/json"},
    ),  # fmt: skip
    BadInput(
        "JSON 100,000 deep",
        "/v1/completions",
        400,
        content=b"[" * 100_000,
        headers={"Content-Type": "application/json"},
    ),  # fmt: skip
    BadInput(
        "truncated JSON",
        "/v1/completions",
        400,
        content=b'{"prompt": "Hi", "max_tok',
        headers={"Content-Type": "application/json"},
    ),  # fmt: skip
    BadInput(
        "text/plain POST (CSRF form)",
        "/v1/completions",
        415,
        content=b'{"prompt": "Hi"}',
        headers={"Content-Type": "text/plain"},
    ),  # fmt: skip
    BadInput("Host evil.example (DNS rebinding)", "/v1/models", 403, method="GET", headers={"Host": "evil.example"}),
    BadInput("PUT /v1/models", "/v1/models", 405, method="PUT"),
    BadInput(
        "body over 8 MiB",
        "/v1/completions",
        413,
        content=b" " * (9 << 20),
        headers={"Content-Type": "application/json"},
    ),  # fmt: skip
    BadInput("unknown session", "/sessions/nope", 404, method="GET"),
)
