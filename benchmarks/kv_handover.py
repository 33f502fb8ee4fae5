"""The prefill/decode split's KV hand-over, measured on the real PD graph for the simulator's `KVTransferModel`.

The W4 benchmark's pd graph (prefill and decode workers in two processes, a core each, the KV over ZeroMQ ipc and
shared memory) serves a closed loop of one request at a time, every prompt on the PD path (pd_split's threshold 1),
of 64 to 1,024 tokens. Alone, a hand-over is the transfer itself, not a wait for the decode worker's step to end (the
simulator models that wait apart: a hand-over joins at the decode instance's next step boundary). Each request's
`RequestMetrics.kv_handover_s` (the prefill worker's first token to the decode worker's) is a sample, after a first
request that warms the path (the shared-memory arena, the sockets); the fit is linear in the prompt's tokens."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from tqdm import tqdm

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.pd_split import PDBenchConfig, Trace, build_graph, run_config
from sagellm.simulator.kv_transfer import KVTransferModel

HANDOVER_LENGTHS = (64, 128, 256, 512, 768, 1024)  # prompt tokens, each `rounds` times


@dataclass(frozen=True)
class HandoverCalibration:
    model: KVTransferModel
    samples: list[tuple[int, float]]  # (prompt tokens, seconds)
    wall_s: float


def calibrate_kv_handover(
    model: str,
    *,
    lengths: tuple[int, ...] = HANDOVER_LENGTHS,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 512,
    rounds: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> HandoverCalibration:
    from sagellm.benchmarks.workloads import random_token_prompts
    from sagellm.runtime.models.loader import load_model

    started = time.perf_counter()
    tokenizer = load_model(model, load_weights=False).tokenizer
    lengths = (lengths[0], *lengths * rounds)  # the first warms the path
    prompts = [random_token_prompts(tokenizer, 1, n, (seed, 11, i))[0] for i, n in enumerate(lengths)]
    pd = PDBenchConfig(
        model=model,
        threshold_tokens=1,
        output_len=4,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    requests = Trace(prompts, [0.0] * len(prompts)).requests(pd)
    with tqdm(total=len(requests), desc="KV hand-overs", unit="req", disable=not progress) as bar:
        result, _, _ = run_config(build_graph("pd", pd), requests, None, bar, max_in_flight=1)
    samples = []
    for request in requests[1:]:
        outcome = result.outcomes.get(request.request_id)
        handover = outcome.metrics.kv_handover_s if outcome is not None and outcome.metrics is not None else None
        if handover is None or math.isnan(handover):
            why = outcome.error.message if outcome is not None and outcome.error else "no hand-over measured"
            raise BenchmarkError(f"KV hand-over calibration: request {request.request_id}: {why}")
        samples.append((request.num_prompt_tokens, handover))
    return HandoverCalibration(KVTransferModel.fit(samples), samples, time.perf_counter() - started)
