"""The seed API's extension points under its names (router, load balancer, PD strategy, parallelism, hybrid policy):
the seed's examples run as written (import path aside), and each answer is the one sageLLM's own machinery gives:
the route strategies, pd_split, the parallelism planner, the policy_sort policies. Pure units: no server."""

from __future__ import annotations

import asyncio
import random

import pytest

from sagellm.common.errors import InvalidInput
from sagellm.control_plane import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    HybridSchedulingConfig,
    HybridSchedulingPolicy,
    LoadBalancer,
    ParallelismConfig,
    ParallelismOptimizer,
    PDRoutingStrategy,
    PDSeparationConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
    RequestRouter,
    SchedulingDecision,
)
from sagellm.control_plane.convert import instance_stats
from sagellm.control_plane.parallelism import model_of_size
from sagellm.control_plane.policies import policy_name
from sagellm.operators.pd_split import PDSplit
from sagellm.operators.policy_sort import PolicySort
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.operators.routing import make_strategy
from sagellm.runtime.parallel import planner
from sagellm.runtime.parallel.devices import Devices
from sagellm.runtime.parallel.model_shape import GIB
from sagellm.runtime.parallel.plan import PlanError
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext

PREFILL, DECODE, HYBRID = ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING, ExecutionInstanceType.HYBRID


def pd_instances() -> list[ExecutionInstance]:
    """The seed README's PD example's instances (a prefill and a decode one), and a GENERAL one."""
    return [
        ExecutionInstance(
            instance_id="prefill-1", host="localhost", port=8000, model_name="meta-llama/Llama-2-7b",
            instance_type=ExecutionInstanceType.PREFILLING, tensor_parallel_size=4, gpu_count=4,
            prefilling_config=PrefillingConfig(target_batch_size=64, enable_chunked_prefill=True),
        ),
        ExecutionInstance(
            instance_id="decode-1", host="localhost", port=8001, model_name="meta-llama/Llama-2-7b",
            instance_type=ExecutionInstanceType.DECODING, tensor_parallel_size=1, gpu_count=1,
            decoding_config=DecodingConfig(target_latency_ms=50, max_parallel_requests=200),
        ),
        ExecutionInstance("general-1", port=8002, model_name="meta-llama/Llama-2-7b"),
    ]  # fmt: skip


# -- RequestRouter and LoadBalancer: the gateway's route strategies ---------------------------------------------------
def random_instances(rng: random.Random) -> list[ExecutionInstance]:
    return [
        ExecutionInstance(
            f"i{n}",
            instance_type=rng.choice(list(ExecutionInstanceType)),
            max_concurrent_requests=rng.choice([1, 4, 100]),
            active_requests=rng.randrange(6),
            is_healthy=rng.random() > 0.2,
            is_available=rng.random() > 0.1,
        )
        for n in range(rng.randrange(1, 7))
    ]


def test_load_balanced_routes_where_the_gateways_strategy_does():
    """Over random pools: the healthy instances that run whole requests, then our LoadBalanced's pick (None when
    no instance qualifies)."""
    rng = random.Random(7)
    router = RequestRouter("load_balanced")
    strategy = make_strategy("load_balanced", prefix_index=PrefixIndex())
    for _ in range(300):
        instances = random_instances(rng)
        request = RequestMetadata(prompt="What is a river?")
        candidates = [instance_stats(i) for i in instances if i.instance_type is not PREFILL]
        candidates = [s for s in candidates if s.healthy]
        expected = strategy.choose(Request(request_id="r"), candidates, []).name if candidates else None
        chosen = router.route(request, instances)
        assert (chosen.instance_id if chosen else None) == expected


def test_a_decision_pins_the_request_to_its_target_while_that_can_take_it():
    instances = [ExecutionInstance("busy", active_requests=9), ExecutionInstance("idle")]
    router, request = RequestRouter(), RequestMetadata(prompt="hi")
    assert router.route(request, instances).instance_id == "idle"
    assert router.route(request, instances, SchedulingDecision(request.request_id, "busy")).instance_id == "busy"
    instances[0].is_healthy = False
    assert router.route(request, instances, SchedulingDecision(request.request_id, "busy")).instance_id == "idle"


