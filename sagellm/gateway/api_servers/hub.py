"""The serving core's end of its API servers (`sagellm serve --api-servers N`, and `sagellm api-server` on other
hosts with `--api-hub`): requests in, their items out.

A request from an API server becomes a stream of the core (`ServingCore.submit`), with everything a stream does here:
admission, the policy queue, failover and resume, the metrics sink; the request's status is the core's
(`/v1/requests/{id}`). A task per request reads its stream and queues the items for their API server; one sender task
sends each API server what is queued in one message. A `Cancel` cancels the stream; a `Call` (any other route) is
answered by the gateway's own app. An API server that goes away (its process ended, or another host's fell silent)
has all its requests cancelled. The core tells API servers what its routes need to know (`Snapshot`) when they attach
and whenever it changes, and that it is there (a heartbeat) each second. The messages are the wire's
(`api_servers.link`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio
import zmq

from sagellm.common.errors import SageLLMError, StartFailed
from sagellm.common.flag import Flag
from sagellm.common.nursery_errors import single_errors
from sagellm.common.parent_death import env_for_child
from sagellm.common.peer_monitor import PeerMonitor
from sagellm.common.processes import python_module
from sagellm.common.pulse import Pulse
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervised, Supervision, end_process, exit_cause
from sagellm.gateway.api_servers.link import (
    ALIVE_S,
    PEER_TIMEOUT_S,
    Call,
    FrontEnd,
    HangUp,
    ModelReady,
    NotSubmitting,
    Reply,
    Snapshot,
)
from sagellm.gateway.config import GatewayConfig
from sagellm.gateway.http.app import App, EventStream, HttpRequest, Response, error_response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys, child_env
from sagellm.runtime.comm.zmq_trio import TrioSocket, bind_router
from sagellm.runtime.pipeline.messages import HTTP_STATUS, Embedding, Request, RequestError, TokenDelta

log = structlog.get_logger("sagellm.gateway")
SNAPSHOT_CHECK_S = 0.2  # how often the core's state is compared with what the API servers were told
ITEMS = (TokenDelta, Embedding, RequestError)  # what goes to an API server batched, in one `wire.Batch`
START_TIMEOUT_S = 120.0  # an API server loads a tokenizer before it listens
CORE = "core"  # the node name the core gives in its messages


class ApiServerHub:
    def __init__(self, core: ServingCore, app: App, front_end: FrontEnd) -> None:
        """`app`: the gateway's own app, which answers the routes API servers pass on (`Call`); `front_end`: the
        settings every API server enforces."""
        self.core, self.app, self.front_end = core, app, front_end
        self.endpoint = ""  # where API servers attach, once bound
        self.key_file: Path | None = None  # the run's key for API servers on other hosts (a tcp hub), while it runs
        self.submitted: Counter[int] = Counter()  # requests by the pid of the API server that sent them
        self.serving: dict[bytes, str] = {}  # API servers that listen: routing id -> their URL
        self.pids: dict[bytes, int] = {}
        self.changed = Pulse()  # fired as an API server attaches or starts serving
        self._streams: dict[bytes, dict[str, RequestStream]] = defaultdict(dict)  # routing id -> request id -> ...
        self._calls: dict[tuple[bytes, int], trio.CancelScope] = {}
        # requests waiting for their model to serve before they enter: routing id -> request id -> their wait
        self._waiting: dict[bytes, dict[str, trio.CancelScope]] = defaultdict(dict)
        self._monitor = PeerMonitor(PEER_TIMEOUT_S)  # routing ids, silent ones lost
        self._outbox: dict[bytes, list[Any]] = defaultdict(list)
        self._queued = Flag()  # set as something is queued: the sender task takes it
        self._snapshot: Snapshot | None = None
        self._socket: TrioSocket | None = None
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        zctx: zmq.Context,
        bind: tuple[str, int] | None = None,
        keys: RunKeys | None = None,
        *,
        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Binds the hub's socket and serves until cancelled; hands its endpoint to `task_status`. `bind`: a tcp
        (host, port) API servers on other hosts reach, CURVE-encrypted with `keys`; None: an ipc socket, for the
        API servers of this host only."""
        host, port = bind if bind is not None else ("127.0.0.1", None)
        socket, endpoint = bind_router(zctx, "tcp" if bind else "ipc", "api-hub", host=host, port=port, keys=keys)
        with socket:
            self._socket, self.endpoint = socket, endpoint
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_queued)
                nursery.start_soon(self._keep_in_touch)
                task_status.started(endpoint)
                while True:
                    frames = await socket.receive_frames()
                    peer = frames[0].bytes
                    try:
                        message = wire.decode(frames[1:])
                    except wire.WireError as exc:  # a stranger's bytes: say so once per message, go on
                        log.warning("api_hub_bad_message", error=str(exc))
                        continue
                    self._monitor.seen(peer)
                    self._handle(peer, message)

    def _handle(self, peer: bytes, message: Any) -> None:
        assert self._nursery is not None
        if isinstance(message, Request):
            self._submit(peer, [message])
        elif isinstance(message, wire.Batch):  # the prompts of one request: admitted or refused whole
            self._submit(peer, [item for item in message.items if isinstance(item, Request)])
        elif isinstance(message, wire.Cancel):
            for request_id in message.request_ids:
                stream = self._streams[peer].get(request_id)
                if stream is not None:
                    stream.cancel()
                waiting = self._waiting[peer].get(request_id)
                if waiting is not None:
                    waiting.cancel()
        elif isinstance(message, Call):
            self._nursery.start_soon(self._answer, peer, message)
        elif isinstance(message, ModelReady):
            self._nursery.start_soon(self._model_ready, peer, message)
        elif isinstance(message, NotSubmitting):
            self.core.readiness.not_submitting(message.model)
        elif isinstance(message, HangUp):
            scope = self._calls.get((peer, message.call_id))
            if scope is not None:
                scope.cancel()
        elif isinstance(message, wire.Hello):
            if message.protocol != wire.PROTOCOL:
                why = (f"it speaks wire protocol {message.protocol}, the core {wire.PROTOCOL}: run the same sageLLM "
                       "version on both hosts")  # fmt: skip
                log.warning("api_server_refused", pid=message.pid, host=message.host, problem=why)
                self._forget(peer)  # (what it held before, if it was attached)
                self._queue(peer, wire.Assign(error=why))
                return
            self.pids[peer] = message.pid
            self._queue(peer, self.snapshot())
            self.changed.fire()
        elif isinstance(message, wire.Ready) and peer in self.pids:
            self.serving[peer] = url = message.info.get("url", "")
            log.info("api_server_attached", url=url, pid=message.pid)
            self.changed.fire()

    def _submit(self, peer: bytes, requests: list[Request]) -> None:
        """A client request's prompts into the core (`ServingCore.submit_all`) at once, or once their model serves
        when it must load or wake first (as a route waits in a gateway without API servers); a refusal answers each
        of them."""
        if self.core.readiness.ready_now(requests[0].model):
            self._enter(peer, requests)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._enter_when_ready, peer, requests)

    async def _enter_when_ready(self, peer: bytes, requests: list[Request]) -> None:
        """Waits for the requests' model to serve, then submits them; a cancel of any of them, or its API server
        leaving, ends the wait and they never enter."""
        waiting = self._waiting[peer]
        with trio.CancelScope() as scope:
            for request in requests:
                waiting[request.request_id] = scope
            try:
                await self.core.readiness.model_ready(requests[0].model)
            except ApiError as error:
                self._refuse(peer, requests, error)
                return
            finally:
                for request in requests:
                    waiting.pop(request.request_id, None)
            self._enter(peer, requests)

    def _enter(self, peer: bytes, requests: list[Request]) -> None:
        try:
            streams = self.core.submit_all(requests)
        except SageLLMError as failure:  # refused at the door, a request id in use, shutting down
            self._refuse(peer, requests, ApiError.of(failure))
            return
        assert self._nursery is not None
        for stream in streams:
            self._streams[peer][stream.request.request_id] = stream
            self.submitted[self.pids.get(peer, 0)] += 1
            self._nursery.start_soon(self._forward, peer, stream)

    def _refuse(self, peer: bytes, requests: list[Request], error: ApiError) -> None:
        for request in requests:
            self._queue(peer, RequestError(request_id=request.request_id, code=_code(error), message=error.message,
                                           retry_after_s=error.retry_after_s, limit=error.limit))  # fmt: skip

    async def _model_ready(self, peer: bytes, ask: ModelReady) -> None:
        """Makes a model on demand serve for an API server (`ModelReady`): the core's state, which then holds the
        model's files and defaults, goes first, then a 200; or the error. An API server's hang-up ends the wait."""
        scope = self._calls[peer, ask.call_id] = trio.CancelScope()
        try:
            with scope:
                await self.core.readiness.model_ready(ask.model, ask.submits)
        except ApiError as error:
            answer = error_response(error)
        else:
            if scope.cancelled_caught:
                return
            self._queue(peer, self.snapshot())
            answer = Response({})
        finally:
            self._calls.pop((peer, ask.call_id), None)
        self._queue(peer, _reply(ask.call_id, answer))

    async def _forward(self, peer: bytes, stream: RequestStream) -> None:
        try:
            async for item in stream:
                self._queue(peer, item)
        finally:
            self._streams[peer].pop(stream.request.request_id, None)

    async def _answer(self, peer: bytes, call: Call) -> None:
        """Answers a passed-on request with the gateway's own app (its Host was checked by the API server); a client
        that hangs up cancels it."""
        request = HttpRequest(call.method, call.path, call.headers, call.query, call.body)
        with trio.CancelScope() as scope:
            self._calls[peer, call.call_id] = scope
            try:
                reply = await self.app.handle(request, host_checked=True)
                if not isinstance(reply, Response):  # a stream the core answers (/v1/responses): passed on whole
                    reply = await _whole(reply)
                self._queue(peer, _reply(call.call_id, reply))
            finally:
                self._calls.pop((peer, call.call_id), None)

    def _queue(self, peer: bytes, item: Any) -> None:
        self._outbox[peer].append(item)
        self._queued.set()

    async def _send_queued(self) -> None:
        """One message per API server with all the request items queued for it; other messages as they are, in
        order."""
        assert self._socket is not None
        while True:
            await self._queued.take()
            await trio.lowlevel.checkpoint()  # corked for one loop turn: what the engine makes meanwhile goes along
            outbox, self._outbox = self._outbox, defaultdict(list)
            for peer, queued in outbox.items():
                items = [q for q in queued if isinstance(q, ITEMS)]
                batch = [wire.Batch(items=items)] if items else []
                messages = [q for q in queued if not isinstance(q, ITEMS)] + batch
                for message in messages:
                    await self._socket.send_frames([peer, *wire.encode(message)])

    def gone(self, pid: int) -> None:
        """An API server's process ended: it is forgotten and its requests are cancelled."""
        for peer, known in list(self.pids.items()):
            if known == pid:
                self._forget(peer)

    def _forget(self, peer: bytes) -> None:
        """An API server is gone (its clients with it): its requests and passed-on calls stop."""
        for stream in list(self._streams.pop(peer, {}).values()):
            stream.cancel()
        for waiting in list(self._waiting.pop(peer, {}).values()):
            waiting.cancel()
        for (owner, _), scope in list(self._calls.items()):
            if owner == peer:
                scope.cancel()
        for known in (self.pids, self.serving, self._outbox):
            known.pop(peer, None)
        self._monitor.forget(peer)

    def snapshot(self) -> Snapshot:
        core, served = self.core, self.core.served
        instances = core.registry.instances().values()
        return Snapshot(
            model_name=core.model_name,
            model_aliases=core.registry.aliases,
            model_path=served.path if served is not None else None,
            models=core.models(),
            instance_models=sorted({s.model for s in instances if s.model is not None}),
            own_names=core.registry.own_names(),
            on_demand=list(core.registry.on_demand),
            embedders=core.registry.cards(),
            embedding_models=core.registry.embedding_models(),
            max_model_len=core.max_model_len,
            vocab_size=served.vocab_size if served is not None else None,
            sampling_defaults=core.sampling_defaults(),
            instance_defaults=core.registry.served_defaults(),
            front_end=msgspec.structs.replace(self.front_end, keys=core.tenants.known_keys()),
        )

    async def _keep_in_touch(self) -> None:
        """Tells every attached API server the core's new state when it changed (an instance attached, a model came
        or went) and that the core is there (a heartbeat each `ALIVE_S`); forgets an API server silent for
        `PEER_TIMEOUT_S` (another host's, whose process no one here watches)."""
        alive_at = trio.current_time()
        while True:
            await trio.sleep(SNAPSHOT_CHECK_S)
            now = trio.current_time()
            for peer in self._monitor.lost():
                log.warning("api_server_silent", url=self.serving.get(peer), pid=self.pids.get(peer))
                self._forget(peer)
            snapshot = self.snapshot()
            if snapshot != self._snapshot:
                self._snapshot = snapshot
                for peer in self.pids:
                    self._queue(peer, snapshot)
            if now - alive_at >= ALIVE_S:
                alive_at = now
                for peer in self.pids:
                    self._queue(peer, wire.Heartbeat(node=CORE, time=time.time()))


