"""`sagellm bench overload`: reliability under overload and at the edges, each scenario against our server
and against vLLM-CPU with the same client, each server started by the benchmark with the options the scenario needs.

On a small engine (ours: `--set engine.max_num_seqs=2 --set admission.max_queue=8`; vLLM: `--max-num-seqs 2`):
1. abandoned queued streams: 2 long streams fill the engine, 4 more are sent and their clients leave before their
   first token, then the long ones leave: the tokens generated for the 4 (the server's counter of generated tokens
   less what the live clients received) and the seconds from the last client leaving until the engine is idle;
2. late refusals: long streams hold every slot of the admission bound (8), 20 more come at once: their answers and
   the time to their status line (vLLM has no bound: it queues them; a timeout bounds the wait);
3. a refused batch: one /v1/completions of 2,000 prompts while the engine is busy: its answer, when, and how many of
   its prompts ran (the server's counter of prompt tokens).
On an engine of 16 (ours: `admission.max_queue=32` as well):
4. metastable: capacity (16 clients in a closed loop, 64 output tokens, ~60 s), then 4× its request rate as Poisson
   arrivals for ~90 s, clients that give up after 10 s and retry (after Retry-After when given, else at once):
   goodput (tokens/s of requests completed within their client's timeout) as % of capacity, tokens the server
   generated that no waiting client received as % of all it generated, refusals and the time to them.

Metrics come from each server's /metrics: `sagellm:` / `vllm:` `generation_tokens_total`, `prompt_tokens_total`,
`num_requests_running` and `num_requests_waiting`. The parts: the servers (`overload_servers`), the client and its
loads (`overload_client`), the scenarios (`overload_scenarios`), the table and chart (`overload_report`). A markdown
table on stdout with the CPU beside it; every number in `--out` (JSON) and a chart beside it (PNG)."""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.overload_report import markdown, plot
from sagellm.benchmarks.overload_scenarios import SCENARIOS
from sagellm.benchmarks.overload_servers import SERVERS, Setup, serving
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.vllm_results import cpu_description

# (flag, default, help): every option that changes what is measured, written out in the command stored with results
OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("small-seqs", 2, "engine batch (max_num_seqs) of scenarios 1-3"),
    ("small-queue", 8, "our admission bound (admission.max_queue) in scenarios 1-3"),
    ("long-tokens", 1500, "output tokens of the long streams that keep the engine busy"),
    ("abandoned", 4, "streams whose clients leave before their first token (scenario 1)"),
    ("abandoned-tokens", 512, "their max_tokens"),
    ("abandon-after-s", 1.0, "when they leave"),
    ("extra", 20, "requests sent while the bound is full (scenario 2)"),
    ("refusal-timeout-s", 30.0, "how long each of those waits for its answer"),
    ("batch-prompts", "2000,1000", "prompts of the one request, a comma list of sizes sent in turn (scenario 3)"),
    ("batch-timeout-s", 30.0, "how long its client waits"),
    ("batch-seqs", 16, "engine batch of the metastable test, and its capacity's closed-loop clients"),
    ("batch-queue", 32, "our admission bound in the metastable test"),
    ("batch-ttft-slo-ms", 2500.0, "the TTFT our admission bound adapts to in the metastable test (0: none)"),
    ("prompt-len", 16, "prompt tokens in the metastable test"),
    ("max-tokens", 64, "output tokens in the metastable test"),
    ("capacity-s", 60.0, "how long capacity is measured"),
    ("overload-factor", 4.0, "offered load, in multiples of capacity's request rate"),
    ("overload-s", 90.0, "how long the overload lasts"),
    ("client-timeout-s", 10.0, "when a client of the overload gives up on an attempt and retries"),
    ("idle-timeout-s", 120.0, "how long to wait for an idle engine after a scenario"),
    ("seed", 0, "seed of the prompts and arrivals"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="our server's model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--peers", default="vllm", choices=("vllm", "none"), help="compare with (default: vllm)")
    parser.add_argument(
        "--peers-dir", type=Path, default=None,
        help="where /work/shared/peers/setup.sh put vLLM-CPU and the weights (default: $PEERS or /tmp/peers)",
    )  # fmt: skip
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only this scenario (repeat)")
    for flag, default, text in OPTIONS:
        parser.add_argument(f"--{flag}", type=type(default), default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overload.json"), help="JSON (and .png)")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    results = trio.run(_run, args)
    options = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, _, _ in OPTIONS}
    options["model"] = args.model
    cpu = cpu_description()
    table = markdown(results, options)
    print(table)
    print(f"\nCPU: {cpu}")
    command = _command(args)
    minutes = (time.monotonic() - started) / 60
    print(f"Command: `{command}` ({minutes:.0f} min)")
    payload = {"benchmark": "sagellm bench overload", "command": command, "cpu": cpu, "minutes": round(minutes, 1)}
    setups = {s: {name: shlex.join(setup.options(s)) for name, setup in _setups(args).items()} for s in results}
    payload |= {"options": options, "setups": setups}
    payload |= {"results": results, "table": table}
    for path in write_json_and_plot(args.out, payload, lambda png: plot(results, options, png, cpu)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _setups(args: argparse.Namespace) -> dict[str, Setup]:
    """The servers' setups by name: a small engine for scenarios 1-3, the engine's batch for the metastable test."""
    small = Setup("small", args.small_seqs, args.small_queue)
    return {"small": small, "batch": Setup("batch", args.batch_seqs, args.batch_queue, args.batch_ttft_slo_ms or None)}


async def _run(args: argparse.Namespace) -> dict[str, dict[str, dict[str, Any]]]:
    wanted = [name for name in SCENARIOS if name in (args.only or SCENARIOS)]
    setups = _setups(args)
    servers = [s for s in SERVERS if s == "sagellm" or args.peers == s]
    results: dict[str, dict[str, dict[str, Any]]] = {server: {} for server in servers}
    peers_dir = args.peers_dir or Path(os.environ.get("PEERS", "/tmp/peers"))
    with tempfile.TemporaryDirectory(prefix="sagellm-overload-") as scratch:
        for server in servers:
            for setup in setups.values():
                names = [name for name in wanted if SCENARIOS[name][0] == setup.name]
                if not names:
                    continue
                model = args.model if server == "sagellm" else None
                async with serving(server, setup, Path(scratch), model, peers_dir) as target:
                    for name in names:
                        rng = random.Random(f"{args.seed}/{name}")  # the same prompts for every server
                        results[server][name] = await SCENARIOS[name][1](target, setup, args, rng)
                        results[server][name]["loadavg_1m"] = os.getloadavg()[0]  # the machine is shared: how busy
                        progress(f"{server}: {name} done: {results[server][name]}", "overload")
    return results


def _command(args: argparse.Namespace) -> str:
    """The run spelled out in full (every default made explicit), so the table's numbers can be reproduced."""
    parts = ["sagellm", "bench", "overload", "--peers", args.peers]
    parts += ["--model", args.model] if args.model else []
    for name in args.only or ():
        parts += ["--only", name]
    for flag, _, _ in OPTIONS:
        value = getattr(args, flag.replace("-", "_"))
        parts += [f"--{flag}", value if isinstance(value, str) else f"{value:g}"]
    return shlex.join(parts)
