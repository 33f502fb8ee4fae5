"""A child of ours ends with the process that started it, however that one ended (kill -9 included).

A pipeline worker, an API server and a parallel rank serve only their parent (the run, the gateway, rank 0's
engine): once it is gone they must not hold ports, memory, devices and socket files until a heartbeat times out. The
parent puts its pid in the child's environment (`env_for_child`); the child calls `exit_with_parent` first thing in
its main. A parent that died before the child could look (its pid is no longer the child's parent) ends the child at
once; otherwise a daemon thread waits on the parent, through a pidfd, readable the moment the parent exits (Linux 5.3+;
elsewhere the parent pid is polled every `POLL_S`), and ends the child.

Why not prctl(PR_SET_PDEATHSIG): its "parent" is the thread that forked, not the process, and trio forks from its
thread cache, whose idle threads exit after 10 s: the signal kills such a child 10 s after it starts, its parent
alive (measured). A worker on another host or a Ray node has no parent here (none is in its environment): the
heartbeat on its link (`peer_monitor`) finds a run that went away, after the peer timeout."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Mapping

PARENT_PID_ENV = "SAGELLM_PARENT_PID"
POLL_S = 0.25  # how often the parent pid is read where no pidfd waits on it (and a pidfd's backstop)
EXIT_CODE = 1
_parent: int | None = None  # the parent this process ends with, once `exit_with_parent` found one


def env_for_child(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that is to end with this process: `env` (default: this process's) with this
    process's pid."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def exit_with_parent(on_exit: Callable[[], object] | None = None) -> None:
    """Ends this process (`EXIT_CODE`) as soon as the parent named in its environment is gone, having called `on_exit`
    (to remove what the parent no longer can). A process started by hand (no parent named) is left alone. The name
    is taken out of the environment, so this process's own children do not inherit it."""
    global _parent
    named = os.environ.pop(PARENT_PID_ENV, "")
    if not named.isdigit():
        return
    parent = _parent = int(named)
    pidfd = _pidfd(parent)  # before the check below: once it passes, the pidfd is of the parent itself, not a reuse
    if os.getppid() != parent:
        _exit(parent, on_exit)
    threading.Thread(target=_watch, args=(parent, pidfd, on_exit), name="parent-death", daemon=True).start()


def parent() -> int | None:
    """The pid of the parent this process ends with; None for a process started by hand (or not watching)."""
    return _parent


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or the process is gone already
        return None


def _watch(parent: int, pidfd: int | None, on_exit: Callable[[], object] | None) -> None:
    while os.getppid() == parent:
        if pidfd is None:
            time.sleep(POLL_S)
        elif select.select([pidfd], [], [], POLL_S)[0]:
            break
    _exit(parent, on_exit)


def _exit(parent: int, on_exit: Callable[[], object] | None) -> None:
    """Ends this process at once: no interpreter teardown, whatever the main thread is doing (it may be a model's
    step); a line on stderr (written directly: a logger's lock may be held by the thread this one ends) says why."""
    os.write(2, f"sagellm: pid {os.getpid()} exits: the process that started it (pid {parent}) is gone\n".encode())
    if on_exit is not None:
        with contextlib.suppress(Exception):
            on_exit()
    os._exit(EXIT_CODE)
