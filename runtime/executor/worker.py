"""A worker: runs one process group of a pipeline graph and links it to the other processes over ZeroMQ.

    sagellm worker --connect tcp://HEAD:5555 --group decode [--key-file K]  # started by hand, on any host
    python -m sagellm.runtime.executor.worker --connect ... --group          # how the parent starts `process` groups

Either way the worker knows only the parent's control endpoint and its group. It says Hello, gets the graph (YAML
text: no file is shared), binds its data socket, opens its nodes (engines load their models), says Ready with the
endpoint, and runs once the parent sends every group's endpoint (see `control` for the whole exchange). While it
runs, it heartbeats its engine stats and held requests, which is how the parent routes by load and knows what to fail
if this worker is lost. It exits when its inputs end (saying End first), when the parent says End, when the parent
that started it is gone (within a second, kill -9 included: `common.parent_death`; its socket folder goes with it),
or when the parent falls silent for the peer timeout (how a worker on another host, or on a Ray node, finds its run
gone). A failure the code names (a model that will not load) is told to the parent (End with its error), which raises
it as what it is: one line for the user, the exit code of its kind.

In a secure run (`comm.curve`) the worker uses the run's key for every socket: from `--key-file` (a worker started by
hand) or `SAGELLM_RUN_KEY` (set by the parent for the workers it starts). Without it the handshake with the parent
fails, which the worker cannot tell from a run that is not there: both end in the connect timeout."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import structlog
import trio
import zmq

from sagellm.common import parent_death, progress, tracing
from sagellm.common.errors import InvalidInput, JoinRefused, SageLLMError, Unavailable
from sagellm.common.logging import configure_logging
from sagellm.common.nursery_errors import named_failures, single_errors
from sagellm.common.openmp import prefer_short_spin
from sagellm.common.peer_monitor import PeerMonitor
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys, authenticator
from sagellm.runtime.comm.zmq_trio import (
    TrioSocket,
    announce_ready,
    bind_pull,
    connect_dealer,
    heartbeat_loop,
    host_toward,
    reclaim_ipc_dirs,
    with_host,
)
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.bridge import Bridge, groups_of
from sagellm.runtime.executor.local import LocalExecutor, instances_of
from sagellm.runtime.executor.worker_args import add_arguments
from sagellm.runtime.pipeline.operator import StepOperator
from sagellm.runtime.pipeline.spec import MAIN, WILDCARD_HOST, host_problem
from sagellm.runtime.pipeline.yaml_io import load_pipeline

log = structlog.get_logger("sagellm.worker")
TELL_TIMEOUT_S = 1.0  # how long a failing worker waits for its parent to take its error (it answers End)


class WorkerError(Unavailable, RuntimeError):
    """The worker cannot run: the parent never answered, or fell silent (the message says which). A parent that
    refused it (its group has a live worker, or is not one a worker may take) is a JoinRefused."""


def stats_of(executor: LocalExecutor) -> dict[str, dict[str, Any]]:
    """This process's engine stats and held requests, for a Heartbeat."""
    local = executor.operators
    stats = {name: dataclasses.asdict(s) for name, s in executor.instances.items() if name in local}
    stats[wire.REQUESTS_KEY] = {"ids": executor.held_requests()}
    busy = progress.current()
    if busy is not None:
        stats[wire.STAGE_KEY] = {"what": busy[0], "elapsed_s": busy[1]}
    return stats


async def run_worker(
    connect: str,
    group: str,
    *,
    bind_host: str | None = None,
    advertise_host: str | None = None,
    connect_timeout_s: float = 300.0,
    keys: RunKeys | None = None,
) -> None:
    """Runs `group` of the graph running at `connect` until it ends; `keys`: the run's key, when it is secure."""
    if not connect.startswith(("tcp://", "ipc://")):
        raise InvalidInput(f"--connect: expected the endpoint the run printed, tcp://HOST:PORT, got {connect!r}")
    for option, host in (("--bind-host", bind_host), ("--advertise-host", advertise_host)):
        problem = host is not None and host_problem(host, wildcard_ok=option == "--bind-host")
        if problem:
            raise InvalidInput(f"{option}: {problem}")
    zctx = zmq.Context()
    try:
        with authenticator(zctx, keys), single_errors(), connect_dealer(zctx, connect, keys=keys) as ctrl:
            async with _telling_parent(ctrl, group):
                graph, peer_timeout_s = await _join(ctrl, connect, group, connect_timeout_s)
                transport = graph.attrs.get("transport", "ipc")
                # AddressError (exit 2, one line): no route to the run, or an address that is not this host's
                bind, advertise = _hosts(connect, transport, bind_host, advertise_host)
                data, endpoint = bind_pull(zctx, transport, group, host=bind, keys=keys)
                with data:
                    advertised = with_host(endpoint, advertise)
                    silence = (connect_timeout_s, peer_timeout_s)
                    await _serve(zctx, ctrl, data, advertised, graph, group, silence, keys)
    finally:
        zctx.term()


