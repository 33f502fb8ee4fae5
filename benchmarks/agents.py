"""`sagellm bench agents`: coding agents' sessions coming back to a server, across a restart (issue 66: the tiers under
the prefix cache, `--kv-offload-ram-gb` and `--kv-offload-dir`).

8 sessions, each opening with ~6,000 tokens of its own (system prompt, tool schema, repository files, made from a
seed), 5 turns each, a turn adding ~250 tokens of tool output and the previous reply; streamed chat completions,
temperature 0, up to 100 tokens a reply. Sessions take turns round-robin, one request at a time; our engine's KV cache
holds ~2.5 sessions (`--num-kv-blocks`), so no session's prefix is still in its pages when it comes back. After every
session's turn 3 the server gets SIGTERM and is started again with the same flags: turns 4-5 are "after restart".
Arms, one server at a time, each alone on the machine: sagellm (no tiers), sagellm-tiers (`--kv-offload-ram-gb 4
--kv-offload-dir` a fresh folder), llamacpp (`llama-server --cache-ram 8192`, one slot of 8,192 tokens) and vllm
(vLLM-CPU with prefix caching), the peers as /work/shared/peers/serve.sh runs them and restarted the same way; a peer
not installed is skipped with a note. TTFT p50/p99 of first turns, of returning turns before and after the restart,
and the cached prompt tokens the servers report: a table with the CPU, `--out`.json and .png.

`--w1-overhead`: W1-c16 (`sagellm bench serve`'s client) against `sagellm serve` without and with the tiers' flags,
a fresh server per run, `--repeats` runs of each interleaved: output tok/s and TTFT p50 (the gate: at most 3% worse).
`--across-instances`: the sessions' second turns sent to the other of two instances, whose engine fetches the
session's blocks from the first, against computing them and against routing to the holder (agents_instances.py)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from sagellm.benchmarks.agents_instances import run_across
from sagellm.benchmarks.agents_load import Conversations, Workload, converse, warm_up
from sagellm.benchmarks.agents_report import markdown, overhead_markdown, overhead_plot, plot, summarize
from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server, answers_ok, free_port
from sagellm.benchmarks.overload_servers import VllmServer, served_model
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.serve import ServeConfig, Target, benchmark
from sagellm.benchmarks.serve import summarize as summarize_w1
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import InvalidInput, NotFound, StartFailed

ARMS = ("sagellm", "sagellm-tiers", "llamacpp", "vllm")
PEERS_MODEL = "smollm2-135m-instruct"  # the model the peers serve (serve.sh): another --model runs our arms alone
BLOCK_SIZE = 16
STOP_TIMEOUT_S = 180  # a clean shutdown writes the tiers' blocks to disk first
W1_OPTIONS = ("ram-gb", "disk-gb", "server-args", "seed", "repeats", "w1-prompts")  # what --w1-overhead reads
ACROSS_OPTIONS = ("sessions", "prefix-tokens", "tool-tokens", "max-tokens", "cache-sessions", "ram-gb", "server-args",
                  "seed")  # fmt: skip  # what --across-instances reads
OVERHEAD_GATE = 1.03  # the tiers' W1-c16: output tok/s at most 3% lower, TTFT p50 at most 3% higher
# (flag, default, help): every option that changes what is measured, written out in the command stored with results
OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("arms", ",".join(ARMS), "comma list of the arms to run, in turn"),
    ("sessions", 8, "agent sessions"),
    ("turns", 5, "turns per session"),
    ("prefix-tokens", 6000, "tokens of each session's own opening (system prompt, tool schema, files)"),
    ("tool-tokens", 250, "tokens of tool output a turn adds"),
    ("max-tokens", 100, "max_tokens of a reply"),
    ("restart-after", 3, "the server is restarted after every session's turn N (0: never)"),
    ("cache-sessions", 2.5, "our engine's KV cache holds this many sessions (their longest turn)"),
    ("ram-gb", 4.0, "--kv-offload-ram-gb of the tiers' arm"),
    ("disk-gb", 0.0, "--kv-offload-disk-gb of the tiers' arm (0: the engine's default)"),
    ("llamacpp-cache-ram", 8192, "llama-server --cache-ram, MiB"),
    ("server-args", "", "more `sagellm serve` options for our arms (and the W1 runs)"),
    ("vllm-args", "", "more `vllm serve` options (its KV cache: VLLM_CPU_KVCACHE_SPACE=4 GiB, all 8 sessions)"),
    ("seed", 0, "seed of the sessions' texts (and the W1 prompts)"),
    ("repeats", 3, "--w1-overhead: runs of each server, interleaved; medians"),
    ("w1-prompts", 64, "--w1-overhead: requests per run (W1-c16: 64 at concurrency 16)"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=PEERS_MODEL, help="our arms' model (default: %(default)s)")
    for flag, default, text in OPTIONS:
        parser.add_argument(f"--{flag}", type=type(default), default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--w1-overhead", action="store_true", help="run the W1-c16 overhead check instead")
    across = "two instances: second turns on the other one, fetched from the first or computed"
    parser.add_argument("--across-instances", action="store_true", help=across)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="seconds one turn may take")
    parser.add_argument(
        "--peers-dir", type=Path, default=None,
        help="where /work/shared/peers/setup.sh put the peers and their weights (default: $PEERS or /tmp/peers)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/agents"), help="JSON and PNG stem")
    parser.add_argument("--logs", type=Path, default=None, help="copy every server's log here (default: none kept)")


def run(args: argparse.Namespace) -> int:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS):
        raise InvalidInput(f"--arms {args.arms!r}: choose from {', '.join(ARMS)}")
    started = time.monotonic()
    cpu, command = cpu_description(), _command(args)
    if args.w1_overhead:
        return trio.run(_w1_overhead, args, cpu, command)
    if args.across_instances:
        return trio.run(run_across, args, cpu, command)
    workload = Workload(args.sessions, args.turns, args.prefix_tokens, args.tool_tokens, args.max_tokens,
                        args.restart_after, args.seed)  # fmt: skip
    results = trio.run(_agents, args, arms, workload)
    table = markdown(results["arms"])
    title = (f"{workload.sessions} agent sessions x {workload.turns} turns, ~{workload.prefix_tokens}-token prefixes, "
             f"restart after turn {workload.restart_after}")  # fmt: skip
    print(f"\n{title}; TTFT p50 / p99 ms; one request at a time\n\n{table}")
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores")
    print(f"Command: `{command}` ({(time.monotonic() - started) / 60:.0f} min)")
    payload = {"benchmark": "sagellm bench agents", "command": command, "cpu": cpu, "cores": os.cpu_count()}
    paths = write_json_and_plot(args.out, payload | results, lambda png: plot(results["arms"], png, title, cpu))
    print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    ours = [arm for name, arm in results["arms"].items() if name.startswith("sagellm")]
    return 0 if all(p["failed"] == 0 for arm in ours for p in arm["summary"].values()) else 1


async def _agents(args: argparse.Namespace, arms: list[str], workload: Workload) -> dict[str, Any]:
    from sagellm.runtime.engine.kv_cache import bytes_per_block
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.model_cache import resolve_model

    model = str(resolve_model(args.model))
    meta = load_model(model, load_weights=False)
    context = meta.config.max_position_embeddings
    conversations = Conversations(meta.tokenizer, workload)
    longest = conversations.session_tokens()
    if longest > context:
        raise InvalidInput(f"a session's last turn takes up to {longest} tokens, over the model's context of "
                           f"{context}: fewer --turns, --prefix-tokens or --tool-tokens")  # fmt: skip
    blocks = math.ceil(args.cache_sessions * longest / BLOCK_SIZE)
    kv_gib = blocks * bytes_per_block(meta.config, BLOCK_SIZE) / 2**30
    progress(f"our KV cache: {blocks} blocks of {BLOCK_SIZE} tokens ({kv_gib:.2f} GiB); a session: {longest}", "agents")
    peers = args.peers_dir or Path(os.environ.get("PEERS", "/tmp/peers"))
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-agents-") as scratch:
        for name in arms:
            work = Path(scratch) / name
            work.mkdir()
            why = _not_runnable(name, args, peers)
            if why:
                progress(f"{name}: skipped: {why}", "agents")
                results[name] = {"skipped": why}
                continue
            server, group, flags = _server(name, args, work, model, peers, blocks)
            try:
                arm = await _arm(name, server, group, conversations, args.timeout_s, args.logs)
                results[name] = arm | {"flags": flags}
            except (StartFailed, NotFound) as error:
                if name.startswith("sagellm"):
                    raise
                results[name] = {"skipped": f"did not start: {str(error)[:500]}"}
    shape = {k: getattr(workload, k) for k in Workload.__dataclass_fields__}
    cache = {
        "kv_blocks": blocks,
        "block_size": BLOCK_SIZE,
        "kv_gib": kv_gib,
        "session_tokens": longest,
    }
    return {"workload": shape | {"concurrency": 1}, "our_kv_cache": cache, "arms": results}


def _not_runnable(name: str, args: argparse.Namespace, peers: Path) -> str | None:
    """Why a peer cannot run here (not installed, or another model asked for); None when it can."""
    if name.startswith("sagellm"):
        return None
    if args.model != PEERS_MODEL:
        return f"the peers serve {PEERS_MODEL} only (serve.sh), not {args.model}"
    needs = {"llamacpp": (LlamaCppServer.BINARY, LlamaCppServer.WEIGHTS), "vllm": ("venv-vllm/bin/vllm", "smollm2-hf")}
    missing = [str(peers / path) for path in needs[name] if not (peers / path).exists()]
    return f"missing {', '.join(missing)} (/work/shared/peers/setup.sh installs it)" if missing else None


def _server(name: str, args: argparse.Namespace, work: Path, model: str, peers: Path, blocks: int) -> tuple:
    """(the arm's server, whether its stop signal goes to a process group, the flags it is started with)."""
    if name == "llamacpp":
        extra = ("-np", "1", "-c", "8192", "--cache-ram", str(args.llamacpp_cache_ram))
        return LlamaCppServer(work, peers, extra), True, " ".join(extra)
    if name == "vllm":
        extra = ("--max-model-len", "8192", "--enable-prefix-caching", "--enable-prompt-tokens-details")
        extra += tuple(shlex.split(args.vllm_args))
        return VllmServer(work, peers, extra), True, " ".join(extra)
    extra = ("--num-kv-blocks", str(blocks), "--block-size", str(BLOCK_SIZE), *shlex.split(args.server_args))
    if name == "sagellm-tiers":
        extra += _tier_flags(args, work / "kv-tiers")
    return Server(work, "colocated", model, extra, bench="agents"), False, shlex.join(extra)


def _tier_flags(args: argparse.Namespace, directory: Path) -> tuple[str, ...]:
    flags = ("--kv-offload-ram-gb", f"{args.ram_gb:g}", "--kv-offload-dir", str(directory))
    return flags + (("--kv-offload-disk-gb", f"{args.disk_gb:g}") if args.disk_gb else ())


async def _arm(
    name: str, server: Any, group: bool, conversations: Conversations, timeout_s: float, logs: Path | None
) -> dict:
    """The sessions through one server, restarted as the workload says; stopped at the end, its logs (before and
    after the restart) copied into `logs` when given."""
    restarts: list[float] = []
    try:
        await server.start()
        model = await served_model(server.port)
        await warm_up(server.port, model)

        async def restart() -> None:
            began = time.monotonic()
            progress(f"{name}: SIGTERM, then the same server again", "agents")
            stop(server.process, group)
            _keep_log(server.log, logs, f"{name}-before-restart.log")
            await server.start()
            await warm_up(server.port, model)
            restarts.append(time.monotonic() - began)

        turns = await converse(lambda: server.port, model, conversations, restart, timeout_s, name)
    finally:
        server.stop()
        _keep_log(server.log, logs, f"{name}.log")
    return {
        "summary": summarize(turns, conversations.workload),
        "restart_s": restarts[0] if restarts else None,
        "turns": [t.to_json() for t in turns],
    }


def _keep_log(log: Path, logs: Path | None, name: str) -> None:
    if logs is not None and log.exists():
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, logs / name)


