"""`sagellm bench agents --across-instances`: coding agents' sessions whose second turn lands on the other instance
of the model (issue 66: a KV block fetched from another instance's tiers and pages).

Two engines behind one `sagellm serve` (graphs/multi_instance.yaml), each with a RAM tier under its prefix cache
(`--ram-gb`), pages for `--cache-sessions` sessions and its KV events published; `sagellm bench agents`' sessions,
two turns each (the opening, then its return), one request at a time, no restart. Round-robin routing sends every
session's second turn to the instance that did not serve its first (with an even number of sessions, one short
request between the rounds keeps it so). Arms, one server at a time:

- fetch: route follows the engines' events, sees the other instance holds the session, and says so with the request;
  the engine fetches the blocks from there (kv_tiers/peer_blocks.py).
- recompute: the same, but route reads no events (`route.kv_events=false`): the second turn is computed whole.
- holder: `cache_aware` routing on the events sends the second turn to the instance that holds the session: the
  best case, which load does not always allow.

TTFT p50/p99 of first and returning turns and the cached tokens by tier: a table with the CPU, and `--out` with
`_instances` added, .json and .png."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sagellm.benchmarks.agents_load import Conversations, Turn, Workload, converse, warm_up
from sagellm.benchmarks.agents_report import markdown, plot, summarize
from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server
from sagellm.benchmarks.overload_servers import served_model
from sagellm.benchmarks.report import write_json_and_plot

ARMS = {"fetch": ("round_robin", True), "recompute": ("round_robin", False), "holder": ("cache_aware", True)}
ENGINES = ("engine_a", "engine_b")
BLOCK_SIZE = 16
EVENTS = {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:0", "replay_endpoint": "tcp://127.0.0.1:0"}


async def run_across(args: argparse.Namespace, cpu: str, command: str) -> int:
    from sagellm.runtime.engine.kv_cache import bytes_per_block
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import resolve_model

    started = time.monotonic()
    model = str(resolve_model(args.model))
    meta = load_model(model, load_weights=False)
    workload = Workload(args.sessions, 2, args.prefix_tokens, args.tool_tokens, args.max_tokens, 0, args.seed)
    conversations = Conversations(meta.tokenizer, workload)
    blocks = math.ceil(args.cache_sessions * conversations.session_tokens() / BLOCK_SIZE)
    kv_gib = blocks * bytes_per_block(meta.config, BLOCK_SIZE) / 2**30
    progress(f"each engine's KV cache: {blocks} blocks of {BLOCK_SIZE} tokens ({kv_gib:.2f} GiB)", "agents")
    arms: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-agents-instances-") as scratch:
        for name, (strategy, events) in ARMS.items():
            flags = _flags(strategy, events, blocks, args.ram_gb) + tuple(shlex.split(args.server_args))
            server = Server(Path(scratch) / name, "multi_instance", model, flags, bench="agents")
            try:
                await server.start()
                turns = await _sessions(server.port, conversations, args.timeout_s, name)
            finally:
                server.stop()
            arms[name] = {"summary": summarize(turns, workload), "flags": shlex.join(flags),
                          "turns": [t.to_json() for t in turns]}  # fmt: skip
    title = (f"{workload.sessions} agent sessions, ~{workload.prefix_tokens}-token prefixes, the second turn on the "
             "other of two instances")  # fmt: skip
    print(f"\n{title}; TTFT p50 / p99 ms; one request at a time\n\n{markdown(arms)}")
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores")
    print(f"Command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)")
    payload = {"benchmark": "sagellm bench agents --across-instances", "command": command, "cpu": cpu,
               "cores": os.cpu_count(), "kv_blocks_per_engine": blocks, "arms": arms}  # fmt: skip
    stem = args.out.with_name(args.out.name + "_instances")
    paths = write_json_and_plot(stem, payload, lambda png: plot(arms, png, title, cpu))
    print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    return 0 if all(p["failed"] == 0 for arm in arms.values() for p in arm["summary"].values()) else 1


def _flags(strategy: str, events: bool, blocks: int, ram_gb: float) -> tuple[str, ...]:
    settings = {"route.strategy": strategy, "route.kv_events": str(events).lower(), "route.block_size": BLOCK_SIZE}
    for engine in ENGINES:
        settings |= {
            f"{engine}.num_kv_blocks": blocks,
            f"{engine}.block_size": BLOCK_SIZE,
            f"{engine}.kv_offload_ram_gb": f"{ram_gb:g}",
            f"{engine}.kv_events_config": json.dumps(EVENTS),
        }
    return tuple(part for key, value in settings.items() for part in ("--set", f"{key}={value}"))


async def _sessions(port: int, conversations: Conversations, timeout_s: float, label: str) -> list[Turn]:
    """Every session's first turn, then every second turn, round-robin over the sessions; a short request between
    the rounds where their number is even, so each second turn goes to the other instance under round robin."""
    model = await served_model(port)
    await warm_up(port, model)  # what a first request pays for (made on first use) paid here
    await warm_up(port, model)  # ... on both instances

    async def between_rounds() -> None:
        if conversations.workload.sessions % 2 == 0:
            await warm_up(port, model)

    async def no_restart() -> None:  # the workload has none
        raise AssertionError("no restart in this workload")

    return await converse(lambda: port, model, conversations, no_restart, timeout_s, label, between_rounds)
