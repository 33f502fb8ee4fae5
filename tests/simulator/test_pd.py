"""Prefill/decode disaggregation in the cluster simulator: the real pd_split decides, prefill workers prefill, the KV
hand-over takes its modelled time, decode workers decode; times checked against the step model by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from sagellm.simulator.capacity import capacity_rps, cluster_capacity_rps
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig, Tier
from sagellm.simulator.kv_transfer import KVTransferModel
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import from_rows, poisson

MODEL = StepModel(
    fixed_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=1e-6, per_prefill_context_s=1e-8
)
KV = KVTransferModel(latency_s=0.002, per_token_s=1e-5)


def pd_config(prefill: int = 1, decode: int = 1, model: StepModel = MODEL, **settings) -> ClusterConfig:
    n = prefill + decode
    tiers = (Tier("prefill", prefill / n, model, role="prefill"), Tier("decode", decode / n, model, role="decode"))
    return ClusterConfig(instances=n, tiers=tiers, kv_transfer=KV, **settings)


def decode_s(context: int, steps: int) -> float:
    """`steps` decode steps of one sequence whose first decode step attends over `context` tokens."""
    return sum(MODEL.step_s(0, 1, context + k) for k in range(steps))


def test_a_long_prompt_is_prefilled_on_one_instance_and_decoded_on_the_other() -> None:
    """Its KV reaches the idle decode instance after the transit, is copied in, and the first token goes out."""
    trace = from_rows([0.0], [1024], [10])
    result = simulate(pd_config(), trace)
    prefill_s = MODEL.step_s(512, 0, 0) + MODEL.step_s(512, 0, 0, 512 * 512)  # two chunks of the 512-token budget
    first = prefill_s + KV.seconds(1024)
    assert result.ttft_s[0] == pytest.approx(first)
    assert result.e2e_s[0] == pytest.approx(first + decode_s(1025, 9))
    assert result.instance[0] == 1  # the decode instance (instances are numbered tier after tier)
    assert result.info["pd"]["decisions"] == {"pd": 1}


def test_a_short_prompt_stays_colocated_on_the_decode_instance() -> None:
    trace = from_rows([0.0], [64], [5])
    result = simulate(pd_config(pd_threshold_tokens=512), trace)
    assert result.ttft_s[0] == pytest.approx(MODEL.step_s(64, 0, 0))
    assert result.e2e_s[0] == pytest.approx(MODEL.step_s(64, 0, 0) + decode_s(65, 4))
    assert result.instance[0] == 1
    assert result.info["pd"]["decisions"] == {"short_prompt": 1}


def test_a_one_token_request_ends_with_its_prefill() -> None:
    result = simulate(pd_config(), from_rows([0.0], [600], [1]))
    first = MODEL.step_s(512, 0, 0) + MODEL.step_s(88, 0, 0, 88 * 512) + KV.latency_s  # nothing to copy in
    assert result.ttft_s[0] == pytest.approx(first) and result.e2e_s[0] == pytest.approx(first)
    assert math.isnan(result.tpot_s[0])


def test_a_hand_over_waits_for_a_decode_slot() -> None:
    """One decode slot: the second prefilled request's KV is copied in when the first request's slot frees, its
    first token right after."""
    one_slot = StepModel(**{**vars(MODEL), "max_num_seqs": 1})
    trace = from_rows([0.0, 0.0], [512, 512], [20, 20])
    result = simulate(pd_config(model=one_slot, pd_threshold_tokens=1), trace)
    assert result.ttft_s[1] == pytest.approx(result.e2e_s[0] + KV.per_token_s * 512)
    assert result.info["pd"]["decisions"] == {"pd": 2}


def test_a_kv_copy_delays_the_decode_instances_other_sequences() -> None:
    """A hand-over's copy runs on the decode instance between two steps: a colocated request decoding there waits."""
    alone = simulate(pd_config(), from_rows([0.0], [64], [200]))
    beside = simulate(pd_config(), from_rows([0.0, 0.0], [64, 1024], [200, 2]))
    extra = beside.e2e_s[0] - alone.e2e_s[0]
    copy = KV.per_token_s * 1024
    assert copy < extra < copy + 3 * MODEL.step_s(0, 2, 2000)  # the copy, and a few steps decoding two


