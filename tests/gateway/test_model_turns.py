"""The models on demand's turns and waits (`control.model_turns`, `control.model_waits`) on a virtual clock, with
engines that only pretend to load: models load in the order their first requests came, every waiting request is
served and none refused, the load counter counts loads alone; a request is let in the instant its model's engine is
ready (an event, not a poll); a wait that runs out is a 503 saying what it waited for and gives its model's turn up
(the model it drained serves again); a client that leaves its wait leaves the line; a load that fails refuses those
waiting, counted as a failed load; a loaded model whose engine fails for good is forgotten the instant it fails."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from sagellm.common.pulse import Pulse
from sagellm.gateway.control.engine_spec import FAILED, READY, EngineSpec, ManagedEngine
from sagellm.gateway.control.model_pool import ModelPool
from sagellm.gateway.http.errors import ApiError

LOAD_S = 2.0  # how long a pretend engine takes to start


class PretendEngines:
    """The engine manager's part the pool uses: each engine ready (or failed, for the models in `failing`) `load_s`
    after its start."""

    def __init__(self, nursery: trio.Nursery, failing: tuple[str, ...] = (), load_s: float = LOAD_S) -> None:
        self.nursery, self.failing, self.load_s = nursery, failing, load_s
        self.engines: dict[str, Any] = {}
        self.started: list[str] = []
        self._ids = itertools.count(1)

    async def start(self, spec: EngineSpec) -> Any:
        name = spec.served_model_name or spec.model
        engine = ManagedEngine(f"e{next(self._ids)}", spec, "", None)
        self.engines[engine.id] = engine
        self.started.append(name)
        self.nursery.start_soon(self._settle, engine, name)
        return engine

    async def _settle(self, engine: Any, name: str) -> None:
        await trio.sleep(self.load_s)
        engine.state, engine.last_error = (FAILED, "no such architecture") if name in self.failing else (READY, None)

    async def stop(self, engine_id: str, *, force: bool = False) -> None:
        self.engines.pop(engine_id)


class PretendReadiness:
    """The serving core's `readiness` as the pool asks it: requests held on their way in, then running, by model."""

    def __init__(self) -> None:
        self.held: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self._fewer = Pulse()

    def hold(self, model: str) -> None:
        self.held[model] += 1

    def requests_of(self, model: str) -> int:
        return self.held[model] + self.running[model]

    async def until_idle(self, model: str) -> None:
        while self.requests_of(model):
            await self._fewer.wait()

    async def serve(self, pool: ModelPool, model: str, duration_s: float, served: list[str]) -> None:
        """A request: waits for its model, runs `duration_s`, ends."""
        await pool.ready(model)
        self.held[model] -= 1
        self.running[model] += 1
        await trio.sleep(duration_s)
        self.running[model] -= 1
        self._fewer.fire()
        served.append(model)


def _pool(engines: PretendEngines, readiness: PretendReadiness, names: str, wait_s: float = 60.0) -> ModelPool:
    specs = {name: EngineSpec(model=f"/models/{name}", served_model_name=name) for name in names}
    core = SimpleNamespace(readiness=readiness)
    pool = ModelPool(engines, core, specs, max_loaded=1, wait_s=wait_s, available=lambda: None)
    for model in pool.models.values():
        model.estimate = 0  # (no files to read)
    return pool


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_models_load_in_the_order_their_first_requests_came_and_every_waiting_request_is_served(clock):
    served: list[str] = []

    async def main() -> tuple[ModelPool, PretendEngines]:
        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery), PretendReadiness()
            pool = _pool(engines, readiness, "abc")
            await nursery.start(pool.run)
            async with trio.open_nursery() as requests:
                for at, model in [(0.0, "a"), (0.1, "b"), (0.1, "b"), (0.2, "c"), (0.3, "a"), (0.4, "b"), (0.5, "c")]:
                    await trio.sleep_until(at)
                    requests.start_soon(readiness.serve, pool, model, 1.0, served)
            nursery.cancel_scope.cancel()
        return pool, engines

    pool, engines = trio.run(main, clock=clock)
    assert engines.started == ["a", "b", "c"]  # first come first served: one load each, none refused
    assert served == ["a", "a", "b", "b", "b", "c", "c"]  # a's two, then b's three, then c's two
    assert dict(pool.loads) == {("a", "loaded"): 1, ("b", "loaded"): 1, ("c", "loaded"): 1}
    assert not pool.lines.refusals and pool.lines.waits == Counter(a=2, b=3, c=2)


