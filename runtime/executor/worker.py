"""The main of a worker process: runs one process group of a pipeline graph and links it to the others over ZeroMQ.

    python -m sagellm.runtime.executor.worker --graph GRAPH.yaml --group NAME --control ENDPOINT

Startup handshake: bind this group's PULL socket, open the operators (engines load their models), announce Ready
with the endpoint on the parent's control socket, then wait for the parent's Ready carrying every group's
endpoint. While running, a Heartbeat on the control socket carries this group's engine stats and the requests it
holds, which is how the parent routes by load and knows what to fail if this process dies. The worker exits by
itself when its inputs end (clean: it says `End` on the control socket first) or when its parent is gone."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

import trio
import zmq

from sagellm.logging import configure_logging
from sagellm.operators.base import StepOperator
from sagellm.runtime.comm import wire
from sagellm.runtime.comm.zmq_trio import announce_ready, bind_pull, connect_push, heartbeat_loop
from sagellm.runtime.executor.bridge import MAIN, Bridge, groups_of
from sagellm.runtime.executor.local import LocalExecutor, instances_of
from sagellm.runtime.pipeline.yaml_io import load_pipeline

HEARTBEAT_S = 0.5
REQUESTS_KEY = "_requests"  # heartbeat stats entry listing the request ids this process holds


def stats_of(executor: LocalExecutor) -> dict[str, dict[str, Any]]:
    """This process's engine stats and held requests, for a Heartbeat."""
    local = executor.operators
    stats = {name: dataclasses.asdict(s) for name, s in executor.instances.items() if name in local}
    held = [rid for op in executor.operators.values() if isinstance(op, StepOperator) for rid in op.in_flight()]
    stats[REQUESTS_KEY] = {"ids": held}
    return stats


async def run_worker(graph_path: str, group: str, control: str) -> None:
    graph = load_pipeline(graph_path)
    nodes = [node for node, g in groups_of(graph).items() if g == group]
    executor = LocalExecutor(graph, nodes=nodes, instances=instances_of(graph))
    zctx = zmq.Context()
    parent = os.getppid()
    try:
        with connect_push(zctx, control) as ctrl:
            data, endpoint = bind_pull(zctx, graph.attrs.get("transport", "ipc"), group)
            with data:
                await executor.open_operators()
                await announce_ready(ctrl, group, {"endpoint": endpoint})
                start = await data.receive()
                if not isinstance(start, wire.Ready) or start.node != MAIN:
                    raise RuntimeError(f"worker {group}: expected the parent's Ready, got {start!r}")
                bridge = Bridge(executor, group, zctx)
                bridge.connect(start.info["peers"])
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(heartbeat_loop, ctrl, group, HEARTBEAT_S, lambda: stats_of(executor))
                    nursery.start_soon(_exit_with_parent, parent)
                    bridge.nursery = nursery
                    bridge.open_inbound()
                    nursery.start_soon(bridge.receive_loop, data)
                    await executor.run()
                    await ctrl.send(wire.End(node=group))
                    nursery.cancel_scope.cancel()
                bridge.close()
    finally:
        zctx.term()


async def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (reparented) has no one to serve: it stops instead of lingering."""
    while os.getppid() == parent:
        await trio.sleep(1.0)
    os._exit(3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sagellm-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--graph", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--control", required=True)
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("SAGELLM_LOG_LEVEL", "warning"))
    trio.run(run_worker, args.graph, args.group, args.control)


if __name__ == "__main__":
    main()
