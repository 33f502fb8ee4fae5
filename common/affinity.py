"""Which CPU cores a process runs on: an engine given its own cores (a prefill and a decode engine side by side, each
rank of a tensor parallel group) keeps its threads there instead of both contending for every core."""

from __future__ import annotations

import math
import os
from pathlib import Path

from sagellm.common.errors import InvalidInput


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity mask, which a container or taskset may have narrowed)."""
    return sorted(os.sched_getaffinity(0))


def default_thread_count() -> int:
    """An engine's threads when nothing names them: OMP_NUM_THREADS where it is set (a whole number, as torch itself
    reads it: the user's or a test runner's share of the machine), else `usable_core_count()`."""
    named = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(named) if named.isdigit() and int(named) > 0 else usable_core_count()


def usable_core_count(cgroup: Path = Path("/sys/fs/cgroup"), cpus: Path = Path("/sys/devices/system/cpu")) -> int:
    """The threads worth running: the physical cores among the usable CPUs (two hyperthreads of one core share its
    arithmetic units, as torch counts), fewer where the process's cgroup grants less CPU time (a container started
    with `--cpus 1.5` on 8 cores gets 2: more threads than that wait for quota in every parallel step)."""
    cores = len({_siblings(cpu, cpus) for cpu in usable_cores()})
    quota = cpu_quota(cgroup)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def _siblings(cpu: int, cpus: Path) -> str:
    """The CPUs sharing `cpu`'s core ("0,64", or "3-4"), or the CPU alone where the kernel does not say."""
    try:
        return (cpus / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
    except OSError:
        return str(cpu)


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU time the cgroup mounted at `cgroup` (a container's own) may use, in cores, or None when unlimited or
    unreadable: cgroup v2's cpu.max ("quota period", "max" for none), or v1's cpu.cfs_quota_us (-1 for none)."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


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
