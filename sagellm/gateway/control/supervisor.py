"""The lifecycle of the control plane's engines: the supervisor spawns a managed process, waits for its health check,
watches it, and restarts it; an `openai` engine (a server we did not start) it only health-checks.

Each managed process is kept alive by the one supervision loop (`common.supervision`): one that dies after having
served is restarted under the `RestartPolicy` (backoff with jitter, a bounded number of attempts in a row); one that
never became ready is failed at once with the last line it logged, since a bad model or port does not heal by
retrying. Managed processes run in their own session (a Ctrl-C at the gateway's terminal
reaches the gateway, which stops them in order), with their log, pid file and state in their own folder; a gateway
killed outright leaves them running, so the next one on that state directory stops such orphans first
(`stop_orphans`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import structlog
import trio

from sagellm.common.errors import StartFailed
from sagellm.common.processes import python_module
from sagellm.common.ray_process import RayProcess
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervision, end_process, exit_cause
from sagellm.gateway.config import ADMIN_KEY_ENV, API_KEY_ENV, DEFAULT_GRAPH
from sagellm.gateway.control.engine_spec import FAILED, READY, STARTING, UNHEALTHY, ManagedEngine
from sagellm.runtime.pipeline.cluster import RayCluster

log = structlog.get_logger("sagellm.gateway")

LOG_FILE, PID_FILE = "engine.log", "engine.pid"
# The gauge of queued requests in the Prometheus text of vLLM, llama.cpp and sageLLM servers.
WAITING = re.compile(
    r"^(?:vllm:num_requests_waiting|llamacpp:requests_deferred|sagellm:num_requests_waiting)(?:\{[^}]*\})? (\S+)$",
    re.MULTILINE,
)


class Supervisor:
    """Runs engines' processes and health checks; the manager owns the registry and decides when to stop them."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        health_interval_s: float = 5.0,
        startup_timeout_s: float = 600.0,
        stop_grace_s: float = 15.0,
        restart: RestartPolicy | None = None,
        ray: RayCluster | None = None,
        relocated: Callable[[ManagedEngine, str], None] = lambda engine, url: None,
    ) -> None:
        """`startup_timeout_s` covers a first-run model download; `stop_grace_s` is how long a process may take to
        stop after SIGTERM before it is killed; `restart`: when a process that died after serving is started again;
        `ray`: the cluster engines placed `ray:GROUP` run on; `relocated(engine, url)`: such an engine's server is
        now reached at `url` (each start may land on another node)."""
        self._client, self.ray, self.relocated = client, ray, relocated
        self.health_interval_s, self.startup_timeout_s = health_interval_s, startup_timeout_s
        self.stop_grace_s, self.restart = stop_grace_s, restart or RestartPolicy()

    async def supervise(self, engine: ManagedEngine) -> None:
        """Runs the engine's process until it is stopped or failed, restarting it when it dies after serving."""
        supervision = engine.supervision = Supervision(
            _EngineProcess(self, engine), self.restart, startup_timeout_s=self.startup_timeout_s
        )
        try:
            await supervision.run()
        except StartFailed as error:  # it never served: a bad model or port does not heal by retrying
            engine.state, engine.last_error = FAILED, str(error)
            log.warning("engine_failed", engine=engine.id, error=engine.last_error)
        except Exception as exc:  # anything else fails this engine alone: the gateway serves the others
            log.exception("engine_supervision_failed", engine=engine.id)
            engine.state, engine.last_error = FAILED, f"{type(exc).__name__}: {exc}"
            await end_process(engine.process, graceful=False, grace_s=0)  # a process it started serves no one now

    async def spawn(self, engine: ManagedEngine) -> trio.Process | RayProcess:
        """Starts the engine's server here, or on the Ray node its placement names (its URL then that node's)."""
        if engine.spec.placement is not None:
            assert self.ray is not None  # the manager refuses a Ray placement without a cluster (400)
            group = engine.spec.placement.removeprefix("ray:")
            env = {API_KEY_ENV: engine.api_key or ""}  # the node's own environment otherwise: its GPUs are Ray's
            process = engine.process = await RayProcess.start(
                self.ray.address, self.ray.group(group).options(), lambda host, port: _command(engine, host, port),
                env, self.startup_timeout_s,
            )  # fmt: skip
            self.relocated(engine, f"http://{process.host}:{process.port}")
            return process
        engine.directory.mkdir(parents=True, exist_ok=True)  # its log and pid file (a Ray node keeps its own log)
        with (engine.directory / LOG_FILE).open("ab") as logfile:
            process = engine.process = await trio.lowlevel.open_process(
                _command(engine), stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                env=_environment(engine), start_new_session=True,
            )  # fmt: skip
        (engine.directory / PID_FILE).write_text(f"{process.pid}\n")
        return process

    async def death_cause(self, engine: ManagedEngine) -> str:
        """One line: killed by a signal, or its exit code and the last line it logged (its error message)."""
        process = engine.process
        code = process.returncode
        if code < 0:
            return f"the process was {exit_cause(code)}"
        if isinstance(process, RayProcess):
            last = (await trio.to_thread.run_sync(process.log_tail))[-300:]
        else:
            last = log_tail(engine.directory / LOG_FILE, 1)[-300:]
        return f"the process {exit_cause(code)}" + (f": {last}" if last else "")

    async def end_process(self, engine: ManagedEngine, force: bool) -> None:
        """Ends the engine for good: SIGTERM, then SIGKILL after `stop_grace_s` (at once with `force`); the caller
        set `engine.stopping`."""
        if engine.supervision is not None:
            await engine.supervision.stop(graceful=not force)
        else:
            await end_process(engine.process, not force, self.stop_grace_s)

    # -- health ---------------------------------------------------------------------------------------------------
    async def _healthy(self, engine: ManagedEngine, path: str) -> bool:
        try:
            reply = await self._client.get(engine.url + path, headers=_auth(engine), timeout=5)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def probe(self, engine: ManagedEngine) -> bool:
        """Checks the engine's health now (what the periodic check does), moving it between ready and unhealthy."""
        ok = await self._healthy(engine, "/v1/models" if engine.spec.kind == "openai" else "/health")
        if engine.state in (READY, UNHEALTHY) and not engine.stopping:
            engine.state = READY if ok else UNHEALTHY
        return ok

    async def _until_ready(self, engine: ManagedEngine, path: str) -> None:
        """Returns once the check passes (or the engine is being stopped)."""
        while not engine.stopping and not await self._healthy(engine, path):
            await trio.sleep(0.25)

    async def _check_health(self, engine: ManagedEngine, path: str) -> None:
        """Every `health_interval_s`: ready while the check passes, unhealthy while it fails."""
        while True:
            await trio.sleep(self.health_interval_s)
            if engine.stopping:
                return
            ok = await self._healthy(engine, path)
            if engine.stopping:
                return
            if ok != (engine.state == READY):
                log.warning("engine_health", engine=engine.id, healthy=ok)
            engine.state = READY if ok else UNHEALTHY
            if ok and engine.stats is not None:
                engine.stats.waiting = await self._waiting(engine)

    async def _waiting(self, engine: ManagedEngine) -> int:
        """Requests waiting at the server, from its Prometheus metrics (vLLM's, llama.cpp's or ours); 0 where it
        exposes none. Requests running there are counted by the gateway itself, which sent them."""
        try:
            reply = await self._client.get(engine.url + "/metrics", headers=_auth(engine), timeout=5)
        except httpx.HTTPError:
            return 0
        if reply.status_code != 200:
            return 0
        return round(sum(float(value) for value in WAITING.findall(reply.text)))

    async def watch_remote(self, engine: ManagedEngine) -> None:
        """An openai engine is not ours to restart: it is ready whenever its `/v1/models` answers."""
        with trio.move_on_after(self.startup_timeout_s):
            await self._until_ready(engine, "/v1/models")
            if engine.stopping:
                return
            engine.state, engine.ever_ready = READY, True
        if not engine.ever_ready:
            engine.state, engine.last_error = UNHEALTHY, f"{engine.url}/v1/models does not answer 200"
        await self._check_health(engine, "/v1/models")


