"""An API server: a process in front of a gateway's serving core, started by the gateway (`sagellm serve
--api-servers N`, sharing its port) or by hand on another host (`sagellm api-server --core tcp://HOST:PORT`).

API servers do the work that grows with the request rate and not with the model: HTTP, JSON, the chat template and
tokenizing, SSE framing. The core (`api_hub`) runs the graph. The OpenAI generation routes (`/v1/completions`,
`/v1/chat/completions`, `/v1/embeddings`) are answered here by the same code as in a single-process gateway, against
`RemoteCore`: requests go to the core tokenized, their items come back in batches. Every other route (models,
health, metrics, admin, management, sessions, request status) is passed on over the same link to the core's own app
(`CoreCalls`), so it answers from the one state there is: metrics count the requests of every API server.

The gateway starts its own as `python -m sagellm.gateway.api_servers.server --core ENDPOINT`, their settings in the
environment (`SAGELLM_API_SERVER`, JSON, and the run's key when the core listens on tcp: keys do not show in a
process listing); they end with the gateway, within a second even when it is killed outright
(`common.parent_death`): an API server must not answer for a core that is gone. The gateway's API keys, body limit
and graceful stop come from the core when an API server attaches."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
import trio
import zmq

from sagellm.common.errors import JoinRefused, Unavailable
from sagellm.common.flag import Flag
from sagellm.common.logging import configure_logging
from sagellm.common.parent_death import exit_with_parent
from sagellm.common.peer_monitor import PeerMonitor
from sagellm.gateway.api_servers import link as api_link
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
from sagellm.gateway.http.app import App, HttpRequest, Response
from sagellm.gateway.http.auth import key_guard
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.limits import HttpLimits
from sagellm.gateway.http.server import serve_http
from sagellm.gateway.openai.api import OpenAIApi
from sagellm.gateway.serving.instances import embedding_model, instance_model
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.gateway.serving.prompts import RequestIds, tokenize_prompts
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys
from sagellm.runtime.comm.zmq_trio import TrioSocket, connect_dealer, reclaim_ipc_dirs
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.pipeline.messages import Request, RequestError, is_terminal

if TYPE_CHECKING:
    from sagellm.runtime.pipeline.served_model import ServedModel

log = structlog.get_logger("sagellm.gateway.api_servers.server")
SETTINGS_ENV = "SAGELLM_API_SERVER"
CORE = "core"  # the one peer an API server watches
START_TIMEOUT_S = 60.0  # for the core's first answer


class RemoteStream(ItemStream):
    """A request's items as the core sends them: the `ItemStream` the routes read of a core's `RequestStream`.
    Failover happens in the core; this end only carries the items."""

    def __init__(self, link: CoreLink, request_id: str) -> None:
        super().__init__()
        self.link, self.request_id = link, request_id

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.link.send(wire.Cancel(node=API_SERVER, request_ids=[self.request_id]))
            self.link.streams.pop(self.request_id, None)


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
        for request in requests:
            streams.append(RemoteStream(self, request.request_id))
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

    def embedder(self, model: str) -> api_link.EmbedderCard | None:
        return next((card for card in self.state.embedders if card.served_model_name == model), None)

    def embedding_model(self, name: str | None) -> str:
        """As `ServingCore.embedding_model`."""
        return embedding_model(name, self.state.embedding_models)

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


async def run_api_server(
    core_endpoint: str, settings: dict[str, Any], keys: RunKeys | None = None, *, by_gateway: bool = False
) -> None:
    """Attaches to the core, loads the tokenizer of its model, serves HTTP until SIGTERM (and, one started by hand,
    Ctrl-C; `by_gateway`: the gateway stops its own in order), then stops gracefully: requests in flight finish.
    Stopped while it starts, it just ends. `settings`: where it listens (`host`, `port`, `allowed_hosts`); `keys`:
    the core's run key (a tcp core is CURVE-encrypted)."""
    zctx = zmq.Context()
    try:
        with connect_dealer(zctx, core_endpoint, keys=keys) as socket:
            link = CoreLink(socket)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                starting = trio.CancelScope()

                async def end_start_on_stop() -> None:
                    await stop.wait()
                    starting.cancel()

                nursery.start_soon(link.run)
                nursery.start_soon(_stop_on_signal, stop, by_gateway)
                nursery.start_soon(end_start_on_stop)
                with starting:
                    link.attach()
                    with trio.fail_after(START_TIMEOUT_S):
                        await link.snapshot_arrived.wait()
                    assert link.snapshot is not None
                    served = await trio.to_thread.run_sync(_served, link.snapshot.model_path)
                if not starting.cancelled_caught:
                    await _serve(link, served, settings, stop)
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise ApiServerError(f"the serving core at {core_endpoint} did not answer within {START_TIMEOUT_S:.0f} s "
                             "(not running, unreachable, or another run's key)") from None  # fmt: skip
    finally:
        zctx.term()


