"""A managed engine of ours as an instance of the gateway's graph, not a server of its own: a replica of the
gateway's model, another model (whose files the gateway reads, without weights, to tokenize its requests), or an
embedding model. Its engine runs in a worker process (on this host, or on a Ray node) that the gateway's own executor
hosts (`runtime.executor.hosted`): a request reaches it through the gateway's one admission, one policy queue and
one ledger, then only the engine:

    requests (an end in the gateway) -> ENGINE ID (engine or embedding, its own worker process) -> replies (an end)

Route hands a request to the gateway's `remote_engine` node, which gives it to `stream` here: the request (already
tokenized and checked by admission) crosses to the worker on the wire, and its items come back to its stream. The
worker is what any pipeline worker is: started, watched by heartbeats and restarted by the one supervision loop under
the gateway's restart policy; when it is lost, its requests end with a retryable `instance_lost` and the gateway's
failover moves them. The gateway learns the engine's load from its heartbeats. A stop ends the engine's input: it
finishes what it holds, then the worker ends."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from sagellm.common.errors import SageLLMError
from sagellm.common.nursery_errors import leaves
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import FAILED as SUPERVISION_FAILED
from sagellm.common.supervision import READY as SUPERVISION_READY
from sagellm.common.supervision import Supervision
from sagellm.gateway.control.engine_spec import FAILED, READY, STARTING, ManagedEngine
from sagellm.gateway.state import engine_log_hint
from sagellm.runtime.embedding.card import PoolingCard
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.hosted import HostedGroup
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.pipeline.messages import Request, RequestError, is_terminal
from sagellm.runtime.pipeline.served_model import served_model

if TYPE_CHECKING:
    from sagellm.gateway.serving.instances import InstanceRegistry

log = structlog.get_logger("sagellm.gateway")

LOAD_FIELDS = ("waiting", "queued_prefill_tokens", "queued_decode_tokens", "kv_cache_usage", "prefix_cache_queries",
               "prefix_cache_hits", "tokens_per_s", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
               "spec_decode_num_accepted_tokens", "threads", "kv_offload_ram_bytes", "kv_offload_disk_bytes",
               "kv_offload_stored_blocks", "kv_offload_loaded_blocks", "kv_events_endpoint",
               "kv_events_replay_endpoint", "kv_blocks_endpoint", "kv_blocks_token")  # fmt: skip
SOURCE, SINK = "requests", "replies"
LINK_ATTRS = ("transport", "bind_host", "advertise_host", "secure", "shared_memory", "cluster")  # the run's, as its own


def worker_graph(engine: ManagedEngine, run_attrs: dict[str, Any]) -> Graph:
    """The engine's graph: its node in a worker process of its own (here, or on the Ray node its `placement` names),
    between two ends in the gateway; its sockets are the gateway's run's kind (`run_attrs`). The model is the node's
    (the graph has none: the gateway's front end reads its own)."""
    spec = engine.spec
    if spec.kind == "embedding":
        op, settings = "embedding", {"model": spec.model, "served_model_name": engine.name}
    else:
        op, settings = "engine", {"backend": "cuda" if engine.gpus or spec.use_gpu else "cpu", **spec.engine}
        settings["model"] = spec.model
        if spec.tensor_parallel > 1:
            settings["tensor_parallel_size"] = spec.tensor_parallel
    graph = Graph(attrs={"name": f"engine {engine.id}", **{k: run_attrs[k] for k in LINK_ATTRS if k in run_attrs}})
    requests = graph.add("http_source", id=SOURCE)
    replica = graph.add(op, [requests], id=engine.id, **settings)
    graph.nodes[engine.id].placement = f"ray:{engine.id}" if spec.placement is not None else "process"
    graph.add("relay", [replica], id=SINK)
    return graph


@dataclass(frozen=True)
class FrontFiles:
    """What the gateway reads of an engine's model before the engine serves, and where it puts what it read."""

    read: Callable[[], Any]  # run in a thread: it reads files (a ModelLoadError fails the engine with its message)
    serve: Callable[[Any], None]  # run on the gateway's loop with what `read` returned


def front_files(engine: ManagedEngine, registry: InstanceRegistry) -> FrontFiles:
    """A pooling engine's card, or a generation engine's front-end files (another model than the gateway's)."""
    spec = engine.spec
    if spec.kind == "embedding":
        return FrontFiles(partial(_pooling_card, spec.model), partial(registry.serve_card, engine.name))
    attrs = {"model": spec.model, "max_model_len": spec.engine.get("max_model_len")}
    return FrontFiles(partial(served_model, attrs), partial(registry.serve_model, engine.name))


def _pooling_card(model: str) -> PoolingCard:
    from sagellm.runtime.embedding.encoder import read_pooling_card  # imports torch: not for a listing
    from sagellm.runtime.models.model_cache import resolve_model

    return read_pooling_card(resolve_model(model))


class EngineLink:
    def __init__(
        self,
        engine: ManagedEngine,
        executor: ProcessExecutor,
        restart: RestartPolicy,
        startup_timeout_s: float,
        log_file: Path,
        front: FrontFiles | None = None,
    ) -> None:
        """`executor`: the gateway's, which hosts the engine's worker; `log_file`: where a worker on this host writes
        its log; `front`: what the gateway reads of the engine's model (its files, without weights) before it
        serves: another generation model's front-end files, so admission tokenizes its requests; a pooling model's
        card, so the routes know its task."""
        self.engine, self.executor, self.log_file, self.front = engine, executor, log_file, front
        self.restart, self.startup_timeout_s = restart, startup_timeout_s
        self.graph = worker_graph(engine, executor.graph.attrs)
        self.hosted: HostedGroup | None = None  # once its first worker is ready
        self._streams: dict[str, trio.MemorySendChannel] = {}
        self._stopping = False
        self._scope = trio.CancelScope()
        self.done = trio.Event()

    # -- the replica's life -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the replica until it is stopped: ready once its worker is; failed when it cannot start, or when its
        supervision gives it up."""
        engine = self.engine
        try:
            with self._scope:
                if self.front is not None:
                    self.front.serve(await trio.to_thread.run_sync(self.front.read))
                placement = engine.spec.placement
                self.hosted = await self.executor.hosted.start(
                    self.graph, self._deliver, self._lost, restart=self.restart,
                    startup_timeout_s=self.startup_timeout_s, log_file=self.log_file,
                    env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, engine.gpus))},
                    ray_group=placement.split(":", 1)[1] if placement is not None else None,
                )  # fmt: skip
                await self._follow(self.hosted)
        except Exception as error:  # it never became ready (StartFailed), or anything else: this engine alone
            if not engine.stopping:
                causes = leaves(error)
                said = "; ".join(str(e) if isinstance(e, SageLLMError) else f"{type(e).__name__}: {e}" for e in causes)
                engine.state, engine.last_error = FAILED, f"{said} ({engine_log_hint(engine.id, self.log_file)})"
                bug = not all(isinstance(e, SageLLMError) for e in causes)  # its traceback says where
                log.warning(
                    "engine_failed",
                    engine=engine.id,
                    error=engine.last_error,
                    log=str(self.log_file),
                    exc_info=error if bug else None,
                )
        finally:
            self._lost(f"engine {engine.id} stopped")  # what the worker still held ends; failover moves it elsewhere
            self.done.set()

    async def _follow(self, hosted: HostedGroup) -> None:
        """Mirrors the worker onto the managed engine as it changes: its state (ready, restarting, given up) as its
        supervision moves it, its load as each of its heartbeats brings it. Both wait for the change, so a restart
        shows at once and nothing runs while nothing happens."""
        engine = self.engine
        engine.state, engine.ever_ready = READY, True
        log.info("engine_ready", engine=engine.id, pid=self.pid)
        assert hosted.supervision is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mirror_state, hosted.supervision)
            nursery.start_soon(self._mirror_load, hosted)

    async def _mirror_state(self, supervision: Supervision) -> None:
        engine = self.engine
        while True:
            if not engine.stopping:  # (a stop says the engine's state itself)
                engine.restarts = supervision.restarts.total
                if supervision.state != SUPERVISION_READY:
                    engine.last_error = supervision.cause
                state = {SUPERVISION_READY: READY, SUPERVISION_FAILED: FAILED}.get(supervision.state, STARTING)
                if state != engine.state:
                    engine.state = state
            await supervision.changed.wait()

    async def _mirror_load(self, hosted: HostedGroup) -> None:
        engine = self.engine
        while True:
            stats = hosted.stats
            if stats and engine.stats is not None:
                for name in LOAD_FIELDS:
                    setattr(engine.stats, name, stats[name])
                if engine.spec.slots is None and engine.spec.max_concurrent is None:
                    engine.stats.max_running = stats["max_running"]
            await hosted.heard.wait()  # its worker's next heartbeat

    @property
    def pid(self) -> int | None:
        process = self.executor.processes.get(self.hosted.group) if self.hosted is not None else None
        return process.pid if process is not None and process.returncode is None else None

    async def stop(self, force: bool, grace_s: float) -> None:
        """Ends the replica: its engine finishes what it holds (up to `grace_s`), or at once with `force`."""
        self._stopping = True
        if self.hosted is not None:
            await self.executor.hosted.retire(self.hosted, force=force, grace_s=grace_s)
        self._scope.cancel()  # (a start under way ends with it)
        await self.done.wait()

    # -- requests -----------------------------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """The request's items from the replica's engine, up to its terminal one; a client that leaves (the caller
        stops iterating) cancels it there."""
        rid, hosted = request.request_id, self.hosted
        if hosted is None or self._stopping or self.done.is_set():  # stopping, or ended: another instance takes it
            yield RequestError(request_id=rid, code="unavailable", message=f"engine {self.engine.id} is stopping",
                               retryable=True)  # fmt: skip
            return
        send, receive = trio.open_memory_channel(math.inf)
        self._streams[rid] = send
        ended = False
        try:
            await hosted.send(request)
            async for item in receive:
                ended = is_terminal(item)
                yield item
                if ended:
                    return
        finally:
            # No checkpoint between the two (an `async with` would take one as it closes): an item delivered then
            # would find a closed channel, and the error would end the engine's link.
            self._streams.pop(rid, None)
            receive.close()
            if not ended:
                self.executor.control.cancel([rid], group_only=hosted.group)

    def _deliver(self, item: Any) -> None:
        send = self._streams.get(getattr(item, "request_id", ""))
        if send is not None:
            send.send_nowait(item)

    def _lost(self, why: str) -> None:
        """Its worker is lost (or the link ends): every request it held ends, retryable, and failover moves it."""
        for rid in list(self._streams):
            send = self._streams.pop(rid)
            send.send_nowait(RequestError(request_id=rid, code="instance_lost", message=why, retryable=True))
