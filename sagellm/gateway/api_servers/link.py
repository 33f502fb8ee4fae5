"""What API servers and the serving core say to each other over ZeroMQ (`sagellm serve --api-servers N`, and
`sagellm api-server --core tcp://...` on other hosts).

An API server (`api_server`) is a process that answers HTTP and turns the OpenAI requests into pipeline `Request`s,
tokenized; the core (`api_hub`, in the process that runs the graph) runs them and streams their items back. Every
other route is a `Call`: the HTTP request as it came, answered by the core's own app (`Reply`), so the link is the
only way an API server reaches the core. One DEALER per API server, one ROUTER in the core; each message is one
msgpack frame. Items travel in batches: all that are ready for one API server when the core's sender runs go in one
message, so a busy core sends one message per turn of its event loop, not one per token. Each end says `Alive` each
second: an end that hears nothing for a while counts the other as gone (the core forgets the API server and cancels
its requests; the API server ends its requests with an error, answers 503 and attaches again until the core
answers)."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta


class Attach(msgspec.Struct, tag=True, kw_only=True):
    """An API server's first message; again with `url` once it listens (it then counts as serving)."""

    pid: int
    url: str = ""


class Call(msgspec.Struct, tag=True, kw_only=True):
    """A request for a route the core answers itself (models, health, metrics, admin, management, sessions, request
    statuses), as the client sent it; the API server checked its Host already."""

    call_id: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


class HangUp(msgspec.Struct, tag=True, kw_only=True):
    """The client of a `Call` left before its reply: the core stops answering it."""

    call_id: int


class Reply(msgspec.Struct, tag=True, kw_only=True):
    """A `Call`'s reply (no route but the generation ones streams, and API servers answer those themselves)."""

    call_id: int
    status: int
    content_type: str
    headers: list[tuple[str, str]]
    body: bytes


class Alive(msgspec.Struct, tag=True, kw_only=True):
    """The sender is there (each end says it each `ALIVE_S`)."""


class Submit(msgspec.Struct, tag=True, kw_only=True):
    request: Request


class Cancel(msgspec.Struct, tag=True, kw_only=True):
    """The client left: the request stops wherever it is."""

    request_id: str


class Items(msgspec.Struct, tag=True, kw_only=True):
    items: list[TokenDelta | Embedding | RequestError]


class EmbedderCard(msgspec.Struct, kw_only=True):
    """What the OpenAI routes read of an embedding model served in the core (`core.embedder(name)`)."""

    served_model_name: str
    dim: int
    max_length: int


class FrontEnd(msgspec.Struct, kw_only=True):
    """What every API server enforces as the gateway would: its API keys, its body limit, its graceful stop."""

    api_keys: list[str]
    max_body_bytes: int
    graceful_timeout_s: float


class Snapshot(msgspec.Struct, tag=True, kw_only=True):
    """The core's state the routes read, sent when an API server attaches and whenever it changes: the models (own,
    attached, embedding), what requests for the graph's own model need (its tokenizer's source, context, sampling
    defaults, vocabulary), and the gateway's settings for its front ends."""

    model_name: str
    model_path: str | None
    models: list[str]
    instance_models: list[str]  # every model an attached instance serves (also those whose instances all failed)
    embedders: list[EmbedderCard]
    embedding_models: list[str]
    max_model_len: int | None
    vocab_size: int | None
    sampling_defaults: dict[str, Any] | None
    front_end: FrontEnd


ALIVE_S = 1.0  # how often each end says Alive
PEER_TIMEOUT_S = 10.0  # an end that heard nothing from the other for this long counts it as gone (a busy loop is not)
ToCore = Attach | Submit | Cancel | Call | HangUp | Alive
ToApiServer = Items | Snapshot | Reply | Alive

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_to_api_server = msgspec.msgpack.Decoder(ToApiServer)


def encode(message: ToCore | ToApiServer) -> bytes:
    return _encoder.encode(message)


def decode_to_core(frame: Any) -> ToCore:
    return _to_core.decode(frame)


def decode_to_api_server(frame: Any) -> ToApiServer:
    return _to_api_server.decode(frame)
