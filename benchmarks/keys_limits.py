"""`sagellm bench keys`: two API keys of one server, one rate-limited, under a mixed load (issue 69).

One `sagellm serve --api-servers 2 --api-keys-file FILE` (the default model), `vllm bench serve` as the client of each
key (its openai backend sends `OPENAI_API_KEY` as the bearer key). The `open` key has no limits; the round's
`limited-N` key may send `--requests-per-minute` R (a key of its own per round, so each round's window starts
empty). Each round runs W1-c4 (random 256-token prompts, 128 tokens out, 4 at a time) on the open key alone, and
again beside the limited key's run: `--limited-rate` requests a second (Poisson, short prompts, 16 tokens out) for
`--minutes` N, more than the limit, started first; the open key's run starts once the limited key's window is full.
The limit is a sliding 60 s window from the key's first request, so over N minutes of load above it the server must
let in R x N of the limited key's requests (counted by the server: `GET /v1/management/usage`) and answer the rest
429, whichever API server they reach; the open key's TTFT must not suffer from the refusals. Rounds alternate which
of the open key's two runs comes first, each run with fresh prompts."""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from sagellm.benchmarks.batch_live import median
from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server
from sagellm.benchmarks.proc_stats import children, cmdline, cpu_seconds
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.vllm_results import add_peers_argument, bench_serve_command, cpu_description, vllm_client
from sagellm.common.errors import FieldError

ACCEPTED_RATIO = 1.2  # the open key's TTFT p99 beside the limited key's load, against alone
ACCEPTED_MISS = 0.05  # the limited key's requests let in, off R x minutes by at most this fraction
LIVE_KEYS = ("completed", "failed", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "output_throughput")
OPEN_KEY, ADMIN_KEY = "sk-bench-open-key", "sk-bench-admin-key"
TOO_MANY = "Too Many Requests"  # the error vllm bench serve records for a 429 (the status line's reason)
API_SERVER_MODULE = "sagellm.gateway.api_servers.server"
POLL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="the server's model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (open key alone, mixed) (default: 2)")
    parser.add_argument("--requests-per-minute", type=int, default=60, help="the limited key's limit (default: 60)")
    parser.add_argument("--minutes", type=int, default=2, help="the limited key's load, whole minutes (default: 2)")
    parser.add_argument("--limited-rate", type=float, default=2.0,
                        help="the limited key's requests a second, above its limit (default: 2)")  # fmt: skip
    parser.add_argument("--limited-input-len", type=int, default=32, help="its prompts' tokens (default: 32)")
    parser.add_argument("--limited-output-len", type=int, default=16, help="its tokens out (default: 16)")
    parser.add_argument("--live-prompts", type=int, default=64, help="W1 requests in each open-key run (default: 64)")
    parser.add_argument("--concurrency", type=int, default=4, help="the open key's concurrency (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every run's prompts (default: 0)")
    add_peers_argument(parser)
    parser.add_argument("--server-args", default="", help="more options of `sagellm serve`, one string")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/keys_limits"), help="OUT.json, OUT.png")


def run(args: argparse.Namespace) -> int:
    vllm_client(args.peers)
    if args.limited_rate * 60 <= args.requests_per_minute:
        raise FieldError("limited_rate", f"--limited-rate {args.limited_rate:g}/s is not above the limit of "
                         f"{args.requests_per_minute} a minute: nothing would be refused")  # fmt: skip
    started = time.monotonic()
    rounds = trio.run(_run, args)
    cpu = cpu_description()
    print(markdown(rounds))
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores")
    command = "sagellm bench keys " + shlex.join(sys.argv[3:])
    print(f"Command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)")
    passed, line = acceptance(rounds)
    print(line)
    payload = {"benchmark": "sagellm bench keys", "command": command, "cpu": cpu, "rounds": rounds}
    for path in write_json_and_plot(args.out, payload, lambda png: plot(rounds, png, cpu)):
        print(f"wrote {path}", file=sys.stderr)
    return 0 if passed else 1


def keys_file(args: argparse.Namespace) -> bytes:
    """The server's keys: the open one, and a limited one per round (each round's window starts empty)."""
    keys = [{"name": "open", "key": OPEN_KEY}]
    keys += [{"name": limited_name(n), "key": limited_key(n), "requests_per_minute": args.requests_per_minute}
             for n in range(args.rounds)]  # fmt: skip
    return msgspec.yaml.encode({"keys": keys})


def limited_name(number: int) -> str:
    return f"limited-{number}"