def test_the_router_keeps_to_the_requests_model_and_its_strategy_can_change():
    instances = [ExecutionInstance("a", model_name="m1"), ExecutionInstance("b", model_name="m2")]
    router = RequestRouter("round_robin")
    assert [router.route(RequestMetadata(), instances).instance_id for _ in range(3)] == ["a", "b", "a"]
    assert {router.route(RequestMetadata(model_name="m2"), instances).instance_id for _ in range(3)} == {"b"}
    assert router.route(RequestMetadata(model_name="m3"), instances) is None
    router.routing_strategy = "load_balanced"  # the seed's users assign it
    assert router.routing_strategy == "load_balanced"
    with pytest.raises(InvalidInput, match="unknown routing strategy 'topology_aware'; known: affinity"):
        RequestRouter("topology_aware")


def test_the_seed_documents_request_flow_runs_as_written():
    """INTEGRATION.md's steps 4 and 5 (the PD phase, then `await router.select_instance(..., phase=phase)`)."""
    pd_router, router = PDRoutingStrategy(PDSeparationConfig()), RequestRouter("load_balanced")
    request = RequestMetadata(
        request_id="req-123",
        user_id="user-456",
        priority=RequestPriority.HIGH,
        slo_deadline_ms=1000,
        max_tokens=512,
        prompt="Explain quantum computing in simple terms.",
        model_name="meta-llama/Llama-2-7b",
    )

    async def flow() -> ExecutionInstance | None:
        phase = pd_router.determine_request_phase(request)
        assert phase is DECODE
        return await router.select_instance(request=request, available_instances=pd_instances(), phase=phase)

    assert asyncio.run(flow()).instance_id == "decode-1"  # runs whole requests; of equals, the first
    long = RequestMetadata(prompt="x" * 4000, model_name="meta-llama/Llama-2-7b")
    assert pd_router.determine_request_phase(long) is PREFILL
    chosen = asyncio.run(router.select_instance(long, pd_instances(), PREFILL))
    assert chosen.instance_id == "prefill-1"
    no_decode = [i for i in pd_instances() if i.instance_type is not DECODE]  # a prefill needs a decode pair
    assert asyncio.run(router.select_instance(long, no_decode, PREFILL)) is None


def test_the_load_balancer_balances_with_the_gateways_strategy():
    """The seed's algorithms (QUICKSTART: `select_instance(instances, algorithm="weighted_round_robin")`) and the
    documents' `get_least_loaded_instance` are load_balanced; a gateway strategy name is taken as it is."""
    instances = [ExecutionInstance(f"i{n}", active_requests=a) for n, a in enumerate([3, 1, 2])]
    balancer = LoadBalancer()
    for algorithm in ("weighted_round_robin", "least_connections", "least_response_time", "power_of_two"):
        assert balancer.select_instance(instances, algorithm=algorithm).instance_id == "i1"
    assert balancer.select_instance(instances).instance_id == "i1"
    assert balancer.get_least_loaded_instance(instances).instance_id == "i1"
    turns = [balancer.select_instance(instances, "round_robin").instance_id for _ in range(4)]
    assert turns == ["i0", "i1", "i2", "i0"]
    assert balancer.select_instance([ExecutionInstance("down", is_healthy=False)]) is None


# -- PDRoutingStrategy: the gateway's pd_split -------------------------------------------------------------------------
def pd_split_phase(threshold: int, ratio: float, tokens: int, max_tokens: int) -> str:
    split = PDSplit(threshold_tokens=threshold, ratio=ratio)
    pool = [InstanceStats("p", role="prefill"), InstanceStats("d", role="decode")]
    split.open(OperatorContext(node_id="pd_split", instances={s.name: s for s in pool}))
    request = Request(request_id="r", prompt_token_ids=list(range(tokens)))
    request.sampling.max_tokens = max_tokens
    return split.execute(request).phase


