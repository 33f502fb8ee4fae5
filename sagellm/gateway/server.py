"""`serve()`: the gateway process. Loads the graph's engines (the embedding model is one of them), then answers HTTP
(`http_server`) in the same event loop as the pipeline, so a request goes from socket to engine without a
thread or process hop. SIGINT/SIGTERM stop it gracefully: no new connections, requests in flight finish (up to
`graceful_timeout_s`), the graph drains, then the process exits; a server that joined another gateway leaves it
first (drained there), so no request sent to it is cut."""

from __future__ import annotations

import queue
import signal
import threading
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from typing import Any

import structlog
import trio

from sagellm.common import tracing
from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import FieldError, InvalidInput
from sagellm.common.logging import default_logging
from sagellm.common.memory import resident_bytes
from sagellm.common.nursery_errors import single_errors
from sagellm.gateway import openapi
from sagellm.gateway.anthropic.routes import MessagesRoutes
from sagellm.gateway.api_servers.hub import ApiServerHub
from sagellm.gateway.api_servers.hub_serving import serve_with_hub
from sagellm.gateway.api_servers.link import FrontEnd
from sagellm.gateway.batches.batch_store import BatchStore
from sagellm.gateway.batches.files import FileStore
from sagellm.gateway.batches.routes import BatchRoutes
from sagellm.gateway.batches.runner import BatchRunner
from sagellm.gateway.config import GatewayConfig
from sagellm.gateway.control.admin_routes import AdminRoutes
from sagellm.gateway.control.autoscaler import Autoscaler, Autoscalers
from sagellm.gateway.control.engine_spec import pooled_spec
from sagellm.gateway.control.engines import EngineManager
from sagellm.gateway.control.join import Memberships
from sagellm.gateway.control.management_routes import ManagementRoutes
from sagellm.gateway.control.model_pool import ModelPool
from sagellm.gateway.control.model_routes import ModelRoutes
from sagellm.gateway.control.sleep_mode import SleepMode
from sagellm.gateway.control.upstreams import UpstreamAllowList
from sagellm.gateway.http.app import App
from sagellm.gateway.http.auth import admin_key, key_guard
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.limits import HttpLimits
from sagellm.gateway.http.server import serve_http
from sagellm.gateway.indexes.routes import IndexRoutes
from sagellm.gateway.indexes.store import IndexStore
from sagellm.gateway.keys.reload import keep_keys_current
from sagellm.gateway.keys.tenants import Tenants
from sagellm.gateway.keys.usage_metrics import KeyUsageMetrics
from sagellm.gateway.media import media_policy
from sagellm.gateway.ollama.routes import OllamaRoutes
from sagellm.gateway.openai.api import OpenAIApi
from sagellm.gateway.openai.kv_transfer.api_router import KVTransferRoutes
from sagellm.gateway.openai.kv_transfer.serving import KVHandOff
from sagellm.gateway.openai.lora.api_router import LoraRoutes
from sagellm.gateway.openai.models.api_router import ModelsRoutes
from sagellm.gateway.openai.request_status.api_router import RequestStatusRoutes
from sagellm.gateway.openai.responses.api_router import ResponsesRoutes
from sagellm.gateway.openai.tokenization.api_router import TokenizerRoutes
from sagellm.gateway.serving.access_log import AccessLog
from sagellm.gateway.serving.background import BackgroundTasks
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.sessions.routes import SessionRoutes
from sagellm.gateway.sessions.store import SessionStore
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.cluster import RayCluster

log = structlog.get_logger("sagellm.gateway")


@dataclass
class Gateway:
    """A running gateway: its address and the pieces tests and the embedded client reach into."""

    url: str
    core: ServingCore
    admin_key: str
    stop: trio.Event
    engines: EngineManager
    hub: ApiServerHub | None = None  # with API servers: the core's end of them
    autoscaler: Autoscaler | None = None  # with `autoscale:` in the graph
    models: ModelPool | None = None  # with models loaded on demand
    batches: BatchRunner | None = None  # the Batch API's batches (`sagellm run-batch` feeds them directly)


