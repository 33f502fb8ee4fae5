"""The server the chaos and faults benchmarks put through their phases: `sagellm serve GRAPH` in a process of its own,
its ipc sockets in a folder of ours, its workers found by their command line; and the chaos benchmark's first phase,
the server started over a damaged sessions file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import trio

from sagellm.benchmarks.chaos_report import Row, progress
from sagellm.benchmarks.proc_stats import children, cmdline, cpu_seconds, rss_kb
from sagellm.common.errors import StartFailed
from sagellm.common.processes import python_module
from sagellm.runtime.comm.zmq_trio import IPC_DIR_ENV

READY_TIMEOUT_S = 900  # a first run may download or convert the model
WORKER_MODULE = "sagellm.runtime.executor.worker"
SAGELLM = python_module("sagellm.cli.main")  # the CLI with this interpreter, on PATH or not


class Server:
    """`sagellm serve GRAPH` in its own process (also the faults benchmark's), ipc sockets in a folder of ours (so the
    junk phase finds them all); `extra`: more command-line options."""

    def __init__(
        self, work: Path, graph: str, model: str | None, extra: tuple[str, ...] = (), bench: str = "chaos"
    ) -> None:
        self.work, self.graph, self.model, self.extra, self.bench = work, graph, model, extra, bench
        self.state, self.ipc, self.log = work / "state", work / "ipc", work / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    async def start(self, ready_path: str = "/ready") -> float:
        """Starts it and waits until `ready_path` answers 200 (a gateway with no engine yet is never ready: wait for
        `/v1/models`); the seconds that took."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.ipc.mkdir(exist_ok=True)
        command = [*SAGELLM, "serve", self.graph, "--port", str(self.port), "--no-embedding"]
        command += ["--state-dir", str(self.state), *self.extra]
        command += ["--model", self.model] if self.model else []
        env = {**os.environ, IPC_DIR_ENV: str(self.ipc), "SAGELLM_LOG_LEVEL": "warning"}
        progress(f"starting sagellm {' '.join(command[len(SAGELLM) :])}", self.bench)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url) as client:
            while not await answers_ok(client, ready_path):
                if self.process.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
                    raise StartFailed(f"the server did not start; its log: {self.log}\n{self.log.read_text()[-2000:]}")
                await trio.sleep(0.5)
        progress(f"ready in {time.monotonic() - started:.0f} s; workers {self.workers()}", self.bench)
        return time.monotonic() - started

    def workers(self) -> dict[str, int]:
        """Worker group -> pid, of the workers running under the server now."""
        found = {}
        for pid in children(self.process.pid):
            command = cmdline(pid)
            if WORKER_MODULE in command and "--group" in command:
                found[command[command.index("--group") + 1]] = pid
        return found

    def rss_mb(self) -> float:
        """Resident memory of the server and its workers."""
        pids = [self.process.pid, *children(self.process.pid)]
        return sum(rss_kb(pid) for pid in pids) / 1024

    def gateway_cpu_s(self) -> float:
        """CPU seconds the gateway's own process has used so far (its workers not counted)."""
        return cpu_seconds(self.process.pid)

    def cpu_s(self) -> float:
        """CPU seconds the server and its workers have used so far."""
        return cpu_seconds(self.process.pid, *children(self.process.pid))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def start_over_damaged_sessions(server: Server) -> Row:
    """The server must start anyway, keep the bad sessions file aside and say so."""
    server.state.mkdir(parents=True)
    (server.state / "sessions.json").write_text('{"sessions": [ {"id": "torn')
    await server.start()
    kept = sorted(p.name for p in server.state.glob("sessions.json.bad-*"))
    said = "sessions_file_unreadable" in server.log.read_text()
    answer = f"started; the file moved aside as {kept[0]} and logged" if kept and said else "NOT moved aside/said"
    return Row("start over a damaged sessions.json", "1 file", answer, lost=0 if kept and said else 1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def answers_ok(client: httpx.AsyncClient, path: str) -> bool:
    """Whether `path` answers 200 now (a server not up yet answers nothing)."""
    try:
        return (await client.get(path)).status_code == 200
    except httpx.HTTPError:
        return False
