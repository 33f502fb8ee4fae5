"""Executor behaviour on small operators written for the test (no model): items flow and the graph ends, an operator
that raises turns its items into errors while the graph keeps serving, a Step operator that fails ends what it
held, and every request ends exactly once. Runs on trio's virtual clock (`autojump_clock`)."""

from __future__ import annotations

from typing import Any, ClassVar

import trio

from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import MapOperator, SourceOperator, StepOperator, register_operator
from sagellm.runtime.pipeline.yaml_io import load_pipeline


@register_operator
class TickingSource(SourceOperator):
    """Releases one request every `every` polls, with empty polls in between (a source fed over time); `every: 1`
    releases them back to back."""

    name = "test_exec_ticking_source"

    def __init__(self, count: int = 5, every: int = 2) -> None:
        self.count, self.every, self.polls = count, every, 0

    def poll(self) -> list[Any] | None:
        self.polls += 1
        if self.polls > self.every * self.count:
            return None
        if self.polls % self.every:
            return []
        return [Request(request_id=f"r{self.polls // self.every - 1}", prompt_token_ids=[1, 2, 3])]


@register_operator
class Flaky(MapOperator):
    """Raises on the requests named in `fail`."""

    name = "test_exec_flaky"
    accepts = (Request,)

    def __init__(self, fail: list[str] | None = None) -> None:
        self.fail = set(fail or [])

    def execute(self, item: Request) -> Request:
        if item.request_id in self.fail:
            raise RuntimeError("boom")
        return item


@register_operator
class Counter(StepOperator):
    """An engine stand-in for executor logic only: each request needs `steps` steps, one token per step;
    `crash_at` makes one step raise."""

    name = "test_exec_counter"
    accepts = (Request,)
    steps_taken: ClassVar[int] = 0

    def __init__(self, steps: int = 3, crash_at: int = -1, max_running: int = 2) -> None:
        self.steps, self.crash_at, self.max_running = steps, crash_at, max_running
        self.left: dict[str, int] = {}
        self.calls = 0

    def add(self, item: Request) -> list[Any]:
        self.left[item.request_id] = self.steps
        return []

    def step(self) -> list[Any]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("engine fell over")
        out = []
        for rid in list(self.left):
            self.left[rid] -= 1
            done = self.left[rid] == 0
            out.append(TokenDelta(request_id=rid, token_ids=[7], finish_reason="length" if done else None))
            if done:
                del self.left[rid]
        return out

    def has_work(self) -> bool:
        return bool(self.left)

    def capacity(self) -> int:
        return self.max_running - len(self.left)

    def in_flight(self) -> list[str]:
        return list(self.left)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.left.pop(rid, None)


def graph(flaky: str = "[]", crash_at: int = -1):
    return load_pipeline(f"""
name: behaviour
nodes:
  source: {{op: test_exec_ticking_source, params: {{count: 6}}}}
  flaky: {{op: test_exec_flaky, params: {{fail: {flaky}}}}}
  sort: {{op: policy_sort}}
  engine: {{op: test_exec_counter, params: {{crash_at: {crash_at}}}}}
  metrics: {{op: metrics_sink}}
edges:
  - source -> flaky -> sort -> engine -> metrics
""")


async def test_items_flow_and_the_graph_ends(autojump_clock):
    result = await LocalExecutor(graph()).run()
    assert sorted(result.outcomes) == [f"r{i}" for i in range(6)]
    assert all(o.finish_reason == "length" and o.token_ids == [7, 7, 7] for o in result.outcomes.values())
    assert result.metrics().completed == 6


async def test_an_operator_that_raises_fails_only_its_item(autojump_clock):
    result = await LocalExecutor(graph(flaky="[r1, r4]")).run()
    errors = {rid: o.error for rid, o in result.outcomes.items() if o.error is not None}
    assert sorted(errors) == ["r1", "r4"]
    assert all(e.code == "internal" and "flaky: boom" in e.message for e in errors.values())
    assert sum(o.finish_reason == "length" for o in result.outcomes.values()) == 4


async def test_a_failing_step_ends_what_it_held_and_keeps_serving(autojump_clock):
    executor = LocalExecutor(graph(crash_at=2))
    result = await executor.run()
    failed = sorted(rid for rid, o in result.outcomes.items() if o.error is not None)
    assert failed and all(result.outcomes[rid].error.message == "engine: engine fell over" for rid in failed)
    assert len(result.outcomes) == 6 and all(o.finished for o in result.outcomes.values())
    assert executor.load.in_flight == 0 and executor.load.failed == len(failed)


async def test_the_graph_can_be_cancelled_without_hanging(autojump_clock):
    with trio.move_on_after(0.001):
        await LocalExecutor(graph()).run()  # cancelled mid-run: returns, nothing waits forever


async def test_errors_passing_a_full_engine_do_not_stall_it():  # real clock: fail_after guards a stall
    """A bounded queue sheds into errors that pass through the engine node: they must not leave its feeder
    waiting for room that was freed by draining them (policy_sort with max_len=1 sheds so).

    The six requests come back to back: the engine's first request needs 50 steps, each a trip to a worker thread and
    back through the event loop, so the queue fills and sheds whatever the machine's speed. With the source's idle
    polls in between (5 ms each) the engine could finish each request before the next came, and nothing shed."""
    text = """
name: shed
nodes:
  source: {op: test_exec_ticking_source, params: {count: 6, every: 1}}
  sort: {op: policy_sort, params: {max_len: 1}}
  engine: {op: test_exec_counter, params: {steps: 50, max_running: 1}}
  metrics: {op: metrics_sink}
edges:
  - source -> sort -> engine -> metrics
"""
    with trio.fail_after(30):
        result = await LocalExecutor(load_pipeline(text)).run()
    assert len(result.outcomes) == 6 and all(o.finished for o in result.outcomes.values())
    assert any(o.error is not None and o.error.code == "overloaded" for o in result.outcomes.values())


async def test_slots_a_step_frees_are_filled_by_the_next_step_while_requests_wait():
    """12 requests queued at once before an engine of 2 slots, 3 steps each: the queue always has one routed to the
    engine and waiting in its channel, and a slot a step frees is filled in the very next step (the engine gathers
    what upstream already routed to it before stepping), so every step runs 2 but perhaps the first (an idle engine
    starts with what it has) and then the last (one request left)."""

    class AllAtOnce(TickingSource):
        def poll(self) -> list[Any] | None:
            self.polls += 1
            return (
                [Request(request_id=f"r{i}", prompt_token_ids=[1, 2, 3]) for i in range(12)]
                if self.polls == 1
                else None
            )

    class Recording(Counter):
        def __init__(self) -> None:
            super().__init__(steps=3, max_running=2)
            self.batches: list[int] = []

        def step(self) -> list[Any]:
            self.batches.append(len(self.left))
            return super().step()

    text = """
name: refill
nodes:
  source: {op: test_exec_ticking_source, params: {count: 12, every: 1}}
  sort: {op: policy_sort}
  engine: {op: test_exec_counter}
  metrics: {op: metrics_sink}
edges:
  - source -> sort -> engine -> metrics
"""
    engine = Recording()
    with trio.fail_after(30):
        result = await LocalExecutor(load_pipeline(text), operators={"source": AllAtOnce(), "engine": engine}).run()
    assert len(result.outcomes) == 12 and all(o.error is None for o in result.outcomes.values())
    assert sum(engine.batches) == 36 and all(b == 2 for b in engine.batches[1:-1]), engine.batches
