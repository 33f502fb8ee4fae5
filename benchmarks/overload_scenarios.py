"""The overload benchmark's scenarios, each against one running server (`overload_servers.Target`) and the same
client (`overload_client`); each returns a dict of what it measured (JSON, for the table and the results file) and
leaves the engine idle for the next.

- abandoned: long streams fill the engine; more streams are sent and their clients leave before a first token; then
  the long ones leave. The tokens generated for the streams nobody waited for (the server's own counter of generated
  tokens, less what the live clients received), and the seconds from the last client leaving to an idle engine.
- late refusals: long streams hold every slot of the admission bound; more requests come: what they are answered,
  and how long until the status line (and a first token, bounded by a timeout).
- refused batch: one /v1/completions of thousands of prompts while the engine is busy: its answer, how long that
  took, and how many of its prompts ran (the server's counter of prompt tokens).
- metastable: capacity in a closed loop at the engine's batch, its clients started together (in step: every round's
  prompts prefill in one step) and started apart (as arrivals come); then several times the first's request rate as
  Poisson arrivals of clients that time out and retry. Goodput (tokens of requests completed within their client's
  timeout) against both capacities, tokens generated that no waiting client received, and the refusals."""

from __future__ import annotations

import argparse
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.overload_client import (
    Attempt,
    closed_loop,
    completion,
    open_loop,
    percentile_ms,
    prompt,
    send,
    staggered_loop,
)
from sagellm.benchmarks.overload_servers import Setup, Target, busy, scrape, seconds_until_idle

PROMPT_LEN = 8  # tokens of every prompt but the metastable test's and the long streams'
HELD_PROMPT_LEN = 5  # tokens of a long stream's prompt: shares no factor with PROMPT_LEN (see `_prompts_ran`)
STREAM_TIMEOUT_S = 600.0  # a stream the scenario does not end itself: the bound on a hang
COUNTED_S = 1.0  # after the engine is idle, until its last requests are in the counters
TIMELINE_S = 5.0  # the metastable test's goodput is also shown per this many seconds
SAMPLED = ("num_requests_running", "num_requests_waiting", "gateway_requests_in_flight", "admission_bound")


def _say(message: str) -> None:
    progress(message, "overload")


async def _until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Waits until `ready()`, saying so every 10 s, and says so if `timeout_s` passes first (the scenario goes on:
    its numbers show what the server did)."""
    start = next_word = trio.current_time()
    with trio.move_on_after(timeout_s):
        while not ready():
            if trio.current_time() >= next_word + 10:
                next_word = trio.current_time()
                _say(f"  waiting for {what}: {next_word - start:.0f} s")
            await trio.sleep(0.05)
        return
    _say(f"  gave up waiting for {what} after {timeout_s:.0f} s")


async def _idle(target: Target, timeout_s: float) -> float | None:
    """Seconds until the engine is idle (None: not within `timeout_s`), then the pause that lets the counters catch
    up with the requests that ended last."""
    idle_s = await seconds_until_idle(target, timeout_s)
    await trio.sleep(COUNTED_S)
    return idle_s


def _tally(values: list[Any]) -> dict[str, int]:
    return {str(value): count for value, count in Counter(values).most_common()}


def _spread(values: list[float]) -> list[float] | None:
    """Least, median and most of `values`; None when there are none."""
    return [min(values), float(np.median(values)), max(values)] if values else None


async def _hold(
    nursery: trio.Nursery, target: Target, count: int, running: int, args: argparse.Namespace, rng: random.Random
) -> tuple[list[Attempt], trio.Event]:
    """`count` long streams, started in `nursery`, once the first `running` of them stream (the engine's batch is
    full); they leave when the returned event is set."""
    leave, held = trio.Event(), []
    for _ in range(count):
        body = completion(target.model, prompt(rng, HELD_PROMPT_LEN), args.long_tokens)
        nursery.start_soon(partial(send, target.port, body, STREAM_TIMEOUT_S, leave, held))
    await _until(lambda: sum(a.first_token_s is not None for a in held) >= running, 300, f"{running} long streams")
    return held, leave


async def abandoned(target: Target, setup: Setup, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    _say(f"{target.server}: abandoned queued streams: {setup.max_num_seqs} long streams, {args.abandoned} that leave")
    before = await scrape(target)
    left: list[Attempt] = []
    async with trio.open_nursery() as nursery:
        held, leave = await _hold(nursery, target, setup.max_num_seqs, setup.max_num_seqs, args, rng)
        async with trio.open_nursery() as leaving:
            for _ in range(args.abandoned):
                body = completion(target.model, prompt(rng, PROMPT_LEN), args.abandoned_tokens)
                leaving.start_soon(partial(send, target.port, body, args.abandon_after_s, into=left))
        leave.set()
    idle_s = await _idle(target, args.idle_timeout_s)
    generated = (await scrape(target))["generation_tokens_total"] - before["generation_tokens_total"]
    received = sum(a.tokens for a in held + left)
    return {
        "long_streams": len(held),
        "long_tokens_received": [a.tokens for a in held],
        "abandoned": len(left),
        "abandoned_with_a_token": sum(a.first_token_s is not None for a in left),
        "abandoned_status": _tally([a.status for a in left]),
        "generated": generated,
        "abandoned_tokens": generated - received,
        "idle_s": idle_s,
    }


async def late_refusals(target: Target, setup: Setup, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    _say(f"{target.server}: late refusals: {setup.max_queue} long streams hold the bound, {args.extra} more come")
    extra: list[Attempt] = []
    async with trio.open_nursery() as nursery:
        held, leave = await _hold(nursery, target, setup.max_queue, setup.max_num_seqs, args, rng)
        await trio.sleep(1.0)  # the rest of the held streams reach the server's queue
        async with trio.open_nursery() as more:
            for _ in range(args.extra):
                body = completion(target.model, prompt(rng, PROMPT_LEN), 16)
                more.start_soon(partial(send, target.port, body, args.refusal_timeout_s, into=extra))
        leave.set()
    await _idle(target, args.idle_timeout_s)
    refused = [a.status_s for a in extra if a.refused]
    return {
        "held": len(held),
        "extra": len(extra),
        "status": _tally([a.status or "none" for a in extra]),
        "ends": _tally([a.end for a in extra]),
        "status_p50_ms": percentile_ms([a.status_s for a in extra if a.status_s is not None], 50),
        "status_p99_ms": percentile_ms([a.status_s for a in extra if a.status_s is not None], 99),
        "refusal_p99_ms": percentile_ms(refused, 99),
        "first_token": sum(a.first_token_s is not None for a in extra),
        "timeout_s": args.refusal_timeout_s,
        "retry_after_s": _spread([a.retry_after_s for a in extra if a.retry_after_s is not None]),
    }


async def refused_batch(target: Target, setup: Setup, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Each size of `--batch-prompts` in turn, while the same long streams keep the engine busy."""
    sizes = [int(size) for size in args.batch_prompts.split(",")]
    _say(f"{target.server}: batches of {args.batch_prompts} prompts while {setup.max_num_seqs} long streams run")
    async with trio.open_nursery() as nursery:
        _, leave = await _hold(nursery, target, setup.max_num_seqs, setup.max_num_seqs, args, rng)
        batches = [await _batch(target, setup, args, rng, size) for size in sizes]
        leave.set()
    await _idle(target, args.idle_timeout_s)
    return {"batches": batches}


