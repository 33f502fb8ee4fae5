"""Running a pipeline graph to completion from synchronous code: `run_pipeline(graph)` picks the local executor, or
the process executor when any node is placed in a process, and stops cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import trio

from sagellm.common.logging import default_logging
from sagellm.common.nursery_errors import single_errors
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.runtime.executor.process import ProcessExecutor


def run_pipeline(graph: Graph, *, on_ready: Callable[[], None] | None = None, **executor_args: Any) -> PipelineResult:
    """Runs a graph to completion (sources exhausted, every request ended) in this process; nodes placed in other
    processes start there (see `sagellm.runtime.executor.process`). `on_ready` is called once every operator is open
    (models loaded, workers joined) and requests start to flow. Ctrl-C or SIGTERM stops it cleanly (workers killed,
    sockets closed) and raises KeyboardInterrupt."""
    default_logging()
    if any(node.placement != "task" for node in graph.nodes.values()):
        return trio.run(_until_interrupted, ProcessExecutor(graph, **executor_args).run, on_ready)
    return trio.run(_until_interrupted, LocalExecutor(graph, **executor_args).run, on_ready)


async def _until_interrupted(run: Callable[..., Any], on_ready: Callable[[], None] | None) -> Any:
    """Runs `run()` until it returns or a SIGINT/SIGTERM arrives. A signal cancels it: trio would otherwise raise
    KeyboardInterrupt only at the main task's next checkpoint, which a main task waiting on its nursery never
    reaches."""
    result, interrupted = None, False

    async def watch(nursery: trio.Nursery) -> None:
        nonlocal interrupted
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                interrupted = True
                nursery.cancel_scope.cancel()
                return

    async def running(task_status: trio.TaskStatus) -> None:
        nonlocal result
        result = await run(task_status=task_status)

    with single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery)
            async with trio.open_nursery() as graph:
                await graph.start(running)
                if on_ready is not None:
                    on_ready()
            nursery.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt
    return result
