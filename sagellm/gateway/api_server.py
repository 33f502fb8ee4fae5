"""An API server: one of the processes `sagellm serve --api-servers N` runs in front of its serving core.

The API servers share the gateway's port (SO_REUSEPORT: the kernel spreads new connections over them) and do the work
that grows with the request rate and not with the model: HTTP, JSON, the chat template and tokenizing, SSE framing.
The core (`api_hub`) runs the graph. The OpenAI generation routes (`/v1/completions`, `/v1/chat/completions`,
`/v1/embeddings`) are answered here by the same code as in a single-process gateway, against `RemoteCore`: requests go
to the core tokenized, their items come back in batches. Every other route (models, health, metrics, admin,
management, sessions, request status) is passed on to the core's own HTTP server, so it answers from the one state
there is: metrics count the requests of every API server.

Run by the gateway, not by hand: `python -m sagellm.gateway.api_server --core ENDPOINT`, its settings in the
environment (`SAGELLM_API_SERVER`, JSON: keys do not show in a process listing)."""

from __future__ import annotations

import argparse
import json
import os
import signal
from functools import partial
from typing import Any

import httpx
import structlog
import trio
import zmq

from sagellm.common.logging import configure_logging
from sagellm.gateway import api_link
from sagellm.gateway.api_link import Attach, Cancel, Items, Snapshot, Submit
from sagellm.gateway.auth import key_guard
from sagellm.gateway.core import RequestIds, instance_model, tokenize_prompts
from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import App, EventStream, HttpRequest, Response
from sagellm.gateway.http_server import HttpLimits, serve_http
from sagellm.gateway.openai_routes import OpenAIRoutes
from sagellm.gateway.request_stream import ItemQueue
from sagellm.runtime.comm.zmq_trio import TrioSocket, connect_dealer
from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta, is_terminal

log = structlog.get_logger("sagellm.gateway.api_server")
SETTINGS_ENV = "SAGELLM_API_SERVER"
START_TIMEOUT_S = 60.0  # for the core's first answer
PARENT_CHECK_S = 1.0  # how often an API server checks that the gateway that started it still runs
# Not passed on to the core: they describe this hop. Host is kept: the core checks it as this server did.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                        "content-length", "proxy-authorization", "proxy-connection"})  # fmt: skip


class RemoteStream:
    """A request's items as the core sends them: what the routes read of a core's `RequestStream` (iteration, items
    already here, cancel). Failover happens in the core; this end only carries the items."""

    def __init__(self, link: CoreLink, request_id: str) -> None:
        self.link, self.request_id = link, request_id
        self.done = False
        self._items = ItemQueue()

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> TokenDelta | Embedding | RequestError:
        if self.done and not self._items:
            raise StopAsyncIteration
        item = await self._items.get()
        if is_terminal(item):
            self.done = True
        return item

    def has_ready(self) -> bool:
        return bool(self._items)

    def deliver(self, item: TokenDelta | Embedding | RequestError) -> None:
        self._items.put(item)

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.link.send(Cancel(request_id=self.request_id))
            self.link.streams.pop(self.request_id, None)


class CoreLink:
    """This process's connection to the core: submits, cancels and attaches go out (batched by one sender task),
    items come in and go to their streams; the latest `Snapshot` of the core's state is kept."""

    def __init__(self, socket: TrioSocket) -> None:
        self.socket = socket
        self.streams: dict[str, RemoteStream] = {}
        self.snapshot: Snapshot | None = None
        self.snapshot_arrived = trio.Event()
        self._outbox: list[api_link.ToCore] = []
        self._queued = trio.Event()

    def send(self, message: api_link.ToCore) -> None:
        self._outbox.append(message)
        self._queued.set()

    def submit(self, request: Request) -> RemoteStream:
        stream = self.streams[request.request_id] = RemoteStream(self, request.request_id)
        self.send(Submit(request=request))
        return stream

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_queued)
            while True:
                frames = await self.socket.receive_frames()
                message = api_link.decode_to_api_server(frames[-1].buffer)
                if isinstance(message, Items):
                    for item in message.items:
                        stream = self.streams.get(item.request_id)
                        if stream is not None:
                            stream.deliver(item)
                            if is_terminal(item):
                                del self.streams[item.request_id]
                else:
                    self.snapshot = message
                    self.snapshot_arrived.set()

    async def _send_queued(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            outbox, self._outbox = self._outbox, []
            for message in outbox:
                await self.socket.send_frames([api_link.encode(message)])


class RemoteCore:
    """What the OpenAI routes read of a `ServingCore`, answered from the core's latest snapshot; requests for the
    graph's own model are tokenized here (the work this process exists for) before they go to the core."""

    def __init__(self, link: CoreLink, tokenizer: Any) -> None:
        self.link, self.tokenizer = link, tokenizer
        self.new_id = RequestIds()  # request ids unique across API servers

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

    @property
    def sampling_defaults(self) -> dict[str, Any] | None:
        return self.state.sampling_defaults

    def models(self) -> list[str]:
        return self.state.models

    def embedder(self, model: str) -> api_link.EmbedderCard | None:
        return next((card for card in self.state.embedders if card.served_model_name == model), None)

    def embedding_models(self) -> list[str]:
        return self.state.embedding_models

    def instance_model(self, name: str | None) -> str | None:
        """As `ServingCore.instance_model`: None for the graph's own model, the name for an attached one."""
        return instance_model(name, self.state.model_name, self.state.instance_models, self.state.models)

    async def tokenize_long_prompts(self, requests: list[Request]) -> None:
        await tokenize_prompts(requests, self.tokenizer, self.state.vocab_size, self.max_model_len, short_too=True)

    def submit(self, request: Request) -> RemoteStream:
        return self.link.submit(request)


class CoreProxy:
    """Passes a request on to the core's own HTTP server and its reply back (an event stream as it streams)."""

    def __init__(self, link: CoreLink) -> None:
        self.link = link
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0))

    async def __call__(self, request: HttpRequest) -> Response | EventStream:
        assert self.link.snapshot is not None
        url = self.link.snapshot.core_url + request.path
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        outgoing = self.client.build_request(request.method, url, params=request.query, headers=headers,
                                             content=request.body)  # fmt: skip
        try:
            reply = await self.client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"the serving core did not answer: {exc}", code="unavailable") from None
        content_type = reply.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):
            return EventStream(_passed_on(reply), on_disconnect=lambda: None, framed=True)
        body = await reply.aread()
        await reply.aclose()
        kept = [(k.encode(), v.encode()) for k, v in reply.headers.items() if k.lower() in ("retry-after", "allow")]
        return Response(body, reply.status_code, content_type=content_type, headers=kept)