class _EngineProcess:
    """A managed engine's server as its supervision sees it: ready once `/health` answers, lost when its process
    exits (a failing health check only marks it unhealthy: the process may recover, or be restarted once it ends)."""

    def __init__(self, supervisor: Supervisor, engine: ManagedEngine) -> None:
        self.supervisor, self.engine, self.name = supervisor, engine, engine.id

    async def start(self) -> None:
        await self.supervisor.spawn(self.engine)

    async def until_ready(self) -> None:
        while not await self.supervisor._healthy(self.engine, "/health"):
            if self.engine.process.returncode is not None:  # (also once a stop has ended it)
                raise StartFailed(await self.supervisor.death_cause(self.engine))
            await trio.sleep(0.25)

    async def until_lost(self) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.supervisor._check_health, self.engine, "/health")
            await self.engine.process.wait()
            nursery.cancel_scope.cancel()
        return await self.supervisor.death_cause(self.engine)

    async def end(self, graceful: bool) -> None:
        await end_process(self.engine.process, graceful, self.supervisor.stop_grace_s)

    async def on_ready(self, life: int) -> None:
        engine = self.engine
        engine.state, engine.ever_ready = READY, True
        log.info("engine_ready", engine=engine.id, pid=engine.process.pid, url=engine.url)

    def on_restarting(self, cause: str, attempt: int, delay_s: float) -> None:
        engine = self.engine
        engine.restarts, engine.last_error = engine.restarts + 1, cause
        engine.state = STARTING  # (after `last_error`: the state's setter writes the routing's problem from it)

    def on_given_up(self, cause: str) -> None:
        self.engine.state, self.engine.last_error = FAILED, cause


