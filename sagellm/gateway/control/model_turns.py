"""The models waiting for room to load, first come first served: the first in line makes room for itself, the others
wait for it to be done, each woken by an event (a model's status, turn or drain changed), never by polling.

Room means at most `max_loaded` models at once, and the new model's estimate within the memory available now. The
least recently used loaded model is evicted until both hold, an idle one first; when every candidate is busy, the
least recently used drains: new requests for it wait (they load it again after, in their turn), those it runs
finish, then it stops. When that drain outlasts the wait, the load is given up (`NoRoom`: a 503 with Retry-After
naming the busy model) and the model it drained serves again. While every other model is loading, the turn waits for
one to be loaded (the requests that waited for it go in first, holding it busy) or to fail. A model that does not fit
the memory even alone is refused at once. A model whose requests all left gives up its turn (`ModelPool.ready`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from sagellm.common.pulse import Pulse
from sagellm.gateway.control.model_waits import WaitingLines
from sagellm.gateway.control.pooled_model import LOADED, LOADING, PooledModel, gib, load_estimate
from sagellm.gateway.http.errors import ApiError

if TYPE_CHECKING:
    from sagellm.gateway.serving.core import ServingCore


class NoRoom(ApiError):
    """A load given up before its engine started; `why`: `busy` or `memory` (`model_waits`' refusal reasons)."""

    def __init__(self, message: str, why: str, retry_after_s: float) -> None:
        super().__init__(503, message, code="model_not_ready", retry_after_s=retry_after_s)
        self.why = why


class Pool(Protocol):
    """What the turns need of the pool whose models take them (`ModelPool`), its settings read as they are now."""

    models: dict[str, PooledModel]
    core: ServingCore
    lines: WaitingLines
    max_loaded: int | None
    wait_s: float
    available: Callable[[], int | None]

    def busy(self, model: PooledModel) -> bool: ...
    async def unload_now(self, model: PooledModel, reason: str) -> None: ...


class Turns:
    def __init__(self, pool: Pool) -> None:
        """`pool`: whose models take turns, under its settings (`max_loaded`, `available`, `wait_s`)."""
        self.pool = pool
        self.line: list[PooledModel] = []  # first come first: line[0] makes room
        self._change = Pulse()

    def changed(self) -> None:
        """A model's status, turn or drain changed: whoever waits on one looks again."""
        self._change.fire()

    def join(self, model: PooledModel) -> None:
        model.queued, model.turn = True, trio.CancelScope()
        self.line.append(model)
        self.changed()

    def ahead_of(self, model: PooledModel) -> list[str]:
        """The models before `model` in line (none once it is first)."""
        return [m.name for m in self.line[: self.line.index(model)]] if model in self.line else []

    async def take(self, model: PooledModel) -> bool:
        """Waits until `model` is first in line, then makes room for it: True, its status loading; False when its
        turn was given up (`model.turn` cancelled). Raises NoRoom, or what reading its files raised."""
        try:
            with model.turn:
                while self.line[0] is not model:
                    await self._change.wait()
                if model.estimate is None:
                    model.estimate = await trio.to_thread.run_sync(load_estimate, model.spec)
                await self._make_room(model)
                model.status = LOADING
                return True
            return False
        finally:
            model.queued = model.asked = False
            self.line.remove(model)
            self.changed()

    async def _make_room(self, model: PooledModel) -> None:
        assert model.estimate is not None
        pool = self.pool
        while True:
            others = [m for m in pool.models.values() if m is not model and m.status in (LOADED, LOADING)]
            free = pool.available()
            fits_count = pool.max_loaded is None or len(others) < pool.max_loaded
            fits_memory = free is None or model.estimate <= free
            if fits_count and fits_memory:
                return
            victims = [m for m in others if m.status == LOADED and not m.stopping]
            if victims:
                await self._evict(min(victims, key=lambda m: (pool.busy(m), m.last_used)), model)
            elif others:  # each loading or leaving: once loaded (its requests in), it is a victim; or it failed
                await self._change.wait()
            else:
                raise NoRoom(f"no room to load the model {model.name!r}: it needs {gib(model.estimate)} GiB and "
                             f"{gib(free)} GiB are available", "memory", pool.wait_s)  # fmt: skip

    async def _evict(self, victim: PooledModel, model: PooledModel) -> None:
        """Drains `victim` for `model` up to the wait, then unloads it. When it is still busy then (NoRoom), or the
        turn is given up meanwhile, it is given back to its requests, those that came for it meanwhile included."""
        pool = self.pool
        was_draining, unloaded = victim.draining, False
        victim.draining, model.making_room = True, victim.name
        self.changed()
        try:
            with trio.move_on_after(pool.wait_s):
                await pool.core.readiness.until_idle(victim.name)
                if not victim.stopping:  # (else another unload of it is under way: the turn waits for it)
                    await pool.unload_now(victim, f"evicted for {model.name}")
                unloaded = True
        finally:
            model.making_room = None
            if not unloaded and victim.status == LOADED:
                victim.draining = was_draining
                if victim.serving:
                    pool.lines.admit(victim.name)
                self.changed()
        if not unloaded:
            running = pool.core.readiness.requests_of(victim.name)
            raise NoRoom(f"no room to load the model {model.name!r}: the model {victim.name!r} it would replace "
                         f"still runs {running} requests; retry later", "busy", pool.wait_s)  # fmt: skip
