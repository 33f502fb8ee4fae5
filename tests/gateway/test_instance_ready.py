"""`InstanceRegistry.instance_ready` waits on changes of instance health, not a poll: on trio's virtual clock a waiter
returns at the very instant another task makes an instance healthy (a poll would return at its next tick), gives up
the instant the last instance on its way is lost, and keeps its timeout when nothing changes."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import trio

from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.runtime.pipeline.operator import InstanceStats

WAIT_S = 30.0
CHANGE_AT_S = 1.03  # off any poll period's tick


def registry_of(*instances: InstanceStats) -> tuple[InstanceRegistry, dict[str, InstanceStats]]:
    table = {s.name: s for s in instances}
    local = SimpleNamespace(instances=table, operators={})
    return InstanceRegistry("own", lambda: local), table


async def waited(registry: InstanceRegistry, change: Callable[[], None]) -> tuple[bool, float, float]:
    """instance_ready's answer, when it answered and when `change` ran (in another task, after CHANGE_AT_S)."""
    changed_at = trio.current_time()

    async def later() -> None:
        nonlocal changed_at
        await trio.sleep(CHANGE_AT_S)
        change()
        changed_at = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        ready = await registry.instance_ready(None, WAIT_S)
        answered_at = trio.current_time()
    return ready, answered_at, changed_at


async def test_wakes_the_instant_health_is_set_from_another_task(autojump_clock):
    engine = InstanceStats("engine", healthy=False, starting=True)
    registry, _ = registry_of(engine)

    def up() -> None:
        engine.healthy, engine.starting = True, False

    ready, answered_at, changed_at = await waited(registry, up)
    assert ready and answered_at == changed_at


async def test_gives_up_the_instant_the_last_instance_on_its_way_is_lost(autojump_clock):
    engine = InstanceStats("engine", healthy=False, recovering=True)
    registry, _ = registry_of(engine)

    def given_up() -> None:
        engine.recovering, engine.failed = False, True

    ready, answered_at, changed_at = await waited(registry, given_up)
    assert not ready and answered_at == changed_at


async def test_takes_an_instance_registered_while_it_waits(autojump_clock):
    starting = InstanceStats("engine-0", healthy=False, starting=True)
    registry, table = registry_of(starting)

    def another_ready() -> None:
        table["engine-1"] = InstanceStats("engine-1")

    ready, answered_at, changed_at = await waited(registry, another_ready)
    assert ready and answered_at == changed_at


async def test_times_out_when_nothing_changes(autojump_clock):
    engine = InstanceStats("engine", healthy=False, starting=True)
    registry, _ = registry_of(engine)
    engine.waiting = 3  # not health: wakes no one
    began = trio.current_time()
    assert not await registry.instance_ready(None, WAIT_S)
    assert trio.current_time() - began == WAIT_S


async def test_answers_at_once_without_waiting(autojump_clock):
    began = trio.current_time()
    assert await registry_of(InstanceStats("engine"))[0].instance_ready(None, WAIT_S)
    assert not await registry_of(InstanceStats("engine", healthy=False))[0].instance_ready(None, WAIT_S)
    assert trio.current_time() == began
