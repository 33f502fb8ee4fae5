"""The planner on published model sizes (under 10B to over 175B, and a mixture of experts) over 1 to 32 GPUs of 24, 40
and 80 GiB in 8-GPU NVLink nodes, and on this machine's CPU: the recommendation a practitioner would make, every
alternative sized, and a clear error with the memory needed when nothing fits."""

from __future__ import annotations

import dataclasses

import pytest

from sagellm.runtime.comm.topology import machine_topology
from sagellm.runtime.parallel.config import ParallelismConfig
from sagellm.runtime.parallel.devices import Devices
from sagellm.runtime.parallel.model_shape import ModelShape
from sagellm.runtime.parallel.plan import PlanError, Recommendation
from sagellm.runtime.parallel.planner import ParallelismOptimizer
from tests.parallel.known_models import shape

PLAN = ParallelismOptimizer()


@pytest.mark.parametrize(
    "name, billions",
    [("Llama-3-8B", 8.03), ("Llama-2-13B", 13.0), ("Llama-3-70B", 70.6), ("Llama-3.1-405B", 405.9)]
    + [("GPT-3-175B", 175.2), ("Mixtral-8x7B", 46.7)],
)
def test_parameter_counts_match_the_published_ones(name, billions):
    model = shape(name)
    assert model.num_params() / 1e9 == pytest.approx(billions, abs=0.1)
    assert model.num_params() == model.config.num_params()  # the same count as the runtime's ModelConfig


@pytest.mark.parametrize(
    "name, gpus, memory, expected",
    [
        ("Llama-3-8B", 1, 80, (1, 1, 1)),
        ("Llama-3-8B", 1, 24, (1, 1, 1)),
        ("Llama-3-8B", 8, 80, (1, 1, 8)),  # fits one GPU: eight replicas
        ("Llama-2-13B", 1, 40, (1, 1, 1)),
        ("Llama-2-13B", 2, 24, (2, 1, 1)),
        ("Llama-3-70B", 2, 80, (2, 1, 1)),
        ("Llama-3-70B", 4, 80, (4, 1, 1)),
        ("Llama-3-70B", 8, 40, (8, 1, 1)),
        ("Llama-3-70B", 16, 24, (8, 2, 1)),  # two nodes: tp inside each, a pipeline across
        ("GPT-3-175B", 8, 80, (8, 1, 1)),
        ("GPT-3-175B", 16, 80, (8, 2, 1)),
        ("GPT-3-175B", 32, 24, (8, 4, 1)),
        ("Llama-3.1-405B", 16, 80, (8, 2, 1)),
        ("Llama-3.1-405B", 32, 80, (8, 4, 1)),  # four nodes: tp=8 inside a node, pp=4 across
    ],
)
def test_sensible_recommendations(name, gpus, memory, expected):
    model, devices = shape(name), Devices.gpus(gpus, memory, per_node=8)
    plan = PLAN.recommend_strategy(model, devices)
    assert (plan.config.tp, plan.config.pp, plan.config.dp) == expected
    _check_plan(plan, model, devices)


def test_llama_70b_on_an_8_gpu_nvlink_node():
    plan = PLAN.recommend_strategy(shape("Llama-3-70B"), Devices.gpus(8, 80))
    assert plan.config.tp in (4, 8) and plan.config.pp == 1
    text = plan.explanation
    assert "70.6B parameters" in text and "131.4 GiB of weights in bf16" in text and "8192 tokens" in text
    assert f"Recommended {plan.config}" in text and "inside one fast-link group" in text
    assert "tp=2 pp=1 dp=4 ep=1, fits, but its weights fill 93% of usable memory" in text  # why not smaller
    tight = next(a for a in plan.alternatives if a.config == ParallelismConfig(tp=2, dp=4))
    assert tight.fits and not tight.roomy and tight.note.startswith("weights fill 93%")
    whole = next(a for a in plan.alternatives if a.config.tp == a.config.pp == 1)
    assert not whole.fits and whole.note == "needs 133.9 GiB > 72 usable"


def test_experts_spread_over_ranks():
    plan = PLAN.recommend_strategy(shape("Mixtral-8x7B"), Devices.gpus(8, 80))
    assert plan.config == ParallelismConfig(tp=1, pp=1, dp=8, ep=8)
    assert "12.9B active per token: 2 of 8 experts" in plan.explanation
    assert "experts spread over 8 ranks, 1 whole expert on each" in plan.explanation
    two = PLAN.recommend_strategy(shape("Mixtral-8x7B"), Devices.gpus(2, 80))
    assert two.config.ep == 2 and two.config.world_size == 2
    sliced = next(a for a in two.alternatives if a.config == ParallelismConfig(tp=2, ep=1))
    assert sliced.fits  # considered, ranked below spreading the experts


@pytest.mark.parametrize(
    "name, gpus, memory, needs",
    [
        ("Llama-2-13B", 1, 24, "24.2 GiB of weights in bf16"),
        ("Llama-3-70B", 1, 80, "131.4 GiB of weights in bf16"),
        ("Mixtral-8x7B", 1, 80, "87 GiB of weights in bf16"),
        ("GPT-3-175B", 4, 80, "326.3 GiB of weights in bf16"),
        ("Llama-3.1-405B", 8, 80, "756 GiB of weights in bf16, and 63 GiB of KV cache for 131072 tokens"),
    ],
)
def test_a_model_that_fits_nowhere_says_what_it_needs(name, gpus, memory, needs):
    with pytest.raises(PlanError) as caught:
        PLAN.recommend_strategy(shape(name), Devices.gpus(gpus, memory))
    message = str(caught.value)
    assert needs in message and f"No split over {gpus} GPU" in message and "still needs" in message
    assert caught.value.alternatives and not any(a.fits for a in caught.value.alternatives)


