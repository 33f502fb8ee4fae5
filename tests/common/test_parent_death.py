"""A child of ours ends with its parent: at once when the parent was gone before the child looked, within a second of
a parent killed outright; a process started by hand is left alone. (Every kind of child, end to end:
tests/executor/test_clean_deaths.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sagellm.common.parent_death import EXIT_CODE, PARENT_PID_ENV, env_for_child
from sagellm.common.processes import alive

CHILD = (
    "import os, time\n"
    "from sagellm.common.parent_death import PARENT_PID_ENV, exit_with_parent\n"
    "exit_with_parent(lambda: print('cleaned up', flush=True))\n"
    "print('watching' if PARENT_PID_ENV not in os.environ else 'leaked', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_child_whose_parent_is_already_gone_exits_at_once() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    env = {**os.environ, PARENT_PID_ENV: str(gone.pid)}  # a parent that died before the child could look
    ran = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == EXIT_CODE and ran.stdout == "cleaned up\n"
    assert f"(pid {gone.pid}) is gone" in ran.stderr


def test_a_process_started_by_hand_is_left_alone() -> None:
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == "watching\n"
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow  # two interpreters
def test_a_grandchild_ends_within_a_second_of_its_parent_killed_outright() -> None:
    parent_code = (
        "import subprocess, sys, time\n"
        "from sagellm.common.parent_death import env_for_child\n"
        f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], env=env_for_child())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert env_for_child({})[PARENT_PID_ENV] == str(os.getpid())
    time.sleep(0.5)  # the child is watching
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    while alive(child) and time.monotonic() - killed < 10:
        time.sleep(0.01)
    assert not alive(child) and time.monotonic() - killed < 1.0