def stop(process: subprocess.Popen | None, group: bool) -> None:
    """SIGTERM (a clean shutdown: our engine writes its cached blocks to disk), SIGKILL after STOP_TIMEOUT_S."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM) if group else process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL) if group else process.kill()
        process.wait()


class LlamaCppServer:
    """llama.cpp's server as `serve.sh llamacpp` runs it (keep in step with /work/shared/peers/serve.sh), `extra`
    options after its own, in a session of its own."""

    BINARY, WEIGHTS = "llama-build/bin/llama-server", "gguf/SmolLM2-135M-Instruct.F32.gguf"

    def __init__(self, work: Path, peers: Path, extra: tuple[str, ...]) -> None:
        self.peers, self.extra, self.log = peers, extra, work / "llama-server.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        command = [str(self.peers / self.BINARY), "-m", str(self.peers / self.WEIGHTS), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "-a", "smollm2", "-np", "16", "-c", "8192", "--cont-batching"]
        command += ["-t", "2", "-tb", "2", *self.extra]
        progress(f"starting llama-server {' '.join(self.extra)}", "agents")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while not await answers_ok(client, "/health"):
                if self.process.poll() is not None or time.monotonic() - started > 300:
                    raise StartFailed(f"llama-server did not start; its log: {self.log}\n"
                                      f"{self.log.read_text(errors='replace')[-2000:]}")  # fmt: skip
                await trio.sleep(0.5)

    def stop(self) -> None:
        stop(self.process, True)


async def _w1_overhead(args: argparse.Namespace, cpu: str, command: str) -> int:
    """W1-c16 through `sagellm serve` without and with the tiers' flags, a fresh server per run, the order of the two
    alternating run by run; medians."""
    from sagellm.benchmarks.serve_datasets import load_tokenizer, random_requests
    from sagellm.runtime.models.model_cache import resolve_model

    model = str(resolve_model(args.model))
    tokenizer = load_tokenizer(model)
    names = ("sagellm", "sagellm-tiers")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-agents-w1-") as scratch:
        for repeat in range(args.repeats):
            prompts = random_requests(tokenizer, args.w1_prompts, 256, 128, seed=(args.seed, repeat))
            for name in names if repeat % 2 == 0 else names[::-1]:
                work = Path(scratch) / f"{name}-{repeat}"
                extra = tuple(shlex.split(args.server_args))
                extra += _tier_flags(args, work / "kv-tiers") if name == "sagellm-tiers" else ()
                server = Server(work, "colocated", model, extra, bench="agents")
                progress(f"W1-c16 run {repeat + 1}/{args.repeats}: {name}", "agents")
                try:
                    await server.start()
                    config = ServeConfig((Target(name, server.url),), max_concurrency=16, ignore_eos=True,
                                         progress=False)  # fmt: skip
                    result = await benchmark(config, [prompts])
                finally:
                    server.stop()
                if result.errors:
                    raise StartFailed(f"{name}: {result.errors}")
                runs[name].append(summarize_w1(result.runs[0].records, result.runs[0].wall_s))
    keys = ("out_tok_s", "ttft_p50_ms", "tpot_p50_ms", "completed", "failed")
    medians = {name: {k: statistics.median(r[k] for r in rows) for k in keys} for name, rows in runs.items()}
    plain, tiers = medians["sagellm"], medians["sagellm-tiers"]
    overhead_pct = 100 * (1 - tiers["out_tok_s"] / plain["out_tok_s"])
    ttft_ratio = tiers["ttft_p50_ms"] / plain["ttft_p50_ms"]
    passed = overhead_pct <= 100 * (OVERHEAD_GATE - 1) and ttft_ratio <= OVERHEAD_GATE
    print(f"\nW1-c16 ({args.w1_prompts} requests, 256 in / 128 out), medians of {args.repeats} interleaved runs\n")
    print(overhead_markdown(medians, overhead_pct, ttft_ratio))
    print(f"\nCPU: {cpu}; {os.cpu_count()} cores\nCommand: `{command}`")
    print(f"Gate (at most {100 * (OVERHEAD_GATE - 1):.0f}% worse): {'PASS' if passed else 'FAIL'}")
    payload = {"benchmark": "sagellm bench agents --w1-overhead", "command": command, "cpu": cpu, "medians": medians,
               "overhead_pct": overhead_pct, "ttft_p50_ratio": ttft_ratio, "passed": passed, "runs": runs}  # fmt: skip
    stem = args.out.with_name(args.out.name + "_w1_overhead")
    paths = write_json_and_plot(stem, payload, lambda png: overhead_plot(medians, png, cpu))
    print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    return 0 if passed else 1


def _command(args: argparse.Namespace) -> str:
    """The run spelled out in full (every default made explicit), so the table's numbers can be reproduced."""
    parts = ["sagellm", "bench", "agents", "--model", args.model] + (["--w1-overhead"] if args.w1_overhead else [])
    parts += ["--across-instances"] if args.across_instances else []
    for flag, _, _ in OPTIONS:
        if args.w1_overhead and flag not in W1_OPTIONS or args.across_instances and flag not in ACROSS_OPTIONS:
            continue
        value = getattr(args, flag.replace("-", "_"))
        parts += [f"--{flag}", value if isinstance(value, str) else f"{value:g}"]
    return shlex.join(parts)