def test_dtype_and_kv_budget_change_what_fits():
    model = shape("Llama-3-8B")
    with pytest.raises(PlanError, match="16 GiB of KV cache for 131072 tokens"):
        ParallelismOptimizer(kv_tokens=131072).recommend_strategy(model, Devices.gpus(1, 24))
    fp8 = ParallelismOptimizer(dtype="fp8").recommend_strategy(shape("Llama-3-70B"), Devices.gpus(1, 80))
    assert fp8.config == ParallelismConfig()  # half bf16's bytes: one GPU holds what needed two
    with pytest.raises(ValueError, match="dtype must be one of"):
        ParallelismOptimizer(dtype="int3")


def test_even_head_splits_before_uneven():
    """6 KV heads over 4 ranks is 2+2+1+1: at the same size, tp=2 x pp=2 splits them evenly."""
    config = dataclasses.replace(shape("Llama-3-70B").config, num_heads=48, num_kv_heads=6)
    plan = PLAN.recommend_strategy(config, Devices.gpus(4, 80))
    assert plan.config == ParallelismConfig(tp=2, pp=2)
    uneven = next(a for a in plan.alternatives if a.config.tp == 4)
    assert uneven.fits and uneven.uneven and "uneven head split" in uneven.note


def test_tensor_parallel_stays_inside_a_group_and_within_the_kv_heads():
    config = dataclasses.replace(shape("Llama-3-70B").config, num_kv_heads=2, num_heads=16)
    plan = PLAN.recommend_strategy(config, Devices.gpus(16, 80, per_node=4))
    assert {a.config.tp for a in plan.alternatives} == {1, 2}
    linear = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel=4, layer_types=("linear_attention", "full_attention") * 40)  # fmt: skip
    hybrid = dataclasses.replace(shape("Llama-3-70B").config, **linear)  # 8 KV heads, 2 Gated DeltaNet key heads
    hybrid_plan = PLAN.recommend_strategy(hybrid, Devices.gpus(16, 80, per_node=4))
    assert {a.config.tp for a in hybrid_plan.alternatives} == {1, 2}
    wide = PLAN.recommend_strategy(shape("Llama-3.1-405B"), Devices.gpus(32, 80, per_node=4))
    assert max(a.config.tp for a in wide.alternatives) == 4 and wide.config == ParallelismConfig(tp=4, pp=8)


def test_a_gemma4_shaped_model_splits_within_its_full_layers_kv_heads_in_one_stage():
    """Gemma 4 31B's full attention layers have 4 KV heads to its sliding layers' 16, and its graph needs every layer
    (shared KV, layer scalars): tp at most 4, never a pipeline."""
    layers = ("sliding_attention",) * 3 + ("full_attention",)
    gemma4 = dataclasses.replace(shape("Llama-3-70B").config, num_heads=32, num_kv_heads=16, full_num_kv_heads=4,
                                 layer_types=layers * 20, sliding_window=1024, layer_scalar=True)  # fmt: skip
    plan = PLAN.recommend_strategy(gemma4, Devices.gpus(16, 80))
    assert max(a.config.tp for a in plan.alternatives) == 4 and {a.config.pp for a in plan.alternatives} == {1}
    assert plan.config == ParallelismConfig(tp=4, dp=4)


def test_this_machines_cpu_is_one_device_in_fp32():
    devices = Devices.from_topology(machine_topology())
    assert devices.kind == "cpu" and devices.count == 1
    plan = PLAN.recommend_strategy(shape("SmolLM2-135M"), devices)
    assert plan.config == ParallelismConfig() and [a.config for a in plan.alternatives] == [ParallelismConfig()]
    assert "in fp32" in plan.explanation and "one device holds it all" in plan.explanation
    with pytest.raises(PlanError, match=r"1511\.9 GiB of weights in fp32.*No split over 1 CPU of"):
        PLAN.recommend_strategy(shape("Llama-3.1-405B"), devices)


def test_parallelism_config():
    split = ParallelismConfig(tp=4, pp=2, dp=2, ep=8)
    assert split.world_size == 16 and split.replica_size == 8 and str(split) == "tp=4 pp=2 dp=2 ep=8"
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        ParallelismConfig(tp=0)
    with pytest.raises(ValueError, match="ep=3 must divide the tp x dp = 4 ranks"):
        ParallelismConfig(tp=2, dp=2, ep=3)


def _check_plan(plan: Recommendation, model: ModelShape, devices: Devices) -> None:
    """What holds of every plan: the choice fits and comes first; every split uses all the devices, keeps tp inside
    one fast-link group and within the KV heads."""
    assert plan.alternatives[0] is plan.choice and plan.choice.fits
    assert plan.choice.total_gib <= devices.usable_gib
    for alternative in plan.alternatives:
        split = alternative.config
        assert split.world_size == devices.count
        assert devices.group_size % split.tp == 0
        assert split.tp <= model.config.num_kv_heads