async def _batch(
    target: Target, setup: Setup, args: argparse.Namespace, rng: random.Random, size: int
) -> dict[str, Any]:
    before = await scrape(target)
    prompts = [prompt(rng, PROMPT_LEN) for _ in range(size)]
    answer = await send(target.port, completion(target.model, prompts, 4, stream=False), args.batch_timeout_s)
    _say(f"  {size} prompts: {answer.status} ({answer.end}) after {answer.end_s:.1f} s; waiting for them to go")
    with trio.move_on_after(args.idle_timeout_s):
        while await busy(target) > setup.max_num_seqs:  # the batch's prompts still queued or running
            await trio.sleep(0.1)
    await trio.sleep(COUNTED_S)
    after = await scrape(target)
    return {
        "prompts": size,
        "status": answer.status,
        "end": answer.end,
        "answer_s": answer.end_s if answer.end != "timeout" else None,
        "timeout_s": args.batch_timeout_s,
        "prompts_ran": _prompts_ran(after["prompt_tokens_total"] - before["prompt_tokens_total"], setup.max_num_seqs),
        "tokens_generated": after["generation_tokens_total"] - before["generation_tokens_total"],
    }


def _prompts_ran(delta: float, held: int) -> int:
    """The batch's prompts that ran, read from the server's prompt-token counter: PROMPT_LEN tokens each, plus
    HELD_PROMPT_LEN for each of the `held` long streams that ended meanwhile on a server that counts a prompt when its
    request ends (ours; vLLM counts it when it runs). The two lengths share no factor, so for `held` < PROMPT_LEN one
    number of ended streams makes the rest a multiple of PROMPT_LEN."""
    for ended in range(held + 1):
        if (delta - HELD_PROMPT_LEN * ended) % PROMPT_LEN == 0:
            return int(delta - HELD_PROMPT_LEN * ended) // PROMPT_LEN
    return round(delta / PROMPT_LEN)  # a server counting otherwise: the nearest reading


