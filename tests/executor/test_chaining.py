"""Operator chaining in the local executor, on small operators written for the test (no model): a Map node fed only
by nodes the executor runs has no task and no channel and runs in its upstream's task, delivering exactly what it did
as a task of its own; its end of input comes when all its upstreams ended; an operator that raises fails only its
item; a node fed from another process keeps its inbox and task; and a source whose items all end in chained nodes
still yields to other tasks once per item. Runs on trio's virtual clock (`autojump_clock`) where sources idle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, TokenDelta
from sagellm.runtime.pipeline.operator import MapOperator, SourceOperator, register_operator
from sagellm.runtime.pipeline.yaml_io import load_pipeline

COUNT = 20


@register_operator
class BurstSource(SourceOperator):
    """`count` requests in one poll after `idle_polls` empty ones, then the end; remembers the task it polls in, and
    calls `on_release` (set by a test) as it releases them."""

    name = "test_chain_burst_source"

    def __init__(self, count: int = COUNT, prefix: str = "r", idle_polls: int = 0) -> None:
        self.count, self.prefix, self.idle_polls = count, prefix, idle_polls
        self.polls = 0
        self.task: trio.lowlevel.Task | None = None
        self.on_release: Callable[[], None] | None = None

    def poll(self) -> list[Any] | None:
        self.polls += 1
        self.task = trio.lowlevel.current_task()
        if self.polls <= self.idle_polls:
            return []
        if self.polls > self.idle_polls + 1:
            return None
        if self.on_release is not None:
            self.on_release()
        return [Request(request_id=f"{self.prefix}{i}", prompt_token_ids=[i]) for i in range(self.count)]


@register_operator
class Answer(MapOperator):
    """Answers a request with its one finished delta (its first prompt token); raises on the requests named in
    `fail`; remembers the tasks it ran in."""

    name = "test_chain_answer"
    accepts = (Request,)

    def __init__(self, fail: list[str] | None = None) -> None:
        self.fail = set(fail or [])
        self.tasks: set[trio.lowlevel.Task] = set()

    def execute(self, item: Request) -> TokenDelta:
        self.tasks.add(trio.lowlevel.current_task())
        if item.request_id in self.fail:
            raise RuntimeError("boom")
        return TokenDelta(request_id=item.request_id, token_ids=item.prompt_token_ids[:1], finish_reason="stop")


@register_operator
class Record(MapOperator):
    """Passes every item on, keeping its request id in arrival order, the tasks it ran in, and what `probe` (set by
    a test) says at each item."""

    name = "test_chain_record"

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.tasks: set[trio.lowlevel.Task] = set()
        self.probe: Callable[[], Any] | None = None
        self.probed: list[Any] = []

    def execute(self, item: Any) -> Any:
        self.seen.append(item.request_id)
        self.tasks.add(trio.lowlevel.current_task())
        if self.probe is not None:
            self.probed.append(self.probe())
        return item


def chain(fail: str = "[]") -> str:
    return f"""
name: chain
nodes:
  source: {{op: test_chain_burst_source}}
  answer: {{op: test_chain_answer, params: {{fail: {fail}}}}}
  record: {{op: test_chain_record}}
edges:
  - source -> answer -> record
"""


def summary(outcomes: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
    """Each request's outcome without its timestamps."""
    return {
        rid: (o.token_ids, o.finish_reason, o.error and (o.error.code, o.error.message)) for rid, o in outcomes.items()
    }


async def test_a_chain_of_maps_runs_in_the_source_task_and_delivers_every_item_once_in_order() -> None:
    executor = LocalExecutor(load_pipeline(chain()))
    with trio.fail_after(30):
        result = await executor.run()

    assert executor.chained == {"answer", "record"}
    assert not executor._inbox_recv  # no channel at all: a source has none, the chained maps neither
    with pytest.raises(KeyError, match="chained"):
        executor.inbox("answer")
    source, answer, record = (result.operators[n] for n in ("source", "answer", "record"))
    assert answer.tasks == record.tasks == {source.task}  # no task of their own
    assert record.seen == [f"r{i}" for i in range(COUNT)]
    assert summary(result.outcomes) == {f"r{i}": ([i], "stop", None) for i in range(COUNT)}
    assert executor.load.completed == COUNT and executor.load.in_flight == 0


async def test_chained_maps_deliver_what_maps_in_tasks_of_their_own_did(monkeypatch: pytest.MonkeyPatch) -> None:
    chained = LocalExecutor(load_pipeline(chain(fail="[r3]")))
    with trio.fail_after(30):
        with_chaining = await chained.run()
        monkeypatch.setattr(LocalExecutor, "_chainable", lambda self, node_id: False)
        unchained = LocalExecutor(load_pipeline(chain(fail="[r3]")))
        without = await unchained.run()

    assert chained.chained == {"answer", "record"} and unchained.chained == set()
    source, answer = without.operators["source"], without.operators["answer"]
    assert source.task not in answer.tasks  # the map ran in a task of its own
    assert summary(with_chaining.outcomes) == summary(without.outcomes)
    assert with_chaining.operators["record"].seen == without.operators["record"].seen