@pytest.mark.parametrize("routing_policy", ["adaptive", "threshold"])
def test_the_pd_phase_is_pd_splits_decision(routing_policy):
    """Over prompt lengths and outputs: PREFILLING exactly when a pd_split of the same threshold (and, "adaptive",
    ratio) splits a prompt of len(prompt) // 4 tokens."""
    config = PDSeparationConfig(
        routing_policy=routing_policy, prefilling_threshold_input_tokens=800, prefilling_threshold_ratio=4.0
    )
    strategy = PDRoutingStrategy(config)
    ratio = 4.0 if routing_policy == "adaptive" else 0.0
    for chars in (0, 7, 400, 1599, 1600, 2000, 3196, 3200, 3204, 8000):
        for max_tokens in (1, 100, 500, 799, 4000):
            phase = strategy.determine_request_phase(RequestMetadata(prompt="y" * chars, max_tokens=max_tokens))
            split = pd_split_phase(800, ratio, chars // 4, max_tokens) == "prefill"
            assert phase is (PREFILL if split else DECODE), (chars, max_tokens)


def test_the_pd_phase_expects_the_output_the_control_plane_sends():
    """No max_tokens: `avg_output_tokens` when given, else the 512 the control plane sends such a request with; a
    chat's text is what is counted; PD disabled: HYBRID."""
    strategy = PDRoutingStrategy(PDSeparationConfig())  # adaptive, 800 tokens, ratio 4
    prompt = RequestMetadata(prompt="z" * 4 * 500)  # 500 tokens: more than 4 x 100, not 4 x 512
    assert strategy.determine_request_phase(prompt, avg_output_tokens=100.0) is PREFILL
    assert strategy.determine_request_phase(prompt) is DECODE
    chat = RequestMetadata(messages=[{"role": "user", "content": "z" * 4 * 900}])
    assert strategy.determine_request_phase(chat) is PREFILL
    assert PDRoutingStrategy(PDSeparationConfig(enabled=False)).determine_request_phase(chat) is HYBRID


def test_the_seed_pd_examples_run_as_written():
    """demo_control_plane's PD loop and the seed's PD_SEPARATION_EXAMPLE's dynamic routing (the prompt set after
    construction, `avg_output_tokens=100.0`, the suitable instances filtered)."""
    pd_router = PDRoutingStrategy(PDSeparationConfig(enabled=True, routing_policy="adaptive"))
    requests_config = [
        ("长文档分析", "A" * 2000, PREFILL),  # 500 tokens > 4 x 100
        ("简短聊天", "你好", DECODE),
        ("代码审查", "B" * 1500, DECODE),  # 375 tokens: not > 400 (the seed too)
        ("快速问答", "什么是AI?", DECODE),
    ]
    for desc, prompt, expected in requests_config:
        req = RequestMetadata(request_id=f"pd-{desc}", prompt=prompt, max_tokens=100)
        phase = pd_router.determine_request_phase(req)
        assert phase is expected and phase.value in ("prefilling", "decoding")

    request = RequestMetadata(request_id="req-1", priority=RequestPriority.HIGH, slo_deadline_ms=200.0, max_tokens=500)
    request.prompt = "Explain the concept of PD separation in LLM inference."
    target_type = pd_router.determine_request_phase(request, avg_output_tokens=100.0)
    suitable_instances = pd_router.filter_instances_by_type(pd_instances(), target_type)
    assert target_type is DECODE and [i.instance_id for i in suitable_instances] == ["decode-1", "general-1"]


def test_instances_are_filtered_and_scored_by_the_phases_their_role_runs():
    instances = [*pd_instances(), ExecutionInstance("hybrid-1", instance_type="hybrid")]
    instances.append(ExecutionInstance("draining", instance_type="prefilling", is_available=False))
    strategy = PDRoutingStrategy(PDSeparationConfig())
    ids = lambda phase: [i.instance_id for i in strategy.filter_instances_by_type(instances, phase)]  # noqa: E731
    assert ids(PREFILL) == ids("prefilling") == ["prefill-1"]
    assert ids(DECODE) == ids(HYBRID) == ["decode-1", "general-1", "hybrid-1"]
    scores = {i.instance_id: PDRoutingStrategy.get_instance_specialization(i) for i in instances[:4]}
    assert scores["prefill-1"] == {"prefilling_score": 1.0, "decoding_score": 0.0}
    assert scores["decode-1"] == scores["general-1"] == scores["hybrid-1"]
    assert scores["general-1"] == {"prefilling_score": 0.0, "decoding_score": 1.0}


# -- ParallelismConfig and ParallelismOptimizer: the planner -----------------------------------------------------------
def test_the_readme_parallelism_example_runs_as_written():
    config = ParallelismConfig(
        auto_optimize=True,
        supported_strategies=["TP", "PP", "Hybrid"],
    )
    instance = ExecutionInstance(
        instance_id="hybrid-instance",
        tensor_parallel_size=4,  # TP=4
        pipeline_parallel_size=2,  # PP=2
        data_parallel_size=2,  # DP=2
        gpu_count=16,
    )
    assert config.auto_optimize and config.validate()
    as_config = ParallelismConfig(tensor_parallel_size=4, pipeline_parallel_size=2, data_parallel_size=2)
    assert as_config.total_parallel_size == instance.gpu_count
    assert not as_config.validate() and ParallelismConfig(4, 2, 2, total_gpus=16).validate()
    with pytest.raises(InvalidInput, match="supported_strategies"):
        ParallelismConfig(supported_strategies=["TP", "ZeRO"])


def test_the_seeds_config_checks():
    """The seed's tests of validate() and total_parallel_size; ep reuses the tp x dp ranks, as ours runs it."""
    seed_valid = ParallelismConfig(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2, total_gpus=8)
    assert seed_valid.validate()
    assert not ParallelismConfig(4, 4, 2, total_gpus=8).validate()
    assert ParallelismConfig(total_gpus=1).validate() and ParallelismConfig(total_gpus=1).total_parallel_size == 1
    assert ParallelismConfig(2, 2, 2, 2, total_gpus=8).total_parallel_size == 8
    assert not ParallelismConfig(expert_parallel_size=8, total_gpus=8).validate()  # ep over 1 rank: none to spread
    assert not ParallelismConfig(context_parallel_size=2, total_gpus=2).validate()


PLANS = [(14, 1, 80), (14, 2, 24), (60, 4, 80), (140, 8, 80), (810, 32, 80)]  # model GB, GPUs, GB each


@pytest.mark.parametrize(("size_gb", "gpus", "memory_gb"), PLANS)
def test_the_optimizer_recommends_the_planners_split(size_gb, gpus, memory_gb):
    """The planner's split of a model of that size (its bf16 weights within half a layer of it) over those GPUs."""
    shape = model_of_size(size_gb)
    layer_gb = (shape.attention_params + shape.expert_params + shape.replicated_params) * 2 / GIB
    assert abs(shape.num_params() * 2 / GIB - size_gb) <= layer_gb / 2
    plan = planner.ParallelismOptimizer(kv_tokens=2048).recommend_strategy(shape, Devices.gpus(gpus, memory_gb))
    config = ParallelismOptimizer().recommend_strategy(size_gb, gpus, memory_gb)
    assert config.split == plan.config and config.total_gpus == gpus and config.validate()


def test_the_readme_table_holds_for_the_largest_models():
    """The README's last row, >175B on 16+ GPUs: Hybrid (TP=8, PP=4), for a 405B-size model on 32 GPUs of 80 GB."""
    config = ParallelismOptimizer().recommend_strategy(810, 32, 80)
    assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (8, 4)


def test_supported_strategies_take_the_planners_best_allowed_split():
    limited = ParallelismOptimizer(ParallelismConfig(auto_optimize=True, supported_strategies=["TP"]))
    plan = planner.ParallelismOptimizer(kv_tokens=2048).recommend_strategy(model_of_size(14), Devices.gpus(8, 80))
    assert plan.config.dp > 1  # the planner would replicate; TP alone may not
    best_tp = next(a.config for a in plan.alternatives if a.fits and a.config.pp == a.config.dp == 1)
    assert limited.recommend_strategy(14, 8, 80).split == best_tp
    with pytest.raises(PlanError, match="no split of the kinds DP fits a 140 GB model"):
        ParallelismOptimizer(ParallelismConfig(supported_strategies=["DP"])).recommend_strategy(140, 8, 80)


def test_optimize_hybrid_config_is_the_recommendation_or_the_configured_split():
    sized = ParallelismOptimizer(ParallelismConfig(auto_optimize=True, model_size_gb=140, gpu_memory_gb=80))
    best = sized.recommend_strategy(140, 16, 80)
    assert sized.optimize_hybrid_config(16) == (
        best.tensor_parallel_size, best.pipeline_parallel_size, best.data_parallel_size
    )  # fmt: skip
    fixed = ParallelismOptimizer(ParallelismConfig(4, 2, 2))
    assert fixed.optimize_hybrid_config(16) == (4, 2, 2)
    with pytest.raises(InvalidInput, match="does not run on 8 GPUs"):
        fixed.optimize_hybrid_config(8)
    with pytest.raises(InvalidInput, match="model_size_gb"):
        ParallelismOptimizer().optimize_hybrid_config(8)
    with pytest.raises(PlanError):
        ParallelismOptimizer().recommend_strategy(140, 1, 24)


# -- HybridSchedulingPolicy: our policies, composed by request kind --------------------------------------------------
def test_the_hybrid_policy_takes_the_seeds_settings():
    policy = HybridSchedulingPolicy()
    assert policy.name == "Hybrid" and policy.config == HybridSchedulingConfig()
    assert policy.embedding_priority == "normal" and policy.llm_policy.policy == "adaptive"
    assert policy_name(policy) == "adaptive"  # "normal": both kinds in one queue, the fallback's
    custom = HybridSchedulingPolicy(embedding_batch_size=64, embedding_priority="high", llm_fallback_policy="fifo")
    assert custom.config.embedding_batch_size == 64 and custom.llm_policy.policy == "fifo"
    config = HybridSchedulingConfig(embedding_batch_size=128, embedding_priority="low", llm_fallback_policy="priority")
    assert HybridSchedulingPolicy(config=config).config is config
    with pytest.raises(InvalidInput, match="llm_fallback_policy: 'invalid' is not one of fifo, priority"):
        HybridSchedulingPolicy(llm_fallback_policy="invalid")
    with pytest.raises(InvalidInput, match="embedding_priority"):
        HybridSchedulingConfig(embedding_priority="urgent")
    low, high = RequestMetadata(priority="low"), RequestMetadata(priority="high")
    assert HybridSchedulingPolicy(llm_fallback_policy="priority").prioritize([low, high]) == [high, low]


def popped(embedding_priority: str, kinds: str) -> str:
    """The kinds ("e" embedding, "g" generation) in the order the real policy_sort gives them out."""
    queue = PolicySort(policy=policy_name(HybridSchedulingPolicy(embedding_priority=embedding_priority)))
    queue.open(OperatorContext(node_id="sort"))
    for n, kind in enumerate(kinds):
        queue.push(Request(request_id=f"{kind}{n}", prompt="hi", phase="embed" if kind == "e" else "colocated"))
    return "".join(queue.pop().request_id[0] for _ in kinds)


def test_embedding_priority_orders_the_real_queue():
    assert popped("normal", "gegeg") == "gegeg"  # one queue: adaptive under light load is arrival order
    assert popped("high", "gegeg") == "eeggg"
    assert popped("low", "egege") == "ggeee"
    # adaptive: at each pop, embeddings first while they are more than 40% of what waits
    assert popped("adaptive", "gggge") == "gggeg"  # 1 of 5, 1 of 4, 1 of 3; then 1 of 2
    assert popped("adaptive", "ggee") == "egeg"  # 2 of 4; 1 of 3; 1 of 2; the last
