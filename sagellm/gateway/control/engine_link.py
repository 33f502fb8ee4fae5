"""A managed engine of ours as an instance of the gateway's graph, not a server of its own: a replica of the
gateway's model, another model (whose files the gateway reads, without weights, to tokenize its requests), or an
embedding model. Its engine runs in a worker process (on this host, or on a Ray node), and a
request reaches it through the gateway's one admission and one policy queue, then only the engine.

The engine is a graph of three nodes, run by a process executor inside the gateway:

    requests (http_source, here) -> ENGINE ID (engine or embedding, its own worker process) -> replies (relay, here)

Route hands a request to the gateway's `remote_engine` node, which gives it to `stream` here: the request (already
tokenized and checked by admission) goes into `requests`, crosses to the worker on the wire, and its items come back
through `replies`. The worker is what any pipeline worker is: started, watched by heartbeats and restarted by the
one supervision loop under the gateway's restart policy; when it is lost, its requests end with a retryable
`instance_lost` and the gateway's failover moves them. The gateway learns the engine's load from its heartbeats.
A stop closes `requests`: the engine finishes what it holds, then the worker ends."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from sagellm.common.errors import SageLLMError
from sagellm.common.nursery_errors import leaves, single_errors
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import FAILED as SUPERVISION_FAILED
from sagellm.common.supervision import READY as SUPERVISION_READY
from sagellm.common.supervision import Supervision
from sagellm.gateway.control.engine_spec import FAILED, READY, STARTING, ManagedEngine
from sagellm.gateway.state import engine_log_hint
from sagellm.operators.http_source import HttpSource
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.bridge import groups_of
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.pipeline.cluster import RayCluster
from sagellm.runtime.pipeline.messages import Request, RequestError, is_terminal
from sagellm.runtime.pipeline.served_model import ServedModel, served_model

log = structlog.get_logger("sagellm.gateway")

LOAD_FIELDS = ("waiting", "queued_prefill_tokens", "queued_decode_tokens", "kv_cache_usage", "prefix_cache_queries",
               "prefix_cache_hits", "tokens_per_s", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
               "spec_decode_num_accepted_tokens")  # fmt: skip
SOURCE, SINK = "requests", "replies"


def worker_graph(engine: ManagedEngine, restart: RestartPolicy, ray: RayCluster | None = None) -> Graph:
    """The engine's graph: its node in a process of its own (here, or on the Ray node its `placement` names, over
    tcp), between a source and a relay in the gateway. The model is the node's (the graph has none: the gateway's
    front end reads its own)."""
    spec = engine.spec
    if spec.kind == "embedding":
        op, settings = "embedding", {"model": spec.model, "served_model_name": engine.name}
    else:
        op, settings = "engine", {"backend": "cuda" if engine.gpus or spec.use_gpu else "cpu", **spec.engine}
        settings["model"] = spec.model
        if spec.tensor_parallel > 1:
            settings["tensor_parallel_size"] = spec.tensor_parallel
    attrs: dict[str, Any] = {"name": f"engine {engine.id}", "transport": "ipc", "restart": dataclasses.asdict(restart)}
    if engine.spec.placement is not None:  # its worker reaches this process from another node
        assert ray is not None  # the manager refuses a Ray placement without a cluster
        groups = {name: {k: v for k, v in dataclasses.asdict(group).items() if v is not None}
                  for name, group in ray.groups.items()}  # fmt: skip
        attrs |= {"transport": "tcp", "bind_host": "0.0.0.0", "cluster": {"ray": ray.address, "groups": groups}}
    graph = Graph(attrs=attrs)
    requests = graph.add("http_source", id=SOURCE)
    replica = graph.add(op, [requests], id=engine.id, **settings)
    graph.nodes[engine.id].placement = engine.spec.placement or "process"
    graph.add("relay", [replica], id=SINK)
    return graph


class EngineLink:
    def __init__(
        self,
        engine: ManagedEngine,
        restart: RestartPolicy,
        startup_timeout_s: float,
        log_file: Path,
        ray: RayCluster | None = None,
        serve_model: Callable[[ServedModel], None] | None = None,
    ) -> None:
        """`log_file`: where a worker on this host writes its log; `ray`: the cluster of an engine placed there;
        `serve_model`: for an engine of another model than the gateway's, handed that model's front-end files
        (read here, without weights) before it serves, so admission tokenizes its requests."""
        self.engine, self.log_file, self.serve_model = engine, log_file, serve_model
        self.graph = worker_graph(engine, restart, ray)
        self.group = groups_of(self.graph)[engine.id]  # its worker's process group
        self.source = HttpSource()
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, engine.gpus))}
        self.executor = ProcessExecutor(
            self.graph,
            startup_timeout_s=startup_timeout_s,
            operators={SOURCE: self.source},
            keep_outcomes=False,
            worker_env={self.group: env},
            worker_logs={self.group: log_file},
        )
        self.local = self.executor.executor
        self.local.ledger.on_leaf_item = self._deliver
        self.source.wake = self.local.wake_sources
        self._streams: dict[str, trio.MemorySendChannel] = {}
        self._scope = trio.CancelScope()
        self.done = trio.Event()

    # -- the replica's life -----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the replica until it is stopped: ready once its worker is; failed when it cannot start, or when its
        supervision gives it up."""
        engine = self.engine
        try:
            if self.serve_model is not None:
                attrs = {"model": engine.spec.model, "max_model_len": engine.spec.engine.get("max_model_len")}
                self.serve_model(await trio.to_thread.run_sync(served_model, attrs))
            with self._scope, single_errors():
                async with trio.open_nursery() as nursery:

                    async def run_graph(task_status: trio.TaskStatus) -> None:
                        await self.executor.run(task_status=task_status)
                        nursery.cancel_scope.cancel()  # the graph ended (a stop closed its source)

                    await nursery.start(run_graph)
                    nursery.start_soon(self._follow)
        except Exception as error:  # it never became ready (WorkerStartError), or anything else: this engine alone
            if not engine.stopping:
                causes = leaves(error)
                said = "; ".join(str(e) if isinstance(e, SageLLMError) else f"{type(e).__name__}: {e}" for e in causes)
                engine.state, engine.last_error = FAILED, f"{said} ({engine_log_hint(engine.id, self.log_file)})"
                bug = not all(isinstance(e, SageLLMError) for e in causes)  # its traceback says where
                log.warning("engine_failed", engine=engine.id, error=engine.last_error, log=str(self.log_file),
                            exc_info=error if bug else None)
        finally:
            for rid in list(self._streams):  # what the worker still held ends; failover moves it elsewhere
                self._end(rid, f"engine {engine.id} stopped", "instance_lost")
            self.done.set()

    async def _follow(self) -> None:
        """Mirrors the worker onto the managed engine as it changes: its state (ready, restarting, given up) as its
        supervision moves it, its load as each of its heartbeats brings it. Both wait for the change, so a restart
        shows at once and nothing runs while nothing happens."""
        engine = self.engine
        engine.state, engine.ever_ready = READY, True
        log.info("engine_ready", engine=engine.id, pid=self.pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._mirror_state, self.executor.supervisions[self.group])
            nursery.start_soon(self._mirror_load)

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

    async def _mirror_load(self) -> None:
        engine = self.engine
        while True:
            worker = self.local.instances.get(engine.id)
            if worker is not None and engine.stats is not None:
                for name in LOAD_FIELDS:
                    setattr(engine.stats, name, getattr(worker, name))
                if engine.spec.slots is None and engine.spec.max_concurrent is None:
                    engine.stats.max_running = worker.max_running
            await self.executor.control.wait_changed()  # a heartbeat's stats applied (or a worker came or went)

    @property
    def pid(self) -> int | None:
        process = self.executor.processes.get(self.group)
        return process.pid if process is not None and process.returncode is None else None

    async def stop(self, force: bool, grace_s: float) -> None:
        """Ends the replica: its engine finishes what it holds (up to `grace_s`), or at once with `force`."""
        self.source.finish()
        if force:
            self._scope.cancel()
        with trio.move_on_after(0 if force else grace_s) as waited:
            await self.done.wait()
        if waited.cancelled_caught:
            self._scope.cancel()
            await self.done.wait()

    # -- requests -----------------------------------------------------------------------------------------------------
    async def stream(self, request: Request) -> AsyncIterator[Any]:
        """The request's items from the replica's engine, up to its terminal one; a client that leaves (the caller
        stops iterating) cancels it there."""
        rid = request.request_id
        if self.source.finished or self.done.is_set():  # stopping, or ended: another instance takes it
            yield RequestError(request_id=rid, code="unavailable", message=f"engine {self.engine.id} is stopping",
                               retryable=True)  # fmt: skip
            return
        send, receive = trio.open_memory_channel(math.inf)
        self._streams[rid] = send
        ended = False
        try:
            self.source.submit(request)
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
                self.local.cancel(rid)

    def _deliver(self, item: Any) -> None:
        send = self._streams.get(getattr(item, "request_id", ""))
        if send is not None:
            send.send_nowait(item)

    def _end(self, rid: str, message: str, code: str) -> None:
        send = self._streams.pop(rid, None)
        if send is not None:
            send.send_nowait(RequestError(request_id=rid, code=code, message=message, retryable=True))
