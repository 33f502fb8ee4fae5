"""How sageLLM starts a Python process of its own (a pipeline worker, a managed engine, a background gateway, pip), and
whether a process still runs."""

from __future__ import annotations

import os
import sys


def python_module(module: str, *args: str) -> list[str]:
    """`python -P -m MODULE ARGS` with this interpreter. -P keeps the working directory off `sys.path`, so a
    `sagellm/` folder where the user happens to stand (the parent of a clone, say) cannot stand in for the installed
    package in a process we start. Not -I: that would also drop PYTHONPATH and the user's site-packages, where a
    `pip install --user` or `--target` sageLLM lives, and the child would not find the package its parent runs."""
    return [sys.executable, "-P", "-m", module, *args]


def alive(pid: int) -> bool:
    """Whether process `pid` runs (another user's counts). One that exited and waits for its parent to reap it (a
    zombie: a gateway killed by a shell that has not looked yet) does not: it holds nothing any more."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]  # after the command, which may hold spaces
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill's answer
    return state not in (b"Z", b"X")