def limited_key(number: int) -> str:
    return f"sk-bench-limited-{number}"


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="sagellm-keys-") as scratch:
        work = Path(scratch)
        (work / "keys.yaml").write_bytes(keys_file(args))
        extra = ("--api-servers", "2", "--api-keys-file", str(work / "keys.yaml"), "--admin-key", ADMIN_KEY,
                 *shlex.split(args.server_args))  # fmt: skip
        server = Server(work, "colocated", args.model, extra, bench="keys")
        try:
            await server.start()
            model = (await _get(server.url, "/v1/models", OPEN_KEY))["data"][0]["id"]
            await _open_run(args, server, model, args.seed + 10**6, work / "warm.json", prompts=8)  # first use
            for number in range(args.rounds):
                rounds.append(await _round(args, server, model, rng, number, work))
        finally:
            server.stop()
    return rounds


async def _round(args: argparse.Namespace, server: Server, model: str, rng: random.Random, number: int,
                 scratch: Path) -> dict[str, Any]:  # fmt: skip
    """The open key alone then mixed (an even round), or mixed then alone (an odd one)."""
    result: dict[str, Any] = {"round": number}

    async def alone() -> None:
        result["alone"] = await _open_run(args, server, model, rng.randrange(10**6), scratch / f"alone{number}.json")

    if number % 2 == 0:
        await alone()
    result["mixed"], result["limited"] = await _mixed(args, server, model, rng, number, scratch)
    if number % 2:
        await alone()
    alone_p99, mixed_p99 = result["alone"]["p99_ttft_ms"], result["mixed"]["p99_ttft_ms"]
    result["ttft_p99_ratio"] = mixed_p99 / alone_p99 if alone_p99 and mixed_p99 is not None else None
    progress(f"round {number}: {json.dumps(result)}", "keys")
    return result


async def _mixed(args: argparse.Namespace, server: Server, model: str, rng: random.Random, number: int,
                 scratch: Path) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The limited key's run, and the open key's beside it once the limited key's window is full: the open key's
    numbers, and what became of the limited key's requests."""
    name, prompts = limited_name(number), round(args.limited_rate * 60 * args.minutes)
    pids = _api_server_pids(server)
    cpu_before = [cpu_seconds(pid) for pid in pids]
    limited: dict[str, Any] = {}
    limited_done = trio.Event()

    async def limited_run() -> None:
        load = ["--request-rate", f"{args.limited_rate:g}", "--save-detailed"]  # detailed: each request's error
        out = scratch / f"limited{number}.json"
        limited.update(await _bench(args, server, model, limited_key(number), rng.randrange(10**6), out, prompts,
                                    (args.limited_input_len, args.limited_output_len), load))  # fmt: skip
        limited_done.set()

    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        nursery.start_soon(limited_run)
        while not limited_done.is_set():
            use = (await _get(server.url, "/v1/management/usage", ADMIN_KEY))["keys"][name]
            if use["last_minute"]["requests"] >= args.requests_per_minute:
                break
            await trio.sleep(POLL_S)
        window_full_s = time.monotonic() - started
        mixed = await _open_run(args, server, model, rng.randrange(10**6), scratch / f"mixed{number}.json")
        open_inside = not limited_done.is_set()
    use = (await _get(server.url, "/v1/management/usage", ADMIN_KEY))["keys"][name]
    expected = args.requests_per_minute * args.minutes
    return mixed, {
        "offered": prompts, "accepted": use["requests"], "expected": expected,
        "miss": accepted_miss(use["requests"], expected), "rate_limited": use["rate_limited"].get("requests", 0),
        "client_completed": limited["completed"], "client_429s": limited["errors"].count(TOO_MANY),
        "window_full_s": round(window_full_s, 1), "open_inside": open_inside,
        "api_server_cpu_s": [round(cpu_seconds(pid) - before, 1) for pid, before in zip(pids, cpu_before)],
    }  # fmt: skip


async def _open_run(
    args: argparse.Namespace, server: Server, model: str, seed: int, out: Path, prompts: int | None = None
) -> dict[str, Any]:
    """W1 at `--concurrency` on the open key (`prompts` requests, `--live-prompts` by default): its numbers."""
    load = ["--max-concurrency", str(args.concurrency)]
    result = await _bench(args, server, model, OPEN_KEY, seed, out, prompts or args.live_prompts, (256, 128), load)
    return {key: result.get(key) for key in LIVE_KEYS}


async def _bench(args: argparse.Namespace, server: Server, model: str, key: str, seed: int, out: Path, prompts: int,
                 lengths: tuple[int, int], load: list[str]) -> dict[str, Any]:  # fmt: skip
    """One `vllm bench serve` run on `key` (`bench_serve_command`): its result file; what it prints goes to a log
    beside it."""
    command = bench_serve_command(args.peers, server.url, model, seed, out, prompts, lengths, load)
    progress(f"{out.stem}: {prompts} requests {shlex.join(load)} on {key}, seed {seed}", "keys")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "OPENAI_API_KEY": key}  # vLLM's openai backend sends it
    with out.with_suffix(".log").open("wb") as log:
        await trio.run_process(command, env=env, stdout=log, stderr=log)
    result = json.loads(out.read_text())
    progress(f"{out.stem}: {result['completed']} completed, {result.get('failed')} failed", "keys")
    return result


