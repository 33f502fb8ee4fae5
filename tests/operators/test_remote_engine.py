"""That a drain of an instance of the remote_engine operator ends the instant its last request does (on a virtual
clock). What it sends a server and how it reads the answers: tests/operators/test_openai_wire.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from sagellm.operators.remote_engine import Endpoint, RemoteEngine
from sagellm.runtime.pipeline.messages import Request, RequestError


class SlowLink:
    """An instance reached without HTTP whose requests end `took_s` after they reach it."""

    def __init__(self, took_s: float) -> None:
        self.took_s = took_s

    async def stream(self, request: Request) -> AsyncIterator[RequestError]:
        await trio.sleep(self.took_s)
        yield RequestError(request_id=request.request_id, code="internal", message="done")


def test_a_drain_of_an_instance_ends_the_instant_its_last_request_does():
    async def main() -> float:
        remote = RemoteEngine()
        remote.ctx = SimpleNamespace(instances={}, node_id="remote")  # (what `open` would give it, minus the client)
        remote.attach("e1", "m", Endpoint("", "m", link=SlowLink(1.234)))  # off a 50 ms poll's beat

        async def request() -> None:
            async for _ in remote.serve(Request(request_id="r", prompt="x", instance="e1")):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.sleep(0.5)
            assert remote.ctx.instances["e1"].running == 1
            await remote.until_idle("e1")
            return trio.current_time()

    drained_at = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert drained_at == pytest.approx(1.234, abs=1e-9)
