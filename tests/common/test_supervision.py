"""The one supervision loop, over real child processes: a first life that fails is final, a life lost after serving
is followed by another after the backoff, a failed restart counts as an attempt, a crash loop is given up, a stop
ends the life gracefully and starts none, `no_more_lives` cuts a restart under way."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from sagellm.common.errors import StartFailed
from sagellm.common.restart import RestartPolicy
from sagellm.common.supervision import FAILED, READY, STOPPED, Supervision, end_process, exit_cause

FAST = RestartPolicy(backoff_base_s=0.05, backoff_cap_s=0.2, jitter=0, max_restart_attempts=3)

# A child that is ready once it writes its pid to the file it is given, after `delay` seconds; `exit` makes it exit
# with that code at once instead (before it is ready). On SIGTERM it exits 0.
CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
path, delay, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
if code:
    sys.exit(code)
time.sleep(delay)
open(path + ".tmp", "w").write(str(os.getpid()))
os.replace(path + ".tmp", path)
time.sleep(600)
"""


class Child:
    """A supervised child process whose lives follow `plan`: one (delay, exit code) per life, the last repeated."""

    def __init__(self, folder: Path, plan: list[tuple[float, int]]) -> None:
        self.name, self.folder, self.plan = "child", folder, plan
        self.process: trio.Process | None = None
        self.events: list[str] = []
        self.started = 0

    @property
    def ready_file(self) -> Path:
        return self.folder / f"ready-{self.started}"

    async def start(self) -> None:
        delay, code = self.plan[min(self.started, len(self.plan) - 1)]
        self.started += 1
        args = [sys.executable, "-c", CHILD, str(self.ready_file), str(delay), str(code)]
        self.process = await trio.lowlevel.open_process(args)

    async def until_ready(self) -> None:
        assert self.process is not None
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                raise StartFailed(f"the child {exit_cause(self.process.returncode)} before it was ready")
            await trio.sleep(0.02)

    async def until_lost(self) -> str:
        assert self.process is not None
        return exit_cause(await self.process.wait())

    async def end(self, graceful: bool) -> None:
        await end_process(self.process, graceful, grace_s=5)

    async def on_ready(self, life: int) -> None:
        self.events.append(f"ready {life}")

    def on_restarting(self, cause: str, attempt: int, delay_s: float) -> None:
        self.events.append(f"restarting {attempt}: {cause}")

    def on_given_up(self, cause: str) -> None:
        self.events.append(f"given up: {cause}")

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)


async def _until(condition, timeout_s: float = 30.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(0.02)


async def test_a_first_life_that_fails_before_it_is_ready_is_final(tmp_path):
    child = Child(tmp_path, [(0, 3)])
    supervision = Supervision(child, FAST)
    with pytest.raises(StartFailed, match="exited with code 3 before it was ready"):
        await supervision.run()
    assert child.started == 1 and supervision.state == FAILED and child.events == []


async def test_a_life_lost_after_serving_is_followed_by_another(tmp_path):
    child = Child(tmp_path, [(0, 0)])
    supervision = Supervision(child, FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervision.run)
        first = child.process
        child.kill()
        await _until(lambda: supervision.lives == 2)
        assert child.process is not first and supervision.state == READY and supervision.restarts.total == 1
        assert child.events == ["ready 1", "restarting 1: killed by SIGKILL", "ready 2"]
        await supervision.stop(graceful=True)  # SIGTERM: the child exits 0 by itself
    assert child.process.returncode == 0 and supervision.state == STOPPED and child.started == 2


async def test_failed_restarts_count_as_attempts_until_the_policy_gives_up(tmp_path):
    child = Child(tmp_path, [(0, 0), (0, 7)])  # serves once, then every new life fails before it is ready
    supervision = Supervision(child, FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervision.run)
        child.kill()
    assert supervision.state == FAILED and child.started == 1 + FAST.max_restart_attempts
    assert child.events[1:] == [
        "restarting 1: killed by SIGKILL",
        "restarting 2: the child exited with code 7 before it was ready",
        "restarting 3: the child exited with code 7 before it was ready",
        "given up: the child exited with code 7 before it was ready",
    ]


async def test_a_life_too_slow_to_be_ready_is_ended_and_counted(tmp_path):
    child = Child(tmp_path, [(0, 0), (60, 0)])
    supervision = Supervision(child, RestartPolicy(backoff_base_s=0.05, jitter=0, max_restart_attempts=1),
                              startup_timeout_s=1.0)  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(supervision.run)
        child.kill()
    assert child.events[-1] == "given up: not ready after 1 s" and child.process.returncode == -signal.SIGKILL


async def test_no_more_lives_cuts_a_restart_under_way_and_lets_a_serving_life_run(tmp_path):
    child = Child(tmp_path, [(0, 0), (60, 0)])  # the second life would take a minute to be ready
    supervision = Supervision(child, FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervision.run)
        supervision.no_more_lives()  # serving: it runs on
        await trio.sleep(0.2)
        assert supervision.state == READY and child.process.returncode is None
        child.kill()  # lost now: given up, not restarted
    assert child.started == 1 and child.events[-1] == "given up: killed by SIGKILL"

    child = Child(tmp_path / "b", [(0, 0), (60, 0)])
    child.folder.mkdir()
    supervision = Supervision(child, FAST)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervision.run)
        child.kill()
        await _until(lambda: child.started == 2)
        supervision.no_more_lives()  # the second life is starting: it is ended
    assert supervision.state == FAILED and child.process.returncode == -signal.SIGKILL


async def test_a_stop_before_the_first_life_is_ready_ends_it_quietly(tmp_path):
    child = Child(tmp_path, [(60, 0)])
    supervision = Supervision(child, FAST)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervision.run)
        await _until(lambda: child.process is not None)
        await supervision.stop(graceful=False)
    assert supervision.state == STOPPED and child.process.returncode == -signal.SIGKILL and child.started == 1
