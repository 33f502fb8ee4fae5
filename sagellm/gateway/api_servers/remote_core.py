"""An API server's side of its link to the serving core: the link itself (`CoreLink`: requests out, their items and
the core's state in, the core watched for silence), what the routes ask of the core there (`RemoteCore`, the serving
interface's second implementation, and its `RemoteReadiness`), a request's stream of items (`RemoteStream`), and the
routes passed on to the core's own app (`CoreCalls`)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio

from sagellm.common import tracing
from sagellm.common.errors import JoinRefused
from sagellm.common.flag import Flag
from sagellm.common.peer_monitor import PeerMonitor
from sagellm.gateway.api_servers.link import (
    ALIVE_S,
    API_SERVER,
    PEER_TIMEOUT_S,
    Call,
    HangUp,
    ModelReady,
    NotSubmitting,
    Reply,
    Snapshot,
)
from sagellm.gateway.http.app import HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.instances import embedding_model, instance_model
from sagellm.gateway.serving.item_stream import Item, ItemStream
from sagellm.gateway.serving.prompts import RequestIds, tokenize_prompts
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import TrioSocket
from sagellm.runtime.embedding.card import PoolingCard
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.pipeline.messages import Request, RequestError, is_terminal

if TYPE_CHECKING:
    from sagellm.runtime.pipeline.served_model import ServedModel

log = structlog.get_logger("sagellm.gateway.api_servers.server")
CORE = "core"  # the one peer an API server watches


class RemoteStream(ItemStream):
    """A request's items as the core sends them: the `ItemStream` the routes read of a core's `RequestStream`.
    Failover happens in the core; this end only carries the items."""

    def __init__(self, link: CoreLink, request_id: str, span: ServerSpan | None = None) -> None:
        super().__init__()
        self.link, self.request_id, self.span = link, request_id, span

    def deliver(self, item: Item) -> None:
        super().deliver(item)
        if self.span is not None and is_terminal(item):
            self.span, span = None, self.span  # (a cancel that follows ends nothing more)
            span.stream_ended(item)

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.link.send(wire.Cancel(node=API_SERVER, request_ids=[self.request_id]))
            self.link.streams.pop(self.request_id, None)
            if self.span is not None:
                self.span, span = None, self.span
                span.stream_ended(None)


class ServerSpan:
    """A traced client request's span on this API server (`sagellm.api_server`): from its submission to the end of the
    last of its prompts' streams; the core's span of each prompt is its child."""

    def __init__(self, parent: tracing.TraceContext, requests: list[Request]) -> None:
        attributes = {"sagellm.request_id": requests[0].request_id, "sagellm.pid": os.getpid(),
                      "sagellm.prompts": len(requests)}  # fmt: skip
        self.span = tracing.start("sagellm.api_server", parent, time.time(), attributes)
        self.context = tracing.context_of(self.span)
        self.open = len(requests)
        self.error: str | None = None

    def stream_ended(self, item: Item | None) -> None:
        """One prompt's stream ended with `item` (None: the client left)."""
        if isinstance(item, RequestError):
            self.error = item.code
        self.open -= 1
        if self.open == 0:
            tracing.end(self.span, time.time(), {"sagellm.cancelled": item is None}, self.error)


