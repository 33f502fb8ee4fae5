"""Process groups a running graph takes on at run time: a graph of their own, one node in a worker process between two
ends in this process, which the process executor starts, links, watches and restarts as it does its own graph's
workers. The control plane's engines of ours are these (`gateway.control.engine_link`), so a request to one passes
this process's one executor and ledger, then only the worker:

    requests (an end here) -> NODE (its worker process) -> replies (an end here)

What goes to the node goes through `HostedGroup.send`; what it sends back goes to the `deliver` its owner gave. A lost
worker's requests end at once with a retryable `instance_lost` (its owner is told: `on_lost`, and an item for it that
is still on its way is refused so), and its worker is started again under the owner's restart policy; `retire` ends
it for good: its input ends, its node finishes what it holds (or its worker is killed), and nothing of it is left
in the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

from sagellm.common.errors import InvalidInput, Unavailable
from sagellm.common.pulse import Pulse
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervision
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.bridge import Bridge, groups_of
from sagellm.runtime.executor.control import ControlServer
from sagellm.runtime.executor.ray_placement import RayPlacement
from sagellm.runtime.executor.worker_life import WorkerLife, Workers
from sagellm.runtime.pipeline.cluster import RayCluster
from sagellm.runtime.pipeline.messages import RequestError
from sagellm.runtime.pipeline.spec import MAIN
from sagellm.runtime.pipeline.yaml_io import dump_pipeline

log = structlog.get_logger("sagellm.process_executor")


class Host(Workers, Protocol):
    """What hosting a group needs of the process executor that runs the graph (`ProcessExecutor`)."""

    graph: Graph
    groups: dict[str, str]  # node -> process group, of the graph's own nodes
    running: bool
    bridge: Bridge
    control: ControlServer
    ray: RayPlacement | None
    processes: dict[str, Any]
    lost_groups: set[str]
    finished_groups: set[str]
    worker_env: dict[str, dict[str, str]]
    worker_logs: dict[str, Path]
    data_endpoints: dict[str, str]
    lives: dict[str, WorkerLife]
    supervisions: dict[str, Supervision]


class Delivery:
    """This process's end of a hosted node's out-edge: the bridge delivers to it as to a node's input, and each item
    goes to the owner's `deliver`."""

    def __init__(self, deliver: Callable[[Any], None]) -> None:
        self.deliver = deliver

    async def send(self, item: Any) -> None:
        self.deliver(item)

    def close(self) -> None:
        """The edge ended: nothing to do here (the owner ends its requests itself, `on_lost` or its own stop)."""


class HostedGroup:
    """One hosted group: its graph, its worker's latest stats, its supervision, and the edge into its node."""

    def __init__(self, graph: Graph, deliver: Callable[[Any], None], on_lost: Callable[[str], None]) -> None:
        groups = groups_of(graph)
        workers = [node for node, group in groups.items() if group != MAIN]
        if len(workers) != 1:
            raise InvalidInput(f"a hosted graph runs one node in a worker, not {workers}")
        self.graph, self.node, self.group = graph, workers[0], groups[workers[0]]
        self.input_edge = next((e.src, e.dst) for e in graph.edges if e.dst == self.node)
        self.output_edge = next((e.src, e.dst) for e in graph.edges if e.src == self.node)
        self.deliver, self.on_lost = deliver, on_lost
        self.stats: dict[str, Any] = {}  # its node's stats, from its worker's latest heartbeat
        self.heard = Pulse()  # fired by each heartbeat
        self.supervision: Supervision | None = None  # once started
        self.input: trio.MemorySendChannel | None = None  # the edge into its node, once its first worker is ready
        self.scope = trio.CancelScope()  # its supervision's: cancelled, its worker ends
        self.ended = trio.Event()  # its supervision returned

    async def send(self, item: Any) -> None:
        """Sends an item (a request) to the node; refused as `instance_lost` while its worker is lost."""
        if self.input is None:
            self.deliver(_lost(item, f"{self.node} is not running"))
            return
        await self.input.send(item)

    def finish(self) -> None:
        """Its input ends: its node finishes what it holds, then its worker ends."""
        if self.input is not None:
            self.input.close()


def _lost(item: Any, message: str) -> RequestError:
    return RequestError(request_id=getattr(item, "request_id", "?"), code="instance_lost", message=message,
                        retryable=True)  # fmt: skip


class _HostedLife(WorkerLife):
    """A hosted group's worker: each life, the first too, joins the run when ready (the run's own workers joined
    together at its start)."""

    def __init__(self, groups: HostedGroups, nursery: trio.Nursery, group: str, startup_timeout_s: float) -> None:
        super().__init__(groups.executor, nursery, group)
        self.groups, self.startup_timeout_s = groups, startup_timeout_s

    async def on_ready(self, life: int) -> None:
        await self.groups.joined(self.group)


