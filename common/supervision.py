"""One way to keep a process of ours alive, whatever it runs (a pipeline worker, an API server, a managed engine):
start it, wait until it is ready, watch it until it is lost, and start it again under the one `RestartPolicy`; end
it on request.

The rules are the same for every kind of process:
- A first life that fails before it is ready is final (`StartFailed`): a bad model, port or command does not heal by
  retrying, and the user hears of it at once, with the cause.
- A life lost after it served is followed by another after the policy's backoff. A new life that fails before it is
  ready counts as one more attempt, so the next backs off further, until the policy gives up.
- `stop` ends the current life and starts no other; `no_more_lives` lets a serving life run on but starts no other
  (a run that is ending).

What start, ready and lost mean is the kind's own (`Supervised`): a child's exit or a health check, a worker's
silence on the control socket, an API server that attached."""

from __future__ import annotations

import math
import random
import signal
from typing import Any, Protocol

import structlog
import trio

from sagellm.common.errors import StartFailed
from sagellm.common.pulse import Pulse
from sagellm.common.restart import RestartPolicy, Restarts

log = structlog.get_logger("sagellm.supervision")

STARTING, READY, RESTARTING, FAILED, STOPPED = "starting", "ready", "restarting", "failed", "stopped"


class Supervised(Protocol):
    """One process kept alive, as its supervisor sees it. Every method is called from the supervision's task. The
    three hooks (`on_...`) do nothing here: a kind that subclasses this overrides those it needs."""

    name: str  # who it is, in logs

    async def start(self) -> None:
        """Begins a new life (spawns the process); raises StartFailed or OSError when it cannot."""

    async def until_ready(self) -> None:
        """Returns once the new life serves; raises StartFailed when it ended first."""

    async def until_lost(self) -> str:
        """Returns, once the serving life is lost, why (one line)."""

    async def end(self, graceful: bool) -> None:
        """Ends the current life if it runs: `graceful` lets it finish what it holds first (SIGTERM, then a kill
        after a grace period); otherwise at once."""

    async def on_ready(self, life: int) -> None:
        """A life is ready (`life` 1 for the first)."""

    def on_restarting(self, cause: str, attempt: int, delay_s: float) -> None:
        """A life was lost (or failed to start): the next starts in `delay_s` (attempt `attempt` in a row)."""

    def on_given_up(self, cause: str) -> None:
        """No life will follow: the policy gave up, or no more lives were wanted while none served."""


class Supervision:
    """Keeps one `Supervised` alive under a policy; `state`, `restarts.total` and `cause` are what status pages show,
    and `changed` wakes whoever mirrors them as they change (no status page polls)."""

    def __init__(
        self,
        unit: Supervised,
        policy: RestartPolicy,
        *,
        startup_timeout_s: float = math.inf,
        rng: random.Random | None = None,
    ) -> None:
        """`startup_timeout_s`: how long a life may take to be ready (a first-run download, a model's load)."""
        self.unit, self.policy, self.startup_timeout_s = unit, policy, startup_timeout_s
        self.restarts = Restarts(policy, rng)
        self.changed = Pulse()  # fired by each move of `state` (`restarts` and `cause` change along with one)
        self.state = STARTING
        self.cause = ""  # why the last life ended (or failed to start)
        self.lives = 0  # lives that became ready
        self._stopped = False  # `stop`: end the life, start none
        self._final = False  # `no_more_lives`: start none
        self._between = trio.CancelScope()  # the backoff and start of the next life, which `no_more_lives` cuts

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self.changed.fire()

    async def run(self, *, ready: bool = False, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Keeps the unit alive until `stop`, `no_more_lives` or the policy gives up; `task_status.started()` once
        the first life is ready. `ready`: that life was started and is ready already (a caller that starts several
        together). Raises StartFailed when the first life fails before it is ready."""
        try:
            await self._run(ready, task_status)
        finally:  # returned, failed or cancelled (its owner is going away): nothing it started is left running
            with trio.CancelScope(shield=True):
                await self.unit.end(graceful=False)

    async def _run(self, ready: bool, task_status: trio.TaskStatus) -> None:
        if not ready:
            cause = await self._new_life()
            if cause is not None:
                self.state, self.cause = (STOPPED if self._stopped else FAILED), cause
                if self._stopped:
                    return
                raise StartFailed(cause)
        task_status.started()
        while True:
            self.state, self.lives = READY, self.lives + 1
            self.restarts.started(trio.current_time())
            await self.unit.on_ready(self.lives)
            self.cause = await self.unit.until_lost()
            if await self._restarted() is False:
                return

    async def _restarted(self) -> bool:
        """Starts lives until one is ready (True) or none may be (False: given up or stopped)."""
        while True:
            if self._stopped:
                self.state = STOPPED
                return False
            delay = None if self._final else self.restarts.next_delay(trio.current_time())
            if delay is None:
                self._give_up()
                return False
            self.state = RESTARTING
            log.warning("restarting", unit=self.unit.name, cause=self.cause, attempt=self.restarts.attempts,
                        delay_s=round(delay, 2))  # fmt: skip
            self.unit.on_restarting(self.cause, self.restarts.attempts, delay)
            self._between = trio.CancelScope()  # (no checkpoint since `_final` was read: no cut is missed)
            with self._between:
                await trio.sleep(delay)
                cause = await self._new_life()
                if cause is None:
                    return True
                self.cause = cause
            if self._between.cancelled_caught:  # no more lives wanted meanwhile
                await self.unit.end(graceful=False)

    async def _new_life(self) -> str | None:
        """Starts a life and waits until it is ready: None then, else why it failed (having ended it)."""
        self.state = STARTING
        try:
            await self.unit.start()
            if self._stopped:  # stopped while it was being started, before there was a life to end
                raise StartFailed("stopped while starting")
            with trio.fail_after(self.startup_timeout_s):
                await self.unit.until_ready()
            return None
        except trio.TooSlowError:
            cause = f"not ready after {self.startup_timeout_s:g} s"
        except (StartFailed, OSError) as error:
            cause = str(error)
        await self.unit.end(graceful=False)
        return cause

    def _give_up(self) -> None:
        self.state = FAILED
        log.error("given_up", unit=self.unit.name, cause=self.cause, attempts=self.restarts.attempts)
        self.unit.on_given_up(self.cause)

    def no_more_lives(self) -> None:
        """Starts no other life: one serving now runs on (and is given up when lost), one starting is ended."""
        self._final = True
        if self.state != READY:
            self._between.cancel()

    async def stop(self, graceful: bool = True) -> None:
        """Ends the unit for good: the current life (see `Supervised.end`), and any restart under way."""
        self._stopped = self._final = True
        self._between.cancel()
        await self.unit.end(graceful)


async def end_process(process: Any, graceful: bool, grace_s: float) -> None:
    """Ends a child (a `trio.Process` or a `RayProcess`): SIGTERM and `grace_s` to finish what it holds, then
    SIGKILL; at once without `graceful`. Returns once it is gone."""
    if process is None or process.returncode is not None:
        return
    if graceful:
        process.terminate()
        with trio.move_on_after(grace_s):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


def exit_cause(code: int) -> str:
    """Why a child ended, in words: `killed by SIGKILL` or `exited with code 2`."""
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