def build_app(
    core: ServingCore,
    config: GatewayConfig,
    admin: str,
    engines: EngineManager,
    sleep_mode: SleepMode,
    batches: BatchRunner,
    scalers: Autoscalers | None = None,
    models: ModelPool | None = None,
) -> App:
    """The gateway's routes; `batches` runs the Batch API's batches, its tasks the background responses too."""
    problem = config.admin_auth_problem()
    if problem is not None:
        raise FieldError("admin_auth", problem)
    app = App(allowed_hosts=config.host_names())
    # What starts a process, reads a path or adds an upstream takes the admin key always, --admin-auth loopback or not
    launch_guard = key_guard([admin], "admin")
    admin_guard = launch_guard if config.admin_auth == "key" else None
    api_guard = core.tenants.ring.guard if core.tenants.ring.required else None
    indexes = IndexStore(core)
    openai_api = OpenAIApi(
        core, indexes, tool_call_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser,
        reasoning_budget=config.reasoning_budget, hand_off=KVHandOff(config.kv_transfer, core.kv_outbox, core.boot_id),
        media=media_policy(config.allowed_media_domains, config.allowed_local_media_path),
        per_request_metrics=config.per_request_metrics,
    )  # fmt: skip
    ModelsRoutes(core).register(app, api_guard)
    openai_api.register(app, api_guard)
    RequestStatusRoutes(core).register(app, api_guard)
    ResponsesRoutes.kept_in(config.state_dir, openai_api.preparation, batches.tasks).register(app, api_guard)
    SessionRoutes(SessionStore(config.state_dir), openai_api.chat).register(app, api_guard)
    BatchRoutes(batches).register(app, api_guard)
    batches.app = app
    collectors = (KeyUsageMetrics(core.tenants), *(c for c in (scalers, models) if c is not None))
    AdminRoutes(core, collectors).register(app, admin_guard)
    upstreams = UpstreamAllowList(config.allowed_upstreams)
    ManagementRoutes(core, engines, upstreams).register(app, admin_guard, launch_guard)
    ModelRoutes(models).register(app, admin_guard, launch_guard)
    LoraRoutes(core).register(app, admin_guard, launch_guard)
    sleep_mode.register(app, admin_guard)
    IndexRoutes(indexes).register(app, admin_guard)
    preparation = openai_api.preparation
    tokenizer_routes = TokenizerRoutes(core, preparation.media, preparation.media_by_uuid)
    tokenizer_routes.register(app, api_guard)
    MessagesRoutes(openai_api.preparation, tokenizer_routes).register(app, api_guard)
    ollama = OllamaRoutes(core, openai_api.preparation, openai_api.completions, openai_api.embeddings)
    ollama.register(app, api_guard)
    KVTransferRoutes(core.kv_outbox).register(app)  # a decode server's fetch: its secret id is the capability
    openapi.register(app, version("sagellm"))
    return app


def http_limits(config: GatewayConfig) -> HttpLimits:
    return HttpLimits(
        max_body_bytes=config.max_body_bytes,
        graceful_timeout_s=config.graceful_timeout_s,
        max_connections=config.max_connections,
    )


def front_end(config: GatewayConfig) -> FrontEnd:
    """What every API server enforces as this gateway does."""
    return FrontEnd(keys=[], keys_required=bool(config.api_keys or config.api_keys_file),
                    max_body_bytes=config.max_body_bytes,
                    graceful_timeout_s=config.graceful_timeout_s, max_connections=config.max_connections,
                    tool_call_parser=config.tool_call_parser, reasoning_parser=config.reasoning_parser,
                    reasoning_budget=config.reasoning_budget, allowed_media_domains=config.allowed_media_domains,
                    allowed_local_media_path=config.allowed_local_media_path,
                    per_request_metrics=config.per_request_metrics)  # fmt: skip


