"""Which CPU cores a process runs on: an engine given its own cores (a prefill and a decode engine side by side, each
rank of a tensor parallel group) keeps its threads there instead of both contending for every core."""

from __future__ import annotations

import os
from pathlib import Path

from sagellm.common.errors import InvalidInput


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which a container or taskset may have narrowed)."""
    return sorted(os.sched_getaffinity(0))


def pin_process(cores: list[int]) -> None:
    """Every thread of this process, and the threads they start later, on `cores` only. Linux applies an affinity
    per thread, so each existing thread is set (torch's and OpenMP's pools inherit from the thread that starts them)."""
    tasks = sorted(Path("/proc/self/task").iterdir(), key=lambda t: t.name != str(os.getpid()))  # the main one first
    for task in tasks:
        try:
            os.sched_setaffinity(int(task.name), cores)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
        except OSError as error:
            raise InvalidInput(
                f"cannot run on cores {cores}: {error.strerror} (this machine has {os.cpu_count()})"
            ) from None
