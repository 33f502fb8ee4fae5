"""The cluster simulator end to end, with the real policies, routing strategies and autoscaler deciding."""

from __future__ import annotations

import numpy as np
import pytest

from sagellm.common.autoscale import AutoscaleSettings
from sagellm.simulator.capacity import capacity_rps, cluster_capacity_rps
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig, Tier
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import from_rows, poisson, with_classes

MODEL = StepModel(fixed_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=1e-6)
W6 = [(0.2, 0, 1000.0), (0.3, 1, 5000.0), (0.5, 2, 20000.0)]
FAST = StepModel(fixed_s=0.005, per_prefill_token_s=5e-5, per_decode_seq_s=5e-4, per_context_token_s=0, max_num_seqs=8)
TIERS = (Tier("fast", 0.25, FAST, price_per_1k_tokens=2.0), Tier("slow", 0.75, MODEL, price_per_1k_tokens=0.5))


def test_light_load_times_are_the_step_models() -> None:
    """Requests that rarely overlap: TTFT is one prefill step, TPOT one decode step over the request's context."""
    arrivals = poisson(200, 0.05, seed=1).arrivals
    trace = from_rows(arrivals, [100] * 200, [20] * 200)
    result = simulate(ClusterConfig(instances=1, step_model=MODEL), trace)
    assert np.median(result.ttft_s) == pytest.approx(MODEL.step_s(100, 0, 0))
    mean_context = 100 + 10  # contexts 101..119 over the 19 decode steps
    assert np.median(result.tpot_s) == pytest.approx(MODEL.step_s(0, 1, mean_context))
    summary = result.summary(slo_ttft_ms=1000)
    assert summary["completed"] == 200 and summary["failed"] == 0 and summary["slo_attainment"] == 1.0


@pytest.mark.parametrize("sample", [None, 2])
def test_load_balanced_spreads_evenly(sample: int | None) -> None:
    base = poisson(4000, 1.0, seed=2)
    trace = base.at_rate(0.7 * capacity_rps(MODEL, base, 8))
    result = simulate(ClusterConfig(instances=8, step_model=MODEL, sample=sample), trace)
    counts = np.bincount(result.instance, minlength=8)
    assert counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()


def test_priority_serves_the_high_class_first_under_overload() -> None:
    base = with_classes(poisson(3000, 1.0, seed=3), W6, seed=3)
    trace = base.at_rate(1.5 * capacity_rps(MODEL, base, 4))
    high = trace.priorities == 0
    ttft = {}
    for policy in ("fifo", "priority"):
        result = simulate(ClusterConfig(instances=4, step_model=MODEL, policy=policy, max_queue=400), trace)
        ttft[policy] = float(np.nanmedian(result.ttft_s[high]))
        assert result.summary()["failed"] > 0  # the bounded queue sheds under 1.5x
    assert ttft["priority"] < ttft["fifo"] / 5


def test_autoscaler_adds_under_a_burst_and_removes_after() -> None:
    burst = poisson(600, 60.0, seed=4)
    tail = poisson(60, 0.2, seed=5)
    arrivals = np.concatenate([burst.arrivals, burst.duration_s + 1 + tail.arrivals])
    trace = from_rows(arrivals, np.full(660, 200), np.full(660, 50))
    settings = AutoscaleSettings(min_instances=1, max_instances=4, up_cooldown_s=5, down_delay_s=20, interval_s=1)
    result = simulate(ClusterConfig(instances=1, step_model=MODEL, autoscale=settings, startup_s=3), trace)
    deltas = [change["delta"] for change in result.autoscale]
    assert deltas[0] == 1 and -1 in deltas
    assert max(change["instances"] for change in result.autoscale) > 1
    assert result.autoscale[-1]["instances"] < max(change["instances"] for change in result.autoscale)
    assert result.summary()["completed"] == 660