async def serve(
    graph: Graph,
    config: GatewayConfig,
    *,
    handle_signals: bool = False,
    api_servers: int = 0,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs until `Gateway.stop` is set (or, with `handle_signals`, a SIGINT/SIGTERM arrives); hands the running
    `Gateway` to `task_status` once it answers HTTP. `api_servers`: that many API server processes answer HTTP on
    the gateway's port (`api_server`) and this process runs the core behind them; 0: this process answers HTTP."""
    if config.otlp_traces_endpoint:  # before any process starts: they inherit where to send theirs
        tracing.configure(config.otlp_traces_endpoint, "sagellm-gateway")
    core = ServingCore(
        graph, served_model_name=config.served_model_name, model_aliases=config.model_aliases,
        failover=config.failover, embedding_model=config.embedding_model,
        pooling_models=config.pooling_models, tenants=Tenants(config.api_keys, config.api_keys_file),
    )  # fmt: skip
    if config.access_log is not None:
        core.access_log = AccessLog(config.access_log, max_bytes=int(config.access_log_max_mb * 2**20))
    cluster = RayCluster.from_settings(graph.attrs["cluster"]) if "cluster" in graph.attrs else None
    engines = EngineManager(config.state_dir, core, reserved_names=lambda: _served_names(core), ray=cluster)
    admin = admin_key(config.state_dir, config.admin_key)
    scaling = graph.attrs.get("autoscale")
    autoscaler = Autoscaler(core, engines, AutoscaleSettings.from_settings(scaling)) if scaling is not None else None
    scalers = Autoscalers()
    if autoscaler is not None:
        scalers.running.append(autoscaler)
    models = model_pool(config, core, engines, scalers)
    sleep_mode = SleepMode(core, wake_timeout_s=config.failover.retry_wait_s)
    core.readiness.add_sleep_mode(sleep_mode)
    tasks = BackgroundTasks()
    batches = BatchRunner(BatchStore(config.state_dir), FileStore(config.state_dir), tasks)
    app = build_app(core, config, admin, engines, sleep_mode, batches, scalers, models)
    stop = trio.Event()
    membership = Memberships(config.join) if config.join is not None else None
    with single_errors():  # one failure (a join the head refused) is raised as itself, for the CLI to say
        async with trio.open_nursery() as nursery:
            await nursery.start(core.run)
            _serve_lora_modules(core, config.lora_modules, config.lora_bases)
            await nursery.start(engines.run)
            signals, member, scaling_scope = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
            loading_scope, keys_scope = trio.CancelScope(), trio.CancelScope()
            await nursery.start(tasks.run)
            nursery.start_soon(tasks.stop_when, stop)  # at once: a batch's lines must not meet the drain's refusals
            batches.resume()
            if models is not None:
                _check_model_names(models, core)
                await nursery.start(_keep_loading, models, loading_scope)
            if autoscaler is not None:
                nursery.start_soon(_keep_scaling, autoscaler, scaling_scope)
            if handle_signals:
                nursery.start_soon(stop_on_signal, stop, signals, membership)
            nursery.start_soon(keep_keys_current, core.tenants, handle_signals, keys_scope)
            async with trio.open_nursery() as http:
                limits = http_limits(config)
                own_http = partial(serve_http, app, config.host, config.port, limits, shutdown_trigger=stop.wait)
                hub = ApiServerHub(core, app, front_end(config)) if api_servers or config.api_hub else None
                if hub is not None:
                    url = await http.start(serve_with_hub, hub, own_http, config, api_servers, stop)
                else:
                    url = await http.start(own_http)
                log.info("gateway_ready", url=url, models=core.models(), memory=process_memory(core))
                if membership is not None:
                    own = [membership.settings.model] if core.registry.own_names() else []
                    joined = [*own, *(models.names() if models is not None else ())]
                    nursery.start_soon(_keep_membership, membership, url, joined, member)
                task_status.started(Gateway(url, core, admin, stop, engines, hub, autoscaler, models, batches))
            signals.cancel()  # the server returned: stop was set and the requests it held have finished
            scaling_scope.cancel()  # no replica is added or drained while the gateway stops
            loading_scope.cancel()  # nor a model loaded or unloaded
            keys_scope.cancel()
            if membership is not None:
                with trio.CancelScope(shield=True):
                    await membership.leave()  # no-op if a signal already made it leave
                member.cancel()
            engines.shutdown()  # managed engine processes stop
            core.shutdown()  # the graph drains what is left, then core.run returns
    tracing.flush()  # the last requests' spans go out before the process ends


def model_pool(
    config: GatewayConfig, core: ServingCore, engines: EngineManager, scalers: Autoscalers
) -> ModelPool | None:
    """The models loaded on demand (`--model NAME=MODEL ...`), each an llm engine of the control plane served as its
    name (with `autoscale`, its replicas scaled, their autoscalers among `scalers`), waiting as long as the
    failover's retry does; None without any."""
    on_demand = config.models_on_demand
    if on_demand is None:
        return None
    specs = {name: pooled_spec(name, source, on_demand.engine) for name, source in on_demand.models.items()}
    scaling = AutoscaleSettings.from_settings(on_demand.autoscale) if on_demand.autoscale is not None else None
    pool = ModelPool(engines, core, specs, max_loaded=on_demand.max_loaded, idle_unload_s=on_demand.idle_unload_s,
                     wait_s=config.failover.retry_wait_s, autoscale=scaling, scalers=scalers)  # fmt: skip
    core.readiness.add_models_on_demand(pool)
    return pool


def _serve_lora_modules(core: ServingCore, modules: dict[str, str], bases: dict[str, str]) -> None:
    """`--lora-modules`: each adapter checked and served, of the model `bases` names for it, else of the graph's (one
    the engines cannot serve stops the start, saying why)."""
    for name, path in modules.items():
        try:
            core.lora.add(name, path, bases.get(name))
        except ApiError as error:
            raise InvalidInput(f"--lora-modules {name}={path}: {error}") from None


def _check_model_names(models: ModelPool, core: ServingCore) -> None:
    """No model on demand takes the name of the embedding model or of the graph's own model (when it has one)."""
    taken = {*_served_names(core), *core.registry.own_names()} & set(models.models)
    if taken:
        raise InvalidInput(f"--model NAME=MODEL: {', '.join(sorted(taken))} is the name of a model the graph "
                           "serves itself")  # fmt: skip


async def _keep_loading(models: ModelPool, scope: trio.CancelScope, *, task_status: trio.TaskStatus) -> None:
    with scope:
        await models.run(task_status=task_status)


def process_memory(core: ServingCore) -> str:
    """This process's resident memory with its engines' weights and KV caches apart (an engine in a worker process
    logs its own at `engine_ready`). The report is imported only where an engine runs here, which has loaded torch: a
    gateway of remote engines alone loads no torch to say its RSS."""
    engines = [op.engine for op in core.engine_operators() if op.engine is not None]
    if not engines:
        return f"RSS {(resident_bytes() or 0) / 2**30:.2f} GiB"
    from sagellm.runtime.engine.memory_report import memory_report

    return memory_report(engine.runner for engine in engines).line()


def _served_names(core: ServingCore) -> list[str]:
    """The embedding models the gateway answers itself, which no managed engine may take."""
    return [op.served_model_name for op in core.registry.embedders()]


async def _keep_scaling(autoscaler: Autoscaler, scope: trio.CancelScope) -> None:
    with scope:
        await autoscaler.run()


async def _keep_membership(membership: Memberships, listening: str, models: list[str], scope: trio.CancelScope) -> None:
    with scope:
        await membership.run(listening, models)


async def stop_on_signal(stop: trio.Event, scope: trio.CancelScope, membership: Memberships | None = None) -> None:
    """Stops the gateway at SIGINT/SIGTERM; one that joined another gateway leaves it first (a second signal does
    not wait for that)."""
    with scope, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("gateway_stopping", signal=signal.Signals(signum).name)
            if membership is not None and not stop.is_set():
                async with trio.open_nursery() as leaving:

                    async def leave() -> None:
                        await membership.leave()
                        leaving.cancel_scope.cancel()

                    leaving.start_soon(leave)
                    async for _ in signals:  # a second signal: stop without waiting
                        leaving.cancel_scope.cancel()
            stop.set()
            return


class GatewayThread:
    """A gateway on its own trio loop in a daemon thread of this process: the Python client's embedded mode, and the
    tests, whose synchronous clients (the `openai` SDK) talk to it over real sockets."""

    def __init__(
        self, graph: Graph, config: GatewayConfig, *, name: str = "sagellm-gateway", api_servers: int = 0
    ) -> None:
        default_logging()
        ready: queue.Queue = queue.Queue()

        async def main() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    gateway = await nursery.start(partial(serve, graph, config, api_servers=api_servers))
                    ready.put((gateway, nursery, trio.lowlevel.current_trio_token()))
            except BaseException as exc:  # a start failure reaches the caller instead of hanging it
                ready.put(exc)
                raise

        self.thread = threading.Thread(target=trio.run, args=(main,), name=name, daemon=True)
        self.thread.start()
        started = ready.get()
        if isinstance(started, BaseException):
            raise started
        self.gateway, self._nursery, self._token = started
        self.url, self.core = self.gateway.url, self.gateway.core

    def call(self, fn: Any, *args: Any) -> Any:
        """Runs `fn(*args)` on the gateway's event loop (its state is the loop's alone)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def wait(self, afn: Any, *args: Any) -> Any:
        """Runs the async function `afn(*args)` on the gateway's event loop and returns its result."""
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def start_soon(self, afn: Any, *args: Any) -> None:
        """Starts `afn(*args)` as a task of the gateway's loop (it ends with the gateway)."""
        self.call(self._nursery.start_soon, afn, *args)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: requests in flight finish, the graph drains, the thread ends."""
        if self.thread.is_alive():
            self.call(self.gateway.stop.set)
            self.thread.join(timeout=timeout_s)
