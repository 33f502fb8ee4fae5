"""Models on demand: one gateway serving many models by name, each loaded when a request first names it, the least
recently used idle one evicted when another needs its place, and unloaded after an idle time (llama.cpp's router
mode, Ollama's keep-alive).

Each model is a managed engine of ours (`EngineManager`, kind llm: a worker process of the gateway's graph), started
on demand and stopped when it leaves. A request waits for its model (`ready`: in its model's line, up to the
failover's retry wait, `control.model_waits`) before anything reads the model's files; its client leaving ends its
wait. Models take turns for room, first come first served (`control.model_turns`), so a swap never drops a request
in flight and a model loading never turns away the requests of another: they wait their turn.

A model is busy while the gateway answers a request of it, or one is on its way in (`ModelReadiness.requests_of`).

With `autoscale` settings, each loaded model has an autoscaler of its own (`control.autoscaler`): replicas of its
engine added and drained as its load asks, none while it drains; they stop with it when it is unloaded (or fails),
before its own engine. What a model is, and its statuses: `control.pooled_model`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import SageLLMError
from sagellm.common.memory import available_bytes, resident_bytes
from sagellm.common.processes import alive
from sagellm.gateway.control.autoscaler import Autoscaler, Autoscalers
from sagellm.gateway.control.engine_spec import FAILED as ENGINE_FAILED
from sagellm.gateway.control.engine_spec import READY, STARTING, STOPPED, EngineSpec, ManagedEngine
from sagellm.gateway.control.model_turns import NoRoom, Turns
from sagellm.gateway.control.model_waits import WaitingLines
from sagellm.gateway.control.pooled_model import FAILED, LOADED, LOADING, RESTARTING, UNLOADED, PooledModel, gib
from sagellm.gateway.http.errors import ApiError

if TYPE_CHECKING:
    from sagellm.gateway.control.engines import EngineManager
    from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")

TICK_S = 0.5  # how often idle models are looked for


class ModelPool:
    def __init__(
        self,
        engines: EngineManager,
        core: ServingCore,
        models: dict[str, EngineSpec],
        *,
        max_loaded: int | None = None,
        idle_unload_s: float | None = None,
        wait_s: float = 60.0,
        available: Callable[[], int | None] = available_bytes,
        autoscale: AutoscaleSettings | None = None,
        scalers: Autoscalers | None = None,
    ) -> None:
        """`models`: the engine each name loads as; `max_loaded`: models loaded at once (None: as memory allows);
        `idle_unload_s`: a model idle that long is unloaded (None: never); `wait_s`: how long a request waits for its
        model (its turn, a load, room for one); `available`: the memory a load may still take; `autoscale`: each loaded
        model's replicas scaled so (None: one engine each), its autoscaler listed in `scalers` while it runs."""
        self.engines, self.core = engines, core
        self.models = {name: PooledModel(name, spec) for name, spec in models.items()}
        self.max_loaded, self.idle_unload_s, self.wait_s = max_loaded, idle_unload_s, wait_s
        self.available = available
        self.autoscale, self.scalers = autoscale, scalers or Autoscalers()
        self.lines = WaitingLines(core.readiness.hold)  # the requests waiting for each model
        self.turns = Turns(self)  # the models waiting for room
        self._nursery: trio.Nursery | None = None
        self.loads: Counter[tuple[str, str]] = Counter()  # (model, outcome: loaded or failed) -> loads
        self.evictions: Counter[tuple[str, str]] = Counter()  # (model, reason) -> unloads

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Loads and unloads models until cancelled (the engine manager stops those loaded)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(TICK_S)
                self._look_for_idle()

    # -- requests -------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.models)

    async def ready(self, name: str, hold: bool = True) -> None:
        """Returns once `name` is loaded and serving (loading it in its turn, and making room for it, if need be);
        `hold`: a request of it follows, which holds it busy from that moment (`ModelReadiness.hold`). Raises ApiError
        503 (Retry-After) when that takes longer than the wait, or when its load fails or is given up."""
        model = self.models[name]
        model.last_used = time.monotonic()
        if model.serving:
            if hold:
                self.core.readiness.hold(name)
            return
        ticket = self.lines.join(name, hold)
        if not (model.queued or model.status == LOADING or model.draining):
            self._load_soon(model)  # (a draining one loads again once it has left: `unload_now`)
        try:
            await self.lines.wait(ticket, self.wait_s, partial(self._not_ready, model))
        finally:
            if not self.lines.waiting(name) and model.queued and not model.asked:
                model.turn.cancel()  # nobody waits for it any more: its turn goes to the next
        model.last_used = time.monotonic()  # its idle time counts from the request, not from the load

    def _not_ready(self, model: PooledModel) -> ApiError:
        """The 503 of a request whose wait ran out: what its model was doing."""
        if model.making_room is not None:
            running = self.core.readiness.requests_of(model.making_room)
            doing = f"its load waits for the model {model.making_room!r}, which still runs {running} requests, to leave"
        elif ahead := self.turns.ahead_of(model):
            doing = f"it waits its turn for room, after {', '.join(map(repr, ahead))}"
        elif model.queued:
            loading = ", ".join(repr(m.name) for m in self.models.values() if m.status == LOADING)
            doing = f"it waits for {loading or 'another model'} to finish loading, to take its place"
        else:
            doing = "it was drained to load another" if model.draining else f"it is {model.status}"
        return ApiError(503, f"the model {model.name!r} is not loaded yet ({doing}, after {self.wait_s:g} s); retry "
                             "later", code="model_not_ready", retry_after_s=max(1.0, self.wait_s / 4))  # fmt: skip

    # -- loading and unloading ------------------------------------------------------------------------------------
    def load(self, name: str) -> None:
        """Starts loading `name` in its turn unless it is loaded or on its way (`POST /models/load`)."""
        model = self.models[name]
        model.last_used = time.monotonic()
        if model.draining:
            raise ApiError(409, f"the model {name!r} is being unloaded; load it again after", code="conflict")
        if model.status in (UNLOADED, FAILED):
            model.asked = True
            if not model.queued:
                self._load_soon(model)

    def unload(self, name: str) -> None:
        """Starts unloading `name` (`POST /models/unload`): it drains, then its engine stops."""
        model = self.models[name]
        if model.status == LOADING or model.queued:
            raise ApiError(409, f"the model {name!r} is loading; unload it once it is loaded", code="conflict")
        if model.serving:
            model.draining = True
            self.turns.changed()
            self._spawn(self._drain_and_unload, model, "asked")

    def _load_soon(self, model: PooledModel) -> None:
        """Puts `model` in line for room (`turns`) and loads it in the background when its turn comes."""
        self.turns.join(model)
        self._spawn(self._load, model)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise ApiError(503, "the gateway's models are not being served yet", code="unavailable")
        self._nursery.start_soon(fn, *args)

    async def _load(self, model: PooledModel) -> None:
        """A model's load: its turn for room, then its engine until ready. Only a started load counts in `loads`; a
        turn given up (nobody waits) counts nowhere, and room not made refuses the requests waiting, as `NoRoom`."""
        try:
            if not await self.turns.take(model):
                if self.lines.waiting(model.name):  # a request came as it gave up its turn: it takes another
                    self._load_soon(model)
                return
            began = time.monotonic()
            engine = await self.engines.start(model.spec)
            model.engine_id = engine.id
            log.info("model_loading", model=model.name, engine=engine.id, estimate_gib=gib(model.estimate))
            await engine.until_state(READY, ENGINE_FAILED)  # (the manager mirrors its worker's state into it)
            if engine.state == ENGINE_FAILED:
                await self.engines.stop(engine.id, force=True)
                model.engine_id, model.error = None, engine.last_error
                raise ApiError(503, f"the model {model.name!r} failed to load: {engine.last_error}",
                               code="model_load_failed")  # fmt: skip
        except NoRoom as refusal:
            log.warning("model_not_loaded", model=model.name, error=str(refusal))
            self.lines.refuse(model.name, refusal, refusal.why)
        except (SageLLMError, OSError) as error:  # (its files unreadable, say: the model fails, not the gateway)
            if not isinstance(error, ApiError):
                model.error = str(error)
                error = ApiError(503, f"the model {model.name!r} failed to load: {error}", code="model_load_failed")
            elif error.code != "model_load_failed":  # (its engine refused at start: a GPU it asks for, say)
                model.error = error.message
            model.status = FAILED
            self.loads[model.name, FAILED] += 1
            log.warning("model_not_loaded", model=model.name, error=str(error))
            self.lines.refuse(model.name, error, FAILED)
        else:
            model.status, model.loaded_at, model.error = LOADED, time.monotonic(), None
            model.last_used = model.loaded_at  # idle from now: a load longer than the idle time is not unloaded at once
            self.loads[model.name, LOADED] += 1
            self.lines.admit(model.name)  # (before anything else runs: no turn evicts it before they are in)
            took = round(time.monotonic() - began, 2)
            log.info("model_loaded", model=model.name, engine=model.engine_id, load_s=took)
            self._spawn(self._forget_when_failed, model, engine)
            if self.autoscale is not None:
                replica = msgspec.structs.replace(model.spec, label="autoscaled")
                model.scaler = Autoscaler(self.core, self.engines, self.autoscale, model=model.name,
                                          template=replica, hold=lambda: model.draining)  # fmt: skip
                self._spawn(self._scale, model.scaler)
        finally:
            self.turns.changed()

    async def _scale(self, scaler: Autoscaler) -> None:
        """Runs a model's autoscaler until it is closed (the model leaves; `_stop_scaling`)."""
        self.scalers.running.append(scaler)
        try:
            await scaler.run()
        finally:
            self.scalers.running.remove(scaler)

    async def _stop_scaling(self, model: PooledModel) -> None:
        """Closes the model's autoscaler (the drains under way finish) and stops the replicas it added (drained:
        what they run finishes)."""
        scaler, model.scaler = model.scaler, None
        if scaler is not None:
            await scaler.close()
            await scaler.stop_replicas()

    async def _drain_and_unload(self, model: PooledModel, reason: str) -> None:
        """Unloads a draining model once the requests it runs have finished (loads meanwhile go on: it takes no new
        request, and counts as loaded until it is gone), unless another unload of it came first."""
        await self.core.readiness.until_idle(model.name)
        if model.status == LOADED and model.draining and not model.stopping:
            await self.unload_now(model, reason)

    async def unload_now(self, model: PooledModel, reason: str) -> None:
        """Stops the model's replicas and engine (shielded: a turn given up meanwhile does not leave it half gone);
        requests that came for it meanwhile load it again, in their turn."""
        model.stopping = True
        self.turns.changed()
        with trio.CancelScope(shield=True):
            await self._stop_scaling(model)
            engine_id = model.engine_id
            if engine_id is not None and engine_id in self.engines.engines:
                await self.engines.stop(engine_id)
        idle_s = round(time.monotonic() - model.last_used, 1)
        model.status, model.engine_id, model.loaded_at = UNLOADED, None, None
        model.draining = model.stopping = False
        model.keep_alive_s = None  # a request's keep-alive held for that load; the next load's is its requests'
        self.evictions[model.name, reason.split()[0]] += 1
        log.info("model_unloaded", model=model.name, reason=reason, idle_s=idle_s)
        if self.lines.waiting(model.name):
            self._load_soon(model)
        self.turns.changed()

    async def _forget_when_failed(self, model: PooledModel, engine: ManagedEngine) -> None:
        """Forgets a loaded model's engine the moment it fails for good (its worker died too often): the next request
        loads the model again. Woken by the engine's changes of state; done once it stops (the model unloaded)."""
        await engine.until_state(ENGINE_FAILED, STOPPED)
        if engine.state != ENGINE_FAILED or model.engine_id != engine.id or model.status != LOADED or model.draining:
            return  # (a draining model's engine is stopped by its unload)
        model.status, model.error, model.engine_id = FAILED, engine.last_error, None
        self.turns.changed()
        self._spawn(self._stop_scaling, model)
        self._spawn(partial(self.engines.stop, engine.id, force=True))

    def keep_alive(self, name: str, seconds: float) -> None:
        """`name` stays loaded `seconds` once idle, from now on (Ollama's `keep_alive`: math.inf, never unloaded; 0,
        unloaded as soon as its requests are done), in place of the pool's `idle_unload_s`."""
        self.models[name].keep_alive_s = seconds

    def _look_for_idle(self) -> None:
        """Unloads the models idle for their keep-alive or `idle_unload_s` (a matter of time passing: looked for every
        TICK_S)."""
        now = time.monotonic()
        for model in self.models.values():
            if model.status != LOADED or model.draining:
                continue
            limit = model.keep_alive_s if model.keep_alive_s is not None else self.idle_unload_s
            if self.busy(model):
                model.last_used = now
            elif limit is not None and now - model.last_used >= limit:
                model.draining = True
                self.turns.changed()
                self._spawn(self._drain_and_unload, model, f"idle {limit:g} s")

    def busy(self, model: PooledModel) -> bool:
        return self.core.readiness.requests_of(model.name) > 0

    def _engine_of(self, model: PooledModel) -> ManagedEngine | None:
        return self.engines.engines.get(model.engine_id) if model.engine_id else None

    # -- what the routes show -------------------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        """`name`'s status as `/v1/models` shows it (llama.cpp's shape: {"value": ..., "failed": ...}); a loaded model's
        engine speaks for it when it is not ready: restarting (its worker died and is being started again, its
        requests resume there) or failed (given up; the pool forgets that engine as it fails: `_forget_when_failed`)."""
        model = self.models[name]
        status: dict[str, Any] = {"value": LOADING if model.queued else model.status}
        engine = self._engine_of(model)
        if model.status == LOADED and engine is not None and engine.state == ENGINE_FAILED:
            status = {"value": FAILED, "error": engine.last_error}
        elif model.status == LOADED and engine is not None and _restarting(engine):
            status = {"value": RESTARTING} | ({"error": engine.last_error} if engine.last_error else {})
        if status["value"] == FAILED:
            status.update(failed=True, error=status.get("error") or model.error)
        if model.queued:
            status["queued"] = True
        if model.draining:
            status["draining"] = True
        return status

    def details(self, name: str) -> dict[str, Any]:
        """`name` as the management API and the CLI show it: its status, engine, memory and idle time."""
        model = self.models[name]
        engine = self._engine_of(model)
        pid = _live_pid(engine) if engine is not None else None
        now = time.monotonic()
        return {
            "id": name,
            "source": model.spec.model,
            "status": self.status(name),
            "engine": model.engine_id,
            "replicas": list(model.scaler.replicas) if model.scaler is not None else [],
            "pid": pid,
            "memory_bytes": resident_bytes(pid=pid) if pid else None,
            "estimate_bytes": model.estimate,
            "in_flight": self.core.readiness.requests_of(name),
            "waiting": self.lines.waiting(name),
            "idle_s": None if self.busy(model) or model.status != LOADED else round(now - model.last_used, 1),
            "loaded_s": round(now - model.loaded_at, 1) if model.loaded_at is not None else None,
        }

    def collect(self) -> Iterator[Any]:
        """Prometheus families (a collector, read at each scrape)."""
        loaded = GaugeMetricFamily("sagellm:model_loaded", "1 when the model is loaded and serving.", labels=["model"])
        for name, model in self.models.items():
            loaded.add_metric([name], float(model.serving))
        loads = CounterMetricFamily(
            "sagellm:model_loads", "Loads started, by how they ended: loaded, failed.", labels=["model", "outcome"]
        )
        for (name, outcome), count in self.loads.items():
            loads.add_metric([name, outcome], count)
        unloads = CounterMetricFamily("sagellm:model_unloads", "Models unloaded, by why.", labels=["model", "reason"])
        for (name, reason), count in self.evictions.items():
            unloads.add_metric([name, reason], count)
        yield from (loaded, loads, unloads)
        yield from self.lines.collect()


def _restarting(engine: ManagedEngine) -> bool:
    """Whether the engine's process died and is being started again: seen at once (its pid is gone, or dead), where
    the engine's state follows within a heartbeat sync."""
    process = engine.link or engine.server
    return engine.state == STARTING or (process is not None and engine.state == READY and _live_pid(engine) is None)


def _live_pid(engine: ManagedEngine) -> int | None:
    """The pid of the engine's worker (or server) while that process lives: none from the moment it dies, before its
    supervisor has reaped it."""
    pid = engine.pid
    return pid if pid is not None and alive(pid) else None