async def metastable(target: Target, setup: Setup, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        return completion(target.model, prompt(rng, args.prompt_len), args.max_tokens)

    clients = setup.max_num_seqs
    _say(
        f"{target.server}: capacity: a warm-up round, then {clients} clients in a closed loop, {args.capacity_s:.0f} s"
    )
    async with trio.open_nursery() as nursery:  # first requests pay for lazy setup (kernels, buffers): not capacity
        for _ in range(clients):
            nursery.start_soon(send, target.port, body(), STREAM_TIMEOUT_S)
    attempts, wall_s = await closed_loop(target.port, body, clients, args.capacity_s, STREAM_TIMEOUT_S)
    done = [a for a in attempts if a.completed]
    capacity_req_s, capacity_tok_s = len(done) / wall_s, sum(a.tokens for a in done) / wall_s
    capacity_e2e_ms = percentile_ms([a.end_s for a in done], 50)
    if capacity_e2e_ms is None or capacity_e2e_ms > 500 * args.client_timeout_s:
        took = f"{capacity_e2e_ms or math.inf:.0f} ms"
        _say(f"  WARNING: a request takes {took} at capacity, over half the clients' {args.client_timeout_s:g} s "
             "timeout: they will time out without any overload (a busy machine?)")  # fmt: skip
    await _idle(target, args.idle_timeout_s)
    _say(f"{target.server}: capacity with the {clients} clients started apart, {args.capacity_s:.0f} s")
    request_s = (capacity_e2e_ms or 0.0) / 1000
    apart_req_s, apart_tok_s, apart_window_s = await staggered_loop(
        target.port, body, clients, request_s, args.capacity_s, STREAM_TIMEOUT_S
    )
    await _idle(target, args.idle_timeout_s)

    rate = args.overload_factor * capacity_req_s
    _say(f"{target.server}: capacity {capacity_req_s:.2f} req/s, {capacity_tok_s:.0f} tok/s; now {rate:.2f} arrivals/s")
    before, server_cpu, client_cpu = await scrape(target), target.cpu_s(), sum(os.times()[:2])
    samples: list[dict[str, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample, target, samples, trio.current_time() + args.overload_s)
        arrivals, start = await open_loop(target.port, body, rate, args.overload_s, args.client_timeout_s, args.seed)
    server_cpu, client_cpu = target.cpu_s() - server_cpu, sum(os.times()[:2]) - client_cpu
    wall_s = trio.current_time() - start  # the window and the attempts still running at its end
    _say(f"  window closed; waiting for the engine to be idle (at most {args.idle_timeout_s:.0f} s)")
    idle_s = await _idle(target, args.idle_timeout_s)
    generated = (await scrape(target))["generation_tokens_total"] - before["generation_tokens_total"]

    tried = [a for c in arrivals for a in c.attempts]
    completed = [a for a in tried if a.completed]
    in_window = [a for a in completed if a.sent + a.end_s <= start + args.overload_s]
    goodput = sum(a.tokens for a in in_window) / args.overload_s
    delivered = sum(a.tokens for a in completed)
    buckets = [0.0] * int(args.overload_s // TIMELINE_S + 1)
    for a in completed:
        buckets[min(int((a.sent + a.end_s - start) // TIMELINE_S), len(buckets) - 1)] += a.tokens / TIMELINE_S
    refused = [a for a in tried if a.refused]
    return {
        "capacity_clients": clients,
        "capacity_req_s": capacity_req_s,
        "capacity_tok_s": capacity_tok_s,
        "capacity_failed": len(attempts) - len(done),
        "capacity_e2e_p50_ms": capacity_e2e_ms,
        "apart_req_s": apart_req_s,
        "apart_tok_s": apart_tok_s,
        "apart_window_s": apart_window_s,
        "arrival_rate": rate,
        "clients": len(arrivals),
        "clients_served": sum(c.completed for c in arrivals),
        "attempts": len(tried),
        "completed": len(completed),
        "timeouts": sum(a.end == "timeout" for a in tried),
        "refusals": len(refused),
        "refusal_status": _tally([a.status for a in refused]),
        "refusal_p99_ms": percentile_ms([a.status_s for a in refused], 99),
        "retry_after_s": _spread([a.retry_after_s for a in refused if a.retry_after_s is not None]),
        "other_ends": _tally([a.end for a in tried if not a.completed and not a.refused and a.end != "timeout"]),
        "goodput_tok_s": goodput,
        "goodput_pct": 100 * goodput / capacity_tok_s if capacity_tok_s else None,
        "goodput_apart_pct": 100 * goodput / apart_tok_s if apart_tok_s else None,
        "generated": generated,
        "delivered": delivered,
        "wasted_pct": 100 * (generated - delivered) / generated if generated else None,
        "e2e_p50_ms": percentile_ms([a.end_s for a in completed], 50),
        "idle_s": idle_s,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "wall_s": wall_s,
        "cpus": os.cpu_count(),
        "timeline_tok_s": buckets,
        "server_state": samples,
    }


async def _sample(target: Target, samples: list[dict[str, float]], until: float) -> None:
    """The server's state once a second until `until`: requests running and waiting in the engine, and on ours the
    requests in flight at the gateway and the admission bound (which adapts to the TTFT target)."""
    start = trio.current_time()
    while trio.current_time() < until:
        state = await scrape(target)
        samples.append({"t": trio.current_time() - start} | {key: state[key] for key in SAMPLED if key in state})
        await trio.sleep(1.0)


SCENARIOS = {  # name -> (the server setup it runs on, the scenario); in this order
    "abandoned": ("small", abandoned),
    "late-refusals": ("small", late_refusals),
    "refused-batch": ("small", refused_batch),
    "metastable": ("batch", metastable),
}
