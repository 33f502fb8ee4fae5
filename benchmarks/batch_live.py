"""`sagellm bench batch`: a Batch API job beside live traffic, and a restart in the middle of it (issue 68).

Each round runs W1-c4 (`vllm bench serve` as the client: random 256-token prompts, 128 tokens out, 4 at a time)
through one `sagellm serve` alone, and again right after a batch of `--lines` chat requests went in through the
openai SDK (`files.create` + `batches.create`; the Batch API sends its lines at the `low` class, which yields to the
live ones in the engine: runtime/engine/priority_classes.py). What is compared is the live requests' TTFT and TPOT
with and without the batch, and how far the batch got meanwhile. Once the live load is through, the server is
stopped mid-batch and started again on the same state dir: the batch must then end `completed` with every line
answered exactly once. Rounds alternate which of the two live runs comes first (the batch must be over before a run
alone), each run with fresh prompts. `--server-args "--long-prefill-token-threshold 0"` turns the yielding off (the
shares it rides on), for the run without it."""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server
from sagellm.benchmarks.overload_servers import served_model
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.vllm_results import add_peers_argument, bench_serve_command, cpu_description, vllm_client

ACCEPTED_RATIO = 1.2  # the live TTFT p99 beside the batch, against alone
LIVE_KEYS = ("completed", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "output_throughput")
WORDS = ("river", "stone", "lantern", "orchard", "copper", "harbor", "meadow", "signal", "thunder", "violet", "ember",
         "glacier", "compass", "willow")  # fmt: skip
POLL_S = 2.0
BATCH_TIMEOUT_S = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="the server's model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (alone, beside the batch) (default: 2)")
    parser.add_argument("--lines", type=int, default=500, help="requests in each round's batch (default: 500)")
    parser.add_argument("--line-words", type=int, default=100, help="words in a batch line's prompt (default: 100)")
    parser.add_argument("--line-max-tokens", type=int, default=32, help="a batch line's max_tokens (default: 32)")
    parser.add_argument("--live-prompts", type=int, default=64, help="W1 requests in each live run (default: 64)")
    parser.add_argument("--concurrency", type=int, default=4, help="the live load's concurrency (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the batch files and the live prompts (default: 0)")
    add_peers_argument(parser)
    parser.add_argument("--server-args", default="", help="more options of `sagellm serve`, one string")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_live"), help="OUT.json, OUT.png")


def run(args: argparse.Namespace) -> int:
    vllm_client(args.peers)
    started = time.monotonic()
    rounds = trio.run(_run, args)
    cpu = cpu_description()
    print(markdown(rounds))
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores")
    command = "sagellm bench batch " + shlex.join(sys.argv[3:])
    print(f"Command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)")
    ratio = median([r["ttft_p99_ratio"] for r in rounds])
    kept = all(r["restart"]["every_line_once"] for r in rounds)
    passed = ratio is not None and ratio <= ACCEPTED_RATIO and kept
    print(f"Acceptance (live TTFT p99 beside the batch <= {ACCEPTED_RATIO:g}x alone, median of rounds: "
          f"{ratio:.2f}x; every line once after a restart: {kept}): {'PASS' if passed else 'FAIL'}")  # fmt: skip
    payload = {"benchmark": "sagellm bench batch", "command": command, "cpu": cpu, "rounds": rounds}
    for path in write_json_and_plot(args.out, payload, lambda png: plot(rounds, png, cpu)):
        print(f"wrote {path}", file=sys.stderr)
    return 0 if passed else 1


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="sagellm-batch-") as scratch:
        server = Server(Path(scratch), "colocated", args.model, tuple(shlex.split(args.server_args)), bench="batch")
        try:
            await server.start()
            model = await served_model(server.port)
            await _live(args, server, model, args.seed + 10**6, Path(scratch) / "warm.json", prompts=8)  # first use
            for number in range(args.rounds):
                rounds.append(await _round(args, server, model, rng, number, Path(scratch)))
        finally:
            server.stop()
    return rounds


async def _round(args: argparse.Namespace, server: Server, model: str, rng: random.Random, number: int,
                 scratch: Path) -> dict[str, Any]:  # fmt: skip
    """Alone then beside the batch (an even round), or beside, the batch to its end, then alone (an odd one)."""
    result: dict[str, Any] = {"round": number}

    async def alone() -> None:
        result["alone"] = await _live(args, server, model, rng.randrange(10**6), scratch / f"alone{number}.json")

    if number % 2 == 0:
        await alone()
    batch_id = await trio.to_thread.run_sync(_create_batch, server.url, batch_file(args, model, rng))
    before = await trio.to_thread.run_sync(_batch, server.url, batch_id)
    result["beside"] = await _live(args, server, model, rng.randrange(10**6), scratch / f"beside{number}.json")
    during = await trio.to_thread.run_sync(_batch, server.url, batch_id)
    result["lines_done_during_live"] = during.request_counts.completed - before.request_counts.completed
    result["restart"] = await _restart_mid_batch(server, batch_id, args.lines)
    if number % 2:
        await alone()
    result["ttft_p99_ratio"] = _ratio(result, "p99_ttft_ms")
    result["tpot_p50_ratio"] = _ratio(result, "p50_tpot_ms")
    progress(f"round {number}: {json.dumps(result)}", "batch")
    return result