class HostedGroups:
    """The groups a process executor hosts (`ProcessExecutor.hosted`)."""

    def __init__(self, executor: Host) -> None:
        self.executor = executor
        self.groups: dict[str, HostedGroup] = {}

    def __contains__(self, group: str) -> bool:
        return group in self.groups

    async def start(
        self,
        graph: Graph,
        deliver: Callable[[Any], None],
        on_lost: Callable[[str], None],
        *,
        restart: RestartPolicy,
        startup_timeout_s: float,
        env: dict[str, str] | None = None,
        log_file: Path | None = None,
        ray_group: str | None = None,
    ) -> HostedGroup:
        """Starts the graph's worker (on the run's Ray cluster, placed as its `ray_group`, when given) and returns once
        it is ready and linked; raises what its first start failed on (the worker's own error, as its kind)."""
        ex = self.executor
        hosted = HostedGroup(graph, deliver, on_lost)
        group, nursery = hosted.group, ex.bridge.nursery if ex.running else None
        if nursery is None:
            raise Unavailable("the graph is not running: it hosts no worker now")
        if group in self.groups or group in ex.groups.values() or hosted.node in ex.groups:
            raise InvalidInput(f"the graph already runs a process group or node named {group!r}")
        self.groups[group] = hosted
        ex.worker_env[group], ex.control.graph_texts[group] = dict(env or {}), dump_pipeline(graph)
        if log_file is not None:
            ex.worker_logs[group] = log_file
        if ray_group is not None:
            if ex.ray is None:
                ex.ray = RayPlacement(RayCluster.from_settings(ex.graph.attrs.get("cluster")), [])
            ex.ray.groups[group] = ray_group
        life = ex.lives[group] = _HostedLife(self, nursery, group, startup_timeout_s)
        hosted.supervision = ex.supervisions[group] = Supervision(life, restart, startup_timeout_s=startup_timeout_s)
        try:
            await nursery.start(self._supervise, hosted)
        except BaseException:
            self._forget(hosted)
            raise
        return hosted

    async def _supervise(self, hosted: HostedGroup, *, task_status: trio.TaskStatus) -> None:
        assert hosted.supervision is not None
        try:
            with hosted.scope:
                await hosted.supervision.run(task_status=task_status)
        finally:
            hosted.ended.set()

    async def joined(self, group: str) -> None:
        """A worker of the group is ready: its node's edges reach it (the first time, they are made), and it is sent
        the run's endpoints, its go."""
        ex, hosted = self.executor, self.groups[group]
        endpoint = ex.control.endpoints[group]
        ex.data_endpoints = {**ex.data_endpoints, group: endpoint}
        ex.bridge.join_group(groups_of(hosted.graph), endpoint)
        ex.lost_groups.discard(group)
        if hosted.input is None:
            hosted.input = ex.bridge.sender(*hosted.input_edge)
            ex.bridge.deliveries[hosted.output_edge] = Delivery(hosted.deliver)
        else:
            assert hosted.supervision is not None
            log.warning("worker_restarted", worker=ex.control.describe(group),
                        restarts=hosted.supervision.restarts.total)  # fmt: skip
        await ex.control.start_all(ex.data_endpoints)

    # -- what the executor tells ----------------------------------------------------------------------------------
    def heard(self, group: str, stats: dict[str, Any]) -> None:
        """Its worker heartbeated: the stats of its node."""
        hosted = self.groups[group]
        hosted.stats = stats.get(hosted.node, hosted.stats)
        hosted.heard.fire()

    def lost(self, group: str, why: str) -> None:
        """Its worker is lost: what it held ends now (its owner ends its requests)."""
        self.groups[group].on_lost(why)

    def sending(self, group: str, item: Any) -> bool:
        """An item (None: the edge's end) for the group's worker: refused, and its request ended as lost, while the
        worker is lost."""
        if group not in self.executor.lost_groups:
            return True
        if item is not None:
            self.groups[group].deliver(_lost(item, f"{self.executor.control.describe(group)} is gone"))
        return False

    def finish_all(self) -> None:
        """The run ends: every hosted node's input ends (each finishes what it holds)."""
        for hosted in self.groups.values():
            hosted.finish()

    # -- ending ---------------------------------------------------------------------------------------------------
    async def retire(self, hosted: HostedGroup, *, force: bool, grace_s: float) -> None:
        """Ends the group for good: its node finishes what it holds, up to `grace_s` (at once with `force`), then its
        worker is ended; nothing of it is left in the run."""
        ex, group = self.executor, hosted.group
        if hosted.supervision is not None:
            hosted.supervision.no_more_lives()
        hosted.finish()
        process = ex.processes.get(group)
        if process is not None:
            with trio.move_on_after(0 if force else grace_s):
                await process.wait()  # it ends by itself once its node has finished what it holds
        hosted.scope.cancel()  # its supervision ends what it started (`WorkerLife.end`)
        await hosted.ended.wait()
        self._forget(hosted)

    def _forget(self, hosted: HostedGroup) -> None:
        ex, group = self.executor, hosted.group
        ex.kill(group)
        tables: list[dict[str, Any]] = [ex.processes, ex.failures, ex.lives, ex.supervisions, ex.worker_env,
                                        ex.worker_logs, ex.data_endpoints]  # fmt: skip
        for table in tables:
            table.pop(group, None)
        ex.finished_groups.discard(group)
        ex.lost_groups.discard(group)
        if ex.ray is not None:
            ex.ray.groups.pop(group, None)
        ex.control.forget(group)
        ex.bridge.leave_group(group)
        self.groups.pop(group, None)