class CoreLink:
    """This process's connection to the core: requests, cancels, calls and its Hello go out (in order, by one sender
    task), items and replies come in and go to their streams and calls; the latest `Snapshot` of the core's state is
    kept. Each end heartbeats each second: a core silent for `PEER_TIMEOUT_S` is lost (its requests here end with an
    `unavailable` error, new ones get a 503) until it answers a Hello again (a core started anew at the same address
    takes this server back). A core that refuses it (another wire protocol) ends it with the core's reason."""

    def __init__(self, socket: TrioSocket) -> None:
        self.socket = socket
        self.streams: dict[str, RemoteStream] = {}
        self.calls: dict[int, trio.MemorySendChannel[Reply | None]] = {}  # call id -> where its Reply arrives
        self._call_ids = itertools.count()
        self.snapshot: Snapshot | None = None
        self.snapshot_arrived = trio.Event()
        self.url = ""  # where it listens, once it does
        self.lost = False
        self.monitor = PeerMonitor(PEER_TIMEOUT_S)  # the core, heard from in any message
        self.monitor.seen(CORE)
        self._outbox: list[Any] = []
        self._queued = Flag()  # set as a message is queued: the sender task takes it

    def send(self, message: Any) -> None:
        self._outbox.append(message)
        self._queued.set()

    def submit(self, requests: list[Request]) -> list[RemoteStream]:
        """A client request's prompts, in one message when several: the core admits or refuses them whole."""
        self._check_reachable()
        streams = []
        trace = tracing.incoming_context()  # the client's traceparent: this server's span of the request goes under it
        span = ServerSpan(trace, requests) if trace is not None else None
        for request in requests:
            if request.trace is None and span is not None:
                request.trace = span.context
            streams.append(RemoteStream(self, request.request_id, span))
            self.streams[request.request_id] = streams[-1]
        self.send(requests[0] if len(requests) == 1 else wire.Batch(items=list(requests)))
        return streams

    async def ask(self, message: Callable[[int], Call | ModelReady]) -> Reply:
        """Sends what `message(call_id)` makes (a passed-on request, a model to make ready) and returns the core's
        Reply; a caller that leaves first hangs up. Raises ApiError 503 when the core is or falls silent."""
        self._check_reachable()
        call_id = next(self._call_ids)
        self.calls[call_id], replies = trio.open_memory_channel[Reply | None](1)  # None: the core is lost
        self.send(message(call_id))
        answered = False
        try:
            reply = await replies.receive()
            answered = True
        finally:
            if not answered and self.calls.pop(call_id, None) is not None:
                self.send(HangUp(call_id=call_id))
        if reply is None:
            raise ApiError(503, "the serving core fell silent before it answered", code="unavailable")
        return reply

    def _check_reachable(self) -> None:
        if self.lost:
            message = f"the serving core did not answer for {PEER_TIMEOUT_S:.0f} s; try again later"
            raise ApiError(503, message, code="unavailable")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_queued)
            nursery.start_soon(self._keep_in_touch)
            while True:
                frames = await self.socket.receive_frames()
                self.monitor.seen(CORE)
                if self.lost:
                    self.lost = False
                    log.info("core_back")
                try:
                    message = wire.decode(frames)
                except wire.WireError as error:  # a core of another version: its Hello answer says so, if it can
                    log.warning("core_message_dropped", problem=str(error))
                    continue
                self._receive(message)

    def attach(self) -> None:
        """Says who this API server is (and, once it listens, where): the core then sends its state."""
        self.send(wire.Hello(node=API_SERVER, pid=os.getpid(), host=socket.gethostname(), protocol=wire.PROTOCOL))
        if self.url:
            self.send(wire.Ready(node=API_SERVER, pid=os.getpid(), info={"url": self.url}))

    def _receive(self, message: Any) -> None:
        if isinstance(message, wire.Assign) and message.error:
            raise JoinRefused(f"the serving core refused this API server: {message.error}")
        if isinstance(message, wire.Batch):
            for item in message.items:
                stream = self.streams.get(item.request_id)
                if stream is not None:
                    stream.deliver(item)
                    if is_terminal(item):
                        del self.streams[item.request_id]
        elif isinstance(message, Reply):
            replies = self.calls.pop(message.call_id, None)
            if replies is not None:
                replies.send_nowait(message)
        elif isinstance(message, Snapshot):
            self.snapshot = message
            self.snapshot_arrived.set()

    async def _keep_in_touch(self) -> None:
        while True:
            await trio.sleep(ALIVE_S)
            if not self.lost and self.monitor.lost():
                self._lose()
            if self.lost:
                self.attach()
            else:
                self.send(wire.Heartbeat(node=API_SERVER, time=time.time()))

    def _lose(self) -> None:
        """The core fell silent: what waits on it ends now, with an error, instead of waiting for ever."""
        self.lost = True
        log.warning("core_lost", silent_s=PEER_TIMEOUT_S)
        message = f"the serving core fell silent (nothing for {PEER_TIMEOUT_S:.0f} s)"
        for request_id, stream in list(self.streams.items()):
            stream.deliver(RequestError(request_id=request_id, code="unavailable", message=message, retryable=True))
        self.streams.clear()
        for replies in self.calls.values():
            replies.send_nowait(None)
        self.calls.clear()

    async def _send_queued(self) -> None:
        while True:
            await self._queued.take()
            outbox, self._outbox = self._outbox, []
            for message in outbox:
                await self.socket.send_frames(wire.encode(message))