async def _live(
    args: argparse.Namespace, server: Server, model: str, seed: int, out: Path, prompts: int | None = None
) -> dict[str, Any]:
    """W1 at `--concurrency` through `vllm bench serve` (`prompts` requests, `--live-prompts` by default): its
    numbers; what it prints goes to a log beside its results."""
    load = ["--max-concurrency", str(args.concurrency)]
    command = bench_serve_command(args.peers, server.url, model, seed, out, prompts or args.live_prompts, (256, 128),
                                  load)  # fmt: skip
    progress(f"live W1-c{args.concurrency}, {prompts or args.live_prompts} requests, seed {seed}", "batch")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    with out.with_suffix(".log").open("wb") as log:
        await trio.run_process(command, env=env, stdout=log, stderr=log)
    result = {key: json.loads(out.read_text()).get(key) for key in LIVE_KEYS}
    progress(f"live: {result}", "batch")
    return result


def batch_file(args: argparse.Namespace, model: str, rng: random.Random) -> bytes:
    """The batch's input file: chat requests with prompts of `--line-words` random words, greedy."""
    lines = []
    for i in range(args.lines):
        words = " ".join(rng.choice(WORDS) for _ in range(args.line_words))
        body = {"model": model, "messages": [{"role": "user", "content": f"Summarize: {words}"}],
                "max_tokens": args.line_max_tokens, "temperature": 0}  # fmt: skip
        lines.append({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _create_batch(url: str, data: bytes) -> str:
    client = _client(url)
    file = client.files.create(file=("batch.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    progress(f"batch {batch.id} created", "batch")
    return batch.id


def _batch(url: str, batch_id: str) -> Any:
    return _client(url).batches.retrieve(batch_id)


async def _restart_mid_batch(server: Server, batch_id: str, lines: int) -> dict[str, Any]:
    """Stops the server while the batch runs, starts it again on the same state dir, and waits for the batch's end:
    what it ended as, and whether every line has exactly one answer."""
    at_stop = await trio.to_thread.run_sync(_batch, server.url, batch_id)
    progress(f"stopping the server mid-batch ({at_stop.request_counts.completed} of {lines} done)", "batch")
    server.stop()
    await server.start()
    started = time.monotonic()
    while (batch := await trio.to_thread.run_sync(_batch, server.url, batch_id)).status not in (
        "completed", "failed", "cancelled", "expired"
    ):  # fmt: skip
        if time.monotonic() - started > BATCH_TIMEOUT_S:
            break
        progress(f"batch {batch.status}: {batch.request_counts.completed} of {lines} done", "batch")
        await trio.sleep(POLL_S * 5)
    answered: list[str] = []
    if batch.output_file_id:
        text = await trio.to_thread.run_sync(lambda: _client(server.url).files.content(batch.output_file_id).text)
        answered = [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
    once = sorted(answered) == sorted(f"line-{i}" for i in range(lines))
    mid_batch = at_stop.status == "in_progress" and at_stop.request_counts.completed < lines
    return {"done_at_stop": at_stop.request_counts.completed, "status": batch.status,
            "completed": batch.request_counts.completed, "failed": batch.request_counts.failed,
            "every_line_once": batch.status == "completed" and once and mid_batch,
            "batch_s": (batch.completed_at or 0) - batch.created_at}  # fmt: skip


def _ratio(result: dict[str, Any], key: str) -> float | None:
    alone, beside = result["alone"].get(key), result["beside"].get(key)
    return beside / alone if alone and beside is not None else None


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def markdown(rounds: list[dict[str, Any]]) -> str:
    rows = ["| round | live run | TTFT p50 / p99 ms | TPOT p50 / p99 ms | out tok/s | batch lines done meanwhile |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rounds:
        for label in ("alone", "beside"):
            x = r[label]
            done = str(r["lines_done_during_live"]) if label == "beside" else ""
            ttft = f"{x['p50_ttft_ms']:.0f} / {x['p99_ttft_ms']:.0f}"
            tpot = f"{x['p50_tpot_ms']:.1f} / {x['p99_tpot_ms']:.1f}"
            rows.append(f"| {r['round']} | {label} | {ttft} | {tpot} | {x['output_throughput']:.1f} | {done} |")
    rows.append("")
    rows.append("| round | TTFT p99 beside / alone | TPOT p50 beside / alone | restart: done at stop | batch end | "
                "every line once | batch s |")  # fmt: skip
    rows.append("|---|---|---|---|---|---|---|")
    for r in rounds:
        s = r["restart"]
        rows.append(f"| {r['round']} | {r['ttft_p99_ratio']:.2f}x | {r['tpot_p50_ratio']:.2f}x | {s['done_at_stop']} | "
                    f"{s['status']} ({s['completed']} ok, {s['failed']} failed) | {s['every_line_once']} | "
                    f"{s['batch_s']} |")  # fmt: skip
    return "\n".join(rows)


def plot(rounds: list[dict[str, Any]], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, key, label in zip(axes, ("p99_ttft_ms", "p50_tpot_ms"), ("live TTFT p99 ms", "live TPOT p50 ms")):
        for offset, run_label in ((-0.2, "alone"), (0.2, "beside")):
            values = [r[run_label][key] or 0.0 for r in rounds]
            bars = ax.bar([r["round"] + offset for r in rounds], values, width=0.4, label=run_label)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([r["round"] for r in rounds], [f"round {r['round']}" for r in rounds])
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("W1-c4 alone and beside a Batch API job (`vllm bench serve` as the client)", fontsize=10)
    fig.text(0.5, 0.01, cpu[:150], ha="center", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