async def _passed_on(reply: httpx.Response) -> Any:
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    finally:
        await reply.aclose()


async def run_api_server(core_endpoint: str, settings: dict[str, Any]) -> None:
    """Attaches to the core, loads the tokenizer of its model, serves HTTP on the shared port until SIGTERM or the
    gateway's end (then stops gracefully: requests in flight finish); stopped while it starts, it just ends."""
    zctx = zmq.Context()
    try:
        with connect_dealer(zctx, core_endpoint) as socket:
            link = CoreLink(socket)
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                starting = trio.CancelScope()

                async def end_start_on_stop() -> None:
                    await stop.wait()
                    starting.cancel()

                nursery.start_soon(link.run)
                nursery.start_soon(_stop_on_signal, stop, settings["parent_pid"])
                nursery.start_soon(end_start_on_stop)
                with starting:
                    link.send(Attach(pid=os.getpid()))
                    with trio.fail_after(START_TIMEOUT_S):
                        await link.snapshot_arrived.wait()
                    assert link.snapshot is not None
                    tokenizer = await trio.to_thread.run_sync(_tokenizer, link.snapshot.model_path)
                if not starting.cancelled_caught:
                    await _serve(link, tokenizer, settings, stop)
                nursery.cancel_scope.cancel()
    finally:
        zctx.term()


async def _serve(link: CoreLink, tokenizer: Any, settings: dict[str, Any], stop: trio.Event) -> None:
    limits = HttpLimits(max_body_bytes=settings["max_body_bytes"], graceful_timeout_s=settings["graceful_timeout_s"])
    serving = partial(serve_http, _app(link, tokenizer, settings), settings["host"], settings["port"], limits,
                      shutdown_trigger=stop.wait, reuse_port=True)  # fmt: skip
    async with trio.open_nursery() as http:
        url = await http.start(serving)
        link.send(Attach(pid=os.getpid(), url=url))
        log.info("api_server_ready", url=url)


def _app(link: CoreLink, tokenizer: Any, settings: dict[str, Any]) -> App:
    allowed = settings.get("allowed_hosts")
    app = App(allowed_hosts=frozenset(allowed) if allowed is not None else None)
    routes = OpenAIRoutes(RemoteCore(link, tokenizer))  # type: ignore[arg-type]  # what the routes read of a core
    routes.register_generation(app, key_guard(settings["api_keys"], "API"))
    app.fallback = CoreProxy(link)
    return app


def _tokenizer(model_path: str | None) -> Any:
    if model_path is None:
        return None
    from sagellm.runtime.executor.local import model_attrs

    return model_attrs(model_path)["tokenizer"]


async def _stop_on_signal(stop: trio.Event, parent: int) -> None:
    """SIGTERM (the gateway's) stops this server gracefully; so does the gateway's process ending, seen as a new
    parent: an API server must not answer for a core that is gone. A terminal's Ctrl-C goes to the gateway, which
    stops its API servers in order (`main` ignores SIGINT here). `parent`: the gateway's pid, as it said (this
    process may have been orphaned before it could look)."""
    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_sigterm)
        while os.getppid() == parent:
            await trio.sleep(PARENT_CHECK_S)
        log.warning("api_server_orphaned", parent=parent)
        nursery.cancel_scope.cancel()
    stop.set()


def settings_of(config: Any, port: int) -> dict[str, Any]:
    """What an API server needs of the gateway's config (sent through the environment)."""
    allowed = config.host_names()
    return {
        "host": config.host, "port": port, "api_keys": list(config.api_keys),
        "max_body_bytes": config.max_body_bytes, "graceful_timeout_s": config.graceful_timeout_s,
        "allowed_hosts": sorted(allowed) if allowed is not None else None, "parent_pid": os.getpid(),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core", required=True, help="the serving core's ZeroMQ endpoint")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "info"))
    trio.run(run_api_server, args.core, json.loads(os.environ[SETTINGS_ENV]))


if __name__ == "__main__":
    main()
