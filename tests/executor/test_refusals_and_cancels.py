"""A refusal never waits behind a full engine, and a request whose client left ends where it waits: the gateway's
front (http_source, admission, the policy queue) before an engine stand-in that holds what it takes until told to
finish. On trio's virtual clock, so "at once" means within the same instant."""

from __future__ import annotations

from typing import Any

import trio

from sagellm.operators.http_source import HttpSource
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.operator import StepOperator, register_operator
from sagellm.runtime.pipeline.yaml_io import load_pipeline

GRAPH = """
name: front
nodes:
  source: {op: prompt_source}
  admission: {op: admission, params: {max_queue: 3}}
  sort: {op: policy_sort}
  engine: {op: test_holding_engine}
  sink: {op: metrics_sink}
edges:
  - source -> admission -> sort -> engine -> sink
"""


@register_operator
class HoldingEngine(StepOperator):
    """Takes one request at a time and holds it until `finish` is set (then a step ends all it holds); until then its
    steps make nothing (an engine busy with a long request)."""

    name = "test_holding_engine"
    accepts = (Request,)
    inline = True

    def __init__(self) -> None:
        self.held: list[str] = []
        self.added: list[str] = []
        self.finish = False

    def add(self, item: Request) -> list[Any]:
        self.held.append(item.request_id)
        self.added.append(item.request_id)
        return []

    def step(self) -> list[Any]:
        if not self.finish:
            return []
        done, self.held = self.held, []
        return [TokenDelta(request_id=rid, token_ids=[1], finish_reason="length") for rid in done]

    def has_work(self) -> bool:
        return bool(self.held)

    def capacity(self) -> int:
        return 1 - len(self.held)

    def in_flight(self) -> list[str]:
        return list(self.held)

    def abort(self, request_ids: list[str]) -> None:
        self.held = [rid for rid in self.held if rid not in request_ids]


async def _run(body) -> tuple[dict[str, Any], HoldingEngine]:
    graph = load_pipeline(GRAPH)
    source = HttpSource()
    executor = LocalExecutor(graph, operators={"source": source}, keep_outcomes=False)
    ended: dict[str, Any] = {}
    executor.ledger.on_leaf_item = lambda item: ended.setdefault(item.request_id, item) if is_terminal(item) else None
    async with trio.open_nursery() as nursery:
        await nursery.start(executor.run)
        source.wake = executor.wake_sources
        engine = executor.operators["engine"]
        await body(source, executor, engine, ended)
        engine.finish = True
        source.finish()
    return ended, engine


def _request(rid: str) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1, 2, 3])


async def _settle() -> None:
    for _ in range(20):
        await trio.lowlevel.checkpoint()


async def test_a_refusal_passes_a_full_engine_at_once(autojump_clock):
    async def body(source, executor, engine, ended):
        for rid in ("a", "b", "c"):  # one in the engine, two in the queue: the bound of 3 is full
            source.submit(_request(rid))
        await _settle()
        assert engine.held == ["a"] and executor.load.in_flight == 3
        start = trio.current_time()
        source.submit(_request("d"))
        await _settle()
        assert isinstance(ended.get("d"), RequestError) and ended["d"].code == "overloaded"
        assert trio.current_time() == start  # not when a slot frees: the engine still holds "a"
        assert ended["d"].retry_after_s is not None and ended["d"].retry_after_s >= 1

    ended, engine = await _run(body)
    assert sorted(ended) == ["a", "b", "c", "d"] and engine.added == ["a", "b", "c"]


async def test_a_cancelled_request_leaves_the_queue_at_once(autojump_clock):
    async def body(source, executor, engine, ended):
        for rid in ("a", "b", "c"):
            source.submit(_request(rid))
        await _settle()
        executor.cancel("b")  # popped, its send waiting for the engine to have room
        executor.cancel("c")  # in the policy queue
        await _settle()
        assert ended["b"].finish_reason == ended["c"].finish_reason == "abort" and executor.load.in_flight == 1
        source.submit(_request("d"))

    ended, engine = await _run(body)
    assert engine.added == ["a", "d"] and ended["a"].finish_reason == ended["d"].finish_reason == "length"


def test_a_request_not_yet_polled_is_taken_back():
    source = HttpSource()
    source.submit(_request("a"))
    source.submit(_request("b"))
    assert source.withdraw("a") and not source.withdraw("a") and len(source) == 1
    assert [r.request_id for r in source.poll()] == ["b"]


async def test_the_room_a_cancelled_request_leaves_in_the_engine_is_taken_by_the_next(autojump_clock):
    """The engine full with "a", "b" waits for its room; "a"'s client leaves, the engine aborts it (sending its
    terminal on, a moment in which "b" may arrive): "b" goes in at once, not whenever something else wakes the
    engine (nothing would: a request lost until its client gave up)."""

    async def body(source, executor, engine, ended):
        source.submit(_request("a"))
        await _settle()
        source.submit(_request("b"))
        await _settle()
        assert engine.held == ["a"]
        start = trio.current_time()
        executor.cancel("a")
        await _settle()
        assert ended["a"].finish_reason == "abort" and engine.held == ["b"] and trio.current_time() == start

    ended, engine = await _run(body)
    assert engine.added == ["a", "b"] and ended["b"].finish_reason == "length"
