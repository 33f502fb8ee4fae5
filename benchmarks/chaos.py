"""`sagellm bench chaos`: the gateway as a user runs it (`sagellm serve graphs/pd.yaml`: prefill and decode workers
under it) put through bad input, junk, overload and faults, and a table of what was tried, what each answered, how
many server errors (must be 0), how many requests were lost (no end, two ends, or a hang: must be 0), and how long
service took to come back.

Phases, in order, against the one server unless said:
- start: a damaged sessions.json in the state dir; the server must start, move it aside and say so.
- bad inputs: the hand-made cases of `chaos_cases` (each once a crash, a failed batch or a 500), beside 8 streams.
- junk: random bytes, truncated and oversized msgpack on every ZeroMQ socket of the run (its ipc files).
- big prompts: three 8 MB prompts at once, ten times, while `/health` and small streams are timed (their p99 must
  stay small: the small streams' TTFT is shown beside theirs alone, just before); against the server, and against
  the gateway in front of the instant engine (`instant_server`, W5: no model compute), where the < 50 ms holds.
- faults: kill -9 of the decode and the prefill worker, and SIGSTOP of the decode worker, each under 32 streams;
  every stream must end once, and the worker must be restarted (recovery: the signal → `/ready` with every engine
  ready again).
- overload: `--overload-factor` × the admission bound of clients in a closed loop for `--overload-s`, each on one
  keep-alive raw connection (`raw_http`: ~0.4 ms of CPU per streamed request, where httpx takes 15-30); shed requests
  must get 429 + Retry-After (and are retried after it), memory must stay bounded, and 99% of the admitted requests
  must get their first token within the `--ttft-slo-ms` the server is given (admission adapts its bound to it).
  The overload comes after the faults: the bound it leaves low grows back only as traffic flows.
- files: `sagellm run` on a YAML alias bomb, and on a truncated model file: a clear error, soon, never a hang.

The parts: the server (`chaos_server`), streamed requests (`chaos_streams`), the phases (`chaos_inputs`: bad input,
junk and bad files; `chaos_load`: big prompts and overload; `chaos_worker_faults`), and the table (`chaos_report`);
this module is the command line and the order of the phases."""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import httpx
import trio

from sagellm.benchmarks.chaos_inputs import alias_bomb, bad_inputs, junk, truncated_model
from sagellm.benchmarks.chaos_load import big_prompts, big_prompts_instant, overload
from sagellm.benchmarks.chaos_report import Row, markdown
from sagellm.benchmarks.chaos_server import Server, start_over_damaged_sessions
from sagellm.benchmarks.chaos_streams import STREAM_TIMEOUT_S
from sagellm.benchmarks.chaos_worker_faults import FAULTS, lost_worker
from sagellm.benchmarks.vllm_results import cpu_description

PHASES = ("bad-inputs", "junk", "big-prompts", "faults", "overload", "files")  # after the start, in this order


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--graph", default="graphs/pd.yaml", help="the graph served (default: %(default)s)")
    parser.add_argument("--model", "-m", default=None, help="the graph's model (default: the graph's, SmolLM2-135M)")
    parser.add_argument("--max-queue", type=int, default=32, help="admission bound during the run (default: 32)")
    parser.add_argument("--overload-factor", type=int, default=10, help="clients per admission slot (default: 10)")
    parser.add_argument("--overload-s", type=float, default=60.0, help="how long the overload lasts (default: 60)")
    parser.add_argument(
        "--ttft-slo-ms", type=float, default=2500.0, help="the server's TTFT target (admission.ttft_slo_ms)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the junk")
    parser.add_argument("--only", action="append", choices=PHASES, help="run only this phase (repeat; default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chaos.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    rows = trio.run(_run, args)
    cpu = cpu_description()
    table = markdown(rows)
    print(table)
    print(f"\nCPU: {cpu}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cpu": cpu, "graph": args.graph, "model": args.model, "rows": [asdict(r) for r in rows]}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    failed = [r.phase for r in rows if r.server_errors or r.lost]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


async def _run(args: argparse.Namespace) -> list[Row]:
    rng = random.Random(args.seed)
    wanted = set(args.only or PHASES)
    with tempfile.TemporaryDirectory(prefix="sagellm-chaos-") as scratch:
        work = Path(scratch)
        admission = (f"admission.max_queue={args.max_queue}", f"admission.ttft_slo_ms={args.ttft_slo_ms:g}")
        server = Server(work, args.graph, args.model, tuple(x for pair in admission for x in ("--set", pair)))
        rows = [await start_over_damaged_sessions(server)]
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=STREAM_TIMEOUT_S) as client:
                if "bad-inputs" in wanted:
                    rows.append(await bad_inputs(client))
                if "junk" in wanted:
                    rows.append(await junk(client, server, rng))
                if "big-prompts" in wanted:
                    rows.append(await big_prompts(server.port, work, "small", "SmolLM2, pd.yaml"))
                    rows.append(await big_prompts_instant(client, work))
                if "faults" in wanted:
                    for group, fault in FAULTS:
                        rows.append(await lost_worker(client, server, group, fault))
                if "overload" in wanted:  # last: the admission bound it leaves low takes traffic to grow back
                    rows.append(await overload(client, server, args))
        finally:
            server.stop()
        if "files" in wanted:
            rows += [await alias_bomb(work), await truncated_model(work, args.model)]
    return rows