def test_same_seed_same_result() -> None:
    base = poisson(2000, 1.0, seed=6)
    trace = base.at_rate(0.9 * capacity_rps(MODEL, base, 6))

    def run(seed: int) -> np.ndarray:
        return simulate(ClusterConfig(instances=6, step_model=MODEL, sample=2, seed=seed), trace).instance

    assert np.array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_tiers_split_the_instances_and_serve_at_their_own_speed() -> None:
    base = poisson(3000, 1.0, seed=7)
    config = ClusterConfig(instances=8, tiers=TIERS)
    assert [(tier.name, n) for tier, n in config.kinds()] == [("fast", 2), ("slow", 6)]
    capacity = cluster_capacity_rps(config, base)
    assert capacity == pytest.approx(capacity_rps(FAST, base, 2) + capacity_rps(MODEL, base, 6))
    result = simulate(config, base.at_rate(0.6 * capacity))
    fast = result.instance < 2  # instances are numbered tier after tier
    assert np.median(result.tpot_s[fast]) < np.median(result.tpot_s[~fast]) / 1.5
    assert [(t["name"], t["instances"], t["price_per_1k_tokens"]) for t in result.info["tiers"]] == [
        ("fast", 2, 2.0),
        ("slow", 6, 0.5),
    ]
    assert result.info["step_model"] is None and result.summary()["completed"] == 3000


def test_cost_optimized_reads_the_tiers_prices() -> None:
    """cost_optimized pins every request to one of the cheapest instances (the slow tier's), in time or not."""
    trace = with_classes(poisson(300, 2.0, seed=8), W6, seed=8)
    result = simulate(ClusterConfig(instances=8, tiers=TIERS, policy="cost_optimized"), trace)
    assert (result.instance >= 2).all()  # the slow tier's, at 0.5 per 1k tokens
    assert result.summary()["completed"] == 300


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"routing": "cache_aware"}, "does not model"),
        ({"routing": "nope"}, "cannot be simulated"),
        ({"policy": "nope"}, "unknown policy"),
        ({"sample": 0}, "sample must be >= 1"),
        ({"instances": 0}, "instances must be >= 1"),
        ({"instances_per_host": 0}, "instances_per_host must be >= 1"),
        ({"step_model": StepModel(0.01, 0, 0, 0, max_num_seqs=64, max_num_batched_tokens=32)}, "max_num_seqs"),
        ({"tiers": TIERS}, "not both or none"),
        ({"step_model": None}, "not both or none"),
        ({"step_model": None, "tiers": (Tier("a", 0.5, MODEL), Tier("b", 0.4, MODEL))}, "sum to 1"),
        ({"step_model": None, "tiers": (Tier("a", 0.5, MODEL), Tier("a", 0.5, MODEL))}, "distinct names"),
        ({"step_model": None, "tiers": TIERS, "autoscale": AutoscaleSettings()}, "instances of one kind"),
    ],
)
def test_bad_configs_are_refused(change: dict, message: str) -> None:
    settings = {"instances": 2, "step_model": MODEL} | change
    with pytest.raises(ValueError, match=message):
        ClusterConfig(**settings)


def test_a_control_plane_policy_object_orders_the_simulated_queue() -> None:
    """A `SchedulingPolicy` of one's own, given as the policy, orders the real queue of the simulation: the
    highest class first under overload, as the built-in priority policy does."""
    from sagellm.control_plane import SchedulingPolicy

    class HighestClassFirst(SchedulingPolicy):
        def prioritize(self, requests):
            return sorted(requests, key=lambda r: r.priority.value)

    base = with_classes(poisson(600, 1.0, seed=3), W6, seed=3)
    trace = base.at_rate(1.5 * capacity_rps(MODEL, base, 2))
    high = trace.priorities == 0
    ttft = {}
    for name, policy in (("fifo", "fifo"), ("own", HighestClassFirst())):
        result = simulate(ClusterConfig(instances=2, step_model=MODEL, policy=policy, max_queue=100), trace)
        ttft[name] = float(np.nanmedian(result.ttft_s[high]))
    assert ttft["own"] < ttft["fifo"] / 3
