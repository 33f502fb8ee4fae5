"""A request on its way in holds its model busy until it is submitted or its hold expires (`ModelReadiness`)."""

from __future__ import annotations

import itertools

import trio

from sagellm.gateway.serving import readiness
from sagellm.gateway.serving.readiness import HOLD_S, ModelReadiness


async def test_a_hold_expiring_between_the_count_and_the_wait_ends_the_wait(monkeypatch) -> None:
    """Found by the API fuzz: `until_idle` counted a hold still live, then the hold had expired when it computed how
    long to wait for it: a negative timeout (ValueError, a 500 on POST /sleep)."""
    ticks = itertools.count()
    monkeypatch.setattr(readiness.time, "monotonic", lambda: next(ticks) * (HOLD_S / 2 + 0.01))  # each look is later
    ready = ModelReadiness(registry=None)
    ready.hold(None)  # expires at HOLD_S + 0.02: alive at the count (tick 1), gone at the wait's deadline (tick 2)
    with trio.fail_after(5):
        await ready.until_idle(None)
    assert ready.requests_of(None) == 0