def test_workers_on_one_host_slow_each_other_while_both_compute() -> None:
    """The decode instance shares a host with the prefill instance: a short prompt's step and the decode steps after
    it take 1.2x and 1.5x as long while the prefill instance computes a long prompt, and the span of decode steps
    goes on at full speed from its first step boundary after the prefill instance went idle."""
    slowed = StepModel(**{**vars(MODEL), "neighbour_prompt_slowdown": 0.2, "neighbour_decode_slowdown": 0.5})
    tiers = (Tier("prefill", 0.5, MODEL, role="prefill"), Tier("decode", 0.5, slowed, role="decode"))
    trace = from_rows([0.0, 0.001], [1024, 64], [1, 200])  # the long prompt's one token comes with its prefill
    config = ClusterConfig(instances=2, tiers=tiers, kv_transfer=KV, instances_per_host=2)
    result = simulate(config, trace)
    prefill_s = MODEL.step_s(512, 0, 0) + MODEL.step_s(512, 0, 0, 512 * 512)
    assert result.ttft_s[0] == pytest.approx(prefill_s + KV.latency_s)
    t = 0.001 + 1.2 * MODEL.step_s(64, 0, 0)
    assert result.ttft_s[1] == pytest.approx(t - 0.001)
    for k in range(199):
        t += MODEL.step_s(0, 1, 65 + k) * (1.5 if t < prefill_s else 1.0)
    assert result.e2e_s[1] == pytest.approx(t - 0.001)
    apart = simulate(dataclasses.replace(config, instances_per_host=1), trace)
    assert apart.e2e_s[1] == pytest.approx(MODEL.step_s(64, 0, 0) + decode_s(65, 199))


def test_pd_split_keeps_a_request_colocated_while_every_decode_instance_is_saturated() -> None:
    """The real pd_split reads the decode instances' reports: with both decode slots taken by short requests it says
    decode_saturated, and the long prompt waits for a slot there and is prefilled there, not on the prefill worker."""
    two_slots = StepModel(**{**vars(MODEL), "max_num_seqs": 2})
    trace = from_rows([0.0, 0.0, 0.001], [64, 64, 600], [50, 50, 5])
    result = simulate(pd_config(model=two_slots), trace)
    assert result.info["pd"]["decisions"] == {"short_prompt": 2, "decode_saturated": 1}
    assert result.instance.tolist() == [1, 1, 1]
    assert result.ttft_s[2] > result.e2e_s[0] + MODEL.step_s(512, 1, 0)  # after a slot freed, its prompt prefilled


@pytest.mark.parametrize("sample", [None, 2])
def test_a_pd_cluster_under_load_ends_every_request_and_spreads_over_its_workers(sample: int | None) -> None:
    rng = np.random.default_rng(3)
    base = poisson(3000, 1.0, seed=3)
    prompts = np.where(rng.random(3000) < 0.2, 1024, 64)
    trace = from_rows(base.arrivals, prompts, np.full(3000, 64))
    rate = 0.6 * capacity_rps(MODEL, trace, 4)
    result = simulate(pd_config(prefill=2, decode=4, sample=sample), trace.at_rate(rate))
    assert result.summary()["completed"] == 3000 and result.summary()["failed"] == 0
    served = np.bincount(result.instance, minlength=6)
    assert served[:2].sum() == 0  # every request ends on a decode instance
    assert served[2:].min() > 0.7 * served[2:].mean()
    decisions = result.info["pd"]["decisions"]
    assert decisions["pd"] == int((prompts >= 512).sum()) and decisions["short_prompt"] == int((prompts < 512).sum())


def test_kv_transfer_model_fits_its_own_line() -> None:
    samples = [(n, 0.003 + 2e-5 * n) for n in (64, 256, 512, 1024)]
    fitted = KVTransferModel.fit(samples)
    assert fitted.latency_s == pytest.approx(0.003) and fitted.per_token_s == pytest.approx(2e-5)
    flat = KVTransferModel.fit([(64, 0.004), (1024, 0.002)])  # falling with size: no per-token cost, the mean
    assert flat.per_token_s == 0 and flat.latency_s == pytest.approx(0.003)
    with pytest.raises(ValueError, match="at least 2"):
        KVTransferModel.fit([(64, 0.001)])
    with pytest.raises(ValueError, match=">= 0"):
        KVTransferModel(latency_s=-1)


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ((Tier("p", 1.0, MODEL, role="prefill"),), "prefill instances alone"),
        ((Tier("p", 0.5, MODEL, role="prefil"), Tier("d", 0.5, MODEL, role="decode")), "role must be one of"),
    ],
)
def test_bad_pd_configs_are_refused(tiers: tuple[Tier, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClusterConfig(instances=2, tiers=tiers)
    with pytest.raises(ValueError, match="pd_threshold_tokens"):
        pd_config(pd_threshold_tokens=-1)


def test_pd_capacity_is_the_side_that_saturates_first() -> None:
    trace = from_rows(np.zeros(100), [64] * 80 + [1024] * 20, [64] * 100)
    prefills = from_rows(np.zeros(20), [1024] * 20, [1] * 20)  # what the prefill workers compute: the long prompts
    few_prefill, few_decode = pd_config(prefill=1, decode=7), pd_config(prefill=7, decode=1)
    assert cluster_capacity_rps(few_prefill, trace) == pytest.approx(capacity_rps(MODEL, prefills, 1) / 0.2)
    assert cluster_capacity_rps(few_decode, trace) == pytest.approx(capacity_rps(MODEL, trace, 1))
