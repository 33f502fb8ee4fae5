"""Sleep mode, vLLM's routes (admin key), for the engines of the gateway's graph (in its process, and in worker
processes: a PD graph's prefill and decode workers, told over their control channel):

    POST /sleep?level=1|2   level 1 frees their KV caches (weights kept: it wakes at once), level 2 their weights
                            too (it wakes by loading them again)
    POST /wake_up           they serve again (`?tags=weights`: their weights alone are loaded, the KV caches
                            stay freed; `?tags=kv_cache` then: they serve)
    GET  /is_sleeping       {"is_sleeping": true|false, "level": 0|1|2}

A sleep first lets the requests in flight finish (new ones wait meanwhile, up to `drain_timeout_s`; then the sleep is
refused with a 503, and they go on). A request that arrives while the engines sleep wakes them and waits for it (up to
the failover's retry wait), so a sleeping server still answers every request, only later. An engine that can free its
KV cache only by closing (a parallel group, a speculator with caches of its own, a GPU) sleeps at level 2; the level
reported is the deepest any engine reached. A worker's engines have slept (or woken) once its heartbeats say so; a
worker that does not within `wake_timeout_s` makes the change a 503 naming it."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
import trio

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")
WEIGHTS, KV_CACHE = "weights", "kv_cache"  # what vLLM's `/wake_up?tags=` names


class SleepMode:
    def __init__(self, core: ServingCore, *, drain_timeout_s: float = 60.0, wake_timeout_s: float = 60.0) -> None:
        self.core = core
        self.drain_timeout_s, self.wake_timeout_s = drain_timeout_s, wake_timeout_s
        self.level = 0
        self._changing = trio.Lock()  # one sleep or wake at a time
        self._falling_asleep = False  # draining before a sleep: requests wait for it, then wake the engines

    def register(self, app: App, admin: Guard | None) -> None:
        app.route("POST", "/sleep", self._sleep_route, admin)
        app.route("POST", "/wake_up", self._wake_route, admin)
        app.route("GET", "/is_sleeping", self._is_sleeping_route, admin)

    # -- what the routes do ---------------------------------------------------------------------------------------
    async def sleep(self, level: int) -> None:
        """Puts every engine of the graph to sleep at `level` once the requests in flight have finished."""
        if level not in (1, 2):
            raise ApiError(400, f"level must be 1 (the KV cache) or 2 (the weights too), got {level}", param="level")
        async with self._changing:
            local, workers = self._engines()
            if self.level >= level:
                return
            self._falling_asleep = True
            try:
                await self._drain()
                for engine in local:
                    await trio.to_thread.run_sync(engine.sleep, level)
                if workers:
                    self.core.executor.sleep_workers(level)
                    await self._until(workers, lambda reached: reached >= level, "sleep")
            finally:  # (after a failure, those that slept are woken by the next request)
                self._falling_asleep = False
                self.level = max(self._levels(local, workers))
        log.info("gateway_asleep", level=self.level, engines=[*(e.ctx.node_id for e in local), *workers])

    async def wake_up(self, level: int = 0) -> None:
        """Wakes the engines whole (`level` 0), or loads their weights alone (1: vLLM's `tags=weights`, after a
        level-2 sleep; their KV caches stay freed and the server still sleeps)."""
        async with self._changing:
            if self.level <= level:
                return
            began = time.monotonic()
            local, workers = self._engines()
            try:
                if workers:  # they load while the engines here do
                    self.core.executor.sleep_workers(level)
                for engine in local:
                    await trio.to_thread.run_sync(engine.wake_up, level)
                if workers:
                    await self._until(workers, lambda reached: reached <= level, "wake up")
            finally:
                self.level = max(self._levels(local, workers))
        log.info("gateway_awake" if not self.level else "gateway_weights_loaded", level=self.level,
                 wake_s=round(time.monotonic() - began, 2))  # fmt: skip

    @property
    def serving(self) -> bool:
        """Awake, and not about to sleep: a request needs no wait."""
        return not self.level and not self._falling_asleep

    async def awake(self) -> None:
        """A request's wait: returns once the engines serve, waking them if they sleep. Raises ApiError 503 when
        that takes longer than `wake_timeout_s`."""
        if self.serving:
            return
        with trio.move_on_after(self.wake_timeout_s):
            await self.wake_up()  # (a sleep under way holds `_changing`: the wake waits for it to end, then undoes it)
            return
        raise ApiError(503, f"the engines are waking up (not done after {self.wake_timeout_s:g} s); retry later",
                       code="unavailable", retry_after_s=self.wake_timeout_s)  # fmt: skip

    async def _drain(self) -> None:
        with trio.move_on_after(self.drain_timeout_s):
            await self.core.readiness.until_idle(None)
            return
        running = self.core.readiness.requests_of(None)
        raise ApiError(503, f"not asleep: {running} requests still ran after {self.drain_timeout_s:g} s",
                       code="unavailable", retry_after_s=self.drain_timeout_s)  # fmt: skip

    def _engines(self) -> tuple[list, list[str]]:
        """The graph's engine operators in this process, and its engine nodes in worker processes; a 400 when it has
        none."""
        local = self.core.engine_operators()
        workers = self.core.executor.worker_sleepers() if self.core.executor is not None else []
        if not local and not workers:
            raise ApiError(400, "sleep mode: the served graph has no engine of its own to put to sleep")
        return local, workers

    def _levels(self, local: list, workers: list[str]) -> list[int]:
        instances = self.core.registry.instances()
        return [*(engine.sleep_level for engine in local), *(instances[node].sleep_level for node in workers)]

    async def _until(self, workers: list[str], reached: Callable[[int], bool], change: str) -> None:
        """Waits until every worker engine's heartbeats show a level that `reached` accepts (looked at as each message
        of a worker is handled); a 503 naming those that do not within `wake_timeout_s`."""
        with trio.move_on_after(self.wake_timeout_s):
            while not all(reached(level) for level in self._levels([], workers)):
                await self.core.executor.control.wait_changed()
            return
        instances = self.core.registry.instances()
        late = [node for node in workers if not reached(instances[node].sleep_level)]
        raise ApiError(503, f"the engines {', '.join(late)} in worker processes did not {change} within "
                            f"{self.wake_timeout_s:g} s; retry later", code="unavailable",
                       retry_after_s=self.wake_timeout_s)  # fmt: skip

    # -- the routes -----------------------------------------------------------------------------------------------
    async def _sleep_route(self, http: HttpRequest) -> Response:
        raw = http.query.get("level", "1")
        if not raw.isdigit():
            raise ApiError(400, f"level must be 1 or 2, got {raw!r}", param="level")
        await self.sleep(int(raw))
        return Response({"is_sleeping": True, "level": self.level})

    async def _wake_route(self, http: HttpRequest) -> Response:
        await self.wake_up(self._wake_level(http.query.get("tags")))
        return Response({"is_sleeping": bool(self.level), "level": self.level})

    def _wake_level(self, tags: str | None) -> int:
        """The level vLLM's `tags` (`weights`, `kv_cache`, comma-separated; none: both) wake the engines to: 1 for the
        weights alone, 0 for the KV cache too. A 400 for another tag, or for the KV cache of engines whose weights
        are not loaded."""
        wanted = set(tags.split(",")) if tags else {WEIGHTS, KV_CACHE}
        unknown = sorted(wanted - {WEIGHTS, KV_CACHE})
        if unknown:
            raise ApiError(400, f"tags: {', '.join(unknown)} is not weights or kv_cache", param="tags")
        if KV_CACHE not in wanted:
            return 1
        if WEIGHTS not in wanted and self.level == 2:
            raise ApiError(400, "tags: the engines' weights are not loaded; wake them first (tags=weights)",
                           param="tags")  # fmt: skip
        return 0

    async def _is_sleeping_route(self, _: HttpRequest) -> Response:
        return Response({"is_sleeping": bool(self.level), "level": self.level})