def test_a_request_is_let_in_the_instant_its_models_engine_is_ready(clock):
    async def main() -> float:
        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery, load_s=math.inf), PretendReadiness()
            pool = _pool(engines, readiness, "a")
            await nursery.start(pool.run)

            async def ready_at(when: float) -> None:
                await trio.sleep_until(when)
                engines.engines["e1"].state = READY

            nursery.start_soon(ready_at, 1.234)  # off a 50 ms poll's beat
            await pool.ready("a")
            let_in = trio.current_time()
            nursery.cancel_scope.cancel()
        return let_in

    assert trio.run(main, clock=clock) == pytest.approx(1.234, abs=1e-9)


def test_a_wait_that_runs_out_says_what_it_waited_for_and_its_model_gives_its_turn_up(clock):
    async def main() -> tuple[ModelPool, ApiError, PretendEngines]:
        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery), PretendReadiness()
            pool = _pool(engines, readiness, "ab", wait_s=5.0)
            await nursery.start(pool.run)
            nursery.start_soon(readiness.serve, pool, "a", 30.0, [])  # a long request of a
            await trio.sleep(LOAD_S + 1)
            with pytest.raises(ApiError) as refused:
                await pool.ready("b")  # its turn drains a, which is still busy when the wait runs out
            await trio.sleep(0.1)
            assert pool.models["a"].serving and not pool.models["b"].queued  # a serves again; b left the line
            nursery.cancel_scope.cancel()
        return pool, refused.value, engines

    pool, refused, engines = trio.run(main, clock=clock)
    assert refused.http_status == 503 and refused.retry_after_s
    assert "the model 'a'" in refused.message and "still runs 1 requests" in refused.message
    assert engines.started == ["a"] and dict(pool.loads) == {("a", "loaded"): 1}
    # (its wait and the drain's run out at the same virtual instant: either says it)
    assert list(pool.lines.refusals.elements()) in ([("b", "timeout")], [("b", "busy")])


def test_a_client_that_leaves_its_wait_leaves_the_line_and_the_next_model_takes_the_turn(clock):
    served: list[str] = []

    async def main() -> tuple[ModelPool, PretendEngines]:
        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery), PretendReadiness()
            pool = _pool(engines, readiness, "abc")
            await nursery.start(pool.run)
            nursery.start_soon(readiness.serve, pool, "a", 1.0, served)
            await trio.sleep(0.1)
            with trio.move_on_after(0.5):  # b's client leaves while a loads
                await pool.ready("b")
            await trio.sleep(0.1)
            assert pool.lines.waiting("b") == 0 and not pool.models["b"].queued
            await readiness.serve(pool, "c", 1.0, served)
            nursery.cancel_scope.cancel()
        return pool, engines

    pool, engines = trio.run(main, clock=clock)
    assert engines.started == ["a", "c"] and served == ["a", "c"]
    assert not pool.lines.refusals


def test_a_load_that_fails_refuses_those_waiting_and_counts_as_a_failed_load(clock):
    async def main() -> list[ApiError]:
        errors: list[ApiError] = []

        async def ask(pool: ModelPool) -> None:
            try:
                await pool.ready("a")
            except ApiError as error:
                errors.append(error)

        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery, failing=("a",)), PretendReadiness()
            pool = _pool(engines, readiness, "a")
            await nursery.start(pool.run)
            async with trio.open_nursery() as requests:
                for _ in range(3):
                    requests.start_soon(ask, pool)
            assert dict(pool.loads) == {("a", "failed"): 1}
            assert pool.lines.refusals == Counter({("a", "failed"): 3})
            assert pool.status("a") == {"value": "failed", "failed": True, "error": "no such architecture"}
            nursery.cancel_scope.cancel()
        return errors

    errors = trio.run(main, clock=clock)
    assert [(e.http_status, e.code) for e in errors] == [(503, "model_load_failed")] * 3


def test_a_loaded_model_whose_engine_fails_for_good_is_forgotten_the_instant_it_fails(clock):
    async def main() -> tuple[ModelPool, PretendEngines, float]:
        async with trio.open_nursery() as nursery:
            engines, readiness = PretendEngines(nursery), PretendReadiness()
            pool = _pool(engines, readiness, "a")
            await nursery.start(pool.run)
            await pool.ready("a", hold=False)
            await trio.sleep_until(5.123)  # off the idle check's beat
            engine = engines.engines["e1"]
            engine.last_error, engine.state = "died 3 times", FAILED
            await trio.testing.wait_all_tasks_blocked()
            forgotten_at = trio.current_time()
            nursery.cancel_scope.cancel()
        return pool, engines, forgotten_at

    pool, engines, forgotten_at = trio.run(main, clock=clock)
    assert forgotten_at == pytest.approx(5.123, abs=1e-9)
    assert pool.status("a") == {"value": "failed", "failed": True, "error": "died 3 times"}
    assert pool.models["a"].engine_id is None and not engines.engines  # its engine stopped: the next request loads