class ApiServerProcess(Supervised):
    """One API server process as its supervision sees it: ready once it attached to the hub with the URL it listens
    on, lost when it exits (its requests are cancelled then)."""

    def __init__(self, hub: ApiServerHub, endpoint: str, config: GatewayConfig, keys: RunKeys | None) -> None:
        self.hub, self.endpoint, self.config, self.keys = hub, endpoint, config, keys
        self.name = "api server"
        self.port = config.port  # the gateway's port, once the first API server has bound it (0: any free one)
        self.process: trio.Process | None = None
        self.url = ""

    async def start(self) -> None:
        from sagellm.gateway.api_servers.server import SETTINGS_ENV, settings_of

        env = env_for_child({**child_env(self.keys), SETTINGS_ENV: json.dumps(settings_of(self.config, self.port))})
        command = python_module("sagellm.gateway.api_servers.server", "--core", self.endpoint)  # isolated, as all
        self.process = await trio.lowlevel.open_process(command, env=env)
        self.name = f"api server (pid {self.process.pid})"

    async def until_ready(self) -> None:
        assert self.process is not None
        hub, pid = self.hub, self.process.pid
        while (url := next((u for p, u in hub.serving.items() if hub.pids.get(p) == pid), None)) is None:
            if self.process.poll() is not None:
                raise StartFailed(f"an API server {exit_cause(self.process.returncode)} before it listened")
            with trio.move_on_after(0.1):
                await hub.changed.wait()
        self.url, self.port = url, int(url.rsplit(":", 1)[1])

    async def until_lost(self) -> str:
        assert self.process is not None
        code = await self.process.wait()
        self.hub.gone(self.process.pid)
        return exit_cause(code)

    async def end(self, graceful: bool) -> None:
        """`graceful`: SIGTERM, so it takes no new connection and finishes the requests in flight."""
        await end_process(self.process, graceful, self.config.graceful_timeout_s + 5)


