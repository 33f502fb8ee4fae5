"""The control plane's lifecycle manager: the engines a gateway runs or reaches besides its graph's own.

Kinds: `llm` and `embedding` run an engine of ours as a worker process of the gateway's graph (`control.engine_link`, on
this host or a Ray node): its requests pass the gateway's one admission and policy queue, then only the engine; for a
model other than the gateway's own the gateway reads that model's files (without weights) to tokenize its requests.
`openai` registers a server that already runs (vLLM, llama.cpp, another sageLLM); `vllm`, `sglang` and `llamacpp` start
that project's own server here as a child process (`control.server_process`), supervised as our workers are and
reached over HTTP as an openai server is. The manager keeps the list behind
`/v1/management/engines` and checks a start request (names, GPUs). Every engine becomes an instance in the serving
core's registry (an embedding engine one of role "embedding"), so its requests take the graph's path (admission, the
policy queue, route among every instance of the model, metrics); several may serve one model name. What an engine is:
`control.engine_spec`; an engine of ours: `control.engine_link`; the health of a server we reach: `control.health`;
a third-party server's command line: `control.third_party`."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog
import trio

from sagellm.common.errors import FieldError
from sagellm.common.processes import alive
from sagellm.common.restart import RestartPolicy
from sagellm.gateway.control import third_party
from sagellm.gateway.control.engine_link import EngineLink, front_files
from sagellm.gateway.control.engine_spec import DRAINING, READY, STOPPED, EngineSpec, ManagedEngine
from sagellm.gateway.control.health import HealthChecks
from sagellm.gateway.control.server_process import ServerProcess
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.state import free_port
from sagellm.operators.remote_engine import Endpoint
from sagellm.runtime.pipeline.cluster import RayCluster

if TYPE_CHECKING:
    from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")
ENGINES_DIR = "engines"
LOG_FILE = "engine.log"  # an engine's worker's output, in its folder


class EngineManager:
    def __init__(
        self,
        gateway_state_dir: Path,
        core: ServingCore,
        *,
        reserved_names: Callable[[], Iterable[str]] = tuple,
        drain_timeout_s: float = 30.0,
        ray: RayCluster | None = None,
        restart: RestartPolicy | None = None,
        startup_timeout_s: float = 600.0,
        stop_grace_s: float = 15.0,
        health_interval_s: float = 5.0,
    ) -> None:
        """Engines keep their files in `gateway_state_dir/engines/<this pid>/ID/`; every engine is an instance in the
        core's registry. `reserved_names`: the embedding models the gateway itself serves, which no managed engine may
        take; a generation engine named as the gateway's own model is one more instance of it (`_registry_model`).
        `drain_timeout_s`: how long a stop waits for the engine's requests in flight. `ray`: the cluster engines placed
        `ray:GROUP` run on. `restart`: when an engine's process that died after serving is started again;
        `startup_timeout_s` covers a first-run model download; `stop_grace_s`: how long an engine's process may take
        to finish after a stop; `health_interval_s`: how often a server we reach is checked."""
        self.engines_root = gateway_state_dir / ENGINES_DIR
        self.state_dir = self.engines_root / str(os.getpid())
        self.core = core
        self.reserved_names = reserved_names
        self.drain_timeout_s = drain_timeout_s
        self.ray = ray
        self.restart = restart or RestartPolicy()
        self.startup_timeout_s, self.stop_grace_s = startup_timeout_s, stop_grace_s
        self.health_interval_s = health_interval_s
        self.engines: dict[str, ManagedEngine] = {}
        self._ids = itertools.count(1)
        self._closed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._health: HealthChecks | None = None

    # -- lifecycle of the manager ---------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `shutdown()`, then stops every engine of ours (each finishes what it holds, up to the grace
        period)."""
        remove_stale(self.engines_root)
        async with _client() as client, trio.open_nursery() as nursery:
            self._nursery = nursery
            self._health = HealthChecks(client, health_interval_s=self.health_interval_s,
                                        startup_timeout_s=self.startup_timeout_s)  # fmt: skip
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
        """Registers the engine (as `engine_id`, or a new id) and, for llm and embedding, starts its worker, for
        vllm, sglang and llamacpp its server; returns at once (state starting)."""
        if self._nursery is None or self._closed.is_set():
            raise ApiError(503, "the engine manager is not running", code="unavailable")
        self._check_fields(spec)
        gpus = await self._gpus_for(spec) if spec.kind != "openai" and spec.placement is None else []
        self._check_name(spec)  # no await from here to the registration: two starts cannot both take a name
        if engine_id is not None and (engine_id in self.engines or engine_id in self.core.registry.instances()):
            raise ApiError(409, f"an engine or instance named {engine_id!r} exists", code="conflict")
        launch = self._launch(spec, gpus) if spec.kind in third_party.KINDS else None
        engine_id = engine_id or f"{spec.kind}-{next(self._ids)}"
        if spec.kind == "openai":
            engine = ManagedEngine(engine_id, spec, spec.url.rstrip("/").removesuffix("/v1"), spec.api_key)
        elif launch is not None:  # another project's server, started here
            engine = ManagedEngine(engine_id, spec, launch.url, launch.api_key, gpus=gpus,
                                   directory=self.state_dir / engine_id)  # fmt: skip
            engine.directory.mkdir(parents=True, exist_ok=True)
            assert self._health is not None
            engine.server = ServerProcess(engine, launch, self.restart, self.startup_timeout_s,
                                          engine.directory / LOG_FILE, self._health)  # fmt: skip
        else:  # an engine of ours: a worker of the gateway's graph
            engine = ManagedEngine(engine_id, spec, "", None, gpus=gpus, directory=self.state_dir / engine_id)
            engine.directory.mkdir(parents=True, exist_ok=True)
            # its requests need its tokenizer here (another generation model), or its card (a pooling model)
            front = front_files(engine, self.core.registry) if not self._replica(spec) else None
            assert self.core.executor is not None  # the core runs (this manager starts after it)
            engine.link = EngineLink(engine, self.core.executor, self.restart, self.startup_timeout_s,
                                     engine.directory / LOG_FILE, front)  # fmt: skip
        server_model = engine.name if engine.server is not None else spec.model  # the name its server was given
        endpoint = Endpoint(engine.url, server_model, engine.api_key, spec.max_concurrent, link=engine.link)
        model = self._registry_model(engine)
        role = "embedding" if spec.kind == "embedding" else spec.role
        engine.stats = self.core.registry.attach(engine_id, model, endpoint, role=role)
        if spec.slots is not None:  # what the policies and the autoscaler count as its free slots
            engine.stats.max_running = spec.slots
        self.engines[engine_id] = engine
        process = engine.link or engine.server
        if process is not None:
            self._nursery.start_soon(process.run)
        else:
            assert self._health is not None
            self._nursery.start_soon(self._health.watch_remote, engine)
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
                await self.core.registry.remote.until_idle(engine_id)
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
        assert self._health is not None
        ok = engine.state == READY if engine.link is not None else await self._health.probe(engine)
        took_ms = round(1000 * (time.perf_counter() - started), 1)
        return {"id": engine.id, "healthy": ok, "state": engine.state, "latency_ms": took_ms}

    async def _end(self, engine: ManagedEngine, force: bool) -> None:
        """Ends an engine of ours or a server started here: it finishes what it holds (up to the grace period), or
        at once with `force`; a server we only reach has nothing of ours to end."""
        process = engine.link or engine.server
        if process is not None:
            await process.stop(force, self.stop_grace_s)

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

    def _replica(self, spec: EngineSpec) -> bool:
        """A generation engine serving the gateway's own model name, whose tokenizer the gateway holds."""
        name = spec.served_model_name or spec.model
        return spec.kind != "embedding" and name == self.core.model_name and self.core.tokenizer is not None

    # -- checks ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _launch(spec: EngineSpec, gpus: list[int]) -> third_party.Launch:
        """The command line of a vllm, sglang or llamacpp engine's server, on a free port of this host with a key
        only the gateway knows; a 400 when it is not installed here."""
        try:
            return third_party.server_launch(spec, free_port(), secrets.token_urlsafe(24), gpus)
        except FieldError as error:
            raise ApiError.of(error) from None

    def _check_fields(self, spec: EngineSpec) -> None:
        try:
            spec.check()
        except FieldError as error:  # as an ApiError: the presets and the autoscaler catch those
            raise ApiError.of(error) from None
        if spec.placement is not None and self.ray is None:
            raise ApiError(400, f"placement {spec.placement} needs a Ray cluster: serve with --ray-address or a "
                                "graph's `cluster:`", param="placement", code="invalid_request")  # fmt: skip

    def _check_name(self, spec: EngineSpec) -> None:
        name = spec.served_model_name or spec.model
        own = name == self.core.model_name and spec.kind == "embedding"
        if name in set(self.reserved_names()) or own:
            raise ApiError(409, f"the gateway itself serves {name!r}; set served_model_name", code="conflict")
        # Several engines of one kind may serve one name (route chooses among them), not a generation and an
        # embedding engine.
        taken = next((e for e in self.engines.values() if e.name == name), None)
        if taken is not None and (spec.kind == "embedding") != (taken.spec.kind == "embedding"):
            raise ApiError(409, f"engine {taken.id} already serves {name!r}; stop it first", code="conflict")

    async def _gpus_for(self, spec: EngineSpec) -> list[int]:
        """The GPU indexes given to the engine: none unless `use_gpu`, which needs one free GPU per rank (tensor
        parallel slice of a pipeline stage; without it, the ranks are processes on the CPU)."""
        tp = spec.tensor_parallel
        needed = spec.ranks if spec.use_gpu else 0
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
    """The client for servers' health checks and metrics: short requests, a small pool."""
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=httpx.Limits(max_keepalive_connections=8))


def remove_stale(engines_root: Path) -> None:
    """Each manager keeps its engines' logs in `engines_root/<its pid>/`; the folders of managers that are gone (a
    gateway killed outright) are removed. Their workers ended with them (`common.parent_death`)."""
    for folder in engines_root.glob("*"):
        if folder.name.isdigit() and not alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
