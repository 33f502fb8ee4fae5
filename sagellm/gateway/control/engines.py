"""The control plane's lifecycle manager: the engines a gateway runs or reaches besides its graph's own.

Kinds: `llm` runs our engine in a process of its own: a replica of the gateway's own model (its served name) as a
worker of the gateway's graph (`control.engine_link`: its requests pass the gateway's one admission and policy queue,
then only the engine; on this host or a Ray node), any other model as a server (`sagellm serve` of the colocated
graph, an OpenAI-compatible server on 127.0.0.1, whose own front tokenizes for its model); `embedding` a server of
one embedding model (`sagellm serve --no-llm -e MODEL`); `openai` registers a server that already runs (vLLM,
llama.cpp, another sageLLM). The manager keeps the list behind `/v1/management/engines`, checks a start request
(names, ports, GPUs) and gives each managed process a fresh API key so only the gateway reaches it. Every engine
becomes an instance in the serving core's registry (an embedding engine one of role "embedding"), so its requests
take the graph's path (admission, the policy queue, route among every instance of the model, metrics); several may
serve one model name. What an engine is: `control.engine_spec`; the processes themselves are run by the Supervisor
(`control.supervisor`)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog
import trio

from sagellm.common.errors import FieldError
from sagellm.gateway.control.engine_link import EngineLink
from sagellm.gateway.control.engine_spec import DRAINING, READY, STOPPED, EngineSpec, ManagedEngine
from sagellm.gateway.control.supervisor import LOG_FILE, Supervisor, free_port, port_free, stop_orphans
from sagellm.gateway.http.auth import new_key
from sagellm.gateway.http.errors import ApiError
from sagellm.operators.embedding import served_name
from sagellm.operators.remote_engine import Endpoint
from sagellm.runtime.pipeline.cluster import RayCluster

if TYPE_CHECKING:
    from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")
ENGINES_DIR = "engines"


class EngineManager:
    def __init__(
        self,
        gateway_state_dir: Path,
        core: ServingCore,
        *,
        reserved_names: Callable[[], Iterable[str]] = tuple,
        drain_timeout_s: float = 30.0,
        ray: RayCluster | None = None,
        **supervision: float,
    ) -> None:
        """Engines keep their files in `gateway_state_dir/engines/<this pid>/ID/`; every engine is an instance in the
        core's registry. `reserved_names`: the embedding models the gateway itself serves, which no managed engine may
        take; a generation engine named as the gateway's own model is one more instance of it (`_registry_model`).
        `drain_timeout_s`: how long a stop waits for the engine's requests in flight. `ray`: the cluster engines placed
        `ray:GROUP` run on. `supervision`: Supervisor's timings and limits."""
        self.engines_root = gateway_state_dir / ENGINES_DIR
        self.state_dir = self.engines_root / str(os.getpid())
        self.core = core
        self.reserved_names = reserved_names
        self.drain_timeout_s = drain_timeout_s
        self.supervision = supervision
        self.ray = ray
        self.engines: dict[str, ManagedEngine] = {}
        self._ids = itertools.count(1)
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._supervisor: Supervisor | None = None
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle of the manager ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `shutdown()`, then stops every managed process (SIGTERM, SIGKILL after the grace period)."""
        stop_orphans(self.engines_root)
        async with _client() as client, trio.open_nursery() as nursery:
            self._client, self._nursery = client, nursery
            self._supervisor = Supervisor(client, ray=self.ray, relocated=self._relocated, **self.supervision)
            try:
                task_status.started()
                await self._closed.wait()
            finally:
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as stopping:
                        for engine in list(self.engines.values()):
                            engine.stopping = True
                            stopping.start_soon(self._end, engine, False)
                nursery.cancel_scope.cancel()

    def shutdown(self) -> None:
        self._closed.set()

    # -- the management API ---------------------------------------------------------------------------------------
    async def start(self, spec: EngineSpec, engine_id: str | None = None) -> ManagedEngine:
        """Registers the engine (as `engine_id`, or a new id) and, for llm and embedding, spawns its process; returns
        at once (state starting)."""
        if self._nursery is None or self._closed.is_set():
            raise ApiError(503, "the engine manager is not running", code="unavailable")
        gpus = await self._gpus_for(spec) if spec.kind != "openai" and spec.placement is None else []
        self._check(spec)  # no await from here to the registration: two starts cannot both take a name or port
        if engine_id is not None and (engine_id in self.engines or engine_id in self.core.registry.instances()):
            raise ApiError(409, f"an engine or instance named {engine_id!r} exists", code="conflict")
        engine_id = engine_id or f"{spec.kind}-{next(self._ids)}"
        if spec.kind == "openai":
            url = spec.url.rstrip("/").removesuffix("/v1")
            engine = ManagedEngine(engine_id, spec, url, None, spec.api_key)
        else:
            port = spec.port or free_port()
            engine = ManagedEngine(engine_id, spec, f"http://127.0.0.1:{port}", port, new_key(), gpus=gpus)
            engine.directory = self.state_dir / engine_id
        # The model's name at the server: an openai server's as registered, a spawned llm server's the name the gateway
        # gave it, a spawned embedding server's its model's default name.
        upstream = {"openai": spec.model, "embedding": served_name(spec.model)}.get(spec.kind, engine.name)
        model = self._registry_model(engine)
        if self._linked(spec):  # a worker of the gateway's graph
            assert engine.directory is not None and self._supervisor is not None
            engine.directory.mkdir(parents=True, exist_ok=True)
            supervisor = self._supervisor
            engine.link = EngineLink(engine, supervisor.restart, supervisor.startup_timeout_s,
                                     engine.directory / LOG_FILE, self.ray)  # fmt: skip
            engine.url, engine.port, engine.api_key = "", None, None
        endpoint = Endpoint(engine.url, upstream, engine.api_key, spec.max_concurrent, link=engine.link)
        role = "embedding" if spec.kind == "embedding" else "colocated"
        engine.stats = self.core.registry.attach(engine_id, model, endpoint, role=role)
        if spec.slots is not None:  # what the policies and the autoscaler count as its free slots
            engine.stats.max_running = spec.slots
        self.engines[engine_id] = engine
        if engine.link is not None:
            self._nursery.start_soon(engine.link.run)
        else:
            watch = self._supervisor.watch_remote if spec.kind == "openai" else self._supervisor.supervise
            self._nursery.start_soon(watch, engine)
        log.info("engine_registered", engine=engine_id, kind=spec.kind, model=engine.name, url=engine.url)
        return engine

    async def stop(self, engine_id: str, *, force: bool = False) -> ManagedEngine:
        """Drains the engine (route sends it nothing new; those in flight finish, up to `drain_timeout_s`) then ends
        its process; `force` kills it at once. What is still running on it then ends (a killed process's streams
        break; an `openai` server's are cut) and the failover moves it to another instance, or it fails with
        `instance_lost`. Returns when it is stopped and forgotten."""
        engine = self.get(engine_id)
        if engine.stopping:
            raise ApiError(409, f"engine {engine_id} is already stopping", code="conflict")
        engine.stopping, engine.state = True, DRAINING
        if not force:
            with trio.move_on_after(self.drain_timeout_s):
                while engine.in_flight:
                    await trio.sleep(0.05)
        await self._end(engine, force)
        engine.state = STOPPED
        self.core.registry.detach(engine_id)
        self.engines.pop(engine_id, None)
        log.info("engine_stopped", engine=engine_id, force=force)
        return engine

    async def health_check(self, engine_id: str) -> dict[str, Any]:
        """Probes one engine now: whether it answered, how long that took, and its state after."""
        engine = self.get(engine_id)
        started = time.perf_counter()
        ok = engine.state == READY if engine.link is not None else await self._supervisor.probe(engine)
        took_ms = round(1000 * (time.perf_counter() - started), 1)
        return {"id": engine.id, "healthy": ok, "state": engine.state, "latency_ms": took_ms}

    async def _end(self, engine: ManagedEngine, force: bool) -> None:
        """Ends the engine's process: SIGTERM, then SIGKILL after the grace period (at once with `force`); a replica's
        worker finishes what it holds first."""
        assert self._supervisor is not None
        if engine.link is not None:
            await engine.link.stop(force, self._supervisor.stop_grace_s)
        else:
            await self._supervisor.end_process(engine, force)

    def _relocated(self, engine: ManagedEngine, url: str) -> None:
        """An engine placed on Ray is reached where its latest start put it."""
        engine.url = url
        self.core.registry.relocate(engine.id, url)

    def get(self, engine_id: str) -> ManagedEngine:
        engine = self.engines.get(engine_id)
        if engine is None:
            known = ", ".join(self.engines) or "none"
            raise ApiError(404, f"no managed engine {engine_id!r} (managed: {known})", code="not_found")
        return engine

    def _registry_model(self, engine: ManagedEngine) -> str | None:
        """The model the engine is an instance of in the registry: None, the graph's own, for a generation engine
        serving the gateway's own model name when the gateway holds that model's tokenizer (a replica, on this host or
        one that joined: admission tokenizes its requests, route chooses it beside the graph's engines, failover
        moves requests between them); else its own name."""
        return None if self._replica(engine.spec) else engine.name

    def _linked(self, spec: EngineSpec) -> bool:
        """Engines of ours that run as workers of the gateway's graph (`engine_link`): replicas of its model and
        embedding engines. An llm engine of another model is a server (`sagellm serve`), whose front end tokenizes
        and applies the defaults of that model."""
        return spec.kind == "embedding" or (spec.kind == "llm" and self._replica(spec))

    def _replica(self, spec: EngineSpec) -> bool:
        """A generation engine serving the gateway's own model name, whose tokenizer the gateway holds."""
        name = spec.served_model_name or spec.model
        return spec.kind != "embedding" and name == self.core.model_name and self.core.tokenizer is not None

    # -- checks ---------------------------------------------------------------------------------------------------
    def _check(self, spec: EngineSpec) -> None:
        try:
            spec.check()
        except FieldError as error:  # as an ApiError: the presets and the autoscaler catch those
            raise ApiError.of(error) from None
        if spec.placement is not None and self.ray is None:
            raise ApiError(400, f"placement {spec.placement} needs a Ray cluster: serve with --ray-address or a "
                                "graph's `cluster:`", param="placement", code="invalid_request")  # fmt: skip
        name = spec.served_model_name or spec.model
        own = name == self.core.model_name and spec.kind == "embedding"
        if name in set(self.reserved_names()) or own:
            raise ApiError(409, f"the gateway itself serves {name!r}; set served_model_name", code="conflict")
        # Several engines of one kind may serve one name (route chooses among them), not a generation and an
        # embedding engine.
        taken = next((e for e in self.engines.values() if e.name == name), None)
        if taken is not None and (spec.kind == "embedding") != (taken.spec.kind == "embedding"):
            raise ApiError(409, f"engine {taken.id} already serves {name!r}; stop it first", code="conflict")
        if spec.port and self._linked(spec):
            raise ApiError(400, "a replica of the gateway's model or an embedding engine runs as a worker of the "
                                "gateway's graph and listens on no port; leave port out", param="port",
                           code="invalid_request")  # fmt: skip
        if spec.port and (not port_free(spec.port) or any(e.port == spec.port for e in self.engines.values())):
            raise ApiError(409, f"port {spec.port} is in use; pick another or leave port out", code="conflict")

    async def _gpus_for(self, spec: EngineSpec) -> list[int]:
        """The GPU indexes given to the engine: none unless `use_gpu`, which needs one free GPU per tensor parallel
        rank (without it, the ranks are processes on the CPU)."""
        tp = spec.tensor_parallel
        needed = tp if spec.use_gpu else 0
        if not needed:
            return []
        from sagellm.runtime.comm.topology import gpu_inventory

        inventory = await trio.to_thread.run_sync(gpu_inventory)
        taken = {i for e in self.engines.values() for i in e.gpus}
        free = [g.index for g in inventory.gpus if g.index not in taken]
        if len(free) < needed:
            found = f"found {len(free)} free of {len(inventory.gpus)}" if inventory.gpus else "found none"
            why = f" ({inventory.reason})" if inventory.reason else ""
            asked, param = (f"tensor_parallel={tp}", "tensor_parallel") if tp > 1 else ("use_gpu", "use_gpu")
            raise ApiError(400, f"{asked} needs {needed} GPU(s); {found}{why}", param=param, code="no_gpu")
        if spec.kind == "embedding":
            raise ApiError(400, "embedding engines run on the CPU; leave use_gpu out", param="use_gpu")
        return free[:needed]


def _client() -> httpx.AsyncClient:
    """The supervisor's client for health checks and metrics: short requests, a small pool."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_keepalive_connections=8))
