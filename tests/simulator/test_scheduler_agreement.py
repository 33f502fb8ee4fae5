"""The simulated instance decides as the engine's own `Scheduler` does, within what the simulator models
(docs/architecture.md, "The cluster simulator"): driven through the same trace, both give every request its first
token and its last in the same step. The simulator reimplements the scheduler's rule rather than calling it (a step
of the real class costs microseconds; the simulator plans a run of decode steps as one event), so this test is what
keeps the two in step.

What the simulator leaves out is set here as it leaves it out: KV blocks enough for every sequence (no preemption),
no prefix caching, fcfs, one sequence a request, no LoRA adapters, no speculative decoding, and the long-prefill
rules off (`long_prefill_token_threshold` 0). With the engine's default threshold the two part ways, and the last
test shows where."""

from __future__ import annotations

import numpy as np
import pytest

from sagellm.runtime.engine.long_prefills import long_prefill_shares
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import Scheduler, SchedulerConfig
from sagellm.runtime.engine.sequence import Sequence
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Trace, from_rows

SEQS, BUDGET = 4, 64
STEP = StepModel(1.0, 0.0, 0.0, 0.0, max_num_seqs=SEQS, max_num_batched_tokens=BUDGET)  # every step takes 1 s


def scheduled(trace: Trace, threshold: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """TTFT and end-to-end seconds of each request when the real `Scheduler` picks every step, each step taking one
    second, requests joining at the first step boundary at or after their arrival (an idle engine starts at it)."""
    arrivals, prompts, outputs = trace.arrivals.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist()
    config = SchedulerConfig(SEQS, BUDGET, 4096, 4096, 16, enable_prefix_caching=False,
                             long_prefill_context_scale=1152, **long_prefill_shares(threshold, BUDGET))  # fmt: skip
    scheduler = Scheduler(config)
    first, finish = [0.0] * len(arrivals), [0.0] * len(arrivals)
    t, joined = 0.0, 0
    while joined < len(arrivals) or scheduler.has_unfinished():
        if not scheduler.has_unfinished():
            t = max(t, arrivals[joined])
        while joined < len(arrivals) and arrivals[joined] <= t:
            prompt = list(range(joined * 1000, joined * 1000 + prompts[joined]))
            scheduler.add(Sequence(str(joined), prompt, SamplingParams(max_tokens=outputs[joined])))
            joined += 1
        batch = scheduler.schedule()
        assert batch, "a step with nothing scheduled while requests wait"
        t += 1.0
        for seq in scheduler.complete_step(batch):
            seq.append_token(1)
            i = int(seq.request_id)
            if seq.num_output_tokens == 1:
                first[i] = t
            if seq.num_output_tokens == outputs[i]:
                finish[i] = t
                scheduler.finish(seq, "length")
    return np.array(first) - trace.arrivals, np.array(finish) - trace.arrivals


def random_trace(seed: int, n: int = 40) -> Trace:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(0.6, n)
    gaps[rng.random(n) < 0.3] = 0.0  # some arrive together
    return from_rows(np.cumsum(gaps) - gaps[0], rng.integers(1, 200, n), rng.integers(1, 30, n), name=f"agree-{seed}")


@pytest.mark.parametrize("seed", range(4))
def test_simulated_instance_schedules_as_the_engine_s_scheduler(seed: int) -> None:
    trace = random_trace(seed)
    result = simulate(ClusterConfig(instances=1, step_model=STEP), trace)
    ttft, e2e = scheduled(trace)
    np.testing.assert_allclose(result.ttft_s, ttft, atol=1e-9)
    np.testing.assert_allclose(result.e2e_s, e2e, atol=1e-9)


def test_the_engine_s_default_long_prefill_shares_are_not_simulated() -> None:
    """The engine's default computes a prompt longer than the step's budget a small chunk a step, and starts a short
    prompt behind it first; the simulator gives the long prompt what the budget leaves, as with the threshold 0."""
    trace = from_rows([0.0, 0.0], [300, 20], [2, 2])
    result = simulate(ClusterConfig(instances=1, step_model=STEP), trace)
    off, _ = scheduled(trace, threshold=0)
    default, _ = scheduled(trace, threshold=None)
    assert result.ttft_s.tolist() == off.tolist() == [5.0, 5.0]  # 64-token steps: the short prompt in the long's last
    assert default[1] == 1.0 and default[0] > 5.0  # the short one first; the long one in 48-token chunks, shrinking
