"""The gateway's work that outlives the request that asked for it (a batch, a background response): each task
runs in one nursery the gateway starts, can be cancelled by its key, and stops where it is when the gateway
stops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class BackgroundTasks:
    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}
        self._stopped = trio.CancelScope()

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Holds the tasks until `stop`."""
        with self._stopped:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()

    def start(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Runs `work()` as the task `key`; a failure of its own is its to handle (one raised here stops the
        gateway)."""
        if self._nursery is None:
            raise RuntimeError("the gateway's background tasks are not running")
        self._scopes[key] = scope = trio.CancelScope()  # cancellable from now, before the task first runs
        self._nursery.start_soon(self._run, key, work, scope)

    def running(self, key: str) -> bool:
        return key in self._scopes

    def cancel(self, key: str) -> bool:
        """Cancels the task `key`; False if none runs."""
        scope = self._scopes.get(key)
        if scope is not None:
            scope.cancel()
        return scope is not None

    async def stop_when(self, stop: trio.Event) -> None:
        """Stops every task where it is once `stop` is set (the gateway stops), before the requests in flight
        drain and the engines refuse new ones."""
        await stop.wait()
        self._stopped.cancel()

    async def _run(self, key: str, work: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        with scope:
            try:
                await work()
            finally:
                del self._scopes[key]
