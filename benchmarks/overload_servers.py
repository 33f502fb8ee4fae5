"""The servers the overload benchmark loads, each started by it for one setup and stopped after: ours (`sagellm serve`
on the colocated graph, in a process of its own: `chaos_server.Server`) and vLLM-CPU, started as
`/work/shared/peers/serve.sh vllm` starts it (the same environment, command and weights) plus the setup's
`--max-num-seqs`, which serve.sh has no way to pass. And what the benchmark reads of them while it runs: the
Prometheus counters of generated and prompt tokens and the gauges of running and waiting requests, which both name
alike (`sagellm:...`, `vllm:...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server, answers_ok, free_port
from sagellm.benchmarks.proc_stats import children, cpu_seconds
from sagellm.benchmarks.raw_http import RawClient
from sagellm.common.errors import NotFound, StartFailed

VLLM_READY_TIMEOUT_S = 900  # it takes ~3.5 minutes here
SERVERS = ("sagellm", "vllm")


@dataclass(frozen=True)
class Setup:
    """What a server is started with for a group of scenarios: its engine's batch (`max_num_seqs`) and, on ours, the
    admission bound and the TTFT target it adapts to (vLLM has neither)."""

    name: str
    max_num_seqs: int
    max_queue: int
    ttft_slo_ms: float | None = None

    def options(self, server: str) -> tuple[str, ...]:
        """The command-line options that start `server` so."""
        if server != "sagellm":
            return ("--max-num-seqs", str(self.max_num_seqs))
        settings = [f"engine.max_num_seqs={self.max_num_seqs}", f"admission.max_queue={self.max_queue}"]
        settings += [f"admission.ttft_slo_ms={self.ttft_slo_ms:g}"] if self.ttft_slo_ms else []
        return tuple(word for setting in settings for word in ("--set", setting))


@dataclass
class Target:
    """A running server: its port, its metrics' prefix (`sagellm:`, `vllm:`), the model name it serves, and its
    process (the server's own: the rest run under it)."""

    server: str
    port: int
    prefix: str
    model: str
    pid: int

    def cpu_s(self) -> float:
        """CPU seconds the server and every process under it have used so far."""
        pids, found = [self.pid], 0
        while found < len(pids):  # breadth first: vLLM's API server → engine core → worker
            pids += children(pids[found])
            found += 1
        return cpu_seconds(*pids)


@asynccontextmanager
async def serving(server: str, setup: Setup, work: Path, model: str | None, peers: Path) -> AsyncIterator[Target]:
    """`server` started for `setup`, ready; stopped (and its children with it) when the block ends."""
    work = work / f"{server}-{setup.name}"
    work.mkdir(parents=True)
    options = setup.options(server)
    running: Server | VllmServer
    if server == "sagellm":
        running = Server(work, "colocated", model, options, bench="overload")
    else:
        running = VllmServer(work, peers, options)
    try:
        await running.start()
        model_name = await served_model(running.port)
        yield Target(server, running.port, f"{server}:", model_name, running.process.pid)
    finally:
        running.stop()


class VllmServer:
    """vLLM-CPU as `serve.sh vllm` runs it, with `extra` options after its own, in a session of its own (vLLM starts
    an engine process and workers: they are stopped together)."""

    def __init__(self, work: Path, peers: Path, extra: tuple[str, ...]) -> None:
        self.work, self.peers, self.extra = work, peers, extra
        self.port = free_port()
        self.log = work / "vllm.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        """serve.sh's command and environment for vLLM (keep in step with /work/shared/peers/serve.sh)."""
        venv = self.peers / "venv-vllm"
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_HOST_IP": "127.0.0.1"}
        env |= {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "LD_PRELOAD": f"{venv}/lib/libiomp5.so"}
        command = [f"{venv}/bin/vllm", "serve", str(self.peers / "smollm2-hf"), "--served-model-name", "smollm2"]
        command += ["--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(self.port)]
        return [*command, *self.extra], env

    async def start(self) -> None:
        command, env = self.command()
        if not Path(command[0]).exists():
            raise NotFound(f"{command[0]} is missing: install vLLM-CPU with `bash /work/shared/peers/setup.sh vllm`")
        progress(f"starting vLLM-CPU {' '.join(self.extra)} (it takes ~3.5 minutes to accept requests)", "overload")
        with self.log.open("wb") as log:  # a session of its own: stopped with its engine process and workers
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        started = trio.current_time()
        next_word = started + 30
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while not await answers_ok(client, "/v1/models"):
                waited = trio.current_time() - started
                if self.process.poll() is not None or waited > VLLM_READY_TIMEOUT_S:
                    raise StartFailed(f"vLLM did not start; its log: {self.log}\n{self.log.read_text()[-2000:]}")
                if trio.current_time() >= next_word:
                    last = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                    progress(f"  vLLM starting, {waited:.0f} s so far; its log says: {last[0][-100:]}", "overload")
                    next_word += 30
                await trio.sleep(1)
        progress(f"vLLM ready in {trio.current_time() - started:.0f} s", "overload")

    def stop(self) -> None:
        """SIGINT to its session (the server, its engine and workers), then SIGKILL to what is left after 60 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


async def served_model(port: int) -> str:
    """The first model of GET /v1/models: the name every request names."""
    client = RawClient("127.0.0.1", port)
    try:
        _, body = await client.get("/v1/models")
    finally:
        await client.aclose()
    return json.loads(body)["data"][0]["id"]


async def scrape(target: Target) -> dict[str, float]:
    """The server's Prometheus series of the target's prefix, each summed over its labels, by name without the
    prefix: generation_tokens_total, prompt_tokens_total, num_requests_running, num_requests_waiting, ..."""
    client = RawClient("127.0.0.1", target.port)
    try:
        _, body = await client.get("/metrics")
    finally:
        await client.aclose()
    totals: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line.startswith(target.prefix):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{")[0].removeprefix(target.prefix)
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


async def busy(target: Target) -> float:
    """Requests running or waiting in the engine now."""
    counts = await scrape(target)
    return counts.get("num_requests_running", 0.0) + counts.get("num_requests_waiting", 0.0)


async def seconds_until_idle(target: Target, timeout_s: float) -> float | None:
    """Seconds until the engine runs and holds no request (polled every 0.1 s); None if not within `timeout_s`."""
    start = trio.current_time()
    with trio.move_on_after(timeout_s):
        while await busy(target):
            await trio.sleep(0.1)
        return trio.current_time() - start
    return None