async def run_api_servers(
    hub: ApiServerHub,
    endpoint: str,
    config: GatewayConfig,
    count: int,
    stop: trio.Event,
    keys: RunKeys | None = None,
    *,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Starts `count` API server processes on the gateway's port and hands its URL to `task_status` once all
    listen; each is kept alive by the one supervision loop (restarted with backoff, as engines are; its requests
    are cancelled when it exits). When `stop` is set they stop gracefully (SIGTERM: no new connections, requests
    in flight finish), then this returns. `keys`: the hub's run key (a tcp hub), handed to them in their
    environment."""
    policy = RestartPolicy()  # one policy for all of them
    first = ApiServerProcess(hub, endpoint, config, keys)
    supervisions = [Supervision(first, policy, startup_timeout_s=START_TIMEOUT_S)]
    with single_errors():  # an API server that did not start: its StartFailed, as itself
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisions[0].run)  # it binds the port (maybe a free one) the others then share
            for _ in range(count - 1):
                server = ApiServerProcess(hub, endpoint, dataclasses.replace(config, port=first.port), keys)
                supervisions.append(Supervision(server, policy, startup_timeout_s=START_TIMEOUT_S))
            with single_errors():
                async with trio.open_nursery() as starting:  # the others start together
                    for supervision in supervisions[1:]:
                        starting.start_soon(nursery.start, supervision.run)
            task_status.started(first.url)
            await stop.wait()
            async with trio.open_nursery() as stopping:
                for supervision in supervisions:
                    stopping.start_soon(supervision.stop)


def _reply(call_id: int, response: Response) -> Reply:
    """A response of the core's as the API server that asked receives it."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
    return Reply(call_id=call_id, status=response.status, content_type=response.content_type, headers=headers,
                 body=response.encoded())  # fmt: skip


def _code(error: ApiError) -> Any:
    """The pipeline error code of an ApiError the core raised before the request entered the graph: its own code
    when it is one, else the first whose status it has (`HTTP_STATUS`, the mapping the other way)."""
    if error.code in HTTP_STATUS:
        return error.code
    return next((code for code, status in HTTP_STATUS.items() if status == error.http_status), "internal")


async def _whole(stream: EventStream) -> Response:
    """An event stream as one reply holding all its events: what an API server passes on streams only this way."""
    events = []
    try:
        async for item in stream.events:
            events.append(stream.framed(item))
    except BaseException:
        stream.on_disconnect()
        raise
    return Response(b"".join(events), content_type=stream.content_type.decode())
