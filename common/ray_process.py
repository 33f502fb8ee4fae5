"""A process run on a node of a Ray cluster: the engine servers the control plane starts there (`placement: ray:GROUP`
in an engine's spec, and the autoscaler's replicas when the gateway has a cluster), and the ranks of a parallel
engine whose `distributed_executor_backend` is ray.

Ray chooses the node from the group's resources and hosts a small actor there, `ProcessHost`, which starts the
command as a child it watches; the child dies with the actor (Linux's parent-death signal), so a lost actor never
leaves a server behind. `RayProcess` is the handle on it, with the parts of `trio.Process` the engine supervisor
uses (`pid`, `returncode`, `wait`, `terminate`, `kill`) and of `subprocess.Popen` a rank's leader uses (`poll`,
`join`), so a process on another node is supervised, health-checked and restarted (by our restart policy, as a new
actor, perhaps on another node) like one spawned here.
The actor itself is never restarted by Ray: a process that died is the supervisor's to judge (a crash loop is not
retried for ever), and its log stays on its node, where the actor reads its last lines for the error message."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from sagellm.common.errors import StartFailed, Unavailable

PR_SET_PDEATHSIG = 1
NAMESPACE = "sagellm"  # of every actor sageLLM starts
# Ray runs its worker processes at niceness 15 (RAY_worker_niceness), and a child inherits it: an engine there gets a
# tenth of a core beside any ordinary process, so a start on a busy node takes minutes. A ProcessHost is a server's
# parent, not background work: it runs at the niceness it was given, as Ray's own job supervisors do.
HOST_ENV = {"RAY_worker_niceness": "0"}


class RayMissing(Unavailable, RuntimeError):
    """Something is to run on Ray, and Ray is not installed here."""


class RayStartError(StartFailed, RuntimeError):  # RuntimeError: what callers of a failed start have caught
    """Ray placed no process in time, or could not start it (the message says which)."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing("work placed on a Ray cluster needs Ray; install Ray: pip install 'sagellm[ray]'") from None
    return ray


def connect(address: str) -> Any:
    """Ray, connected to the cluster at `address` (`auto`: the one `ray start` made on this host; once per process;
    blocking). Raises RayMissing without Ray."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
    return ray


class RayProcess:
    """A command run by a `ProcessHost` actor on the node Ray placed it on."""

    def __init__(self, actor: Any, pid: int, host: str, port: int) -> None:
        self._actor, self.pid, self.host, self.port = actor, pid, host, port
        self.returncode: int | None = None
        self._ended = actor.wait.remote()  # resolves to its exit code when it ends

    @classmethod
    def launch(
        cls, options: dict[str, Any], command: Callable[[str, int], list[str]], env: dict[str, str], timeout_s: float
    ) -> RayProcess:
        """Places a `ProcessHost` with Ray's actor `options` (resources, a placement group's bundle) on the
        connected cluster and starts `command(host, port)` there, with the node's address and a port free on it
        (blocking). Raises RayStartError if Ray has not placed it within `timeout_s` (no node has the resources, and
        no Ray autoscaler added one) or could not start it (the command, the actor or its node failed)."""
        ray = import_ray()
        options = {**options, "max_restarts": 0, "max_concurrency": 4}  # a dead process is its supervisor's to judge
        options["runtime_env"] = {"env_vars": HOST_ENV}
        actor = ray.remote(ProcessHost).options(**options).remote()
        try:
            host, port = ray.get(actor.address.remote(), timeout=timeout_s)
            pid = ray.get(actor.start.remote(command(host, port), env), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise RayStartError(f"Ray placed no process with {options} in {timeout_s:g} s") from None
        except ray.exceptions.RayError as error:
            ray.kill(actor, no_restart=True)
            cause = getattr(error, "cause", None) or error  # a task's own exception, without Ray's traceback
            raise RayStartError(f"Ray could not start the process: {type(cause).__name__}: {cause}") from error
        return cls(actor, pid, host, port)

    @classmethod
    async def start(
        cls,
        address: str,
        options: dict[str, Any],
        command: Callable[[str, int], list[str]],
        env: dict[str, str],
        timeout_s: float,
    ) -> RayProcess:
        """`launch` on the cluster at `address`, from a trio task."""

        def place() -> RayProcess:
            connect(address)
            return cls.launch(options, command, env, timeout_s)

        return await trio.to_thread.run_sync(place, abandon_on_cancel=True)

    async def wait(self) -> int:
        """Its exit code once it has ended (-signal when killed; -SIGKILL when its actor or node was lost)."""
        if self.returncode is None:
            await trio.to_thread.run_sync(self.join, None, abandon_on_cancel=True)
        assert self.returncode is not None
        return self.returncode

    def join(self, timeout_s: float | None) -> int | None:
        """Its exit code, waiting up to `timeout_s` for it to end (None: as long as it takes); None if it still runs
        (blocking)."""
        if self.returncode is None:
            ray = import_ray()
            ready, _ = ray.wait([self._ended], timeout=timeout_s)
            if not ready:
                return None
            try:
                self.returncode = ray.get(self._ended)
            except ray.exceptions.RayActorError:
                self.returncode = -signal.SIGKILL
            ray.kill(self._actor, no_restart=True)
        return self.returncode

    def poll(self) -> int | None:
        return self.join(0)

    def terminate(self) -> None:
        self._actor.send_signal.remote(signal.SIGTERM)

    def kill(self) -> None:
        """Kills the actor, and with it the process."""
        import_ray().kill(self._actor, no_restart=True)

    def node_id(self) -> str:
        """The Ray node it runs on (blocking)."""
        return import_ray().get(self._actor.node_id.remote())

    def log_tail(self) -> str:
        """The last line it logged (blocking; "" when the actor is gone)."""
        ray = import_ray()
        try:
            return ray.get(self._actor.log_tail.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):
            return ""


class ProcessHost:
    """The Ray actor that runs one process on its node and reports on it."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkdtemp(prefix="sagellm-ray-")) / "process.log"

    def address(self) -> tuple[str, int]:
        """This node's address as Ray knows it, and a port free on it."""
        import ray

        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, argv: list[str], env: dict[str, str]) -> int:
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **env}, preexec_fn=_die_with_parent)  # fmt: skip
        return self._process.pid

    def wait(self) -> int:
        assert self._process is not None
        return self._process.wait()

    def send_signal(self, number: int) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(number)

    def log_tail(self) -> str:
        try:
            lines = self._log.read_bytes()[-64 * 1024 :].decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""


def _die_with_parent() -> None:
    """In the child, before it runs: SIGKILL when the actor's process ends, however it ends."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
