"""Sleep mode's waits (`control.sleep_mode`) on a virtual clock, for an engine in a worker process that only pretends
to sleep: a sleep waits for the request in flight and ends the instant the worker's heartbeat shows the level, and a
request that came meanwhile waits for that sleep to end, then wakes the engine and goes in the instant the worker's
heartbeat shows it awake: each wait is woken by the change it waits for, none at a poll's next beat. (The routes,
real engines and workers: tests/gateway/test_sleep_mode.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from sagellm.common.pulse import Pulse
from sagellm.gateway.control.sleep_mode import SleepMode

HEARTBEAT_S = 0.517  # when the worker's heartbeat shows the level it was told (off a 50 ms poll's beat)
REQUEST_ENDS_AT = 1.013  # the request in flight when the sleep is asked for


class PretendWorkers:
    """The process executor's part sleep mode uses: one worker engine, `w`, whose heartbeat shows the level it was
    told HEARTBEAT_S later; its control channel says when a message of a worker was handled."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.engine = SimpleNamespace(sleep_level=0)
        self.control = self
        self._changed = Pulse()

    def worker_sleepers(self) -> list[str]:
        return ["w"]

    def sleep_workers(self, level: int) -> None:
        self.nursery.start_soon(self._heartbeat, level)

    async def _heartbeat(self, level: int) -> None:
        await trio.sleep(HEARTBEAT_S)
        self.engine.sleep_level = level
        self._changed.fire()

    async def wait_changed(self) -> None:
        await self._changed.wait()


class PretendReadiness:
    """The core's readiness as sleep mode asks it: one request in flight until it ends."""

    def __init__(self) -> None:
        self.running = 1
        self._ended = trio.Event()

    def requests_of(self, model: str | None) -> int:
        return self.running

    async def until_idle(self, model: str | None) -> None:
        if self.running:
            await self._ended.wait()

    async def end_the_request(self) -> None:
        await trio.sleep_until(REQUEST_ENDS_AT)
        self.running = 0
        self._ended.set()


class PretendCore:
    """The serving core's part sleep mode uses: no engine in this process, one request in flight until it ends."""

    def __init__(self, workers: PretendWorkers) -> None:
        self.executor, self.local = workers, None
        self.registry = SimpleNamespace(instances=lambda: {"w": workers.engine})
        self.readiness = PretendReadiness()

    def engine_operators(self) -> list:
        return []


def test_a_sleep_and_the_wake_of_a_request_that_came_meanwhile_end_the_instant_their_changes_are_seen():
    times: dict[str, float] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            workers = PretendWorkers(nursery)
            core = PretendCore(workers)
            mode = SleepMode(core)  # type: ignore[arg-type]

            async def sleep() -> None:
                await mode.sleep(1)
                times["asleep"], times["level"] = trio.current_time(), mode.level

            nursery.start_soon(core.readiness.end_the_request)
            nursery.start_soon(sleep)
            await trio.sleep(0.2)
            assert not mode.serving  # falling asleep: a request waits
            await mode.awake()
            times["awake"] = trio.current_time()
            assert mode.level == 0 and mode.serving

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert times["level"] == 1
    assert times["asleep"] == pytest.approx(REQUEST_ENDS_AT + HEARTBEAT_S, abs=1e-9)
    assert times["awake"] == pytest.approx(REQUEST_ENDS_AT + 2 * HEARTBEAT_S, abs=1e-9)
