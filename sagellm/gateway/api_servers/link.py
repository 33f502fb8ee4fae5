"""What API servers and the serving core say to each other over ZeroMQ (`sagellm serve --api-servers N`, and
`sagellm api-server --core tcp://...` on other hosts): the pipeline's wire format (`runtime.comm.wire`), one DEALER
per API server, one ROUTER in the core.

An API server (`api_server`) is a process that answers HTTP and turns the OpenAI requests into pipeline `Request`s,
tokenized; the core (`api_hub`, in the process that runs the graph) runs them and streams their items back. Every
other route is a `Call`: the HTTP request as it came, answered by the core's own app (`Reply`), so the link is the
only way an API server reaches the core.

    api server -> Hello(pid, protocol)          core -> Snapshot (its state), again whenever it changes;
                                                        Assign(error) to an API server of another wire protocol
    api server -> Ready(url) once it listens    (from then on it counts as serving)
    api server -> a Request (DATA)              core -> Batch(items): everything ready for that API server when
    api server -> Cancel(request ids)                   the core's sender runs, one message a loop turn, not a token
    api server -> Call, HangUp (APP)            core -> Reply (APP)
    api server -> ModelReady (APP)              core -> Snapshot, then Reply (APP), once the model serves
    api server -> NotSubmitting (APP)           (the request a ModelReady announced will not come: its hold ends)
    both       -> Heartbeat each ALIVE_S        an end silent for PEER_TIMEOUT_S counts the other as gone (the core
                                                forgets the API server and cancels its requests; the API server ends
                                                its requests with an error, answers 503 and says Hello until the
                                                core answers)

Requests of a model loaded on demand, or of the graph's model while its engines sleep, wait in the core until it
serves (`ModelReadiness.model_ready`); an API server asks first for a model on demand (`ModelReady`), whose files and
sampling defaults the core's Snapshot before the Reply brings.

The gateway's own messages (Call, HangUp, Reply, Snapshot, ModelReady, NotSubmitting) ride in the wire's APP frames
(`wire.carry`)."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.keys.key_ring import KnownKey
from sagellm.runtime.comm import wire
from sagellm.runtime.embedding.card import PoolingCard

API_SERVER = "api-server"  # the node name API servers give in their messages


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


class ModelReady(msgspec.Struct, tag=True, kw_only=True):
    """Asks the core to make a model loaded on demand serve (`ModelReadiness.model_ready`); its `Reply` is 200 once it
    does, else the error (503, Retry-After). `submits`: a request of it follows."""

    call_id: int
    model: str
    submits: bool = True


class NotSubmitting(msgspec.Struct, tag=True, kw_only=True):
    """The request a `ModelReady` (`submits`) announced will not come (`ModelReadiness.not_submitting`)."""

    model: str | None


class FrontEnd(msgspec.Struct, kw_only=True):
    """What every API server enforces as the gateway would: its API keys, its body limit, its graceful stop."""

    keys: list[KnownKey]  # the keys the API routes accept, by digest (the core's, changed as its keys file is)
    keys_required: bool  # a key is needed (also when `keys` is empty: a keys file that lists none)
    max_body_bytes: int
    graceful_timeout_s: float
    max_connections: int | None = None  # each API server's own cap
    tool_call_parser: str | None = None  # how tool calls are read from replies (None: chosen from the model)
    reasoning_parser: str | None = None  # how thinking is read from replies (None: chosen from the model)
    reasoning_budget: int | None = None  # thinking tokens of a request that sets none (None: no bound)
    allowed_media_domains: list[str] = []  # where image_url parts may be fetched from (GatewayConfig's)
    allowed_local_media_path: str | None = None
    per_request_metrics: bool = False  # replies carry vLLM's per-request `metrics`


class Snapshot(msgspec.Struct, tag=True, kw_only=True):
    """The core's state the routes read, sent when an API server attaches and whenever it changes: the models (own,
    attached, embedding), what requests for the graph's own model need (its tokenizer's source, context, sampling
    defaults, vocabulary), and the gateway's settings for its front ends."""

    model_name: str
    model_aliases: list[str]  # more names of the graph's model
    model_path: str | None
    models: list[str]
    instance_models: list[str]  # every model an attached instance serves (also those whose instances all failed)
    own_names: list[str]  # the names the graph's own model is served as (none when the graph has no engine)
    on_demand: list[str]  # the models loaded on demand, in any status
    embedders: dict[str, PoolingCard]  # the pooling models served in the core and its engines, by name
    embedding_models: list[str]
    max_model_len: int | None
    vocab_size: int | None
    sampling_defaults: dict[str, Any] | None
    instance_defaults: dict[str, dict[str, Any]]  # other models' defaults the core applies (their engines take tokens)
    front_end: FrontEnd


ALIVE_S = 1.0  # how often each end says it is there (a Heartbeat)
PEER_TIMEOUT_S = 10.0  # an end that heard nothing from the other for this long counts it as gone (a busy loop is not)
GatewayMessage = Call | HangUp | Reply | Snapshot | ModelReady | NotSubmitting
wire.carry(GatewayMessage)