@contextlib.asynccontextmanager
async def _telling_parent(ctrl: TrioSocket, group: str) -> AsyncIterator[None]:
    """A failure the code names is told to the parent (End with its error and kind) before it ends this worker, and
    the parent's answer (its End, or a kill) awaited: the parent hears why before it sees the process exit, and raises
    it as what it is. It is said once on each stderr: by the parent (a run's workers share its stderr), by the
    command's own line (a worker started by hand), or here, into a log of the worker's own (a managed engine's)."""
    try:
        yield
    except (Exception, BaseExceptionGroup) as error:
        named = named_failures(error)
        if named:
            if _has_own_log():
                log.warning("worker_failed", error=str(named[0]))
            await _tell(ctrl, group, named[0])
        raise


def _has_own_log() -> bool:
    """Whether this worker was started by a parent of ours with a stderr of its own (not the parent's)."""
    started_by = parent_death.parent()
    if started_by is None:
        return False
    try:
        mine, theirs = os.fstat(2), os.stat(f"/proc/{started_by}/fd/2")
    except OSError:  # no /proc (not Linux)
        return True
    return (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino)


async def _tell(ctrl: TrioSocket, group: str, failure: SageLLMError) -> None:
    with trio.move_on_after(TELL_TIMEOUT_S, shield=True):
        await ctrl.send(wire.End(node=group, error=str(failure), kind=failure.code))
        while True:
            with contextlib.suppress(wire.WireError):
                if isinstance(await ctrl.receive(), wire.End):
                    return


async def _join(ctrl: TrioSocket, connect: str, group: str, timeout_s: float) -> tuple[Graph, float]:
    """Hello -> Assign: the graph this worker runs a group of, and how long the parent may stay silent."""
    await ctrl.send(wire.Hello(node=group, pid=os.getpid(), host=socket.gethostname(), protocol=wire.PROTOCOL))
    answer = None
    with trio.move_on_after(timeout_s):
        while not isinstance(answer, wire.Assign):
            answer = await ctrl.receive()
    if not isinstance(answer, wire.Assign):
        raise WorkerError(
            f"no answer from {connect} after {timeout_s:.0f} s: is the graph running, the port open? If the run is "
            "secure, pass --key-file with this run's key (each run makes a new one)"
        )
    if answer.error:
        raise JoinRefused(f"{connect} refused group {group!r}: {answer.error}")
    log.info("worker_joined", connect=connect, group=group)
    return load_pipeline(answer.graph), answer.peer_timeout_s


def _hosts(connect: str, transport: str, bind: str | None, advertise: str | None) -> tuple[str, str]:
    """Where this worker listens and the address it gives the others. By default the address of its interface
    toward the parent: reachable from there, and nothing is exposed on other interfaces."""
    if transport != "tcp":
        return "127.0.0.1", "127.0.0.1"  # ipc: one host, paths instead of addresses
    bind = bind or host_toward(connect)
    return bind, advertise or (host_toward(connect) if bind == WILDCARD_HOST else bind)


async def _serve(
    zctx: zmq.Context,
    ctrl: TrioSocket,
    data: TrioSocket,
    endpoint: str,
    graph: Graph,
    group: str,
    silence_s: tuple[float, float],
    keys: RunKeys | None,
) -> None:
    """`silence_s`: how long the parent may be silent until the run's go (while this worker and the others load
    their models, on a machine they make busy), and after it."""
    nodes = [node for node, g in groups_of(graph).items() if g == group]
    executor = LocalExecutor(graph, nodes=nodes, instances=instances_of(graph))
    bridge = Bridge(executor, group, zctx, keys=keys)
    sleeping = trio.Lock()  # one sleep or wake at a time, in the order the parent asked them
    parent = _Parent(silence_s, bridge.repoint, executor.cancel_passing, partial(sleep_engines, executor, sleeping))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat_loop, ctrl, group, wire.HEARTBEAT_S, lambda: stats_of(executor))
            nursery.start_soon(parent.listen, ctrl, nursery)
            nursery.start_soon(parent.monitor.watch, parent.lost)
            await executor.open_operators()
            await announce_ready(ctrl, group, {"endpoint": endpoint})
            log.info("worker_ready", group=group, nodes=nodes, endpoint=endpoint)
            bridge.connect(await parent.peers())
            bridge.nursery = nursery
            bridge.open_inbound()
            nursery.start_soon(bridge.receive_loop, data)
            await executor.run()
            await ctrl.send(wire.End(node=group))
            nursery.cancel_scope.cancel()
    finally:
        bridge.close()