class RemoteReadiness:
    """The API server's `Readiness`: only a model the core loads on demand is waited for here, by the core, which
    holds it busy for the request that follows (`ModelReady`, `NotSubmitting`). The graph's own model needs no wait
    here: its requests wait in the core while its engines wake."""

    def __init__(self, link: CoreLink) -> None:
        self.link = link

    async def model_ready(self, model: str | None, submits: bool = True) -> None:
        """As `ModelReadiness.model_ready`: a model loaded on demand is made to serve by the core (`ModelReady`, whose
        reply comes after the core's state with the model's defaults); raises its ApiError (503) when it cannot be in
        time."""
        if model is None or model not in self._on_demand():
            return
        reply = await self.link.ask(lambda call_id: ModelReady(call_id=call_id, model=model, submits=submits))
        if reply.status != 200:
            error = json.loads(reply.body)["error"]
            retry_after = next((float(v) for k, v in reply.headers if k.lower() == "retry-after"), None)
            raise ApiError(reply.status, error["message"], param=error["param"], code=error["code"],
                           retry_after_s=retry_after)  # fmt: skip

    def not_submitting(self, model: str | None) -> None:
        """As `ModelReadiness.not_submitting`: the core holds a model busy for the request `ModelReady` announced."""
        if model is not None and model in self._on_demand():
            self.link.send(NotSubmitting(model=model))

    def _on_demand(self) -> list[str]:
        """The models the core loads on demand, as its latest state says (routes run once it came)."""
        assert self.link.snapshot is not None
        return self.link.snapshot.on_demand


class RemoteCore:
    """The API server's `ServingApi`: what the routes that run requests read of a `ServingCore`, answered from the
    core's latest snapshot; requests for the graph's own model are tokenized here (the work this process exists for)
    before they go to the core."""

    def __init__(self, link: CoreLink, served: ServedModel | None) -> None:
        self.link, self.served = link, served
        self.new_id = RequestIds()  # request ids unique across API servers
        self.readiness = RemoteReadiness(link)

    @property
    def tokenizer(self) -> Any:
        return self.served.tokenizer if self.served is not None else None

    @property
    def state(self) -> Snapshot:
        assert self.link.snapshot is not None
        return self.link.snapshot

    @property
    def model_name(self) -> str:
        return self.state.model_name

    @property
    def max_model_len(self) -> int | None:
        return self.state.max_model_len

    def sampling_defaults(self, model: str | None = None) -> dict[str, Any] | None:
        """As `ServingCore.sampling_defaults`."""
        if model is not None:
            return self.state.instance_defaults.get(model)
        return self.state.sampling_defaults

    def models(self) -> list[str]:
        return self.state.models

    def embedder(self, model: str) -> PoolingCard | None:
        return self.state.embedders.get(model)

    def embedding_model(self, name: str | None) -> str:
        """As `ServingCore.embedding_model`."""
        return embedding_model(name, self.state.embedding_models)

    def embedding_models(self) -> list[str]:
        return self.state.embedding_models

    def engines_of_ours(self, model: str) -> bool:
        """As `ServingCore.engines_of_ours` (the core applies those models' sampling defaults, so it sent them)."""
        return model in self.state.instance_defaults

    def instance_model(self, name: str | None) -> str | None:
        """As `ServingCore.instance_model`: None for the graph's own model, the name for an attached one or one loaded
        on demand."""
        state = self.state
        own = {state.model_name, *state.model_aliases}
        alone = state.on_demand if not state.own_names else []
        return instance_model(name, own, lambda: {*state.instance_models, *state.on_demand}, self.models, alone)

    def lora_of(self, name: str | None) -> LoRARequest | None:
        """As `ServingCore.lora_of`: none, a core behind API servers serves its adapters through its own port only."""
        return None

    async def tokenize_prompts(self, requests: list[Request], every: bool = False) -> None:
        """As `ServingCore.tokenize_prompts`; here every prompt is tokenized (the core's event loop is spared)."""
        await tokenize_prompts(requests, self.tokenizer, self.state.vocab_size, self.max_model_len, short_too=True)

    def submit(self, request: Request) -> RemoteStream:
        return self.link.submit([request])[0]

    def submit_all(self, requests: list[Request]) -> list[RemoteStream]:
        """As `ServingCore.submit_all`: the core admits or refuses the prompts whole."""
        return self.link.submit(requests)


class CoreCalls:
    """Passes a request on to the core, whose own app answers it (`Call`), and its reply back; a client that leaves
    first hangs up there too."""

    def __init__(self, link: CoreLink) -> None:
        self.link = link

    async def __call__(self, request: HttpRequest) -> Response:
        reply = await self.link.ask(lambda call_id: Call(call_id=call_id, method=request.method, path=request.path,
                                                         query=request.query, headers=request.headers,
                                                         body=request.body))  # fmt: skip
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
        return Response(reply.body, reply.status, content_type=reply.content_type, headers=headers)