class ApiServerError(Unavailable):
    """An API server that cannot serve (its core does not answer)."""


async def _serve(link: CoreLink, served: ServedModel | None, settings: dict[str, Any], stop: trio.Event) -> None:
    assert link.snapshot is not None
    front_end = link.snapshot.front_end
    limits = HttpLimits(max_body_bytes=front_end.max_body_bytes, graceful_timeout_s=front_end.graceful_timeout_s,
                        max_connections=front_end.max_connections)  # fmt: skip
    serving = partial(serve_http, _app(link, served, settings), settings["host"], settings["port"], limits,
                      shutdown_trigger=stop.wait, reuse_port=True)  # fmt: skip
    async with trio.open_nursery() as http:
        url = await http.start(serving)
        link.url = url
        link.send(wire.Ready(node=API_SERVER, pid=os.getpid(), info={"url": url}))
        log.info("api_server_ready", url=url)


def _app(link: CoreLink, served: ServedModel | None, settings: dict[str, Any]) -> App:
    assert link.snapshot is not None
    allowed = settings.get("allowed_hosts")
    app = App(allowed_hosts=frozenset(allowed) if allowed is not None else None)
    to_core = CoreCalls(link)
    front = link.snapshot.front_end
    routes = OpenAIApi(
        RemoteCore(link, served),
        to_core=to_core,
        tool_call_parser=front.tool_call_parser,
        reasoning_parser=front.reasoning_parser,
        reasoning_budget=front.reasoning_budget,
    )
    routes.register(app, key_guard(link.snapshot.front_end.api_keys, "API"))
    app.fallback = to_core
    return app


def _served(model_path: str | None) -> ServedModel | None:
    """The graph's model's front-end files (tokenizer, config) as this process reads them."""
    if model_path is None:
        return None
    from sagellm.runtime.pipeline.served_model import served_model

    return served_model({"model": model_path})


async def _stop_on_signal(stop: trio.Event, by_gateway: bool) -> None:
    """SIGTERM stops this server gracefully. A terminal's Ctrl-C goes to the gateway too, which stops its API servers
    in order (`main` ignores SIGINT); one started by hand stops at Ctrl-C."""
    with trio.open_signal_receiver(signal.SIGTERM, *(() if by_gateway else (signal.SIGINT,))) as signals:
        async for _ in signals:
            break
    stop.set()


def settings_of(config: Any, port: int) -> dict[str, Any]:
    """Where an API server the gateway starts listens (sent through the environment)."""
    allowed = config.host_names()
    return {"host": config.host, "port": port, "allowed_hosts": sorted(allowed) if allowed is not None else None}


def main() -> None:
    """The entry the gateway spawns (its settings and the run's key in the environment)."""
    exit_with_parent(reclaim_ipc_dirs)  # first: a gateway killed outright takes its API servers along
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", required=True, help="the serving core's ZeroMQ endpoint")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "info"))
    settings, keys = json.loads(os.environ[SETTINGS_ENV]), RunKeys.from_env()
    trio.run(partial(run_api_server, by_gateway=True), args.core, settings, keys)


if __name__ == "__main__":
    main()
