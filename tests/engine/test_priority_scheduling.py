"""The engine's `priority` scheduling policy (vLLM's `--scheduling-policy priority`): waiting requests start lowest
priority value first, arrival order among equals; the lowest running request is the one preempted when the KV cache
runs out; a waiting request preempts running ones below it for a seat or blocks; a preempted request keeps its place.
`fcfs` (the default) keeps the arrival order and preempts the newest (tests/engine/test_scheduler.py)."""

from __future__ import annotations

import argparse

import pytest

from sagellm.cli.engine_flags import add_engine_arguments, engine_settings
from sagellm.common.errors import FieldError
from sagellm.operators.engine import EngineOperator
from sagellm.runtime.engine.config import ENGINE_FIELDS, SCHEDULING_POLICIES, EngineConfig
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.request_queue import QUEUES, FcfsQueue, PriorityQueue
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence, SequenceStatus
from sagellm.runtime.pipeline.spec import PipelineError
from sagellm.runtime.pipeline.yaml_io import load_pipeline
from tests.tiny_models import make_tiny_llama


def make(policy: str, num_blocks: int = 64, max_num_seqs: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 256, num_blocks, 4, scheduling_policy=policy))


def seq(request_id: str, n: int, priority: int, arrival: float, start: int = 0) -> Sequence:
    return Sequence(
        request_id, list(range(start, start + n)), SamplingParams(), priority=priority, arrival_time=arrival
    )


def step(s: Scheduler):
    batch = s.schedule()
    for sampled in s.complete_step(batch):
        sampled.append_token(1)
    return batch


def ids(seqs) -> list[str]:
    return [x.request_id for x in seqs]


# -- the queues ---------------------------------------------------------------------------------------------------
def test_the_priority_queue_serves_lowest_first_and_arrivals_in_turn_among_equals():
    q = PriorityQueue()
    for x in (seq("low", 4, 2, 1.0), seq("b", 4, 1, 2.0), seq("high", 4, 0, 3.0), seq("c", 4, 1, 2.0)):
        q.add(x)
    assert ids(q) == ["high", "b", "c", "low"]  # b and c tie on (priority, arrival): in the order they came
    assert q.peek().request_id == "high" and q.pop().request_id == "high" and len(q) == 3


def test_a_preempted_sequence_goes_back_ahead_of_its_equals_and_behind_higher_ones():
    q = PriorityQueue()
    b, c = seq("b", 4, 1, 2.0), seq("c", 4, 1, 3.0)
    q.add(seq("high", 4, 0, 5.0))
    q.add(b)
    q.add(c)
    q.prepend(seq("a", 4, 1, 1.0))  # arrived first: ahead of b and c, still behind a higher priority
    q.prepend(seq("b2", 4, 1, 2.0))  # ties b: it was running, so it goes first
    assert ids(q) == ["high", "a", "b2", "b", "c"]
    q.remove(b)
    assert ids(q) == ["high", "a", "b2", "c"]


def test_the_fcfs_queue_ignores_priority_and_puts_a_preempted_sequence_first():
    q = FcfsQueue()
    q.add(seq("a", 4, 2, 1.0))
    q.add(seq("b", 4, 0, 2.0))
    q.prepend(seq("c", 4, 5, 3.0))
    assert ids(q) == ["c", "a", "b"]


# -- the scheduler ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("policy", "order"), [("fcfs", ["low", "mid", "high"]), ("priority", ["high", "mid", "low"])])
def test_waiting_requests_start_in_the_policy_s_order(policy: str, order: list[str]):
    s = make(policy, max_num_seqs=1)
    for i, (rid, priority) in enumerate([("low", 2), ("mid", 1), ("high", 0)]):
        s.add(seq(rid, 4, priority, float(i), start=10 * i))
    started = []
    while s.has_unfinished():
        batch = step(s)
        for x in batch.seqs:
            if x not in started:
                started.append(x)
            s.finish(x, "length")
    assert ids(started) == order


def test_equal_priorities_keep_arrival_order():
    s = make("priority", max_num_seqs=2)
    for i in range(4):
        s.add(seq(str(i), 4, 1, 0.0, start=10 * i))  # equal arrival stamps too: the order they were added
    assert ids(step(s).seqs) == ["0", "1"]
    assert ids(s.waiting) == ["2", "3"]


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "high"), ("priority", "low")])
def test_out_of_blocks_the_lowest_running_is_preempted(policy: str, victim: str):
    # 4 blocks of 4 tokens. After the prefill step low holds 7 tokens (2 blocks, room for its next), high 9 (2 blocks,
    # its next needs a third). fcfs frees the newest (high, itself); priority the lowest, low, already scheduled this
    # step: its token goes back to the budget and high decodes.
    s = make(policy, num_blocks=4)
    low, high = seq("low", 6, 2, 1.0), seq("high", 8, 0, 2.0, start=50)
    s.add(low)
    s.add(high)
    step(s)
    batch = step(s)
    assert ids(batch.preempted) == [victim]
    assert ids(batch.seqs) == ["low" if victim == "high" else "high"] and batch.num_new_tokens == [1]
    preempted = low if victim == "low" else high
    assert preempted.status is SequenceStatus.WAITING and preempted.block_table == []
    assert preempted.num_preemptions == 1 and ids(s.waiting) == [victim]


