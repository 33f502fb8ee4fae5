"""The Stream operator kind, on an operator written for the test (a server stand-in that answers a token a second):
items are served at most `capacity()` at once and each ends once; one that raises or stops without a result ends
with an error while the others go on; a request whose client leaves is cancelled in its task (the operator's own
`finally` runs) and ends with an abort. Runs on trio's virtual clock (`autojump_clock`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, ClassVar

import trio

from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import StreamOperator, register_operator
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.executor.test_executor_behaviour import TickingSource  # noqa: F401  (registers the source)


@register_operator
class Talker(StreamOperator):
    name = "test_exec_talker"
    accepts = (Request,)
    serving: ClassVar[int] = 0
    most: ClassVar[int] = 0
    closed: ClassVar[list[str]] = []

    def __init__(self, tokens: int = 3, at_once: int = 2, fail: str = "", mute: str = "") -> None:
        """`fail`: the request it raises on midway; `mute`: the one whose stream stops without a result."""
        self.tokens, self.at_once, self.fail, self.mute = tokens, at_once, fail, mute

    def capacity(self) -> int:
        return self.at_once

    async def serve(self, item: Request) -> AsyncIterator[Any]:
        cls = type(self)
        cls.serving += 1
        cls.most = max(cls.most, cls.serving)
        try:
            for i in range(self.tokens):
                await trio.sleep(1)
                if item.request_id == self.fail and i == 1:
                    raise RuntimeError("server fell over")
                if item.request_id == self.mute and i == 1:
                    return
                done = "length" if i == self.tokens - 1 else None
                yield TokenDelta(request_id=item.request_id, token_ids=[7], finish_reason=done)
        finally:
            cls.serving -= 1
            cls.closed.append(item.request_id)


def graph(**params: Any):
    args = ", ".join(f"{k}: {v!r}" for k, v in params.items())
    return load_pipeline(f"""
name: streams
nodes:
  source: {{op: test_exec_ticking_source, params: {{count: 6, every: 1}}}}
  talker: {{op: test_exec_talker, params: {{{args}}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> talker -> metrics
""")


async def test_items_are_served_at_most_capacity_at_once_and_end_once(autojump_clock):
    Talker.most = 0
    result = await LocalExecutor(graph(at_once=2)).run()
    assert sorted(result.outcomes) == [f"r{i}" for i in range(6)]
    assert all(o.finish_reason == "length" and o.token_ids == [7, 7, 7] for o in result.outcomes.values())
    assert Talker.most == 2 and Talker.serving == 0


async def test_a_stream_that_raises_or_stops_early_ends_with_an_error_alone(autojump_clock):
    result = await LocalExecutor(graph(fail="r1", mute="r4")).run()
    errors = {rid: o.error for rid, o in result.outcomes.items() if o.error is not None}
    assert sorted(errors) == ["r1", "r4"] and all(e.code == "internal" for e in errors.values())
    assert "talker: server fell over" in errors["r1"].message
    assert "ended without a result" in errors["r4"].message
    assert sum(o.finish_reason == "length" for o in result.outcomes.values()) == 4


async def test_a_cancelled_request_stops_in_its_task_and_ends_as_aborted(autojump_clock):
    Talker.closed = []
    executor = LocalExecutor(graph(tokens=10, at_once=6))
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)  # its operators open in a thread, which the virtual clock does not wait for
        await trio.sleep(2.5)  # every request is two tokens in
        executor.cancel("r2")
        await trio.sleep(0.1)
        assert "r2" in Talker.closed and len(Talker.closed) == 1  # its finally ran at once; the others go on
    outcomes = executor.outcomes
    assert outcomes["r2"].finish_reason == "abort" and outcomes["r2"].token_ids == [7, 7]
    assert all(outcomes[f"r{i}"].finish_reason == "length" for i in range(6) if i != 2)
