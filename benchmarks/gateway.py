"""`sagellm bench gateway`: W5 over HTTP. What a front end adds to each streamed chat request, ours against
vllm-router, in one run on this machine.

The paths, each a server process of its own on 127.0.0.1, the load generator in this process:
- engine: a fake OpenAI engine (`fake_engine`, aiohttp: 16 words of text per request from preformatted chunks, no
  compute), sent to directly: the floor;
- engine on our HTTP server: the same fake engine served by sageLLM's own HTTP server (`fake_engine --server ours`):
  what our HTTP stack alone costs beside aiohttp's, with no pipeline, tokenizing or JSON behind it;
- vllm-router: `vllm-router` (PyPI) in front of that fake engine (round robin over its one worker);
- sagellm: `sagellm serve`'s gateway and pipeline (admission, policy_sort, route, metrics_sink) in front of the
  instant engine streaming 16 words of text (`instant_server`), the chat tokenized with SmolLM2's tokenizer and
  template as a real request is;
- sagellm ×N API servers (`--api-servers N`, default 2; 0 leaves it out): the same, with N API server processes
  answering HTTP and tokenizing in front of the process that runs the graph (its CPU counts them all).
The load is closed-loop: `--concurrency` clients, each on a kept-alive connection (`raw_http`), sending the next
streamed chat request when its last one ends; `--warmup` requests first, then `--requests` timed; with `--rounds N`
the paths take turns N times and each path's rounds are pooled. Every request must
end with 16 text events and [DONE], or the path fails. Reported per path and concurrency: req/s, e2e p50/p99, the
latency added over the engine's own (e2e minus the engine path's, same concurrency), the CPU the path's server
processes spent per request (from /proc: the router's, or our gateway's; not the fake engine's), and the load
generator's own (on 2 cores it competes with the server it loads)."""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import trio

from sagellm.benchmarks.fake_engine import REPLY
from sagellm.benchmarks.proc_stats import children, cpu_seconds
from sagellm.benchmarks.raw_http import RawClient, drain, lines
from sagellm.benchmarks.serve import chunk_text
from sagellm.common.errors import StartFailed
from sagellm.common.processes import python_module

