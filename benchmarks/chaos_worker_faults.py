"""The chaos benchmark's faults: a worker of the server killed (kill -9) or stopped (SIGSTOP) under streams. Every
stream must end once, and the worker must be back: recovery is the signal to `/ready` with every engine ready again."""

from __future__ import annotations

import os
import signal
import time

import httpx
import trio

from sagellm.benchmarks.chaos_report import Row, lost_count, progress, tally
from sagellm.benchmarks.chaos_server import READY_TIMEOUT_S, Server
from sagellm.benchmarks.chaos_streams import stream

FAULT_STREAMS = 32
FAULTS = (("decode", signal.SIGKILL), ("prefill", signal.SIGKILL), ("decode", signal.SIGSTOP))


async def lost_worker(client: httpx.AsyncClient, server: Server, group: str, fault: signal.Signals) -> Row:
    name = f"{'kill -9' if fault == signal.SIGKILL else 'SIGSTOP'} {group} worker under {FAULT_STREAMS} streams"
    progress(name)
    pid = server.workers()[group]
    ends: list[list[str]] = [[] for _ in range(FAULT_STREAMS)]
    firsts: list[list[float]] = [[] for _ in range(FAULT_STREAMS)]
    recovery: float | None = None
    async with trio.open_nursery() as nursery:
        for i in range(FAULT_STREAMS):
            nursery.start_soon(stream, client, f"stream {i}", 256, ends[i], firsts[i])
        while sum(map(bool, firsts)) < FAULT_STREAMS // 2 and not all(ends):  # half of them are streaming
            await trio.sleep(0.05)
        os.kill(pid, fault)
        struck = time.monotonic()
        while time.monotonic() - struck < READY_TIMEOUT_S:
            health = (await client.get("/ready")).json()
            if server.workers().get(group, pid) != pid and all(e["state"] == "ready" for e in health["engines"]):
                recovery = time.monotonic() - struck
                break
            await trio.sleep(0.1)
    return Row(name, f"{FAULT_STREAMS} streams", tally([x for e in ends for x in e]),
               server_errors=sum(x.startswith("500") or x == "internal" for e in ends for x in e),
               lost=lost_count(ends, {"length", "instance_lost"}), recovery_s=recovery)  # fmt: skip