def test_a_sequence_that_preempts_itself_lets_higher_ones_after_it_run():
    # low was admitted first, so it comes first in the running list; both need a new block and none is free. low
    # is the lowest: it preempts itself, and high, next in the list, runs with the blocks it gave back (fcfs would
    # have preempted high, the newest: tests/engine/test_scheduler.py).
    s = make("priority", num_blocks=4)
    low, high = seq("low", 8, 2, 1.0), seq("high", 8, 0, 2.0, start=50)
    s.add(low)
    s.add(high)
    step(s)
    assert s.block_manager.num_free_blocks == 0
    batch = step(s)
    assert ids(batch.preempted) == ["low"] and ids(batch.seqs) == ["high"] and s.running == [high]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_high_request_preempts_a_low_one_for_its_seat_under_priority_only(policy: str):
    s = make(policy, max_num_seqs=1)
    low, high = seq("low", 4, 2, 1.0), seq("high", 4, 0, 2.0, start=50)
    s.add(low)
    step(s)
    s.add(high)
    batch = step(s)
    if policy == "fcfs":
        assert ids(batch.seqs) == ["low"] and batch.preempted == [] and ids(s.waiting) == ["high"]
    else:
        assert ids(batch.seqs) == ["high"] and ids(batch.preempted) == ["low"] and ids(s.waiting) == ["low"]
        assert low.num_preemptions == 1 and low.num_computed_tokens == 0


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_a_high_request_preempts_a_low_one_for_its_blocks_under_priority_only(policy: str):
    s = make(policy, num_blocks=4)
    low, high = seq("low", 12, 2, 1.0), seq("high", 4, 0, 2.0, start=50)
    s.add(low)
    step(s)  # low's prompt: 3 blocks
    s.add(high)
    batch = step(s)  # low's decode takes the last block; high needs one
    if policy == "fcfs":
        assert ids(batch.seqs) == ["low"] and ids(s.waiting) == ["high"]
    else:
        assert ids(batch.seqs) == ["high"] and batch.num_new_tokens == [4] and ids(batch.preempted) == ["low"]
        assert s.running == [high] and ids(s.waiting) == ["low"]


def test_a_waiting_request_never_preempts_its_equals():
    s = make("priority", max_num_seqs=1)
    first, second = seq("first", 4, 1, 1.0), seq("second", 4, 1, 2.0, start=50)
    s.add(first)
    step(s)
    s.add(second)
    assert ids(step(s).seqs) == ["first"] and first.num_preemptions == 0


# -- the setting --------------------------------------------------------------------------------------------------
def test_the_setting_is_checked_and_reaches_every_front():
    assert EngineConfig().scheduling_policy == "fcfs"
    assert set(QUEUES) == set(SCHEDULING_POLICIES)
    with pytest.raises(FieldError, match="scheduling_policy must be one of fcfs, priority") as error:
        EngineConfig(scheduling_policy="lottery")
    assert error.value.field == "scheduling_policy"
    assert "scheduling_policy" in ENGINE_FIELDS and "scheduling_policy" in EngineOperator.parameters()
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_settings(parser.parse_args(["--scheduling-policy", "priority"])) == {"scheduling_policy": "priority"}
    with pytest.raises(ValueError, match="scheduling policy 'lottery'"):
        make("lottery")


GRAPH = """\
model: some-model
nodes:
  src: {op: prompt_source}
  engine: {op: engine, params: {max_num_seqs: 1, scheduling_policy: priority}}
  out: {op: stdout_sink}
edges:
  - src -> engine -> out
"""


def test_a_graph_s_engine_node_takes_the_policy():
    assert load_pipeline(GRAPH).nodes["engine"].params["scheduling_policy"] == "priority"
    with pytest.raises(PipelineError, match="scheduling_policy"):
        load_pipeline(GRAPH.replace("scheduling_policy: priority", "scheduling_policy: lottery"))


# -- the engine ---------------------------------------------------------------------------------------------------
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = {"low1": [5, 6, 7, 8, 9], "low2": [10, 11, 12], "high": [13, 14, 15, 16]}
PRIORITIES = {"low1": 1, "low2": 1, "high": 0}  # classes that do not yield: the queue alone orders them


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("priority") / "llama")


def engine(model_path, policy: str) -> LLMEngine:
    config = EngineConfig(
        model=str(model_path), backend="cpu", block_size=4, num_kv_blocks=64, max_num_seqs=1, scheduling_policy=policy
    )
    return LLMEngine(config)


def run_low_then_high(engine: LLMEngine) -> dict[str, object]:
    """The two low requests arrive, one step runs (low1 starts), then the high one arrives; finished outputs in the
    order they finished."""
    for rid in ("low1", "low2"):
        engine.add_request(rid, PROMPTS[rid], GREEDY, priority=PRIORITIES[rid])
    finished = {out.request_id: out for out in engine.step() if out.finished}
    engine.add_request("high", PROMPTS["high"], GREEDY, priority=PRIORITIES["high"])
    while engine.has_unfinished_requests():
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    return finished


def test_a_later_high_request_finishes_first_with_the_tokens_it_has_alone(model_path):
    alone = {}
    for rid, prompt in PROMPTS.items():
        solo = engine(model_path, "fcfs")
        solo.add_request(rid, prompt, GREEDY)
        while solo.has_unfinished_requests():
            alone.update({out.request_id: out.outputs[0].token_ids for out in solo.step() if out.finished})
    fcfs = run_low_then_high(engine(model_path, "fcfs"))
    priority = run_low_then_high(engine(model_path, "priority"))
    assert list(fcfs) == ["low1", "low2", "high"]
    assert list(priority) == ["high", "low1", "low2"]  # low1, preempted, keeps its place ahead of low2
    assert priority["low1"].metrics.num_preemptions == 1
    for rid in PROMPTS:
        assert priority[rid].outputs[0].token_ids == fcfs[rid].outputs[0].token_ids == alone[rid]
