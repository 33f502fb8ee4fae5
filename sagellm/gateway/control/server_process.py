"""A vllm, sglang or llamacpp engine: that project's own server, a child process of the gateway, kept alive by the one
supervision loop (`common.supervision`) under the gateway's restart policy as our own engines' workers are. A life
starts with the command line `third_party` built, is ready once the server's `/v1/models` answers, and is lost when
the process exits; meanwhile the health checks move a ready server to unhealthy and back. The gateway reaches it at
its local URL as it reaches an `openai` engine.

The server runs in a process group of its own, so ending it ends what it started too (vLLM's engine core); its output
goes to the engine's log, every life appended."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from pathlib import Path

import structlog
import trio

from sagellm.common.errors import StartFailed
from sagellm.common.nursery_errors import single_errors
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervised, Supervision, end_process, exit_cause
from sagellm.gateway.control.engine_spec import FAILED, READY, STARTING, ManagedEngine
from sagellm.gateway.control.health import HealthChecks
from sagellm.gateway.control.third_party import Launch
from sagellm.gateway.state import engine_log_hint, log_tail

log = structlog.get_logger("sagellm.gateway")
# How often a starting server's /v1/models is asked: another project's server (vLLM, SGLang, llama.cpp) tells that it
# is ready only by answering, so this wait stays a poll; its probe takes a round trip, and its start takes seconds.
READY_POLL_S = 0.5


class ServerProcess(Supervised):
    """One started server: its lives as the supervision sees them, and the engine's life as the manager drives it
    (`run`, `stop`, `pid`: what an `EngineLink` offers for an engine of ours)."""

    def __init__(
        self,
        engine: ManagedEngine,
        launch: Launch,
        restart: RestartPolicy,
        startup_timeout_s: float,
        log_file: Path,
        health: HealthChecks,
    ) -> None:
        """`startup_timeout_s`: how long a life may take to answer (a first-run download, vLLM's start-up)."""
        self.engine, self.launch, self.log_file, self.health = engine, launch, log_file, health
        self.name = f"{engine.spec.kind} server of engine {engine.id}"
        self.process: trio.Process | None = None
        self.grace_s = 0.0  # how long a graceful end waits (`stop`'s)
        self.supervision = Supervision(self, restart, startup_timeout_s=startup_timeout_s)
        self.done = trio.Event()

    # -- the engine's life ----------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the server until it is stopped, or failed: its first life did not answer, or the policy gave up."""
        engine = self.engine
        try:
            with single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.health.watch, engine)
                    await self.supervision.run()
                    nursery.cancel_scope.cancel()
        except StartFailed as error:
            if not engine.stopping:
                engine.state, engine.last_error = FAILED, str(error)
                log.warning("engine_failed", engine=engine.id, error=engine.last_error, log=str(self.log_file))
        finally:
            self.done.set()

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.returncode is None else None

    async def stop(self, force: bool, grace_s: float) -> None:
        """Ends the server: SIGTERM and up to `grace_s` to finish what it holds, or at once with `force`."""
        self.grace_s = grace_s
        await self.supervision.stop(graceful=not force)
        await self.done.wait()

    # -- Supervised -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        command, key = self.launch.command, self.engine.api_key
        shown = shlex.join(command).replace(key, "***") if key else shlex.join(command)  # a key on its command line
        log.info("engine_server_starting", engine=self.engine.id, command=shown, log=str(self.log_file))
        with self.log_file.open("ab") as output:
            self.process = await trio.lowlevel.open_process(
                command,
                env={**os.environ, **self.launch.env},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def until_ready(self) -> None:
        assert self.process is not None
        while not await self.health.answers(self.engine):
            if self.process.poll() is not None:
                self._end_group()
                last, hint = log_tail(self.log_file, 1).strip(), engine_log_hint(self.engine.id, self.log_file)
                raise StartFailed(f"{self.name} {exit_cause(self.process.returncode)} before it answered"
                                  + (f": {last}" if last else "") + f" ({hint})")  # fmt: skip
            await trio.sleep(READY_POLL_S)

    async def until_lost(self) -> str:
        assert self.process is not None
        code = await self.process.wait()
        self._end_group()
        return exit_cause(code)

    async def end(self, graceful: bool) -> None:
        """`graceful`: SIGTERM first (the server stops taking requests and finishes its own children), a kill after
        the grace period; then whatever of its process group is left is killed. A server found ended had its group
        killed then (`until_lost`, `until_ready`): its id may be another process's by now."""
        if self.process is None or self.process.returncode is not None:
            return
        await end_process(self.process, graceful, self.grace_s)
        self._end_group()

    def _end_group(self) -> None:
        """Kills what the server started that outlived it (vLLM's engine core), the moment it is found ended."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    async def on_ready(self, life: int) -> None:
        self.engine.state, self.engine.ever_ready = READY, True
        log.info("engine_ready", engine=self.engine.id, pid=self.pid, life=life)

    def on_restarting(self, cause: str, attempt: int, delay_s: float) -> None:
        engine = self.engine
        engine.restarts, engine.last_error = self.supervision.restarts.total, cause
        engine.state = STARTING

    def on_given_up(self, cause: str) -> None:
        self.engine.state, self.engine.last_error = FAILED, cause