async def _get(url: str, path: str, key: str) -> Any:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        reply = await client.get(path, headers={"authorization": f"Bearer {key}"})
        reply.raise_for_status()
        return reply.json()


def _api_server_pids(server: Server) -> list[int]:
    """The pids of the server's API server processes (anywhere under it)."""
    found, todo = [], [server.process.pid]
    while todo:
        pid = todo.pop()
        todo += children(pid)
        if API_SERVER_MODULE in cmdline(pid):
            found.append(pid)
    return sorted(found)


def accepted_miss(accepted: int, expected: int) -> float:
    """How far the requests let in are off the limit's share of the load, as a fraction of it."""
    return abs(accepted - expected) / expected


def acceptance(rounds: list[dict[str, Any]]) -> tuple[bool, str]:
    """Whether the rounds pass issue 69's acceptance, and the line that says so."""
    ratio = median([r["ttft_p99_ratio"] for r in rounds])
    worst = max(r["limited"]["miss"] for r in rounds)
    inside = all(r["limited"]["open_inside"] for r in rounds)
    passed = ratio is not None and ratio <= ACCEPTED_RATIO and worst <= ACCEPTED_MISS and inside
    shown = "n/a" if ratio is None else f"{ratio:.2f}x"
    return passed, (f"Acceptance (--api-servers 2; the open key's TTFT p99 mixed <= {ACCEPTED_RATIO:g}x alone, median "
                    f"of rounds: {shown}; the limited key's requests let in within {ACCEPTED_MISS:.0%} of "
                    f"requests_per_minute x minutes, worst round: {worst:.1%} off; the open key's mixed run inside "
                    f"the limited key's load: {inside}): {'PASS' if passed else 'FAIL'}")  # fmt: skip


def markdown(rounds: list[dict[str, Any]]) -> str:
    rows = ["| round | open key's run | completed / failed | TTFT p50 / p99 ms | TPOT p50 / p99 ms | out tok/s |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rounds:
        for label in ("alone", "mixed"):
            x = r[label]
            ttft = f"{x['p50_ttft_ms']:.0f} / {x['p99_ttft_ms']:.0f}"
            tpot = f"{x['p50_tpot_ms']:.1f} / {x['p99_tpot_ms']:.1f}"
            rows.append(f"| {r['round']} | {label} | {x['completed']} / {x['failed']} | {ttft} | {tpot} | "
                        f"{x['output_throughput']:.1f} |")  # fmt: skip
    rows.append("")
    rows.append(
        "| round | TTFT p99 mixed / alone | limited key: offered | let in (expected) | off by | "
        "429s (server / client) | window full after s | open run inside its load | API servers' CPU s |"
    )
    rows.append("|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        s, ratio = r["limited"], r["ttft_p99_ratio"]
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        cpu = " / ".join(f"{c:.1f}" for c in s["api_server_cpu_s"])
        rows.append(f"| {r['round']} | {shown} | {s['offered']} | {s['accepted']} ({s['expected']}) | "
                    f"{s['miss']:.1%} | {s['rate_limited']} / {s['client_429s']} | {s['window_full_s']:.0f} | "
                    f"{s['open_inside']} | {cpu} |")  # fmt: skip
    return "\n".join(rows)


def plot(rounds: list[dict[str, Any]], path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft, let_in) = plt.subplots(1, 2, figsize=(9, 4.2))
    x = [r["round"] for r in rounds]
    for offset, label in ((-0.2, "alone"), (0.2, "mixed")):
        bars = ttft.bar([i + offset for i in x], [r[label]["p99_ttft_ms"] or 0.0 for r in rounds], 0.4, label=label)
        ttft.bar_label(bars, fmt="%.0f", fontsize=8)
    ttft.set_title("open key's TTFT p99 ms", fontsize=9)
    for offset, label, key in ((-0.2, "expected", "expected"), (0.2, "let in", "accepted")):
        bars = let_in.bar([i + offset for i in x], [r["limited"][key] for r in rounds], 0.4, label=label)
        let_in.bar_label(bars, fmt="%d", fontsize=8)
    let_in.set_title("limited key's requests: let in vs requests_per_minute x minutes", fontsize=9)
    for ax in (ttft, let_in):
        ax.set_xticks(x, [f"round {i}" for i in x])
        ax.margins(y=0.2)
        ax.legend(fontsize=8, loc="upper center", ncols=2)
    fig.suptitle("Two API keys, one rate-limited, through `sagellm serve --api-servers 2` (`vllm bench serve`)",
                 fontsize=10)  # fmt: skip
    fig.text(0.5, 0.01, cpu[:150], ha="center", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
