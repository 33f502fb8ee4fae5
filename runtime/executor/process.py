"""Runs a pipeline graph across OS processes and hosts: nodes placed `process` or `process:NAME` run in worker
processes this one starts, nodes placed `remote:NAME` in workers started by hand (`sagellm worker`, on any host),
nodes placed `ray:NAME` in workers this process starts on the graph's Ray cluster (`ray_placement`), the rest as
trio tasks here; every cross-process edge is a ZeroMQ link.

The parent binds its control socket (at the graph's `control_port` when set, so a remote worker can be told where
it is), starts its own workers, prints the command that starts each remote one, and waits until every worker has
joined and is ready (`control`); then it sends all of them the map of endpoints and runs its own nodes. Sockets bind
the graph's `bind_host` and are given out as `advertise_host` (default: the bind host, or this host's name when
binding 0.0.0.0). When they listen where other hosts can reach them (or the graph sets `secure: true`), every link is
CURVE-encrypted and only processes holding the run's key, made here for this run, can connect (`comm.curve`): the
workers this process starts get it in their environment, remote ones from a key file the user copies to their host.

A worker that exits without saying `End`, falls silent, or says End with the error it failed on, is lost: its engines
turn unhealthy, and every request it may hold (held at its last heartbeat, or sent to it and seen by no live worker
since) ends with an `instance_lost` error. Never a hang. A worker this process started is then killed (it may be
stopped, not dead) and started again under the graph's `restart` policy (backoff with jitter, attempts in a row); a
remote group waits for its worker to be started again on its host (the run prints the command). The successor joins as
the first one did, binds a new data socket, and every process that sends to the group is pointed at it; its engines turn
healthy with its first heartbeat. A worker given up (attempts exhausted, `auto_restart: false`, or lost while the run
ends) has its edges ended on its behalf, so nothing waits on it. A worker that fails before it is ready (silence is
judged only once it is) fails the start with its own error when it named one (a model that will not load: one line,
its kind's exit code), else with how it ended. The workers this process starts end with it, within a second even when
it is killed outright (`common.parent_death`); so does the run's ipc folder (`zmq_trio.reclaim_ipc_dirs`)."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import structlog
import trio
import zmq

from sagellm.common import progress
from sagellm.common.errors import SageLLMError, StartFailed, kind_of
from sagellm.common.nursery_errors import single_errors
from sagellm.common.parent_death import env_for_child
from sagellm.common.processes import python_module
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervision, exit_cause
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.curve import RunKeys, authenticator, child_env
from sagellm.runtime.comm.zmq_trio import TrioSocket, bind_pull, bind_router, local_endpoint, with_host
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.bridge import Bridge, groups_of, remote_groups
from sagellm.runtime.executor.control import ControlServer
from sagellm.runtime.executor.core_shares import share_cores
from sagellm.runtime.executor.hosted import HostedGroups
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.runtime.executor.lost_requests import LostRequests
from sagellm.runtime.executor.ray_placement import RayPlacement
from sagellm.runtime.executor.remote_workers import announce_remote_workers, worker_command, write_key_file
from sagellm.runtime.executor.worker_life import WorkerLife
from sagellm.runtime.pipeline.cluster import RayCluster
from sagellm.runtime.pipeline.operator import get_operator
from sagellm.runtime.pipeline.spec import MAIN, WILDCARD_HOST, is_secure
from sagellm.runtime.pipeline.yaml_io import dump_pipeline

log = structlog.get_logger("sagellm.process_executor")


class WorkerStartError(StartFailed, RuntimeError):
    """A worker failed, or never came, before it was ready (the message names it and says what to do)."""


class ProcessExecutor:
    def __init__(
        self,
        graph: Graph,
        *,
        peer_timeout_s: float = 10.0,
        startup_timeout_s: float = 900.0,
        exit_timeout_s: float = 30.0,
        worker_env: dict[str, dict[str, str]] | None = None,
        worker_logs: dict[str, Path] | None = None,
        **local_args: Any,
    ) -> None:
        """`worker_env`: variables set for the worker a group's process runs (its GPUs, say); `worker_logs`: a file
        a group's worker writes its output to (appended; otherwise it shares this process's stderr)."""
        self.core_shares = share_cores(graph)  # before the graph goes to the workers: group -> its cores, if pinned
        self.graph = graph
        self.groups = groups_of(graph)
        self.children = sorted({g for g in self.groups.values() if g != MAIN})
        self.remote = remote_groups(graph, ("remote",))  # groups the user starts by hand (`sagellm worker`)
        ray_groups = remote_groups(graph, ("ray",))
        cluster = RayCluster.from_settings(graph.attrs.get("cluster"))
        self.ray = RayPlacement(cluster, ray_groups) if ray_groups else None
        self.executor = LocalExecutor(graph, nodes=[n for n, g in self.groups.items() if g == MAIN], **local_args)
        self.worker_env, self.worker_logs = worker_env or {}, worker_logs or {}
        self.peer_timeout_s = peer_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.transport: str = graph.attrs.get("transport", "ipc")
        self.bind_host: str = graph.attrs.get("bind_host", "127.0.0.1")
        default_advertise = socket.gethostname() if self.bind_host == WILDCARD_HOST else self.bind_host
        self.advertise_host: str = graph.attrs.get("advertise_host", default_advertise)
        self.keys = RunKeys.generate() if is_secure(graph.attrs) else None  # one key per run
        self.key_file: Path | None = None  # the key for remote workers, while the run lives
        self.control_endpoint: str | None = None  # where workers connect, once bound
        self.data_endpoints: dict[str, str] = {}  # process group -> its data socket, once every worker is ready
        self.processes: dict[str, trio.Process] = {}
        self.pids: dict[str, int] = {}  # the workers this process started
        self.finished_groups: set[str] = set()  # workers that said End
        self.failures: dict[str, wire.End] = {}  # group -> the error its last worker said it failed on
        self.lost_groups: set[str] = set()  # groups whose worker is lost now
        self.restart = RestartPolicy.from_settings(graph.attrs.get("restart"))
        self.lives: dict[str, WorkerLife] = {}
        self.supervisions: dict[str, Supervision] = {}  # group -> what restarts its worker, once the run runs
        self.running = False  # every worker was ready once: from then on a lost worker of ours is restarted
        self._stopping = False  # the edges toward the workers are ending: nothing is restarted any more
        self._local_control = ""  # the control endpoint for the workers this process starts
        self.requests = LostRequests(self.executor, self.groups, self.lost_groups)
        self.hosted = HostedGroups(self)  # groups taken on while the run runs
        self.executor.on_cancel = lambda rid: self.control.cancel([rid])

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> PipelineResult:
        """Runs the graph to its end; `task_status.started()` once every worker is ready and this process's nodes
        run (for `nursery.start`, as `LocalExecutor.run`)."""
        with single_errors():  # one failure (a worker that did not start): raised as itself
            return await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus) -> PipelineResult:
        zctx = zmq.Context()
        keys = self.keys
        try:
            with authenticator(zctx, keys):
                data, data_endpoint = bind_pull(zctx, self.transport, MAIN, host=self.bind_host, keys=keys)
                with data:
                    port = self.graph.attrs.get("control_port")
                    sock, bound = bind_router(
                        zctx, self.transport, "control", host=self.bind_host, port=port, keys=keys
                    )
                    with sock:
                        if self.keys is not None and self.remote:
                            self.key_file = write_key_file(self.keys, self.graph.attrs.get("name", "graph"), bound)
                        endpoint = with_host(data_endpoint, self.advertise_host)
                        return await self._serve(zctx, data, endpoint, sock, bound, task_status)
        finally:
            if self.key_file is not None:
                self.key_file.unlink(missing_ok=True)  # the key dies with the run
            zctx.term()

    async def _serve(
        self,
        zctx: zmq.Context,
        data: TrioSocket,
        data_endpoint: str,
        sock: TrioSocket,
        bound: str,
        task_status: trio.TaskStatus,
    ) -> PipelineResult:
        """Runs the graph once this process's data and control sockets are bound."""
        self.control_endpoint = with_host(bound, self.advertise_host)
        self._local_control = local_endpoint(bound)
        graph_text = dump_pipeline(self.graph) if self.children else ""  # (only its own workers are sent it)
        self.control = control = ControlServer(
            sock, graph_text, spawned=self.pids, remote=self.remote, peer_timeout_s=self.peer_timeout_s
        )
        self.bridge = self.requests.bridge = bridge = Bridge(self.executor, MAIN, zctx, keys=self.keys)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control.serve, self._on_heartbeat, lambda g, end: self._ended(nursery, g, end))
                nursery.start_soon(control.monitor.watch, lambda g: self._lose(nursery, g, "stopped heartbeating"))
                nursery.start_soon(control.heartbeat_loop)
                for group in self.children:
                    if group not in self.remote:
                        await self.spawn(nursery, group)
                announce_remote_workers(self.remote, self.worker_command, self.key_file, self.advertise_host)
                await self.executor.open_operators()
                await self._await_ready()
                self.data_endpoints = peers = {**control.endpoints, MAIN: data_endpoint}
                bridge.connect(peers)
                await control.start_all(peers)
                self.running = True
                self._supervise(nursery)
                bridge.nursery = nursery
                bridge.before_send = self._before_send
                bridge.open_inbound()
                bridge.accepting = True  # groups may be hosted while the graph runs
                bridge.on_inbound_ended = self.requests.close_injection_if_done
                self.requests.open_injection()
                nursery.start_soon(self._receive, data)
                result = await self.executor.run(task_status=task_status)
                bridge.accepting = False
                self.hosted.finish_all()
                await self._await_exit()
                nursery.cancel_scope.cancel()
        finally:
            control.end_all()
            for process in self.processes.values():
                if process.returncode is None:
                    process.kill()
            bridge.close()
        return result

    # -- workers --------------------------------------------------------------------------------------------------
    async def spawn(self, nursery: trio.Nursery, group: str) -> None:
        """Starts the group's worker: here, or (a `ray:` group) on the node Ray chooses, which reaches this process
        at its advertised control endpoint; the run's key goes in the environment, not on a command line."""
        self.failures.pop(group, None)  # a new worker's own error, if any, is what counts
        on_ray = self.ray is not None and group in self.ray.groups
        control = self.control_endpoint if on_ray else self._local_control
        command = python_module("sagellm.runtime.executor.worker", "--connect", control, "--group", group)
        if on_ray:
            assert self.ray is not None and self.control_endpoint is not None
            key = child_env(self.keys, {})  # the key alone: the node has its own environment
            process: Any = await self.ray.spawn(group, command, key, self.startup_timeout_s)
            self.processes[group], self.pids[group] = process, process.pid
            nursery.start_soon(self._watch_exit, nursery, group, process)
            return
        if self.transport == "tcp":  # on this host, so it listens and is reached as this process is
            command += ["--bind-host", self.bind_host, "--advertise-host", self.advertise_host]
        env = env_for_child({**child_env(self.keys), **self.worker_env.get(group, {})})  # it ends with this process
        log_file = self.worker_logs.get(group)
        with contextlib.ExitStack() as files:
            output = None if log_file is None else files.enter_context(log_file.open("ab"))
            process = await trio.lowlevel.open_process(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output and subprocess.STDOUT, env=env
            )
        if group in self.core_shares:  # before it starts a thread: every thread it starts inherits the cores
            with contextlib.suppress(ProcessLookupError):  # gone already: _watch_exit reports its exit
                os.sched_setaffinity(process.pid, self.core_shares[group])
        self.processes[group], self.pids[group] = process, process.pid
        nursery.start_soon(self._watch_exit, nursery, group, process)

    def worker_command(self, group: str) -> str:
        """The shell command that starts the worker of a remote group on its host."""
        return worker_command(self.control_endpoint, group, self.key_file)

    async def _watch_exit(self, nursery: trio.Nursery, group: str, process: trio.Process) -> None:
        code = await process.wait()
        if self.processes.get(group) is process and group not in self.finished_groups:  # not a predecessor's exit
            self._lose(nursery, group, exit_cause(code))

    def kill(self, group: str) -> None:
        """Makes sure a worker of ours that was given up is gone (a stopped or hung one never says so itself)."""
        process = self.processes.get(group)
        if process is not None and process.returncode is None:
            process.kill()

    async def _await_ready(self) -> None:
        """Until every worker is ready; a worker that fails or falls silent first fails the start at once."""
        deadline = trio.current_time() + self.startup_timeout_s
        while missing := [g for g in self.children if g not in self.control.endpoints]:
            if self.lost_groups:
                raise self._start_failure()
            if trio.current_time() > deadline:
                raise WorkerStartError(self._not_ready(missing))
            with trio.move_on_at(deadline + 0.01):
                await self.control.wait_changed()

    def _start_failure(self) -> SageLLMError:
        """Why a worker failed before it was ready: the error it said it failed on, as its kind, else how it ended."""
        told = next((self.failures[g] for g in self.lost_groups if g in self.failures), None)
        if told is not None:
            return kind_of(told.kind)(f"{self.control.name(told.node)} failed before it was ready: {told.error}")
        return WorkerStartError(f"{self.executor.ledger.unfinished_error[1]} before it was ready (see its log)")

    def _not_ready(self, missing: list[str]) -> str:
        waited = f"{self.startup_timeout_s:.0f} s"
        absent = [g for g in missing if g in self.remote and g not in self.control.workers]
        ray_groups = self.ray.groups if self.ray is not None else []
        unplaced = [g for g in missing if g in ray_groups and g not in self.control.workers]
        if unplaced:
            return (f"Ray group(s) {unplaced} started but did not connect within {waited}: can the cluster's nodes "
                    "reach this host's control port (bind_host, advertise_host)?")  # fmt: skip
        if absent:
            commands = "; ".join(self.worker_command(g) for g in absent)
            return f"remote worker group(s) {absent} did not connect within {waited}; start them: {commands}"
        return f"{', '.join(self.control.describe(g) for g in missing)}: not ready after {waited}"

    async def _await_exit(self) -> None:
        """Workers finish by themselves once their inputs end; those still there after the exit timeout are told
        to stop (spawned ones killed)."""
        with trio.move_on_after(self.exit_timeout_s):
            for process in list(self.processes.values()):  # (a worker restarted meanwhile replaces its entry)
                await process.wait()
            while any(g not in self.finished_groups and g not in self.lost_groups for g in self.remote):
                await self.control.wait_changed()

    def worker_sleepers(self) -> list[str]:
        """The nodes in worker processes whose operators give their memory back while idle (engines: `sleeps`)."""
        return [node for node, group in self.groups.items() if group != MAIN
                and getattr(get_operator(self.graph.nodes[node].op), "sleeps", False)]  # fmt: skip

    def sleep_workers(self, level: int) -> None:
        """Tells the workers of `worker_sleepers` to sleep at `level` (0: to wake); the instances' `sleep_level`, from
        their heartbeats, says when they did."""
        for group in sorted({self.groups[node] for node in self.worker_sleepers()}):
            self.control.sleep(group, level)

    def _on_heartbeat(self, group: str, message: wire.Heartbeat) -> None:
        stats = dict(message.stats)
        held = set(stats.pop(wire.REQUESTS_KEY, {}).get("ids", ()))
        busy = stats.pop(wire.STAGE_KEY, {})
        progress.report(group, busy.get("what"), busy.get("elapsed_s", 0.0))
        if group in self.hosted:
            self.hosted.heard(group, stats)
            return
        self.requests.heard(group, held)
        for name, fields in stats.items():
            instance = self.executor.instances.get(name)
            if instance is not None and group not in self.lost_groups:
                for key, value in fields.items():
                    setattr(instance, key, value)

    # -- losing a worker ------------------------------------------------------------------------------------------
    def _ended(self, nursery: trio.Nursery, group: str, end: wire.End) -> None:
        """A worker said End: it finished, or it failed on the error it names (it waits for our End, so its error is
        heard before its exit is seen)."""
        progress.report(group, None)  # whatever it was waiting on, it waits no more
        if not end.error:
            self.finished_groups.add(group)
            return
        self.failures[group] = end
        self._lose(nursery, group, f"failed: {end.error}")

    def _lose(self, nursery: trio.Nursery, group: str, why: str) -> None:
        progress.report(group, None)
        if group in self.finished_groups:
            return
        who = self.control.describe(group)
        self.kill(group)
        # Retired: a killed worker's exit may arrive late (a stopped one is reaped after SIGKILL, maybe during the
        # next attempt's spawn), and must not read as that attempt failing.
        self.processes.pop(group, None)
        if group in self.lost_groups:  # a restarted worker that failed before it was ready: that attempt is over
            if group not in self.control.gone:
                log.error("worker_restart_failed", worker=who, why=why)
                self.control.end(group)
            return
        self.lost_groups.add(group)
        # Before the run runs, the start fails with this cause (`_start_failure`), which its caller reports.
        (log.error if self.running else log.info)("worker_lost", worker=who, why=why)
        self.control.end(group)
        if group in self.hosted:  # its requests are its owner's, ended there at once
            self.hosted.lost(group, f"{who} {why}")
        else:
            self.executor.ledger.unfinished_error = ("instance_lost", f"{self.control.name(group)} {why}")
            for instance in self._instances_of(group):
                instance.lose(recovering=self.running and not self._stopping)
            nursery.start_soon(self.requests.fail_doomed, group, f"{who} {why}", self.control.cancel)
        if group in self.lives:  # its supervision restarts it, or gives it up (the run is ending, the policy says so)
            self.lives[group].lose(why)
        else:
            self.give_up(nursery, group)

    def _instances_of(self, group: str) -> list[Any]:
        instances = self.executor.instances
        return [instances[node] for node, g in self.groups.items() if g == group and node in instances]

    def give_up(self, nursery: trio.Nursery, group: str) -> None:
        """No worker will run the group again: its edges end on its behalf, so nothing waits on it."""
        for instance in self._instances_of(group):
            instance.recovering, instance.failed = False, True
        self.bridge.close_inbound_from(group)
        for src, dst in self.bridge.cross_edges():
            if self.groups[src] == group and self.groups[dst] not in (MAIN, group):
                nursery.start_soon(self.bridge.send_end_for, src, dst)
        self.requests.close_injection_if_done()

    # -- restarting a lost worker ---------------------------------------------------------------------------------
    def _supervise(self, nursery: trio.Nursery) -> None:
        """Every worker is ready: from now on each group's supervision restarts its worker when it is lost."""
        for group in self.children:
            life = self.lives[group] = WorkerLife(self, nursery, group)
            supervision = Supervision(life, life.policy(self.restart), startup_timeout_s=life.startup_timeout_s)
            self.supervisions[group] = supervision
            nursery.start_soon(functools.partial(supervision.run, ready=True))

    async def rejoin(self, group: str) -> None:
        """A restarted worker is ready: it takes the group's requests again, and every process that sends to the
        group (this one included) is pointed at its new data socket."""
        self.data_endpoints = peers = {**self.data_endpoints, group: self.control.endpoints[group]}
        self.lost_groups.discard(group)
        self.requests.rejoined(group)
        self.bridge.repoint(peers)
        for instance in self._instances_of(group):
            instance.healthy, instance.recovering = True, False  # its heartbeats bring the rest
        restarts = self.supervisions[group].restarts.total
        log.warning("worker_restarted", worker=self.control.describe(group), restarts=restarts)
        await self.control.start_all(peers)  # the go for the new worker; the others re-point

    def _stop_restarting(self) -> None:
        """The run is ending (edges toward the workers end): a group not running now never will again."""
        self._stopping = True
        for supervision in self.supervisions.values():
            supervision.no_more_lives()

    def _before_send(self, target: str, item: Any) -> bool:
        """Items for a lost worker end as errors here instead of waiting on its socket; the run's end (None) stops
        every restart."""
        if target in self.hosted:
            return self.hosted.sending(target, item)
        if item is None:
            self._stop_restarting()
            return target not in self.lost_groups
        return self.requests.sending(target, getattr(item, "request_id", None), self.control.describe)

    async def _receive(self, data: Any) -> None:
        await self.bridge.receive_loop(data)
        self.requests.close_injection_if_done()