def _auth(engine: ManagedEngine) -> dict[str, str]:
    """The engine's own key (a managed process gets a fresh one; an openai server the one registered with it)."""
    return {"authorization": f"Bearer {engine.api_key}"} if engine.api_key else {}


def _command(engine: ManagedEngine, host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    serve = python_module("sagellm.cli.main", "serve")
    port = engine.port if port is None else port
    common = ["--host", host, "--port", str(port), "--state-dir", str(engine.directory)]
    if engine.spec.kind == "embedding":
        return [*serve, "--no-llm", "--embedding-model", engine.spec.model, *common]
    settings = {"backend": "cuda" if engine.gpus or engine.spec.use_gpu else "cpu", **engine.spec.engine}
    if engine.spec.tensor_parallel > 1:
        settings["tensor_parallel_size"] = engine.spec.tensor_parallel
    graph = [str(DEFAULT_GRAPH), "--model", engine.spec.model, "--served-model-name", engine.name, "--no-embedding"]
    # Each value as JSON, which `--set` reads as the YAML scalar it is (true, null, 0.5, "text").
    overrides = [arg for name, value in settings.items() for arg in ("--set", f"engine.{name}={json.dumps(value)}")]
    return [*serve, *graph, *overrides, *common]


def _environment(engine: ManagedEngine) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    env[API_KEY_ENV] = engine.api_key
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, engine.gpus))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ("" if there is none), for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_orphans(engines_root: Path) -> None:
    """Each manager keeps its engines in `engines_root/<its pid>/`. For every such folder whose manager is gone (it
    was killed), stops the engine processes it left behind and removes the folder; live managers are not touched."""
    for folder in engines_root.glob("*"):
        if not folder.name.isdigit() or _alive(int(folder.name)):
            continue
        for pid_file in folder.glob(f"*/{PID_FILE}"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pid_file.read_text())
                if str(pid_file.parent) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
                    log.warning("engine_orphan_stopped", pid=pid, directory=str(pid_file.parent))
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
