"""The policy_sort queue and its scheduling policies: each policy's order, shedding by that order, cost_optimized's
pins and its answers when nothing fits, and adaptive's switches (logged and counted) under a fake clock."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from sagellm.common.errors import FieldError
from sagellm.operators.policy_sort import PolicySort
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, PipelineLoad

NOW = 1000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_queue(
    policy: str = "fifo", instances: list[InstanceStats] | None = None, load: PipelineLoad | None = None, **params
) -> PolicySort:
    op = PolicySort(policy=policy, **params)
    op.clock = FakeClock()
    ctx = OperatorContext(node_id="sort", instances={s.name: s for s in instances or []}, load=load or PipelineLoad())
    op.open(ctx)
    return op


def req(rid: str, arrival: float = NOW, tokens: int = 10, **kwargs) -> Request:
    return Request(request_id=rid, prompt_token_ids=[1] * tokens, arrival_time=arrival, **kwargs)


def drain(op: PolicySort) -> list[str]:
    out = []
    while (item := op.pop()) is not None:
        out.append(item.request_id)
    return out


def test_fifo_orders_by_arrival_and_stamps_dispatch() -> None:
    op = make_queue("fifo")
    for rid, arrival in [("b", 2.0), ("a", 1.0), ("c", 3.0), ("b2", 2.0)]:
        assert op.push(req(rid, arrival)) == []
    assert len(op) == 4
    first = op.pop()
    assert first.request_id == "a" and first.dispatched_time == NOW
    assert drain(op) == ["b", "b2", "c"]  # equal arrival times keep push order
    assert op.pop() is None


def test_priority_classes_then_fifo_within_a_class() -> None:
    op = make_queue("priority")
    for rid, priority, arrival in [("low", 2, 1.0), ("n1", 1, 3.0), ("hi", 0, 5.0), ("n0", 1, 2.0), ("n2", 1, 3.0)]:
        op.push(req(rid, arrival, priority=priority))
    assert drain(op) == ["hi", "n0", "n1", "n2", "low"]


def test_slo_aware_least_slack_first() -> None:
    fast = InstanceStats("fast", tokens_per_s=100.0)
    op = make_queue("slo_aware", [fast, InstanceStats("down", healthy=False, tokens_per_s=1e9)])
    op.push(req("none"))  # no SLO: infinite slack, last
    op.push(req("ttft", arrival=NOW - 1, ttft_slo_ms=3000))  # deadline NOW+2, 0.1 s work: slack 1.9
    op.push(req("long", tokens=500, deadline=NOW + 6))  # 5 s work at 100 tok/s (not the unhealthy 1e9): slack 1.0
    op.push(req("late", deadline=NOW + 10))  # slack 9.9
    assert [op.pop().request_id for _ in range(2)] == ["long", "ttft"]
    op.push(req("short", tokens=10, deadline=NOW + 9))  # slack 8.9
    op.push(req("big", tokens=900, deadline=NOW + 18))  # slack 9.0 now; 17.99 once throughput grows
    fast.tokens_per_s = 100_000.0  # the estimate moved: the order is recomputed on pop
    assert drain(op) == ["short", "late", "big", "none"]


def test_slo_aware_uses_a_default_throughput_without_instances() -> None:
    op = make_queue("slo_aware", policy_args={"default_tokens_per_s": 10.0})
    op.push(req("short", tokens=10, deadline=NOW + 5))  # slack 4
    op.push(req("long", tokens=100, deadline=NOW + 12))  # slack 2
    assert drain(op) == ["long", "short"]


def priced() -> list[InstanceStats]:
    return [
        InstanceStats("cheap", price_per_1k_tokens=1.0, tokens_per_s=10.0),
        InstanceStats("mid", price_per_1k_tokens=2.0, tokens_per_s=100.0),
        InstanceStats("dear", price_per_1k_tokens=5.0, tokens_per_s=1000.0),
    ]


def costly(rid: str, budget: float | None = None, ttft_ms: float | None = 2000, **kwargs) -> Request:
    """100 prompt + 900 completion tokens: cost = price; 100 prompt tokens take 10 / 1 / 0.1 s on cheap/mid/dear."""
    return req(
        rid, tokens=100, sampling=SamplingParams(max_tokens=900), cost_budget=budget, ttft_slo_ms=ttft_ms, **kwargs
    )


def test_cost_optimized_pins_the_cheapest_instance_meeting_slo_and_budget() -> None:
    instances = priced()
    op = make_queue("cost_optimized", instances)
    for request in [costly("slo"), costly("no_slo", ttft_ms=None), costly("budget", budget=1.5)]:
        op.push(request)
    pins = {item.request_id: item.instance for item in iter(op.pop, None)}
    assert pins == {"slo": "mid", "no_slo": "cheap", "budget": "cheap"}
    assert op.policy.slo_misses == 1  # "budget": only cheap is affordable and it is too slow
    instances[1].queued_prefill_tokens = 200  # mid now needs 3 s: dear is the cheapest in time
    op.push(costly("queued"))
    assert op.pop().instance == "dear"
    instances[2].healthy = False  # nothing healthy in time: the cheapest affordable, counted
    op.push(costly("down"))
    assert op.pop().instance == "cheap" and op.policy.slo_misses == 2
    instances[1].queued_prefill_tokens, instances[2].healthy = 0, True
    instances[1].running = instances[1].max_running  # mid is fast enough but has no free slot: not in time
    op.push(costly("saturated"))
    assert op.pop().instance == "dear"


def test_cost_optimized_rejects_what_no_instance_can_serve_within_budget() -> None:
    instances = priced()
    op = make_queue("cost_optimized", instances)
    [error] = op.push(costly("r", budget=0.5))
    assert (error.code, error.retryable) == ("invalid_request", False) and "cost_budget 0.5" in error.message
    assert len(op) == 0
    instances[0].healthy = False  # the only affordable instance is down: retry later
    assert op.push(costly("r", budget=1.5)) == []
    error = op.pop()
    assert isinstance(error, RequestError) and (error.code, error.retryable) == ("overloaded", True)


def test_cost_optimized_without_instance_stats_leaves_routing_to_route() -> None:
    op = make_queue("cost_optimized")
    assert op.push(costly("r", budget=0.01)) == []
    assert op.pop().instance is None


def test_full_queue_sheds_the_newcomer_when_it_ranks_last() -> None:
    op = make_queue("fifo", max_len=2)
    assert op.push(req("a", 1.0)) == op.push(req("b", 2.0)) == []
    [error] = op.push(req("c", 3.0))
    assert (error.request_id, error.code, error.retryable, error.time) == ("c", "overloaded", True, NOW)
    assert drain(op) == ["a", "b"]


def test_full_queue_sheds_a_waiting_request_that_ranks_below_the_newcomer() -> None:
    op = make_queue("priority", max_len=2)
    op.push(req("low", 1.0, priority=2))
    op.push(req("normal", 2.0, priority=1))
    [error] = op.push(req("high", 3.0, priority=0))
    assert error.request_id == "low"
    assert drain(op) == ["high", "normal"]


def test_slo_aware_serves_requests_that_can_still_make_it_before_late_ones() -> None:
    op = make_queue("slo_aware", max_len=3)
    op.push(req("late", deadline=NOW - 5))
    op.push(req("later", deadline=NOW - 9))
    op.push(req("fresh", deadline=NOW + 2))
    assert [e.request_id for e in op.push(req("best_effort"))] == ["later"]  # the most late is shed first
    assert drain(op) == ["fresh", "best_effort", "late"]


def test_slo_aware_sheds_the_most_slack() -> None:
    op = make_queue("slo_aware", max_len=2)
    op.push(req("none"))
    op.push(req("tight", deadline=NOW + 1))
    assert [e.request_id for e in op.push(req("loose", deadline=NOW + 50))] == ["none"]
    assert drain(op) == ["tight", "loose"]


def test_adaptive_switches_with_hysteresis_and_counts() -> None:
    load = PipelineLoad()
    args = {"queue_high": 4, "queue_low": 1, "violation_high": 0.2, "violation_low": 0.1}
    op = make_queue("adaptive", load=load, policy_args=args)
    policy = op.policy
    with capture_logs() as logs:
        for i, priority in enumerate([2, 2, 1, 0]):
            op.push(req(f"r{i}", float(i), priority=priority))
        assert policy.current.name == "fifo"
        op.push(req("r4", 4.0, priority=0))  # 4 waiting at this push: backlog, priority order from now on
        assert policy.current.name == "priority"
        assert [op.pop().request_id for _ in range(4)] == ["r3", "r4", "r2", "r0"]  # priority down to queue_low
        assert policy.current.name == "priority" and policy.switches == 1
        op.push(req("x", 5.0))  # decided before each push or pop: 1 waiting <= queue_low
        assert policy.current.name == "fifo"
        load.slo_checked, load.slo_violations = 10, 3
        op.push(req("a", 10.0, deadline=NOW + 9))
        assert policy.current.name == "slo_aware"
        op.push(req("b", 11.0, deadline=NOW + 1))
        assert op.pop().request_id == "b"
        load.slo_checked = 20  # rate 0.15: between the thresholds, so still slo_aware
        assert op.pop().request_id == "a" and policy.current.name == "slo_aware"
        load.slo_checked = 40  # rate 0.075
        assert op.pop().request_id == "r1" and policy.current.name == "fifo"
    switches = [(e["from"], e["to"]) for e in logs if e["event"] == "policy_switch"]
    assert switches == [("fifo", "priority"), ("priority", "fifo"), ("fifo", "slo_aware"), ("slo_aware", "fifo")]
    assert policy.switches == 4 and all(e["reason"] for e in logs)
    assert drain(op) == ["x"]


def test_unknown_policy_and_arguments_are_rejected_with_the_choices() -> None:
    """Each error names the parameter it is about, which is how a graph file points at the line to fix."""
    cases = [
        ({"policy": "lifo"}, "policy", r"unknown scheduling policy 'lifo'; known: adaptive, .*fifo"),
        ({"policy": "adaptive", "policy_args": {"queue_hi": 3}}, "policy_args", r"no \['queue_hi'\].*queue_high"),
        (
            {"policy": "adaptive", "policy_args": {"queue_low": 9, "queue_high": 3}},
            "policy_args",
            "queue_low < queue_high",
        ),
        ({"max_len": 0}, "max_len", "max_len"),
    ]
    for params, field, message in cases:
        with pytest.raises(FieldError, match=message) as raised:
            PolicySort(**params)
        assert raised.value.field == field
