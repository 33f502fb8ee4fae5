"""Sleep mode, vLLM's routes (admin key), for the engines of the gateway's graph:

    POST /sleep?level=1|2   level 1 frees their KV caches (weights kept: it wakes at once), level 2 their weights
                            too (it wakes by loading them again)
    POST /wake_up           they serve again
    GET  /is_sleeping       {"is_sleeping": true|false, "level": 0|1|2}

A sleep first lets the requests in flight finish (new ones wait meanwhile, up to `drain_timeout_s`; then the sleep is
refused with a 503, and they go on). A request that arrives while the engines sleep wakes them and waits for it (up to
the failover's retry wait), so a sleeping server still answers every request, only later. An engine that can free its
KV cache only by closing (a parallel group, a speculator with caches of its own, a GPU) sleeps at level 2; the level
reported is the deepest any engine reached."""

from __future__ import annotations

import time

import structlog
import trio

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore
from sagellm.operators.engine import ENGINE_OPERATORS

log = structlog.get_logger("sagellm.gateway")


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
            engines = self._engines()
            if self.level >= level:
                return
            self._falling_asleep = True
            try:
                await self._drain()
                for engine in engines:
                    await trio.to_thread.run_sync(engine.sleep, level)
            finally:
                self._falling_asleep = False
            self.level = max(engine.sleep_level for engine in engines)
        log.info("gateway_asleep", level=self.level, engines=[e.ctx.node_id for e in engines])

    async def wake_up(self) -> None:
        async with self._changing:
            if not self.level:
                return
            began = time.monotonic()
            for engine in self._engines():
                await trio.to_thread.run_sync(engine.wake_up)
            self.level = 0
        log.info("gateway_awake", wake_s=round(time.monotonic() - began, 2))

    async def awake(self) -> None:
        """A request's wait: returns once the engines serve, waking them if they sleep. Raises ApiError 503 when
        that takes longer than `wake_timeout_s`."""
        if not self.level and not self._falling_asleep:
            return
        with trio.move_on_after(self.wake_timeout_s):
            while self._falling_asleep:
                await trio.sleep(0.05)
            await self.wake_up()
            return
        raise ApiError(503, f"the engines are waking up (not done after {self.wake_timeout_s:g} s); retry later",
                       code="unavailable", retry_after_s=self.wake_timeout_s)  # fmt: skip

    async def _drain(self) -> None:
        with trio.move_on_after(self.drain_timeout_s):
            while self.core.requests_of(None):
                await trio.sleep(0.05)
            return
        running = self.core.requests_of(None)
        raise ApiError(503, f"not asleep: {running} requests still ran after {self.drain_timeout_s:g} s",
                       code="unavailable", retry_after_s=self.drain_timeout_s)  # fmt: skip

    def _engines(self) -> list:
        """The graph's engine operators; a 400 where they cannot sleep from here (in worker processes)."""
        local = self.core.engine_operators()
        engine_nodes = [n.id for n in self.core.graph.nodes.values() if n.op in ENGINE_OPERATORS]
        elsewhere = sorted(set(engine_nodes) - {op.ctx.node_id for op in local})
        if elsewhere:
            raise ApiError(400, f"sleep mode: the engines {', '.join(elsewhere)} run in worker processes, which do not "
                                "sleep yet; a graph whose engines run in the gateway's process does")  # fmt: skip
        if not local:
            raise ApiError(400, "sleep mode: the served graph has no engine of its own to put to sleep")
        return local

    # -- the routes -----------------------------------------------------------------------------------------------
    async def _sleep_route(self, http: HttpRequest) -> Response:
        raw = http.query.get("level", "1")
        if not raw.isdigit():
            raise ApiError(400, f"level must be 1 or 2, got {raw!r}", param="level")
        await self.sleep(int(raw))
        return Response({"is_sleeping": True, "level": self.level})

    async def _wake_route(self, http: HttpRequest) -> Response:
        tags = http.query.get("tags")
        if tags is not None:
            raise ApiError.unsupported("tags", "an engine wakes whole (its weights and KV cache together)")
        await self.wake_up()
        return Response({"is_sleeping": False, "level": 0})

    async def _is_sleeping_route(self, _: HttpRequest) -> Response:
        return Response({"is_sleeping": bool(self.level), "level": self.level})