async def test_a_map_with_two_upstreams_ends_only_when_both_have(autojump_clock) -> None:
    """The fast source ends at once, the slow one releases its requests three idle polls later: they must still
    pass `merge` and reach the sink through the queue's task (had `merge` closed its output when the fast source
    ended, the slow source's sends would fail on a closed channel)."""
    text = """
name: merge
nodes:
  fast: {op: test_chain_burst_source, params: {count: 2, prefix: f}}
  slow: {op: test_chain_burst_source, params: {count: 2, prefix: s, idle_polls: 3}}
  merge: {op: test_chain_answer}
  sort: {op: policy_sort}
  sink: {op: test_chain_record}
edges:
  - fast -> merge
  - slow -> merge
  - merge -> sort -> sink
"""
    slow = BurstSource(count=2, prefix="s", idle_polls=3)
    executor = LocalExecutor(load_pipeline(text), operators={"slow": slow})
    open_edges_at_slow_release: list[int] = []
    slow.on_release = lambda: open_edges_at_slow_release.append(executor._open_chained_edges["merge"])
    result = await executor.run()  # no fail_after: the virtual clock jumps while operators open in threads

    assert executor.chained == {"merge", "sink"}
    assert open_edges_at_slow_release == [1]  # the fast source had ended; merge was still open for the slow one
    assert executor._open_chained_edges == {"merge": 0, "sink": 0}
    assert result.operators["sink"].seen == ["f0", "f1", "s0", "s1"]
    assert summary(result.outcomes) == {
        rid: ([i], "stop", None) for rid, i in (("f0", 0), ("f1", 1), ("s0", 0), ("s1", 1))
    }


async def test_an_exception_in_a_chained_operator_fails_only_its_item() -> None:
    executor = LocalExecutor(load_pipeline(chain(fail="[r1, r4]")))
    with trio.fail_after(30):
        result = await executor.run()

    assert "answer" in executor.chained
    errors = {rid: o.error for rid, o in result.outcomes.items() if o.error is not None}
    assert sorted(errors) == ["r1", "r4"]
    assert all(e.code == "internal" and e.message == "answer: boom" for e in errors.values())
    assert sum(o.finish_reason == "stop" for o in result.outcomes.values()) == COUNT - 2
    assert result.operators["record"].seen == [f"r{i}" for i in range(COUNT)]  # the errors went on down the chain


REMOTE_FED = """
name: remote-fed
nodes:
  remote_source: {op: test_chain_burst_source, params: {count: 2, prefix: x}, placement: "process:w"}
  local_source: {op: test_chain_burst_source, params: {count: 2, prefix: l}}
  merge: {op: test_chain_answer}
  sink: {op: test_chain_record}
edges:
  - remote_source -> merge
  - local_source -> merge
  - merge -> sink
"""


async def test_a_map_fed_from_another_process_keeps_its_inbox_and_task() -> None:
    """As the process executor builds it: this process runs all but `remote_source`, whose items come through
    `inbox("merge")` (the bridge's way in), so `merge` is not chained; `sink`, fed by `merge` alone, is."""
    executor = LocalExecutor(load_pipeline(REMOTE_FED), nodes=["local_source", "merge", "sink"])
    await executor.open_operators()
    assert executor.chained == {"sink"}
    bridged = executor.inbox("merge")

    async def bridge_in() -> None:  # what the bridge does with another process's items, then its End
        async with bridged:
            for i in range(2):
                await bridged.send(Request(request_id=f"x{i}", prompt_token_ids=[i]))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge_in)
            result = await executor.run()

    local_source, merge, sink = (result.operators[n] for n in ("local_source", "merge", "sink"))
    assert len(merge.tasks) == 1 and local_source.task not in merge.tasks  # a task of its own
    assert sink.tasks == merge.tasks  # chained into it
    assert sorted(sink.seen) == ["l0", "l1", "x0", "x1"]
    assert summary(result.outcomes) == {
        rid: ([i], "stop", None) for rid, i in (("l0", 0), ("l1", 1), ("x0", 0), ("x1", 1))
    }
    everything = LocalExecutor(load_pipeline(REMOTE_FED))
    await everything.open_operators()
    assert everything.chained == {"merge", "sink"}  # the same graph all in one process


async def test_a_source_whose_items_end_in_chained_nodes_still_yields_per_item() -> None:
    """Its sends pass no channel (the chained leaf takes each item in the source's task), so the source must yield
    by itself once per item: a task spinning beside it runs between any two items."""
    text = """
name: to-leaf
nodes:
  source: {op: test_chain_burst_source}
  record: {op: test_chain_record}
edges:
  - source -> record
"""
    record = Record()
    executor = LocalExecutor(load_pipeline(text), operators={"record": record})
    spins = 0
    record.probe = lambda: spins

    async def spin() -> None:
        nonlocal spins
        while True:
            spins += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(spin)
            await executor.run()
            nursery.cancel_scope.cancel()

    assert executor.chained == {"record"} and len(record.seen) == COUNT
    # one item per scheduling batch, and the spinner runs once in each: it ran at least once between most pairs
    assert record.probed[-1] - record.probed[0] >= COUNT - 2
