"""Ray placement: the process groups a graph places `ray:GROUP` run on its cluster (`cluster:`), each worker a
process that a small Ray actor (`common.ray_process.ProcessHost`) starts on the node Ray chooses for the group's
CPUs, GPUs, memory and custom resources.

The worker is the one a spawned group runs (`python -m sagellm.runtime.executor.worker --connect ... --group G`): it
joins the run over the parent's control socket, gets the graph, binds its data socket and is sent the endpoints. A
worker that dies is the run's to start again, as a spawned one is (the one supervision loop, under the graph's
`restart:` policy), as a new actor, perhaps on another node; Ray never restarts it behind the run's back. Only the
command, the addresses and the run's key cross Ray; every token and tensor goes over the run's own ZeroMQ links.
`ray` is an extra (`pip install 'sagellm[ray]'`): without it a graph with `ray:` groups fails at start saying so."""

from __future__ import annotations

import structlog
import trio

from sagellm.common.ray_process import RayProcess
from sagellm.runtime.pipeline.cluster import RayCluster

log = structlog.get_logger("sagellm.ray")


class RayPlacement:
    """Where a run's `ray:` groups start their workers."""

    def __init__(self, cluster: RayCluster, groups: list[str]) -> None:
        self.cluster = cluster
        self.groups = {group: group for group in groups}  # worker group -> the cluster's group it is placed by
        self.placed: dict[str, str] = {}  # group -> the Ray node its latest worker runs on

    async def spawn(self, group: str, command: list[str], env: dict[str, str], timeout_s: float) -> RayProcess:
        """Starts the group's worker on a node that has what the group asks for; RayStartError when Ray places it
        nowhere within `timeout_s` or cannot start it, RayMissing without Ray."""
        options = self.cluster.group(self.groups[group]).options()
        process = await RayProcess.start(self.cluster.address, options, lambda host, port: command, env, timeout_s)
        self.placed[group] = await trio.to_thread.run_sync(process.node_id)
        log.info("ray_worker_placed", group=group, pid=process.pid, host=process.host, node=self.placed[group])
        return process
