"""Models on demand: one gateway serving many models by name, each loaded when a request first names it, the least
recently used idle one evicted when another needs its place, and unloaded after an idle time (llama.cpp's router
mode, Ollama's keep-alive).

Each model is a managed engine of ours (`EngineManager`, kind llm: a worker process of the gateway's graph), started
on demand and stopped when it leaves. A request waits for its model (`ready`, bounded by the failover's retry wait)
before anything reads the model's files. Room is made before a load: at most `max_loaded` models at once, and the
new model's estimate (its weight files, and the KV cache its settings fix) within the memory available now, evicting
the least recently used models until both hold. An idle model goes first; when every candidate is busy, the least
recently used one drains: new requests for it wait (they load it again after), those it runs finish, then it stops,
so a swap never drops a request in flight. When that drain outlasts the wait, the load is given up (a 503 with
Retry-After naming the busy model) and the model it drained serves again.

A model is busy while the gateway answers a request of it, or one is on its way in (`ServingCore.requests_of`).

With `autoscale` settings, each loaded model has an autoscaler of its own (`control.autoscaler`): replicas of its
engine added and drained as its load asks, none while it drains; they stop with it when it is unloaded (or fails),
before its own engine.

Statuses, as llama.cpp's router names them: loaded, loading, unloaded, failed (its last load failed; the next request
or `load` tries again)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sagellm.common.autoscale import AutoscaleSettings
from sagellm.common.errors import SageLLMError
from sagellm.common.memory import available_bytes, resident_bytes
from sagellm.gateway.control.autoscaler import Autoscaler, Autoscalers
from sagellm.gateway.control.engine_spec import FAILED as ENGINE_FAILED
from sagellm.gateway.control.engine_spec import READY, EngineSpec
from sagellm.gateway.http.errors import ApiError

if TYPE_CHECKING:
    from sagellm.gateway.control.engines import EngineManager
    from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")

LOADED, LOADING, UNLOADED, FAILED = "loaded", "loading", "unloaded", "failed"
TICK_S = 0.5  # how often idle models are looked for
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
GIB = 2**30


@dataclass
class PooledModel:
    name: str  # what clients send as `model`
    spec: EngineSpec  # the engine it loads as
    status: str = UNLOADED
    engine_id: str | None = None
    draining: bool = False  # being unloaded: no new request goes to it
    last_used: float = field(default_factory=time.monotonic)  # a request's arrival, or its last moment busy
    loaded_at: float | None = None  # time.monotonic() when it became loaded
    estimate: int | None = None  # bytes it is expected to take loaded (weights and a KV cache of fixed size)
    error: str | None = None  # why its last load failed
    attempt: int = 0  # loads started
    failure: ApiError | None = None  # how attempt `attempt` ended, when it did not load
    making_room: str | None = None  # the model its load waits for to finish its requests and leave
    scaler: Autoscaler | None = None  # its replicas' autoscaler, while it is loaded
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def serving(self) -> bool:
        return self.status == LOADED and not self.draining

    def notify(self) -> None:
        """Wakes whoever waits on a change of its status."""
        self.changed.set()
        self.changed = trio.Event()


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
        model (a load, or room for one); `available`: the memory a load may still take; `autoscale`: each loaded
        model's replicas scaled so (None: one engine each), its autoscaler listed in `scalers` while it runs."""
        self.engines, self.core = engines, core
        self.models = {name: PooledModel(name, spec) for name, spec in models.items()}
        self.max_loaded, self.idle_unload_s, self.wait_s = max_loaded, idle_unload_s, wait_s
        self.available = available
        self.autoscale, self.scalers = autoscale, scalers or Autoscalers()
        self._room = trio.Lock()  # one load at a time decides what to evict
        self._nursery: trio.Nursery | None = None
        self.loads: Counter[tuple[str, str]] = Counter()  # (model, outcome) -> loads
        self.evictions: Counter[tuple[str, str]] = Counter()  # (model, reason) -> unloads
        self.waits: Counter[str] = Counter()  # model -> requests that waited for a load
        self.wait_seconds: Counter[str] = Counter()  # model -> seconds those waited

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

    async def ready(self, name: str) -> None:
        """Returns once `name` is loaded and serving (loading it, and making room for it, if need be). Raises
        ApiError 503 (Retry-After) when that takes longer than the wait, or when its load fails."""
        model = self.models[name]
        model.last_used = time.monotonic()
        if not model.serving:
            await self._wait_for(model)
            model.last_used = time.monotonic()  # its idle time counts from the request, not from the load

    async def _wait_for(self, model: PooledModel) -> None:
        began = time.monotonic()
        with trio.move_on_after(self.wait_s):
            while not model.serving:
                changed = model.changed
                attempt = model.attempt if model.status == LOADING or model.draining else self._load_soon(model)
                await changed.wait()
                if model.attempt == attempt and model.failure is not None and model.status != LOADING:
                    raise model.failure
            waited = time.monotonic() - began
            self.waits[model.name] += 1
            self.wait_seconds[model.name] += waited
            log.info("model_waited", model=model.name, wait_s=round(waited, 2))
            return
        self.waits[model.name] += 1
        self.wait_seconds[model.name] += time.monotonic() - began
        if model.failure is not None and model.status != LOADING:  # the load ended as the wait did: say why
            raise model.failure
        if model.making_room is not None:
            running = self.core.requests_of(model.making_room)
            doing = f"its load waits for the model {model.making_room!r}, which still runs {running} requests, to leave"
        else:
            doing = "it was drained to load another" if model.draining else f"it is {model.status}"
        raise ApiError(503, f"the model {model.name!r} is not loaded yet ({doing}, after {self.wait_s:g} s); retry "
                            "later", code="model_not_ready", retry_after_s=max(1.0, self.wait_s / 4))  # fmt: skip

    # -- loading and unloading ------------------------------------------------------------------------------------
    def load(self, name: str) -> None:
        """Starts loading `name` unless it is loaded or loading (`POST /models/load`)."""
        model = self.models[name]
        model.last_used = time.monotonic()
        if model.draining:
            raise ApiError(409, f"the model {name!r} is being unloaded; load it again after", code="conflict")
        if model.status in (UNLOADED, FAILED):
            self._load_soon(model)

    def unload(self, name: str) -> None:
        """Starts unloading `name` (`POST /models/unload`): it drains, then its engine stops."""
        model = self.models[name]
        if model.status == LOADING:
            raise ApiError(409, f"the model {name!r} is loading; unload it once it is loaded", code="conflict")
        if model.status == LOADED and not model.draining:
            model.draining = True
            model.notify()
            self._spawn(self._drain_and_unload, model, "asked")

    def _load_soon(self, model: PooledModel) -> int:
        """Starts a load of `model` in the background; -> its attempt number."""
        model.status, model.attempt, model.failure = LOADING, model.attempt + 1, None
        model.notify()
        self._spawn(self._load, model)
        return model.attempt

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is None:
            raise ApiError(503, "the gateway's models are not being served yet", code="unavailable")
        self._nursery.start_soon(fn, *args)

    async def _load(self, model: PooledModel) -> None:
        began = time.monotonic()
        try:
            async with self._room:
                await self._make_room(model)
                engine = await self.engines.start(model.spec)
                model.engine_id = engine.id
            log.info("model_loading", model=model.name, engine=engine.id, estimate_gib=_gib(model.estimate))
            while engine.state not in (READY, ENGINE_FAILED):
                await trio.sleep(0.05)
            if engine.state == ENGINE_FAILED:
                await self.engines.stop(engine.id, force=True)
                model.engine_id, model.error = None, engine.last_error
                raise ApiError(503, f"the model {model.name!r} failed to load: {engine.last_error}",
                               code="model_load_failed")  # fmt: skip
        except (SageLLMError, OSError) as error:  # (its files unreadable, say: the model fails, not the gateway)
            if not isinstance(error, ApiError):
                model.error = str(error)
                error = ApiError(503, f"the model {model.name!r} failed to load: {error}", code="model_load_failed")
            model.failure = error
            model.status = FAILED if error.code == "model_load_failed" else UNLOADED
            self.loads[model.name, model.status] += 1
            log.warning("model_not_loaded", model=model.name, error=str(error))
        else:
            model.status, model.loaded_at, model.error = LOADED, time.monotonic(), None
            self.loads[model.name, LOADED] += 1
            took = round(time.monotonic() - began, 2)
            log.info("model_loaded", model=model.name, engine=model.engine_id, load_s=took)
            if self.autoscale is not None:
                replica = msgspec.structs.replace(model.spec, label="autoscaled")
                model.scaler = Autoscaler(self.core, self.engines, self.autoscale, model=model.name,
                                          template=replica, hold=lambda: model.draining)  # fmt: skip
                self._spawn(self._scale, model.scaler)
        finally:
            model.notify()

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

    async def _make_room(self, model: PooledModel) -> None:
        """Evicts the least recently used models until `model` fits the count and the memory available; raises
        ApiError 503 when it cannot."""
        if model.estimate is None:
            model.estimate = await trio.to_thread.run_sync(load_estimate, model.spec)
        deadline = trio.current_time() + self.wait_s
        while True:
            others = [m for m in self.models.values() if m is not model and m.status in (LOADED, LOADING)]
            free = self.available()
            fits_count = self.max_loaded is None or len(others) < self.max_loaded
            fits_memory = free is None or model.estimate <= free
            if fits_count and fits_memory:
                return
            victims = sorted((m for m in others if m.status == LOADED), key=lambda m: (self._busy(m), m.last_used))
            if not victims:
                why = (f"{len(others)} of {self.max_loaded} models are loading" if not fits_count else
                       f"it needs {_gib(model.estimate)} GiB and {_gib(free)} GiB are available")  # fmt: skip
                raise ApiError(503, f"no room to load the model {model.name!r}: {why}", code="model_not_ready",
                               retry_after_s=self.wait_s)  # fmt: skip
            await self._evict(victims[0], model, deadline)

    async def _evict(self, victim: PooledModel, model: PooledModel, deadline: float) -> None:
        """Drains `victim` for `model` until the deadline, then unloads it; gives it back to its requests and raises
        ApiError 503 when it is still busy then."""
        victim.draining, model.making_room = True, victim.name
        victim.notify()
        try:
            with trio.move_on_at(deadline):
                while self._busy(victim):
                    await trio.sleep(0.05)
                await self._unload(victim, f"evicted for {model.name}")
                return
        finally:
            model.making_room = None
        victim.draining = False
        victim.notify()
        running = self.core.requests_of(victim.name)
        raise ApiError(503, f"no room to load the model {model.name!r}: the model {victim.name!r} it would replace "
                            f"still runs {running} requests; retry later", code="model_not_ready",
                       retry_after_s=self.wait_s)  # fmt: skip

    async def _drain_and_unload(self, model: PooledModel, reason: str) -> None:
        """Unloads a draining model once the requests it runs have finished (loads meanwhile go on: it takes no new
        request, and counts as loaded until it is gone)."""
        while self._busy(model):
            await trio.sleep(0.05)
        async with self._room:
            await self._unload(model, reason)

    async def _unload(self, model: PooledModel, reason: str) -> None:
        await self._stop_scaling(model)
        engine_id = model.engine_id
        if engine_id is not None and engine_id in self.engines.engines:
            await self.engines.stop(engine_id)
        idle_s = round(time.monotonic() - model.last_used, 1)
        model.status, model.engine_id, model.draining, model.loaded_at = UNLOADED, None, False, None
        self.evictions[model.name, reason.split()[0]] += 1
        log.info("model_unloaded", model=model.name, reason=reason, idle_s=idle_s)
        model.notify()

    def _look_for_idle(self) -> None:
        """Unloads the models idle for `idle_unload_s`, and forgets the engine of one that failed for good (its
        worker died too often): the next request loads it again."""
        now = time.monotonic()
        for model in self.models.values():
            if model.status != LOADED or model.draining:
                continue
            engine = self.engines.engines.get(model.engine_id or "")
            if engine is not None and engine.state == ENGINE_FAILED:
                model.status, model.error = FAILED, engine.last_error
                model.failure = ApiError(503, f"the model {model.name!r} failed: {engine.last_error}",
                                         code="model_load_failed")  # fmt: skip
                model.engine_id = None
                model.notify()
                self._spawn(self._stop_scaling, model)
                self._spawn(partial(self.engines.stop, engine.id, force=True))
                continue
            if self._busy(model):
                model.last_used = now
            elif self.idle_unload_s is not None and now - model.last_used >= self.idle_unload_s:
                model.draining = True
                model.notify()
                self._spawn(self._drain_and_unload, model, f"idle {self.idle_unload_s:g} s")

    def _busy(self, model: PooledModel) -> bool:
        return self.core.requests_of(model.name) > 0

    # -- what the routes show -------------------------------------------------------------------------------------
    def status(self, name: str) -> dict[str, Any]:
        """`name`'s status as `/v1/models` shows it (llama.cpp's shape: {"value": ..., "failed": ...})."""
        model = self.models[name]
        status: dict[str, Any] = {"value": model.status}
        if model.status == FAILED:
            status.update(failed=True, error=model.error)
        if model.draining:
            status["draining"] = True
        return status

    def details(self, name: str) -> dict[str, Any]:
        """`name` as the management API and the CLI show it: its status, engine, memory and idle time."""
        model = self.models[name]
        engine = self.engines.engines.get(model.engine_id) if model.engine_id else None
        rss = resident_bytes(pid=engine.pid) if engine is not None and engine.pid else None
        now = time.monotonic()
        return {
            "id": name,
            "source": model.spec.model,
            "status": self.status(name),
            "engine": model.engine_id,
            "replicas": list(model.scaler.replicas) if model.scaler is not None else [],
            "pid": engine.pid if engine is not None else None,
            "memory_bytes": rss,
            "estimate_bytes": model.estimate,
            "in_flight": self.core.requests_of(name),
            "idle_s": None if self._busy(model) or model.status != LOADED else round(now - model.last_used, 1),
            "loaded_s": round(now - model.loaded_at, 1) if model.loaded_at is not None else None,
        }

    def collect(self) -> Iterator[Any]:
        """Prometheus families (a collector, read at each scrape)."""
        loaded = GaugeMetricFamily("sagellm:model_loaded", "1 when the model is loaded and serving.", labels=["model"])
        for name, model in self.models.items():
            loaded.add_metric([name], float(model.serving))
        loads = CounterMetricFamily(
            "sagellm:model_loads", "Model loads by how they ended.", labels=["model", "outcome"]
        )
        for (name, outcome), count in self.loads.items():
            loads.add_metric([name, outcome], count)
        unloads = CounterMetricFamily("sagellm:model_unloads", "Models unloaded, by why.", labels=["model", "reason"])
        for (name, reason), count in self.evictions.items():
            unloads.add_metric([name, reason], count)
        waits = CounterMetricFamily(
            "sagellm:model_load_waits", "Requests that waited for their model.", labels=["model"]
        )
        seconds = CounterMetricFamily(
            "sagellm:model_load_wait_seconds", "Seconds requests waited for their model.", labels=["model"]
        )
        for name, count in self.waits.items():
            waits.add_metric([name], count)
            seconds.add_metric([name], self.wait_seconds[name])
        yield from (loaded, loads, unloads, waits, seconds)


def load_estimate(spec: EngineSpec) -> int:
    """Bytes a model takes loaded, as far as known before: its weight files, and a KV cache whose size its settings
    fix (`kv_cache_memory_gb`); a cache the engine sizes itself takes a share of what is free when it starts (and
    another project's server, its own)."""
    from sagellm.runtime.models.model_cache import resolve_model

    if spec.kind != "llm":  # another project's server: its files where given as a path (it fetches the others)
        path = Path(spec.model)
        if not path.exists():
            return 0
    else:
        path = resolve_model(spec.model)
    files = [path] if path.is_file() else [p for p in Path(path).rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    weights = sum(p.stat().st_size for p in files)
    kv_gb = spec.engine.get("kv_cache_memory_gb")
    return weights + (math.ceil(kv_gb * GIB) if kv_gb else 0)


def _gib(value: int | None) -> float | None:
    return round(value / GIB, 2) if value is not None else None
