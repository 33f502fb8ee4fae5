"""A pipeline worker group's process as the one supervision loop sees it (`common.supervision`).

A worker this process starts (here, or on a Ray node) is started again by it. A remote one, started by hand on its
host, is the user's to start again: its group's slot reopens at once, as often as it is lost, and the run waits for it
(printing the command); only `auto_restart: false` gives it up."""

from __future__ import annotations

import math
import sys
from typing import Protocol

import structlog
import trio

from sagellm.common.errors import StartFailed
from sagellm.common.flag import Flag
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import Supervised
from sagellm.runtime.comm import wire
from sagellm.runtime.executor.control import ControlServer

log = structlog.get_logger("sagellm.process_executor")


class Workers(Protocol):
    """What a worker's life needs of the process executor that runs the workers."""

    control: ControlServer
    remote: list[str]  # groups this process does not start
    startup_timeout_s: float
    failures: dict[str, wire.End]  # the error a group's worker said it failed on

    async def spawn(self, nursery: trio.Nursery, group: str) -> None: ...
    def worker_command(self, group: str) -> str: ...
    def kill(self, group: str) -> None: ...
    async def rejoin(self, group: str) -> None: ...
    def give_up(self, nursery: trio.Nursery, group: str) -> None: ...


class WorkerLife(Supervised):
    """One worker group's process: ready once its worker joined and bound its data socket, lost when the executor
    finds it exited or silent (`lose`)."""

    def __init__(self, executor: Workers, nursery: trio.Nursery, group: str) -> None:
        self.executor, self.nursery, self.group = executor, nursery, group
        self.name = executor.control.name(group)
        self.remote = group in executor.remote
        self.startup_timeout_s = math.inf if self.remote else executor.startup_timeout_s  # a remote one: until it comes
        self._lost, self._cause = Flag(), ""  # set by `lose`, kept until `until_lost` takes it

    def policy(self, policy: RestartPolicy) -> RestartPolicy:
        """The graph's policy for a worker of ours; for a remote one, its slot reopens at once and always (the
        backoff is whoever starts it again's)."""
        if not self.remote:
            return policy
        return RestartPolicy(auto_restart=policy.auto_restart, max_restart_attempts=2**31, backoff_base_s=1e-3,
                             backoff_cap_s=1e-3, jitter=0)  # fmt: skip

    def lose(self, cause: str) -> None:
        """The executor found the serving worker lost (exited, or silent for the peer timeout)."""
        self._cause = cause
        self._lost.set()

    async def start(self) -> None:
        executor, group = self.executor, self.group
        executor.control.reopen(group)  # its next Hello is taken as a first one was
        if self.remote:
            print(f"sagellm: {self.name} was lost; to bring it back, on its host run: {executor.worker_command(group)}",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            await executor.spawn(self.nursery, group)

    async def until_ready(self) -> None:
        control = self.executor.control
        while self.group not in control.endpoints:
            if self.group in control.gone:  # it failed before it was ready
                if not self.remote:
                    told = self.executor.failures.get(self.group)
                    raise StartFailed(f"{self.name} failed before it was ready" + (f": {told.error}" if told else ""))
                control.reopen(self.group)  # a remote slot opens again for the next try
            await control.wait_changed()

    async def until_lost(self) -> str:
        await self._lost.take()
        return self._cause

    async def end(self, graceful: bool) -> None:
        """A worker of ours is killed (a stopped or hung one never ends itself); any is told to stop and ignored."""
        self.executor.kill(self.group)
        self.executor.control.end(self.group)

    async def on_ready(self, life: int) -> None:
        if life > 1:
            await self.executor.rejoin(self.group)

    def on_given_up(self, cause: str) -> None:
        self.executor.kill(self.group)
        self.executor.control.end(self.group)
        self.executor.give_up(self.nursery, self.group)
