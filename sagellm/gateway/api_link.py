"""What API servers and the serving core say to each other over ZeroMQ (`sagellm serve --api-servers N`).

An API server (`api_server`) is a process that answers HTTP and turns the OpenAI requests into pipeline `Request`s,
tokenized; the core (`api_hub`, in the process that runs the graph) runs them and streams their items back. One
DEALER per API server, one ROUTER in the core; each message is one msgpack frame. Items travel in batches: all that
are ready for one API server when the core's sender runs go in one message, so a busy core sends one message per
turn of its event loop, not one per token."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta


class Attach(msgspec.Struct, tag=True, kw_only=True):
    """An API server's first message; again with `url` once it listens (it then counts as serving)."""

    pid: int
    url: str = ""


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


class Snapshot(msgspec.Struct, tag=True, kw_only=True):
    """The core's state the routes read, sent when an API server attaches and whenever it changes: the models (own,
    attached, embedding), what requests for the graph's own model need (its tokenizer's source, context, sampling
    defaults, vocabulary), and where the core answers the routes an API server passes on to it."""

    model_name: str
    model_path: str | None
    models: list[str]
    instance_models: list[str]  # every model an attached instance serves (also those whose instances all failed)
    embedders: list[EmbedderCard]
    embedding_models: list[str]
    max_model_len: int | None
    vocab_size: int | None
    sampling_defaults: dict[str, Any] | None
    core_url: str


ToCore = Attach | Submit | Cancel
ToApiServer = Items | Snapshot

_encoder = msgspec.msgpack.Encoder()
_to_core = msgspec.msgpack.Decoder(ToCore)
_to_api_server = msgspec.msgpack.Decoder(ToApiServer)


def encode(message: ToCore | ToApiServer) -> bytes:
    return _encoder.encode(message)


def decode_to_core(frame: Any) -> ToCore:
    return _to_core.decode(frame)


def decode_to_api_server(frame: Any) -> ToApiServer:
    return _to_api_server.decode(frame)
