"""The chaos benchmark's phases of load: 8 MB prompts three at a time while `/health` and small streams are timed
(against the server, and against the gateway in front of the instant engine, where the gateway's own share of the
wait shows), and overload: a closed loop of clients, several per admission slot, each on one keep-alive raw
connection, where shed requests must get 429 + Retry-After, memory must stay bounded and the admitted requests must
meet the server's TTFT SLO."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import trio

from sagellm.benchmarks.chaos_report import Row, lost_count, progress, status_of, tally
from sagellm.benchmarks.chaos_server import Server, answers_ok, free_port
from sagellm.benchmarks.chaos_streams import RETRIED, STREAM_TIMEOUT_S, raw_stream
from sagellm.benchmarks.raw_http import RawClient
from sagellm.common.processes import python_module
from sagellm.gateway.http.errors import RETRY_AFTER_S


async def big_prompts(port: int, work: Path, small_prompt: str | list[int], phase: str, rounds: int = 10) -> Row:
    """`rounds` times three 8 MB prompts at once to the server on `port`, from curl processes (so the probes' own
    event loop never blocks on sending them), while `/health` and two small streams are timed over raw connections
    (cheap: the prober's own lag stays out of the numbers); the small streams alone just before, to compare."""
    progress(f"big prompts ({phase}): {rounds} × three 8 MB prompts while /health and small streams are timed")
    health_ms: list[float] = []
    ttfts: list[float] = []
    statuses: list[str] = []
    ends: list[list[str]] = []
    done = trio.Event()

    body = work / "big.json"
    body.write_text(json.dumps({"prompt": "word " * 1_600_000, "max_tokens": 4}))  # 8 MB

    async def big() -> None:
        command = ["curl", "-s", "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]
        done = await trio.run_process([*command, "--data-binary", f"@{body}", f"http://127.0.0.1:{port}/v1/completions"],
                                      capture_stdout=True, check=False)  # fmt: skip
        answer, _, status = done.stdout.decode().rpartition("\n")
        try:
            code = json.loads(answer).get("error", {}).get("code", "")
        except ValueError:
            code = "unreadable"
        statuses.append(f"{status} {code}".strip())

    async def probe() -> None:
        connection = RawClient("127.0.0.1", port)
        while not done.is_set():
            sent = time.monotonic()
            await connection.get("/health")
            health_ms.append((time.monotonic() - sent) * 1000)
            await trio.sleep(0.01)
        await connection.aclose()

    async def small(ttfts: list[float]) -> None:
        connection = RawClient("127.0.0.1", port)
        while not done.is_set():
            e: list[str] = []
            t: list[float] = []
            await raw_stream(connection, small_prompt, 8, e, t)
            ends.append(e)
            ttfts.extend(x * 1000 for x in t)
        await connection.aclose()

    alone: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(small, alone)
        await trio.sleep(5)
        done.set()
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        for _ in range(2):
            nursery.start_soon(small, ttfts)
        for _ in range(rounds):
            async with trio.open_nursery() as bigs:
                for _ in range(3):
                    bigs.start_soon(big)
        done.set()
    p99 = (
        f"/health p99 {np.percentile(health_ms, 99):.0f} ms, small streams' TTFT p99 {np.percentile(ttfts, 99):.0f} ms"
        f" (alone just before: {np.percentile(alone, 99):.0f} ms)"
    )
    errors = sum(s.startswith("5") for s in statuses)
    phase_name = f"8 MB prompts ×3 at once, {rounds} times ({phase})"
    answers = f"{tally(statuses)}; {p99}"
    return Row(phase_name, f"{3 * rounds} requests", answers, server_errors=errors, lost=lost_count(ends, {"length"}))


async def big_prompts_instant(client: httpx.AsyncClient, work: Path) -> Row:
    """The same in front of the instant engine (W5: no model compute), the gateway's own share of the wait."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = python_module("sagellm.benchmarks.instant_server", "--port", str(port))
    env = {**os.environ, "SAGELLM_LOG_LEVEL": "warning"}
    with (work / "instant.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with trio.fail_after(60):
            while not await answers_ok(client, f"{url}/ready"):
                await trio.sleep(0.2)
        return await big_prompts(port, work, list(range(32)), "instant engine, W5")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)  # a request still in flight may hold the stop up to the graceful timeout
        except subprocess.TimeoutExpired:
            process.kill()


async def overload(client: httpx.AsyncClient, server: Server, args: argparse.Namespace) -> Row:
    progress(f"overload: first {args.max_queue} clients (1×) for 10 s, the TTFT to compare with")
    *_, ttfts_1x = await closed_loop(server, args.max_queue, 10.0)
    baseline = np.percentile(ttfts_1x, [50, 99]) if ttfts_1x else [float("nan")] * 2
    clients = args.overload_factor * args.max_queue
    RETRIED.clear()
    progress(f"overload: {clients} clients for {args.overload_s:.0f} s (admission bound {args.max_queue})")
    server_cpu, gateway_cpu, client_cpu = server.cpu_s(), server.gateway_cpu_s(), sum(os.times()[:2])
    slo_before = await slo_counts(client)
    statuses, ends, no_retry_after, rss, ttfts = await closed_loop(server, clients, args.overload_s)
    checked, missed = (after - before for after, before in zip(await slo_counts(client), slo_before))
    server_cpu, client_cpu = server.cpu_s() - server_cpu, sum(os.times()[:2]) - client_cpu
    gateway_cpu = server.gateway_cpu_s() - gateway_cpu
    p = np.percentile(ttfts, [50, 99]) if ttfts else [float("nan")] * 2
    odd = [x for e in ends for x in e if x != "length"]
    met = f"{100 * (checked - missed) / checked:.1f}%" if checked else "n/a"
    answers = (
        f"{tally(statuses)}; 429s without Retry-After: {no_retry_after}; admitted requests within the"
        f" {args.ttft_slo_ms:g} ms TTFT SLO as the server timed them: {met} ({checked - missed:.0f}/{checked:.0f});"
        f" TTFT p50/p99 as the load generator saw it {p[0]:.0f}/{p[1]:.0f} ms (at 1×: {baseline[0]:.0f}/"
        f"{baseline[1]:.0f} ms); RSS {rss[0]:.0f} → max {max(rss):.0f} MB; CPU s: gateway {gateway_cpu:.0f},"
        f" workers {server_cpu - gateway_cpu:.0f}, load generator {client_cpu:.0f}"
        + (f"; other ends: {tally(odd)}" if odd else "")
        + (f"; sent again after a closed pooled connection: {len(RETRIED)}" if RETRIED else "")
    )
    return Row(f"overload {args.overload_factor}× for {args.overload_s:.0f} s", f"{len(statuses)} requests, {clients}"
               " clients", answers, server_errors=sum(s.startswith("5") for s in statuses),
               lost=lost_count(ends, {"length"}) + no_retry_after)  # fmt: skip


async def slo_counts(client: httpx.AsyncClient) -> tuple[float, float]:
    """The server's count of finished requests that had an SLO, and of those that missed it (its /metrics)."""
    text = (await client.get("/metrics")).text
    totals = {"sagellm:slo_checked_total": 0.0, "sagellm:slo_violations_total": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in totals:
            totals[name.split("{")[0]] += float(value)
    return totals["sagellm:slo_checked_total"], totals["sagellm:slo_violations_total"]


async def closed_loop(
    server: Server, clients: int, duration_s: float
) -> tuple[list[str], list[list[str]], int, list[float], list[float]]:
    """`clients` clients each streaming one request after another for `duration_s`, waiting Retry-After when shed.
    Returns every request's status, the ends of the admitted ones, the 429s without Retry-After, the RSS samples
    (MB) and the admitted requests' TTFTs (ms)."""
    statuses: list[str] = []
    ttfts: list[float] = []
    ends: list[list[str]] = []
    no_retry_after = 0
    rss = [server.rss_mb()]
    deadline = trio.current_time() + duration_s

    async def one_client(i: int) -> None:
        nonlocal no_retry_after
        connection = RawClient("127.0.0.1", server.port)
        while trio.current_time() < deadline:
            e: list[str] = []
            t: list[float] = []
            with trio.move_on_after(STREAM_TIMEOUT_S) as waited:
                await raw_stream(connection, f"overload {i}", 16, e, t)
            if waited.cancelled_caught:
                await connection.aclose()
                e.append("transport hung")
            statuses.append(status_of(e))
            if e and e[0].startswith("429"):
                no_retry_after += e[0].endswith("without Retry-After")
                await trio.sleep(RETRY_AFTER_S)  # what the gateway says (a client that did not wait: no load)
                continue
            ends.append(e)
            ttfts.extend(x * 1000 for x in t)
        await connection.aclose()

    async def sample_memory() -> None:
        while trio.current_time() < deadline:
            rss.append(server.rss_mb())
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_memory)
        for i in range(clients):
            nursery.start_soon(one_client, i)
    return statuses, ends, no_retry_after, rss, ttfts