async def sleep_engines(executor: LocalExecutor, one_at_a_time: trio.Lock, level: int) -> None:
    """Brings this process's engines that sleep to sleep `level` (deeper: they sleep; shallower: they wake, 0 whole),
    off the event loop; a failure is logged, and the heartbeats show where each engine got (its `sleep_level`)."""
    async with one_at_a_time:
        for node_id, op in executor.operators.items():
            if isinstance(op, StepOperator) and op.sleeps:
                change = op.sleep if level > op.sleep_level else op.wake_up
                try:
                    await trio.to_thread.run_sync(change, level)
                except Exception:
                    log.exception("engine_sleep_failed", node=node_id, level=level)


class _Parent:
    """What the worker hears from the parent on the control socket: its heartbeats, the endpoints (again when a
    restarted group listens elsewhere: `on_peers`), requests whose clients left (`on_cancel`), sleep and wake
    (`on_sleep`), its End."""

    def __init__(
        self,
        silence_s: tuple[float, float],
        on_peers: Callable[[dict[str, str]], None],
        on_cancel: Callable[[list[str]], None],
        on_sleep: Callable[[int], Awaitable[None]],
    ) -> None:
        starting, self._running_timeout = silence_s
        self.monitor = PeerMonitor(max(starting, self._running_timeout))
        self.monitor.seen(MAIN)
        self.on_peers, self.on_cancel, self.on_sleep = on_peers, on_cancel, on_sleep
        self._peers: dict[str, str] | None = None
        self._started = trio.Event()

    async def listen(self, ctrl: TrioSocket, nursery: trio.Nursery) -> None:
        while True:
            try:
                message = await ctrl.receive()
            except wire.WireError as error:
                log.warning("control_message_dropped", problem=str(error))
                continue
            if getattr(message, "node", None) != MAIN:
                continue
            self.monitor.seen(MAIN)
            if isinstance(message, wire.Cancel):
                self.on_cancel(message.request_ids)
            elif isinstance(message, wire.Sleep):
                nursery.start_soon(self.on_sleep, message.level)
            elif isinstance(message, wire.Ready) and self._started.is_set():
                self.on_peers(message.info["peers"])
            elif isinstance(message, wire.Ready):
                self._peers = message.info["peers"]
                self.monitor.timeout = self._running_timeout  # running: a silent parent is lost soon
                self._started.set()
            elif isinstance(message, wire.End):
                log.info("worker_stopped_by_parent")
                nursery.cancel_scope.cancel()
                return

    async def peers(self) -> dict[str, str]:
        """Every group's data endpoint, sent when all workers are ready."""
        await self._started.wait()
        assert self._peers is not None
        return self._peers

    def lost(self, _: str) -> NoReturn:
        raise WorkerError(f"the run fell silent for {self.monitor.timeout:.0f} s (gone or unreachable); stopping")


def main(argv: list[str] | None = None) -> None:
    """The entry the parent spawns. A failure the code names exits with its kind's code, told to the parent, which
    says it (`_telling_parent`); anything else, a bug, with its traceback (exit code 1)."""
    parent_death.exit_with_parent(reclaim_ipc_dirs)  # first: a parent killed outright takes it and its sockets along
    prefer_short_spin()  # nothing imported so far loads torch; the engines this worker opens will
    parser = argparse.ArgumentParser(prog="sagellm-worker", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "warning"))
    tracing.configure_from_env(f"sagellm-worker:{args.group}")  # traces where the gateway's go, if it traces
    code = 0
    try:
        trio.run(serve_args, args)
    except (Exception, BaseExceptionGroup) as error:
        named = named_failures(error)
        if not named:
            raise
        code = max(failure.exit_code for failure in named)
    # The run is over and every socket closed: skip the interpreter's teardown of torch and the model (~0.4 s the
    # parent would wait for before it reports).
    tracing.shutdown()  # the spans still batched go out first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve_args(args: argparse.Namespace) -> None:
    """Runs the worker the parsed command line describes (the run's key from --key-file, else SAGELLM_RUN_KEY)."""
    keys = RunKeys.read(Path(args.key_file)) if args.key_file else RunKeys.from_env()
    await run_worker(
        args.connect,
        args.group,
        bind_host=args.bind_host,
        advertise_host=args.advertise_host,
        connect_timeout_s=args.connect_timeout,
        keys=keys,
    )


if __name__ == "__main__":
    main()
