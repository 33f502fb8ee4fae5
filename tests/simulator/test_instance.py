"""The fast instance model (spans of decode steps summed in closed form, cut by arrivals) against a naive reference
that runs our engine's scheduling rule one step at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Trace, from_rows


def naive(trace: Trace, model: StepModel) -> tuple[list[float], list[float]]:
    """One instance behind a FIFO queue, step by step: at each step boundary the requests that have arrived are
    routed while fewer than max_num_seqs are routed and unfinished; then the engine's `Scheduler.schedule` rule: the
    running list in order (a decode takes 1 token, a prompt the rest of the budget), then waiting prompts."""
    arrivals, prompts, outputs = trace.arrivals.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist()
    n = len(arrivals)
    first, finish = [math.nan] * n, [math.nan] * n
    queue: list[int] = []
    waiting: list[int] = []
    running: list[list[int]] = []  # [request, prompt tokens computed, tokens generated]
    t, k, routed = 0.0, 0, 0
    while k < n or queue or waiting or running:
        while k < n and arrivals[k] <= t:
            queue.append(k)
            k += 1
        while queue and routed < model.max_num_seqs:
            waiting.append(queue.pop(0))
            routed += 1
        if not running and not waiting:
            t = arrivals[k]
            continue
        budget, batch = model.max_num_batched_tokens, []
        for seq in running:
            need = prompts[seq[0]] - seq[1] if seq[1] < prompts[seq[0]] else 1
            take = min(need, budget)
            if take == 0:
                break
            batch.append((seq, take))
            budget -= take
        while waiting and budget > 0 and len(running) < model.max_num_seqs:
            seq = [waiting.pop(0), 0, 0]
            running.append(seq)
            take = min(prompts[seq[0]], budget)
            batch.append((seq, take))
            budget -= take
        prefill = sum(take for seq, take in batch if seq[1] < prompts[seq[0]])
        earlier = sum(take * seq[1] for seq, take in batch if seq[1] < prompts[seq[0]])
        decoding = [seq for seq, _ in batch if seq[1] >= prompts[seq[0]]]
        t += model.step_s(prefill, len(decoding), sum(prompts[s[0]] + s[2] for s in decoding), earlier)
        for seq, take in batch:
            if seq[1] < prompts[seq[0]]:
                seq[1] += take
                if seq[1] == prompts[seq[0]]:
                    seq[2], first[seq[0]] = 1, t
            else:
                seq[2] += 1
            if seq[2] == outputs[seq[0]]:
                finish[seq[0]] = t
                running.remove(seq)
                routed -= 1
    return first, finish


MODEL = StepModel(0.004, 2e-5, 3e-4, 2e-7, 1e-7, max_num_seqs=4, max_num_batched_tokens=64)


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_equals_step_by_step(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    gaps = rng.exponential(0.05 if seed % 2 else 0.3, n)
    gaps[rng.random(n) < 0.2] = 0.0  # some arrive together, as a burst does
    trace = from_rows(np.cumsum(gaps) - gaps[0], rng.integers(1, 200, n), rng.integers(1, 80, n), name=f"random-{seed}")
    result = simulate(ClusterConfig(instances=1, step_model=MODEL), trace)
    first, finish = naive(trace, MODEL)
    np.testing.assert_allclose(result.ttft_s, np.array(first) - trace.arrivals, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result.e2e_s, np.array(finish) - trace.arrivals, rtol=1e-9, atol=1e-9)


def test_one_request_times_are_the_step_models() -> None:
    """Alone, a request's first token takes one prefill step per budget's worth of prompt, and each later token one
    decode step over its growing context."""
    model = StepModel(0.01, 1e-4, 1e-3, 1e-6, max_num_seqs=4, max_num_batched_tokens=100)
    result = simulate(ClusterConfig(instances=1, step_model=model), from_rows([0.0], [250], [5]))
    prefill = model.step_s(100, 0, 0) * 2 + model.step_s(50, 0, 0)
    decode = sum(model.step_s(0, 1, 250 + g) for g in range(1, 5))
    assert result.ttft_s[0] == pytest.approx(prefill)
    assert result.tpot_s[0] == pytest.approx(decode / 4)
    assert result.e2e_s[0] == pytest.approx(prefill + decode)
