"""The management API (admin key): the engines behind the gateway, the GPUs and the hardware backends.

    GET    /v1/management/engines             the graph's engines (kind "graph") and the managed ones
    POST   /v1/management/engines             start one: {model, kind, tensor_parallel, engine, port, ...}
    GET    /v1/management/engines/{id}        one engine
    DELETE /v1/management/engines/{id}        drain then stop a managed engine (?force=true: kill it now)
    GET    /v1/management/engines/{id}/health health-check one engine now
    GET    /v1/management/health              health-check every engine now
    GET    /v1/management/gpu                 the NVIDIA GPUs (NVML), or why there are none
    GET    /v1/management/backends            every hardware backend and whether it runs here

The graph's engines belong to the served graph: they are listed but not stoppable here (409).

Starting an engine runs a process or adds an upstream, so it takes the admin key even where `--admin-auth loopback`
lets the other routes go without (`launch`), and a request names neither a program nor a flag beyond its kind's tuning
ones (`EngineSpec.check_requested`), nor an `openai` server outside the operator's allow-list (`control.upstreams`):
the operator names those at start (the environment, presets served with `--model NAME=PRESET`,
`--allowed-upstream`)."""

from __future__ import annotations

import contextlib
from typing import Any

import trio

from sagellm.common.errors import FieldError
from sagellm.gateway.control.engine_spec import EngineSpec
from sagellm.gateway.control.engines import EngineManager
from sagellm.gateway.control.upstreams import UpstreamAllowList
from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore

PREFIX = "/v1/management"


class ManagementRoutes:
    def __init__(self, core: ServingCore, engines: EngineManager, upstreams: UpstreamAllowList) -> None:
        """`upstreams`: where an `openai` engine a request registers may be."""
        self.core, self.engines, self.upstreams = core, engines, upstreams

    def register(self, app: App, admin: Guard | None, launch: Guard | None) -> None:
        """`admin` guards the routes; `launch`, always the admin key, the one that starts a process or adds an
        upstream."""
        app.route("GET", f"{PREFIX}/engines", self.list_engines, admin)
        app.route("POST", f"{PREFIX}/engines", self.start_engine, launch)
        app.route("GET", f"{PREFIX}/engines/{{engine_id}}", self.get_engine, admin)
        app.route("DELETE", f"{PREFIX}/engines/{{engine_id}}", self.stop_engine, admin)
        app.route("GET", f"{PREFIX}/engines/{{engine_id}}/health", self.health_check, admin)
        app.route("GET", f"{PREFIX}/health", self.health_check_all, admin)
        app.route("GET", f"{PREFIX}/gpu", self.gpu, admin)
        app.route("GET", f"{PREFIX}/backends", self.backends, admin)
        app.route("GET", f"{PREFIX}/usage", self.usage, admin)

    # -- engines --------------------------------------------------------------------------------------------------
    def _graph_engines(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "id": name,
                "kind": "graph",
                "model": self.core.model_name,
                "label": stats.role,
                "url": None,
                "state": "ready" if stats.healthy else "unhealthy",
                "pid": None,
                "max_concurrent": stats.max_running,
                "in_flight": stats.running,  # those waiting in it included
                "restarts": 0,
                "last_error": None,
            }
            for name, stats in self.core.registry.instances().items()
            if stats.node is None  # the others are the managed engines, listed as such
        }

    async def list_engines(self, _: HttpRequest) -> Response:
        managed = [engine.to_json() for engine in self.engines.engines.values()]
        return Response({"object": "list", "data": [*self._graph_engines().values(), *managed]})

    async def start_engine(self, http: HttpRequest) -> Response:
        spec = http.json(EngineSpec)
        try:
            spec.check()
            spec.check_requested()
        except FieldError as error:
            raise ApiError.of(error) from None
        if spec.kind == "openai":
            assert spec.url is not None  # `check` requires it
            self.upstreams.check(spec.url)
        engine = await self.engines.start(spec)
        return Response(engine.to_json(), 201)

    async def get_engine(self, http: HttpRequest) -> Response:
        engine_id = http.path_params["engine_id"]
        graph = self._graph_engines().get(engine_id)
        return Response(graph if graph is not None else self.engines.get(engine_id).to_json())

    async def stop_engine(self, http: HttpRequest) -> Response:
        engine_id = http.path_params["engine_id"]
        if engine_id in self._graph_engines():
            raise ApiError(
                409,
                f"{engine_id} is an engine of the served graph; stop the gateway or change its graph instead",
                code="conflict",
            )
        force = http.query.get("force", "false").lower() in ("1", "true", "yes")
        engine = await self.engines.stop(engine_id, force=force)
        return Response(engine.to_json())

    async def health_check(self, http: HttpRequest) -> Response:
        return Response(await self._health_of(http.path_params["engine_id"]))

    async def health_check_all(self, _: HttpRequest) -> Response:
        ids = [*self._graph_engines(), *self.engines.engines]
        results: dict[str, dict[str, Any]] = {}

        async def check(engine_id: str) -> None:
            with contextlib.suppress(ApiError):  # stopped while the others were checked: no longer listed
                results[engine_id] = await self._health_of(engine_id)

        async with trio.open_nursery() as nursery:
            for engine_id in ids:
                nursery.start_soon(check, engine_id)
        return Response({"object": "list", "data": [results[i] for i in ids if i in results]})

    async def _health_of(self, engine_id: str) -> dict[str, Any]:
        """A graph engine's health is what its process last reported (heartbeats, every 0.5 s); a managed one is
        probed now."""
        graph = self._graph_engines().get(engine_id)
        if graph is not None:
            return {"id": engine_id, "healthy": graph["state"] == "ready", "state": graph["state"], "latency_ms": None}
        return await self.engines.health_check(engine_id)

    # -- hardware -------------------------------------------------------------------------------------------------
    async def usage(self, _: HttpRequest) -> Response:
        """Each API key's use by its name (`Tenants.usage`): totals, its last minute, in flight, refusals, limits."""
        return Response({"object": "usage", "keys": self.core.tenants.usage()})

    async def gpu(self, _: HttpRequest) -> Response:
        """The machine's devices: the GPU inventory's keys, with the CPU and its NUMA nodes under "cpu"."""
        from sagellm.runtime.comm.topology import machine_topology

        topology = await trio.to_thread.run_sync(machine_topology)
        return Response(topology.to_json())

    async def backends(self, _: HttpRequest) -> Response:
        from sagellm.backends import list_backends

        found = await trio.to_thread.run_sync(list_backends)
        data = [{"name": name, "available": status.available, "reason": status.reason} for name, status in found]
        return Response({"object": "list", "data": data})