TOKENS = 16  # per reply, as in W5
OUR_HTTP = "engine on our HTTP server"
PROMPT = "Summarize the plot of Romeo and Juliet in one sentence."
READY_TIMEOUT_S = 120


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", default="1,16,64", help="comma list of clients (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per path (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests first (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="rounds of every path in turn, pooled per path (the machine's drifts hit all paths alike; default: 1)",
    )  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer our gateway uses")
    parser.add_argument("--router", default=None, help="the vllm-router command (default: found on PATH)")
    parser.add_argument("--api-servers", type=int, default=2, help="API servers of the last path (0: no such path)")
    parser.add_argument(
        "--result-filename", type=Path, default=Path("benchmarks/results/gateway.json"),
        help="the JSON results file with --save-result (PNG: same stem)",
    )  # fmt: skip
    parser.add_argument("--save-result", action="store_true", help="write the JSON results and a PNG chart")


@dataclass
class Server:
    name: str
    port: int
    process: subprocess.Popen


@dataclass
class PathResult:
    path: str
    concurrency: int
    ok: int
    failed: int
    wall_s: float
    e2e_ms: list[float] = field(repr=False)
    server_cpu_s: float
    client_cpu_s: float

    def summary(self, floor_p50: float | None, floor_p99: float | None) -> dict[str, Any]:
        p50, p99 = (float(np.percentile(self.e2e_ms, q)) for q in (50, 99)) if self.e2e_ms else (None, None)
        per = 1e3 / max(self.ok, 1)
        return {
            "path": self.path,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "failed": self.failed,
            "req_s": self.ok / self.wall_s,
            "e2e_p50_ms": p50,
            "e2e_p99_ms": p99,
            "added_p50_ms": None if floor_p50 is None or p50 is None else p50 - floor_p50,
            "added_p99_ms": None if floor_p99 is None or p99 is None else p99 - floor_p99,
            "server_cpu_ms_per_request": self.server_cpu_s * per if self.path != "engine" else None,
            "client_cpu_ms_per_request": self.client_cpu_s * per,
        }


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.chaos_server import free_port
    from sagellm.benchmarks.vllm_results import cpu_description

    router = args.router or shutil.which("vllm-router") or str(Path(sys.prefix) / "bin" / "vllm-router")
    if not Path(router).exists() and not shutil.which(router):
        print("vllm-router is not installed (pip install vllm-router): it is half of this comparison")
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"CPU: {cpu_description()}")
    with ExitStack() as stack:
        engine_port, router_port, gateway_port, split_port = free_port(), free_port(), free_port(), free_port()
        bare_port = free_port()
        servers = {
            "engine": Server("engine", engine_port, _start(stack, python_module("sagellm.benchmarks.fake_engine",
                "--port", str(engine_port), "--tokens", str(TOKENS)))),
            OUR_HTTP: Server(OUR_HTTP, bare_port, _start(stack, python_module("sagellm.benchmarks.fake_engine",
                "--port", str(bare_port), "--tokens", str(TOKENS), "--server", "ours"))),
            "vllm-router": Server("vllm-router", router_port, _start(stack, [router, "--port", str(router_port),
                "--worker-urls", f"http://127.0.0.1:{engine_port}", "--policy", "round_robin",
                "--log-level", "warning", "--prometheus-port", str(free_port())])),
            "sagellm": Server("sagellm", gateway_port, _start(stack, python_module("sagellm.benchmarks.instant_server",
                "--port", str(gateway_port), "--tokens", str(TOKENS), "--model", args.model, "--reply", REPLY))),
        }  # fmt: skip
        if args.api_servers:
            split = f"sagellm ×{args.api_servers} API servers"
            servers[split] = Server(split, split_port, _start(stack, python_module("sagellm.benchmarks.instant_server",
                "--port", str(split_port), "--tokens", str(TOKENS), "--model", args.model, "--reply", REPLY,
                "--api-servers", str(args.api_servers))))  # fmt: skip
        models = {name: trio.run(_ready, server) for name, server in servers.items()}
        results = []
        for concurrency in concurrencies:
            rounds = []
            for round_ in range(args.rounds):
                for name, server in servers.items():
                    print(f"{name} at concurrency {concurrency}, round {round_ + 1} ...", file=sys.stderr)
                    measure = (_measure, server, models[name], concurrency, args.warmup, args.requests, name)
                    rounds.append(trio.run(*measure))
            results += [_pooled([r for r in rounds if r.path == name]) for name in servers]
    summaries = _summaries(results)
    _print(summaries)
    if args.save_result:
        from sagellm.benchmarks.report import write_json_and_plot

        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
        payload = {
            "benchmark": "sagellm bench gateway",
            "cpu": cpu_description(),
            "config": config,
            "results": summaries,
        }
        paths = write_json_and_plot(args.result_filename, payload, lambda png: _plot(summaries, png))
        print("wrote " + ", ".join(map(str, paths)))
    return 0 if all(r.failed == 0 for r in results) else 1


def _start(stack: ExitStack, command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "SAGELLM_LOG_LEVEL": "warning"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()

    stack.callback(stop)
    return process


async def _ready(server: Server) -> str:
    """The model the server names once it answers GET /v1/models (the router answers once its worker is healthy)."""
    deadline = trio.current_time() + READY_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise StartFailed(f"{server.name} exited with {server.process.returncode} before it was ready")
        client = RawClient("127.0.0.1", server.port)
        try:
            reply, body = await client.get("/v1/models")
            if reply.status == 200:
                return str(msgspec.json.decode(body)["data"][0]["id"])
        except (OSError, ValueError, KeyError, IndexError):
            pass
        finally:
            await client.aclose()
        if trio.current_time() > deadline:
            raise StartFailed(f"{server.name} did not answer within {READY_TIMEOUT_S} s")
        await trio.sleep(0.2)


async def _measure(server: Server, model: str, concurrency: int, warmup: int, requests: int, name: str) -> PathResult:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": TOKENS, "stream": True}
    clients = [RawClient("127.0.0.1", server.port) for _ in range(concurrency)]
    e2e_ms: list[float] = []
    failed = 0
    issued = 0

    async def client_loop(client: RawClient, limit: int, timed: bool) -> None:
        nonlocal issued, failed
        while issued < limit:
            issued += 1
            start = time.perf_counter()
            try:
                events = await _stream(client, body)
            except (OSError, ValueError, trio.BrokenResourceError) as error:
                failed += 1
                print(f"{name}: {type(error).__name__}: {error}", file=sys.stderr)
                await client.aclose()
                continue
            if events != TOKENS:
                failed += 1
            elif timed:
                e2e_ms.append(1e3 * (time.perf_counter() - start))

    async with trio.open_nursery() as nursery:  # warm-up: untimed
        for client in clients:
            nursery.start_soon(client_loop, client, warmup, False)
    issued, failed = 0, 0
    cpu_before, own_before = _server_cpu_s(server), _own_cpu_s()
    wall = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client_loop, client, requests, True)
    wall = time.perf_counter() - wall
    server_cpu, client_cpu = _server_cpu_s(server) - cpu_before, _own_cpu_s() - own_before
    for client in clients:
        await client.aclose()
    return PathResult(name, concurrency, len(e2e_ms), failed, wall, e2e_ms, server_cpu, client_cpu)


async def _stream(client: RawClient, body: dict[str, Any]) -> int:
    """Sends one streamed chat request; the text events of its reply, or -1 when it did not end with [DONE]."""
    reply, chunks = await client.post("/v1/chat/completions", body)
    if reply.status != 200:
        await drain(chunks)
        return -1
    events, done = 0, False
    async for line in lines(chunks):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        events += bool(chunk_text(msgspec.json.decode(data)))
    return events if done else -1


def _pooled(rounds: list[PathResult]) -> PathResult:
    """One path's rounds as one result: all their requests, latencies, wall time and CPU."""
    first = rounds[0]
    return PathResult(
        first.path, first.concurrency, sum(r.ok for r in rounds), sum(r.failed for r in rounds),
        sum(r.wall_s for r in rounds), [ms for r in rounds for ms in r.e2e_ms],
        sum(r.server_cpu_s for r in rounds), sum(r.client_cpu_s for r in rounds),
    )  # fmt: skip


def _server_cpu_s(server: Server) -> float:
    """CPU seconds of the server's process and its children so far."""
    return cpu_seconds(server.process.pid, *children(server.process.pid))


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _summaries(results: list[PathResult]) -> list[dict[str, Any]]:
    floors = {
        r.concurrency: (float(np.percentile(r.e2e_ms, 50)), float(np.percentile(r.e2e_ms, 99)))
        for r in results
        if r.path == "engine" and r.e2e_ms
    }
    return [r.summary(*floors.get(r.concurrency, (None, None))) for r in results]


def _print(summaries: list[dict[str, Any]]) -> None:
    def f(value: float | None, digits: int = 2) -> str:
        return "–" if value is None else f"{value:,.{digits}f}"

    print("\n| path | clients | ok / failed | req/s | e2e p50 ms | e2e p99 ms | added p50 ms | added p99 ms | "
          "server CPU ms / request | load generator CPU ms / request |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summaries:
        print(f"| {s['path']} | {s['concurrency']} | {s['ok']} / {s['failed']} | {f(s['req_s'], 0)} | "
              f"{f(s['e2e_p50_ms'])} | {f(s['e2e_p99_ms'])} | {f(s['added_p50_ms'])} | {f(s['added_p99_ms'])} | "
              f"{f(s['server_cpu_ms_per_request'])} | {f(s['client_cpu_ms_per_request'])} |")  # fmt: skip


def _plot(summaries: list[dict[str, Any]], path: Path) -> None:
    """Per concurrency: req/s, added p50 and server CPU per request, a bar per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({s["concurrency"] for s in summaries})
    panels = (("req/s (higher is better)", "req_s"), ("added e2e p50 ms", "added_p50_ms"),
              ("server CPU ms / request", "server_cpu_ms_per_request"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4.2))
    paths = list(dict.fromkeys(s["path"] for s in summaries))
    width = 0.8 / len(paths)
    for ax, (title, key) in zip(axes, panels):
        largest = max((s[key] or 0.0 for s in summaries), default=0.0)
        for i, name in enumerate(paths):
            values = [next((s[key] or 0.0 for s in summaries if (s["path"], s["concurrency"]) == (name, c)), 0.0)
                      for c in concurrencies]  # fmt: skip
            xs = [x + (i - (len(paths) - 1) / 2) * width for x in range(len(concurrencies))]
            bars = ax.bar(xs, values, width, label=name, color=f"C{i}")
            ax.bar_label(bars, fmt="%.2f" if largest < 10 else "%.1f" if largest < 1000 else "%.0f", fontsize=7)
        ax.set_xticks(range(len(concurrencies)), [f"c{c}" for c in concurrencies])
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.25)  # room for the legend above the bars
    fig.suptitle("W5 over HTTP: streamed 16-token chat requests through each front end", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
