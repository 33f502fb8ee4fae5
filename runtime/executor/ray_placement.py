"""Ray placement: the process groups a graph places `ray:GROUP` run as Ray actors on its cluster (`cluster:`).

Each actor hosts the same worker as a process group (`worker.run_worker`): it joins the run over the parent's control
socket, gets the graph, binds its data socket and is sent the endpoints, exactly as a worker started by hand. Ray
decides where it runs (its group's CPUs, GPUs, memory and custom resources) and starts it again when its process
dies (`max_restarts`); the successor joins the run as a remote worker's does, and the run takes it back in (its
engines turn healthy, requests flow to it again). Only the addresses and the run's key cross Ray; every token and
tensor still goes over the run's own ZeroMQ links. `ray` is an extra (`pip install 'sagellm[ray]'`): without it a
graph with `ray:` groups fails at start with a message saying so."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import structlog

from sagellm.common.errors import JoinRefused
from sagellm.common.ray_process import connect, import_ray
from sagellm.runtime.pipeline.cluster import RayCluster

log = structlog.get_logger("sagellm.ray")
REJOIN_S = 120.0  # how long a refused successor asks again (the run notices a lost worker within its peer timeout)


class RayLauncher:
    """The actors of one run's `ray:` groups: started once the parent's control socket listens, killed (with no
    restart) when the run ends."""

    def __init__(self, cluster: RayCluster, groups: list[str]) -> None:
        self.cluster, self.groups = cluster, groups
        self.actors: dict[str, Any] = {}
        self.placed: dict[str, tuple[int, str]] = {}  # group -> (pid, Ray node id) of its first actor

    def start(self, control: str, key_text: str | None) -> None:
        """Connects to the cluster (blocking: run it in a thread) and creates each group's actor, which joins the run
        at `control`."""
        ray = connect(self.cluster.address)
        worker = ray.remote(RayWorker)
        for group in self.groups:
            self.actors[group] = worker.options(**self.cluster.group(group).options()).remote(control, group, key_text)
        for group in self.groups:
            self.placed[group] = self.where(group)
            log.info("ray_actor_placed", group=group, pid=self.placed[group][0], node=self.placed[group][1])

    def where(self, group: str) -> tuple[int, str]:
        """The process id and Ray node of a group's actor now (blocking)."""
        ray, actor = import_ray(), self.actors[group]
        return ray.get(actor.pid.remote()), ray.get(actor.node_id.remote())

    def stop(self) -> None:
        """Kills every actor, with no restart (blocking)."""
        if not self.actors:
            return
        ray = import_ray()
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()


class RayWorker:
    """A Ray actor hosting one process group's worker. The worker runs in a thread of the actor's process, so the
    actor answers (`pid`) while it serves; Ray builds the actor again (this constructor, so a new worker that joins
    the run) when its process dies. A successor is usually up before the run has noticed its predecessor is gone (a
    missed heartbeat): refused, it asks again each second for `REJOIN_S` instead of spending Ray's restarts. A worker
    that fails otherwise ends the process, so Ray restarts it as for a crash."""

    def __init__(self, control: str, group: str, key_text: str | None) -> None:
        self._thread = threading.Thread(target=_serve, args=(control, group, key_text), daemon=True)
        self._thread.start()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node it runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


def _serve(control: str, group: str, key_text: str | None) -> None:
    import trio

    from sagellm.runtime.comm.curve import RunKeys
    from sagellm.runtime.executor.worker import run_worker

    keys = RunKeys.from_text(key_text, "the run's key") if key_text else None
    deadline = time.monotonic() + REJOIN_S
    while True:
        try:
            trio.run(lambda: run_worker(control, group, keys=keys))
            return
        except JoinRefused as refused:
            if time.monotonic() > deadline:
                log.error("ray_worker_refused", group=group, error=str(refused))
                os._exit(1)
            time.sleep(1.0)
        except BaseException:
            log.exception("ray_worker_failed", group=group)
            os._exit(1)
